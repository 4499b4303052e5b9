"""A sparse mixture-of-experts FFN: a router picks the top-k of `experts` SwiGLU FFNs for each token and
mixes their outputs by its (renormalised) probabilities, as Qwen3-MoE and Mixtral do.

The experts are stored stacked, one tensor per kind: gate_up (E, 2 x expert_hidden, dim) and down
(E, dim, expert_hidden), as transformers holds them in memory; export and import convert to and from the
per-expert tensors of the Hugging Face files. Three ways to compute the same thing:
- grouped (many tokens: training, prefill): the token-expert pairs sorted by expert and every expert's
  rows multiplied in one grouped GEMM (`torch._grouped_mm`, offsets computed on the device: no host
  sync, compiles), the results added back in place;
- looped (the reference, and where torch has no grouped GEMM for the device and dtype): the same sort,
  one product per expert; the loop reads the per-expert counts, so it runs eagerly;
- gathered (few tokens: a decode step): each pair's expert weights gathered and multiplied batched, with
  static shapes, so it compiles into the decode step's CUDA graph; it reads top-k experts per token,
  which is what a decode step must read anyway.
`forward` takes the gathered way when tokens x top-k is at most the number of experts (`few` set to
"grouped" takes the grouped GEMM there too: it reads each chosen expert in place, where gathering copies
it first; which is faster at decode is `benchmarks/moe_probe.py --decode`'s to say).

In training each forward keeps what the routers' balance losses need (`balance_loss`): the
load-balancing loss as transformers computes it for these families (over all layers' tokens: experts x
the sum over experts of the share of assignments times the mean probability) and ST-MoE's router z-loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from onebox.config import ModelConfig


class MoE(nn.Module):
    """The sparse FFN of one block: x (B, T, dim) -> (B, T, dim)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.top_k, self.normalise = config.experts_per_token, config.norm_topk_prob
        experts, hidden, dim = config.experts, config.expert_hidden, config.dim
        self.router = nn.Linear(dim, experts, bias=False)
        self.gate_up = nn.Parameter(torch.empty(experts, 2 * hidden, dim))
        self.down = nn.Parameter(torch.empty(experts, dim, hidden))
        self.stats: tuple[Tensor, Tensor, Tensor, int] | None = None  # training: see route
        self.few = "gathered"  # the computation for few tokens (a decode step): "gathered" or "grouped"

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Each token's top-k experts (N, k) and their weights (N, k), from x (N, dim): softmax in fp32, then
        top-k, renormalised where the model does so, in x's dtype."""
        logits = self.router(x).float()
        probs = F.softmax(logits, dim=-1)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        if self.training:  # what the balance losses need: assignments and probability per expert, squared logsumexp
            assigned = torch.zeros_like(probs[0]).scatter_add_(
                0, chosen.reshape(-1), torch.ones_like(weights).reshape(-1)
            )
            self.stats = (assigned, probs.sum(dim=0), torch.logsumexp(logits, dim=-1).square().sum(), x.shape[0])
        if self.normalise:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return chosen, weights.to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        chosen, weights = self.route(flat)
        return self.compute(flat, chosen, weights).reshape(shape)

    def compute(self, x: Tensor, chosen: Tensor, weights: Tensor) -> Tensor:
        """The experts' part of forward for routed rows x (N, dim): the way that suits N (see the module)."""
        if chosen.numel() <= self.gate_up.shape[0] and self.few == "gathered":
            return self.gathered(x, chosen, weights)
        if grouped_mm_runs(x.device, compute_dtype(x)):
            return self.grouped(x, chosen, weights)
        return self.looped(x, chosen, weights)

    def grouped(self, x: Tensor, chosen: Tensor, weights: Tensor) -> Tensor:
        """Tokens sorted by expert, every expert's rows in one grouped GEMM per product (see grouped_mm_runs)."""
        flat = chosen.reshape(-1)
        order = flat.argsort(stable=True)
        rows = order // self.top_k
        counts = torch.zeros(self.gate_up.shape[0], dtype=torch.int32, device=x.device)
        offsets = counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32)).cumsum(0, dtype=torch.int32)
        dtype = compute_dtype(x)
        gate_up, down = self.gate_up.to(dtype), self.down.to(dtype)
        hidden = torch._grouped_mm(x[rows].to(dtype), gate_up.transpose(1, 2), offs=offsets)
        gate, up = hidden.chunk(2, dim=-1)
        y = torch._grouped_mm((F.silu(gate) * up).contiguous(), down.transpose(1, 2), offs=offsets)
        y = y.to(x.dtype) * weights.reshape(-1)[order, None].to(x.dtype)
        return torch.zeros_like(x).index_add_(0, rows, y)

    def looped(self, x: Tensor, chosen: Tensor, weights: Tensor) -> Tensor:
        """Tokens sorted by expert; each expert's rows in one product (the reference computation)."""
        flat = chosen.reshape(-1)
        order = flat.argsort(stable=True)
        rows = order // self.top_k  # the token of each sorted pair
        counts = torch.bincount(flat, minlength=self.gate_up.shape[0]).tolist()
        out = torch.zeros_like(x)
        start = 0
        for expert, count in enumerate(counts):
            if not count:
                continue
            pairs = order[start : start + count]
            tokens = rows[start : start + count]
            gate, up = F.linear(x[tokens], self.gate_up[expert]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.down[expert])
            out.index_add_(0, tokens, y * weights.reshape(-1)[pairs, None])
            start += count
        return out

    def gathered(self, x: Tensor, chosen: Tensor, weights: Tensor) -> Tensor:
        """Each token-expert pair's weights gathered, the products batched (static shapes: compiles)."""
        n, k = chosen.shape
        flat = chosen.reshape(-1)
        rows = x.repeat_interleave(k, dim=0)[:, :, None]  # (N k, dim, 1)
        gate, up = torch.bmm(self.gate_up[flat], rows).squeeze(-1).chunk(2, dim=-1)
        y = torch.bmm(self.down[flat], (F.silu(gate) * up)[:, :, None]).squeeze(-1)  # (N k, dim)
        return (y.view(n, k, -1) * weights[:, :, None]).sum(dim=1)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the experts' products run in: autocast's where it is on, else x's."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def grouped_mm_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch's grouped GEMM takes this device and dtype: the CPU (any dtype), or bf16 on a CUDA GPU of
    compute capability 9.0+ (Hopper, where torch's kernel is CUTLASS's); elsewhere the looped path runs."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cpu":
        return True
    return device.type == "cuda" and dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (9, 0)


def balance_loss(layers: list[MoE], config: ModelConfig) -> Tensor | None:
    """The weighted router losses of the last training forward through `layers` (None when both weights are 0)."""
    if not (config.router_aux_loss_coef or config.router_z_loss_coef):
        return None
    stats = [layer.stats for layer in layers if layer.stats is not None]
    if not stats:
        return None
    rows = sum(s[3] for s in stats)
    assigned = torch.stack([s[0] for s in stats]).sum(dim=0) / rows
    probability = torch.stack([s[1] for s in stats]).sum(dim=0) / rows
    aux = config.experts * (assigned * probability).sum()
    z = torch.stack([s[2] for s in stats]).sum() / rows
    return config.router_aux_loss_coef * aux + config.router_z_loss_coef * z
