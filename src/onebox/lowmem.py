"""A low-memory AdamW for training past the memory wall.

Three savings, each optional, composing with activation checkpointing and compile:
- bf16 weights without an fp32 master copy: the update is computed in fp32 and written back with
  stochastic rounding, so updates smaller than half a bf16 step are kept on average instead of lost.
  Vectors (norm scales) stay fp32 with fp32 moments (`keep_vectors_fp32`): near 1.0 a bf16 step is
  0.004-0.008, several times an AdamW update, so rounding noise would outweigh their updates, and
  they are about 0.01% of the parameters;
- bf16 moments (4 bytes per parameter instead of 8), also stochastically rounded, or 8-bit moments
  (blockwise scales, about 2 bytes per parameter for both);
- moments in pinned host memory, copied to the GPU for each parameter's update and back;
and the update of every block parameter runs inside backward, from a hook that fires as soon as
its gradient is complete, so that gradient is freed at once and no full gradient buffer exists.

Gradient clipping inside backward cannot know this step's global norm before the first update, so
each block parameter estimates it: backward completes the gradients in the same order every step,
and what share of the squared norm has arrived by a given parameter changes slowly from step to
step, while the norm's scale changes fast early in training. So the estimate is this step's squared
norm so far divided by the share that had arrived at the same parameter in the previous step; it is
exact when a step's gradients are a scaled copy of the previous step's, and a spike is clipped as
it arrives. (Clipping with the previous step's norm instead trailed torch's AdamW by 3% at 600m-A
after 300 steps on an H100: early, when norms fall fast, every update was scaled too small against
Adam's history.) The very first step only measures: its gradients are dropped
and nothing moves (unclipped, a first gradient many times the clip norm swells the second moment for
a hundred steps). Parameters updated at step() use the step's own norm; with every update at step()
clipping is exact, as in torch.nn.utils.clip_grad_norm_. The arithmetic
follows torch.optim.AdamW (decoupled weight decay, bias correction); with fp32 weights and moments
it matches it (tested).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from onebox.config import TrainConfig
from onebox.distributed import DTensor
from onebox.errors import OneboxError
from onebox.host import pinned_zeros
from onebox.optim import param_groups


def stochastic_round_bf16(x: Tensor) -> Tensor:
    """Round fp32 `x` to bf16 up or down at random, with the probability of each proportional to
    its distance, so the expected value is x (round-to-nearest would lose every update below half
    a bf16 step). Adds uniform noise below the 16 bits bf16 drops, then truncates them."""
    bits = x.view(torch.int32)
    noise = torch.randint_like(bits, 0, 1 << 16)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


class Int8State:
    """An optimizer moment kept in 8 bits: blocks of 256 values, each with an fp32 scale (its absolute
    maximum). The first moment is stored signed (int8); the second, which is non-negative and spans
    many orders of magnitude, as the square root in uint8, so small entries keep more precision.
    Rounding is stochastic, so the moments are right on average, except that a non-zero second moment
    never rounds to zero (that would turn its update into m / eps: training diverged, tests/test_lowmem.py). 1.016 bytes per value instead of 2 (bf16)."""

    BLOCK = 256

    def __init__(self, shape: torch.Size, device: torch.device | str, signed: bool, pin: bool) -> None:
        self.shape, self.numel, self.signed = shape, int(torch.Size(shape).numel()), signed
        blocks = -(-self.numel // self.BLOCK)
        qtype = torch.int8 if signed else torch.uint8
        if pin:
            self.q, self.scale = pinned_zeros((blocks * self.BLOCK,), qtype), pinned_zeros((blocks,), torch.float32)
        else:
            self.q = torch.zeros(blocks * self.BLOCK, dtype=qtype, device=device)
            self.scale = torch.zeros(blocks, dtype=torch.float32, device=device)
        self.levels = 127.0 if signed else 255.0

    def load(self, device: torch.device) -> Tensor:
        """The moment as fp32 on `device`."""
        q = self.q.to(device, non_blocking=True).float().view(-1, self.BLOCK)
        x = q * (self.scale.to(device, non_blocking=True)[:, None] / self.levels)
        if not self.signed:
            x = x.square()
        return x.view(-1)[: self.numel].view(self.shape)

    def store(self, value: Tensor) -> None:
        """Quantise fp32 `value` (any device) into this state."""
        flat = value.reshape(-1)
        flat = torch.nn.functional.pad(flat, (0, self.q.numel() - self.numel)).view(-1, self.BLOCK)
        if not self.signed:
            flat = flat.clamp_min(0).sqrt()
        scale = flat.abs().amax(dim=1).clamp_min(1e-30)
        scaled = flat / scale[:, None] * self.levels
        q = torch.floor(scaled + torch.rand_like(scaled)).clamp(-self.levels if self.signed else 0.0, self.levels)
        if not self.signed:  # a second moment rounded to 0 beside a first moment that is not would divide by eps:
            q = torch.where(
                scaled > 0, q.clamp_min(1.0), q
            )  # the smallest entries keep one level (a smaller step, never a huge one)
        self.q.copy_(q.to(self.q.dtype).view(-1), non_blocking=True)
        self.scale.copy_(scale, non_blocking=True)

    def state(self) -> dict[str, Tensor]:
        return {"q": self.q.cpu(), "scale": self.scale.cpu()}

    def load_state(self, saved: dict[str, Tensor]) -> None:
        self.q.copy_(saved["q"])
        self.scale.copy_(saved["scale"])


def keep_vectors_fp32(model: nn.Module, state: dict[str, Tensor] | None = None) -> nn.Module:
    """Make the model's one-dimensional parameters (norm scales) fp32 in place, with their exact values
    from `state` (a checkpoint's model state) when given; matrices keep their dtype."""
    for name, p in model.named_parameters():
        if p.ndim < 2 and p.dtype != torch.float32:
            p.data = (p.data if state is None else state[name].to(p.device)).float()
    return model


def _local(t: Tensor) -> Tensor:
    """This process's part of a tensor sharded by FSDP2 (a DTensor); the tensor itself otherwise."""
    return t.to_local() if isinstance(t, DTensor) else t


def _like_param(p: Tensor, local: Tensor, shape: torch.Size) -> Tensor:
    """`local` (this process's rows of a tensor of `shape`) sharded like parameter `p`: a DTensor when p is one."""
    if not isinstance(p, DTensor):
        return local
    return DTensor.from_local(
        local,
        p.device_mesh,
        p.placements,
        run_check=False,
        shape=shape,
        stride=torch.empty(shape, device="meta").stride(),
    )


def _load(state: Tensor | Int8State, device: torch.device) -> Tensor:
    """A moment as a fresh fp32 tensor on `device`."""
    if isinstance(state, Int8State):
        return state.load(device)
    return state.to(device, non_blocking=True).float()


def _store(target: Tensor | Int8State, value: Tensor) -> None:
    """Write fp32 `value` into `target` (any dtype, any device), stochastically rounded to bf16 or 8 bits."""
    if isinstance(target, Int8State):
        target.store(value)
        return
    if target.dtype == torch.bfloat16:
        value = stochastic_round_bf16(value)
    target.copy_(value, non_blocking=True)


class LowMemAdamW:
    """AdamW over a model's parameters with the OptimizerSet interface (step, zero_grad, lr factor, state)."""

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        state_dtype: torch.dtype | str = torch.bfloat16,
        offload_state: bool = False,
        in_backward: bool = True,
    ) -> None:
        if in_backward and config.grad_accum > 1:
            raise OneboxError(
                "the update inside backward needs --grad-accum 1 (each backward would update the weights); "
                "raise --batch-size instead, or pick a memory strategy that steps after backward."
            )
        self.betas, self.eps = (config.beta1, config.beta2), config.eps
        self.max_grad_norm = config.grad_clip
        self.param_groups = param_groups(model, config)
        self.steps = 0  # updates made
        self.in_backward = in_backward
        self.offload = offload_state
        self.state: dict[Tensor, dict[str, Tensor]] = {}
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p] = {key: self._new_state(p, state_dtype, key) for key in ("exp_avg", "exp_avg_sq")}
        device = _local(next(model.parameters())).device
        # Under FSDP2 every parameter is a DTensor: each process updates its own shard, with moments of
        # the shard's size; FSDP2 runs the hooks below on each shard's reduce-scattered gradient.
        self._sharded = any(isinstance(p, DTensor) for p in model.parameters())
        self._square_sum = torch.zeros((), device=device)  # this step's squared gradient norm, accumulated
        self._measured = False  # whether a step's norm is known (before that, clipped hooks only measure)
        self._group_of = {p: group for group in self.param_groups for p in group["params"]}
        names = {p: name for name, p in model.named_parameters()}
        # Block parameters are updated in backward; the embedding (used twice when tied: its gradient
        # is complete only at the very end), the final norm and the output layer at step().
        # Under FSDP2 only sharded parameters: FSDP2 runs their hooks once their gradient is reduced; the
        # parameters it leaves whole on every process (shard_model's replicated vectors) wait for step().
        hooked = [p for p in self._group_of if in_backward and names[p].startswith("layers.") and not self._whole(p)]
        self._hooked = {p: i for i, p in enumerate(hooked)}
        # Per hooked parameter: this step's squared norm so far when its hook ran, and the previous
        # step's total over that (the factor from the norm so far to the estimated total).
        self._so_far = torch.zeros(len(hooked), device=device)
        self._scale_up = torch.ones(len(hooked), device=device)
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self._hooked]

    def _whole(self, p: Tensor) -> bool:
        """Left whole on every process in a sharded model (shard_model's replicated vectors): averaged at step()."""
        return self._sharded and not isinstance(p, DTensor)

    def _new_state(self, p: Tensor, dtype: torch.dtype | str, key: str) -> Tensor | Int8State:
        p = _local(p)
        if (
            p.dtype == torch.float32 and p.ndim < 2
        ):  # fp32 vectors (keep_vectors_fp32): fp32 moments beside them, a few KB
            return torch.zeros_like(p)
        pin = self.offload and p.device.type == "cuda"
        if dtype == "int8":
            return Int8State(p.shape, "cpu" if pin else p.device, signed=key == "exp_avg", pin=pin)
        if pin:
            return pinned_zeros(p.shape, dtype)
        return torch.zeros(p.shape, dtype=dtype, device=p.device)

    def _probing(self) -> bool:
        """True on the first step of clipped updates in backward: no norm is known yet to clip with."""
        return bool(self._hooked) and self.max_grad_norm > 0 and not self._measured

    def _hook(self, p: Tensor) -> None:
        i = self._hooked[p]
        self._square_sum += _local(p.grad).float().square().sum()
        self._so_far[i] = self._square_sum
        if not self._probing():  # clip with the estimated total: the norm so far scaled by the previous step's shares
            self._update(p, self.steps + 1, self._clip_factor(self._square_sum * self._scale_up[i]))
        p.grad = None

    @torch.no_grad()
    def _update(self, p: Tensor, step: int, clip: Tensor) -> None:
        group, state = self._group_of[p], self.state[p]
        lr, decay = group["lr"], group["weight_decay"]
        beta1, beta2 = self.betas
        p, grad = _local(p), _local(p.grad).float() * clip
        m, v = (_load(state[key], p.device) for key in ("exp_avg", "exp_avg_sq"))
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (v.sqrt() / (1 - beta2**step) ** 0.5).add_(self.eps)
        weights = p.float()
        weights.mul_(1 - lr * decay).addcdiv_(m, denom, value=-lr / (1 - beta1**step))
        _store(state["exp_avg"], m)
        _store(state["exp_avg_sq"], v)
        _store(p, weights)

    def _unhooked(self) -> list[Tensor]:
        return [p for p in self._group_of if p not in self._hooked and p.grad is not None]

    @torch.no_grad()
    def step(self, max_grad_norm: float | None = None) -> None:
        """Update what backward did not (clipped with this step's norm), and set the clip factor of the next step's hooks."""
        probing = self._probing()
        if max_grad_norm is not None:
            self.max_grad_norm = max_grad_norm
        rest = self._unhooked()
        replicated = [p for p in rest if self._whole(p)]
        for p in rest:
            if not self._whole(p):
                self._square_sum += _local(p.grad).float().square().sum()
        if self._sharded:  # the global norm: every process's shards (the hooks' estimates stay per process)
            dist.all_reduce(self._square_sum)
        if (
            replicated
        ):  # parameters FSDP2 leaves whole on every process (the norm scales): their mean gradient, counted once
            grads = torch.cat([p.grad.float().flatten() for p in replicated])
            dist.all_reduce(grads)
            grads /= dist.get_world_size()
            self._square_sum += grads.square().sum()
            for p, g in zip(replicated, grads.split([p.numel() for p in replicated])):
                p.grad.copy_(g.view_as(p.grad))
        if not probing:
            clip = self._clip_factor(self._square_sum)
            for p in rest:
                self._update(p, self.steps + 1, clip)
            self.steps += 1
        # Next step's estimates; a parameter with no gradient norm before it yet (all zero) is not scaled up.
        self._scale_up = torch.where(self._so_far > 0, self._square_sum / self._so_far.clamp_min(1e-30), 1.0)
        self._so_far.zero_()
        self._measured = True
        self._square_sum.zero_()

    def _clip_factor(self, square_sum: Tensor) -> Tensor:
        if self.max_grad_norm <= 0:
            return torch.ones_like(square_sum)
        return torch.clamp(self.max_grad_norm / (square_sum.sqrt() + 1e-6), max=1.0)

    def zero_grad(self) -> None:
        for p in self._group_of:
            p.grad = None

    def set_lr_factor(self, factor: float) -> None:
        for group in self.param_groups:
            group["lr"] = group["base_lr"] * factor

    def state_dict(self) -> dict[str, Any]:
        """Moments by parameter index (in group order), step count and the shares the next step's clipping estimates with."""
        order = [p for group in self.param_groups for p in group["params"]]
        if self._square_sum.is_cuda:  # moments in pinned host memory may still be arriving from the GPU
            torch.cuda.synchronize(self._square_sum.device)
        return {
            "steps": self.steps,
            "scale_up": self._scale_up.cpu(),
            "measured": self._measured,
            "state": [
                {k: v.state() if isinstance(v, Int8State) else v.cpu() for k, v in self.state[p].items()} for p in order
            ],
        }

    def load_state_dict(self, payload: dict[str, Any]) -> None:
        order = [p for group in self.param_groups for p in group["params"]]
        if not isinstance(payload, dict) or len(payload.get("state", [])) != len(order):
            raise OneboxError(
                "the checkpoint's optimizer state does not match this run's: resume with the same --memory strategy."
            )
        for p, saved in zip(order, payload["state"]):
            for key, value in saved.items():
                target = self.state[p][key]
                if isinstance(target, Int8State) != isinstance(value, dict):
                    raise OneboxError(
                        "the checkpoint's optimizer moments are stored differently (8-bit or not): resume with the same --memory strategy."
                    )
                if isinstance(target, Int8State):
                    target.load_state(value)
                else:
                    target.copy_(value)
        self.steps = payload["steps"]
        if "scale_up" in payload and len(payload["scale_up"]) == len(self._scale_up):
            self._scale_up.copy_(payload["scale_up"])
            self._measured = payload.get("measured", True)
        else:  # saved by an older onebox (which clipped with the previous step's norm): measure again first
            self._measured = False

    def sharded_state(self, model: nn.Module) -> dict[str, Tensor]:
        """The moments for torch.distributed.checkpoint, by parameter name, each with its parameter's
        sharding (a DTensor under FSDP2), so a run saved on N processes resumes on any number. Stored as
        kept: bf16 as bf16; 8-bit as its codes and block scales laid out like the parameter's rows (when a
        row is whole blocks of 256, as in every preset: the blocks then never straddle two processes),
        otherwise as fp32 values. Nothing is gathered: each process writes its own shards."""
        state: dict[str, Tensor] = {"steps": torch.tensor(self.steps)}
        for name, p in model.named_parameters():
            if p not in self.state:
                continue
            for key, value in self.state[p].items():
                for suffix, local, shape in self._stored(p, value):
                    state[f"{name}.{key}{suffix}"] = _like_param(p, local, shape)
        return state

    def load_sharded_state(self, model: nn.Module, state: dict[str, Tensor]) -> None:
        """Restore what sharded_state saved (read back by torch.distributed.checkpoint into templates from
        sharded_state itself). The next step measures the norm again before clipping in backward: the
        clipping estimates are per process and do not survive a change in the number of processes."""
        for name, p in model.named_parameters():
            if p not in self.state:
                continue
            for key, value in self.state[p].items():
                parts = {suffix: _local(state[f"{name}.{key}{suffix}"]) for suffix, _, _ in self._stored(p, value)}
                if isinstance(value, Int8State) and ".q" in parts:
                    value.q.copy_(parts[".q"].reshape(-1))
                    value.scale.copy_(parts[".scale"].reshape(-1))
                else:
                    _store(value, parts[""].to(_local(p).device).float())
        self.steps = int(state["steps"])
        self._measured = False

    @staticmethod
    def _stored(p: Tensor, value: Tensor | Int8State) -> list[tuple[str, Tensor, torch.Size]]:
        """How one moment is stored in a sharded checkpoint: (key suffix, local tensor, global shape) triples."""
        local = _local(p)
        if isinstance(value, Int8State):
            if p.ndim == 2 and p.shape[1] % Int8State.BLOCK == 0:
                rows, blocks = local.shape[0], p.shape[1] // Int8State.BLOCK
                return [
                    (".q", value.q.view(rows, p.shape[1]), p.shape),
                    (".scale", value.scale.view(rows, blocks), torch.Size((p.shape[0], blocks))),
                ]
            return [("", value.load(local.device), p.shape)]
        return [("", value, p.shape)]
