"""A mixture of experts beyond device memory: everything but the experts stays on the device, the experts
live in host memory (pinned on a GPU machine) or in the model's safetensors files, and a device cache of
`slots` experts holds the ones in use.

The cache is least-recently-used: a decode step routes each token to top-k experts per layer, and the
next token's choices overlap the last ones' far more than a uniform draw would (on trained models), which
recency captures with O(1) bookkeeping; a frequency count would need a history that random weights (near
uniform routing, the hardest case) make meaningless. Hits, misses and the bytes copied in are counted.
With `prefetch`, each layer also asks the next layer's router which experts the current input would pick,
and loads those ahead (the residual stream changes little from one layer to the next, so the guess is
often right); a prefetch never changes a result, only when the copy happens. On a GPU the prefetch copies
run on their own CUDA stream, issued before the current layer's experts compute so the two overlap; a
slot is read only after its copy's event, and overwritten only after the work queued before the copy.

Cold experts (not on the device) may instead be computed where they are, on the host's cores, as Fiddler
and ktransformers do: for a token or a few, multiplying them in host memory reads the same bytes a copy
would move, without the copy. `cold="host"` always does so, `"auto"` measures at start which is faster
per number of rows (one expert copied against one computed on the host for 1 and 8 rows) and chooses
per expert and step; `"copy"` (the default) always copies.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from onebox.config import ModelConfig
from onebox.errors import OneboxError
from onebox.infer.kernels.experts import moe_decode
from onebox.infer.kernels.launch import available
from onebox.moe import MoE

COLD_CHOICES = ("copy", "host", "auto")
Source = Callable[[int, int], tuple[Tensor, Tensor]]  # (layer, expert) -> (gate_up (2I, D), down (D, I)) on the host


class ExpertCache:
    """`slots` experts on the device, by (layer, expert), least recently used out."""

    def __init__(
        self,
        slots: int,
        gate_up: torch.Size,
        down: torch.Size,
        dtype: torch.dtype,
        device: torch.device,
        source: Source,
    ) -> None:
        if slots < 1:
            raise ValueError("an expert cache needs at least one slot")
        self.gate_up = torch.empty((slots, *gate_up), dtype=dtype, device=device)
        self.down = torch.empty((slots, *down), dtype=dtype, device=device)
        self.source, self.slots = source, slots
        self.where: collections.OrderedDict[tuple[int, int], int] = collections.OrderedDict()
        self.hits = self.misses = self.prefetched = self.bytes_in = self.computed_on_host = 0
        self.tier = "host"  # where the experts come from (offload_experts sets it)
        self.cold = "copy"  # what to do with an expert not on the device: copy it, or compute it on the host
        self.host_seconds: tuple[float, float] | None = None  # auto: host compute of one expert at 1 and 8 rows
        self.copy_seconds: float | None = None  # auto: copy of one expert to the device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None  # the prefetch copies' own
        self.ready: dict[int, torch.cuda.Event] = {}  # slot -> the event its side-stream copy records

    @property
    def hit_rate(self) -> float | None:
        asked = self.hits + self.misses
        return self.hits / asked if asked else None

    def _load(self, key: tuple[int, int], keep: set[tuple[int, int]], side: bool = False) -> int | None:
        if len(self.where) < self.slots:
            slot = len(self.where)
        else:  # the least recently used expert that this call does not need
            victim = next((k for k in self.where if k not in keep), None)
            if victim is None:
                return None
            slot = self.where.pop(victim)
        gate_up, down = self.source(*key)
        if side and self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))  # the slot's last readers first
            with torch.cuda.stream(self.stream):
                self._copy(slot, gate_up, down)
                self.ready[slot] = torch.cuda.Event()
                self.ready[slot].record(self.stream)
        else:
            self._wait(slot)  # a side-stream copy still in flight into this slot lands first
            self._copy(slot, gate_up, down)
        self.bytes_in += gate_up.numel() * gate_up.element_size() + down.numel() * down.element_size()
        self.where[key] = slot
        return slot

    def _copy(self, slot: int, gate_up: Tensor, down: Tensor) -> None:
        self.gate_up[slot].copy_(gate_up, non_blocking=True)
        self.down[slot].copy_(down, non_blocking=True)

    def _wait(self, slot: int) -> int:
        """The slot, once a side-stream copy into it has landed (the current stream waits on its event)."""
        event = self.ready.pop(slot, None)
        if event is not None:
            torch.cuda.current_stream(self.stream.device).wait_event(event)
        return slot

    def slots_for(self, layer: int, experts: list[int]) -> list[int]:
        """The slots holding these experts of `layer` (at most `slots` of them), loading the missing ones."""
        keys = [(layer, e) for e in experts]
        keep = set(keys)
        out = []
        for key in keys:
            if key in self.where:
                self.hits += 1
                self.where.move_to_end(key)
                out.append(self._wait(self.where[key]))
            else:
                self.misses += 1
                out.append(self._load(key, keep))
        return out

    def on_host(self, layer: int, expert: int, rows: int) -> bool:
        """Whether this expert, for `rows` tokens, is computed on the host rather than copied (never when it is
        on the device already)."""
        if self.cold == "copy" or (layer, expert) in self.where:
            return False
        if self.cold == "host":
            return True
        one, eight = self.host_seconds  # measured by calibrate when the cache was made
        return one + (eight - one) * (rows - 1) / 7 < self.copy_seconds

    def calibrate(self, repeats: int = 3) -> None:
        """Time one expert copied to the device and computed on the host for 1 and 8 rows (medians); before the
        cache holds anything (its slot 0 is written)."""
        gate_up, down = self.source(0, 0)

        def median(fn: Callable[[], object]) -> float:
            times = []
            for _ in range(repeats + 1):
                start = time.perf_counter()
                fn()
                if self.gate_up.device.type == "cuda":
                    torch.cuda.synchronize(self.gate_up.device)
                times.append(time.perf_counter() - start)
            return sorted(times[1:])[repeats // 2]

        def copy() -> None:
            self.gate_up[0].copy_(gate_up, non_blocking=True)  # slot 0 is overwritten by its next load anyway
            self.down[0].copy_(down, non_blocking=True)

        self.copy_seconds = median(copy)
        rows = [torch.randn(n, gate_up.shape[1], dtype=gate_up.dtype) for n in (1, 8)]
        self.host_seconds = tuple(median(lambda x=x: host_expert(x, gate_up, down)) for x in rows)

    def prefetch(self, layer: int, experts: list[int], keep: set[tuple[int, int]] = frozenset()) -> None:
        """Load these experts of `layer` ahead on the side stream, where they are not resident and a slot not in
        `keep` (experts still to be used) can take them; not counted as hits or misses."""
        for e in experts[: self.slots]:
            if (layer, e) not in self.where:
                if self._load((layer, e), set(keep), side=True) is None:
                    return
                self.prefetched += 1


class OffloadedMoE(nn.Module):
    """A block's MoE whose experts come through the cache: the router stays on the device."""

    def __init__(self, moe: MoE, layer: int, cache: ExpertCache, next_router: nn.Linear | None = None) -> None:
        super().__init__()
        self.router, self.top_k, self.normalise = moe.router, moe.top_k, moe.normalise
        self.layer, self.cache, self.next_router = layer, cache, next_router

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        chosen, weights = MoE.route(self, flat)
        guess, picks = None, chosen.reshape(-1)
        if self.next_router is not None:  # the next layer's likely experts, from this layer's input
            ahead = torch.topk(self.next_router(flat).float(), self.top_k, dim=-1).indices.reshape(-1)
            picks = torch.cat([picks, ahead.to(picks.dtype)])
        picks = picks.tolist()  # the one wait on the device in a decode step's layer
        needed = sorted(set(picks[: chosen.numel()]))
        if self.next_router is not None:
            guess = sorted(set(picks[chosen.numel() :]))
        out = torch.zeros_like(flat)
        distinct = len(needed)
        if self.cache.cold != "copy":
            counts = collections.Counter(picks[: chosen.numel()])  # rows per expert
            cold = [e for e in needed if self.cache.on_host(self.layer, e, counts[e])]
            needed = [e for e in needed if e not in cold]
            for expert in cold:
                gate_up, down = self.cache.source(self.layer, expert)
                tokens, pick = (chosen == expert).nonzero(as_tuple=True)
                y = host_expert(flat[tokens].to(gate_up.device, gate_up.dtype), gate_up, down)
                out.index_add_(0, tokens, y.to(flat.device, flat.dtype) * weights[tokens, pick, None])
                self.cache.computed_on_host += 1
        for start in range(0, len(needed), self.cache.slots):  # no more experts at once than the cache holds
            group = needed[start : start + self.cache.slots]
            slots = self.cache.slots_for(self.layer, group)
            if guess is not None and start + self.cache.slots >= len(needed):  # overlaps the last group's compute
                self.cache.prefetch(self.layer + 1, guess, keep={(self.layer, e) for e in group})
            if len(group) == distinct and few_rows(flat, chosen, self.router.weight.shape[0]):
                lookup = torch.zeros(self.router.weight.shape[0], dtype=torch.int32)
                lookup[group] = torch.tensor(slots, dtype=torch.int32)  # expert -> its slot, for the kernel's index
                index = lookup.to(flat.device, non_blocking=True)[chosen]
                return moe_decode(flat, self.cache.gate_up, self.cache.down, index, weights).reshape(shape)
            for expert, slot in zip(group, slots):
                tokens, pick = (chosen == expert).nonzero(as_tuple=True)
                gate, up = F.linear(flat[tokens], self.cache.gate_up[slot]).chunk(2, dim=-1)
                y = F.linear(F.silu(gate) * up, self.cache.down[slot])
                out.index_add_(0, tokens, y * weights[tokens, pick, None])
        return out.reshape(shape)


