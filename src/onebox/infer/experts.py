"""A mixture of experts beyond device memory: everything but the experts stays on the device, the experts
live in host memory (pinned on a GPU machine) or in the model's safetensors files, and a device cache of
`slots` experts holds the ones in use.

The cache is least-recently-used: a decode step routes each token to top-k experts per layer, and the
next token's choices overlap the last ones' far more than a uniform draw would (on trained models), which
recency captures with O(1) bookkeeping; a frequency count would need a history that random weights (near
uniform routing, the hardest case) make meaningless. Hits, misses and the bytes copied in are counted.
With `prefetch`, each layer also asks the next layer's router which experts the current input would pick,
and loads those ahead (the residual stream changes little from one layer to the next, so the guess is
often right); a prefetch never changes a result, only when the copy happens.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from onebox.moe import MoE

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
        self.hits = self.misses = self.prefetched = self.bytes_in = 0

    @property
    def hit_rate(self) -> float | None:
        asked = self.hits + self.misses
        return self.hits / asked if asked else None

    def _load(self, key: tuple[int, int], keep: set[tuple[int, int]]) -> int:
        if len(self.where) < self.slots:
            slot = len(self.where)
        else:  # the least recently used expert that this call does not need
            victim = next(k for k in self.where if k not in keep)
            slot = self.where.pop(victim)
        gate_up, down = self.source(*key)
        self.gate_up[slot].copy_(gate_up, non_blocking=True)
        self.down[slot].copy_(down, non_blocking=True)
        self.bytes_in += gate_up.numel() * gate_up.element_size() + down.numel() * down.element_size()
        self.where[key] = slot
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
                out.append(self.where[key])
            else:
                self.misses += 1
                out.append(self._load(key, keep))
        return out

    def prefetch(self, layer: int, experts: list[int]) -> None:
        """Load these experts of `layer` ahead, where they are not resident (not counted as hits or misses)."""
        for e in experts[: self.slots]:
            if (layer, e) not in self.where:
                self.prefetched += 1
                self._load((layer, e), set())


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
        if self.next_router is not None:  # the next layer's likely experts, from this layer's input
            guess = torch.topk(self.next_router(flat).float(), self.top_k, dim=-1).indices.unique().tolist()
        out = torch.zeros_like(flat)
        needed = chosen.unique().tolist()
        for start in range(0, len(needed), self.cache.slots):  # no more experts at once than the cache holds
            group = needed[start : start + self.cache.slots]
            for expert, slot in zip(group, self.cache.slots_for(self.layer, group)):
                tokens, pick = (chosen == expert).nonzero(as_tuple=True)
                gate, up = F.linear(flat[tokens], self.cache.gate_up[slot]).chunk(2, dim=-1)
                y = F.linear(F.silu(gate) * up, self.cache.down[slot])
                out.index_add_(0, tokens, y * weights[tokens, pick, None])
        if self.next_router is not None:
            self.cache.prefetch(self.layer + 1, guess)
        return out.reshape(shape)


def host_source(model: nn.Module, pin: bool) -> Source:
    """Every layer's experts moved to host memory (pinned for fast copies to a GPU), read from there."""
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
) -> ExpertCache:
    """Replace every block's MoE by an OffloadedMoE sharing one cache of `slots` experts on `device` (default: the
    model's), in place; the experts come from host memory, or with `folder` from its files (then the model's own
    expert tensors are dropped). Move the rest of the model to `device` afterwards (`model.to(device)`)."""
    first = model.layers[0].mlp
    device = torch.device(device) if device is not None else first.router.weight.device
    source = disk_source(folder, model) if folder is not None else host_source(model, device.type == "cuda")
    cache = ExpertCache(slots, first.gate_up.shape[1:], first.down.shape[1:], first.gate_up.dtype, device, source)
    routers = [block.mlp.router for block in model.layers]
    for i, block in enumerate(model.layers):
        block.mlp = OffloadedMoE(block.mlp, i, cache, routers[i + 1] if prefetch and i + 1 < len(routers) else None)
    return cache