def few_rows(x: Tensor, chosen: Tensor, experts: int) -> bool:
    """Whether a step's experts, all in the cache, go through the expert kernel at once: a decode step (pairs at
    most the experts of a layer) on CUDA in half or bf16."""
    return chosen.numel() <= experts and available(x.device) and x.dtype in (torch.bfloat16, torch.float16)


def host_expert(x: Tensor, gate_up: Tensor, down: Tensor) -> Tensor:
    """One SwiGLU expert on rows x (N, dim) where its weights are (the host's cores, for a cold expert)."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down)


def host_source(model: nn.Module, pin: bool) -> Source:
    """Every layer's experts moved to host memory (pinned for fast copies to a GPU), read from there; experts
    already there (and pinned) are kept where they are, not copied."""
    store = []
    for block in model.layers:
        moe = block.mlp
        gate_up, down = (t.detach().to("cpu") for t in (moe.gate_up, moe.down))
        store.append((gate_up.pin_memory() if pin else gate_up, down.pin_memory() if pin else down))
    return lambda layer, expert: (store[layer][0][expert], store[layer][1][expert])


def disk_source(folder: str | Path, model: nn.Module) -> Source:
    """Each expert read from the model's safetensors files when it is needed (memory-mapped, one expert)."""
    from onebox.export import SafetensorsState
    from onebox.families import hf_names

    state = SafetensorsState(Path(folder), model.config)
    config = model.config

    def read(layer: int, expert: int) -> tuple[Tensor, Tensor]:
        names = hf_names(f"layers.{layer}.mlp.gate_up", config)[2 * expert : 2 * expert + 2]
        names.append(hf_names(f"layers.{layer}.mlp.down", config)[expert])
        gate, up, down = state.read(names)
        dtype = model.layers[layer].mlp.router.weight.dtype
        return torch.cat([gate, up]).to(dtype), down.to(dtype)

    return read


def offload_experts(
    model: nn.Module,
    slots: int,
    folder: str | Path | None = None,
    prefetch: bool = False,
    device: torch.device | str | None = None,
    cold: str = "copy",
) -> ExpertCache:
    """Replace every block's MoE by an OffloadedMoE sharing one cache of `slots` experts on `device` (default: the
    model's), in place; the experts come from host memory, or with `folder` from its files (then the model's own
    expert tensors are dropped). Move the rest of the model to `device` afterwards (`model.to(device)`).
    `cold`: copy, host or auto (see the module's docstring)."""
    if cold not in COLD_CHOICES:
        raise OneboxError(f"--cold-experts {cold!r}: choose one of {', '.join(COLD_CHOICES)}.")
    first = model.layers[0].mlp
    device = torch.device(device) if device is not None else first.router.weight.device
    source = disk_source(folder, model) if folder is not None else host_source(model, device.type == "cuda")
    cache = ExpertCache(slots, first.gate_up.shape[1:], first.down.shape[1:], first.gate_up.dtype, device, source)
    cache.tier, cache.cold = ("disk" if folder is not None else "host"), cold
    if cold == "auto":
        cache.calibrate()
    routers = [block.mlp.router for block in model.layers]
    for i, block in enumerate(model.layers):
        block.mlp = OffloadedMoE(block.mlp, i, cache, routers[i + 1] if prefetch and i + 1 < len(routers) else None)
    return cache


@dataclasses.dataclass(frozen=True)
class ExpertPlacement:
    """Where a mixture of experts' experts live: `slots` on the device (None: all resident) and the tier the
    rest come from ("host" memory or "disk", the model's files)."""

    slots: int | None
    tier: str = "host"


WORKSPACE = 2 * 10**9  # device bytes kept for activations, the decode step's graphs and the allocator's slack


def place_experts(
    config: ModelConfig,
    dtype: torch.dtype,
    slots: int | None = None,
    gpu_memory: int | None = None,
    host_memory: int | None = None,
    kv_tokens: int = 0,
    has_files: bool = True,
) -> ExpertPlacement:
    """The placement for explicit `slots` or for device and host budgets (bytes): everything but the experts and
    the KV cache (`kv_tokens` of it) on the device, as many experts as the rest of `gpu_memory` holds (all of
    them: resident), the others in host memory while `host_memory` holds them all, else read from disk."""
    size = torch.empty((), dtype=dtype).element_size()
    per_expert = 3 * config.dim * config.expert_hidden * size
    experts = config.layers * config.experts
    if slots is None and gpu_memory is not None:
        dense = (config.num_params() - experts * 3 * config.dim * config.expert_hidden) * size
        kv = 2 * config.layers * config.kv_heads * config.head_size * kv_tokens * size
        room = gpu_memory - dense - kv - WORKSPACE
        if room >= experts * per_expert:
            return ExpertPlacement(None)
        slots = int(room // per_expert)
        if slots < config.experts_per_token:
            need = (dense + kv + WORKSPACE + config.experts_per_token * per_expert) / 1e9
            raise OneboxError(
                f"--gpu-memory {gpu_memory / 1e9:g}: {config.name} needs {need:.1f} GB on the device for everything but "
                f"its experts ({dense / 1e9:.1f} GB), its KV cache ({kv / 1e9:.1f} GB), working room and one token's "
                f"{config.experts_per_token} experts: give more, or a shorter --context."
            )
    if slots is None:
        return ExpertPlacement(None)
    if slots < 1:
        raise OneboxError(f"--expert-slots {slots}: give at least one slot.")
    tier = "host" if host_memory is None or experts * per_expert <= host_memory else "disk"
    if tier == "disk" and not has_files:
        raise OneboxError(
            f"--host-memory {host_memory / 1e9:g}: the experts ({experts * per_expert / 1e9:.1f} GB) do not fit, and "
            "only a Hugging Face folder's experts can be read from disk: give more host memory or the model's folder."
        )
    return ExpertPlacement(slots, tier)
