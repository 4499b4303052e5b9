"""Matrix-vector products written as a multiply and a sum, for decode steps of a few rows.

At batch 1 the H100's cuBLAS kernels read the small square o_proj (1536 x 1536 at 600m-A) at ~0.5 TB/s
and the down projection at ~1.5 TB/s of the card's ~3 TB/s (benchmarks/NOTES.md, session 10): too few
thread blocks for so little work. Written as `(x[..., None, :] * W).sum(-1)`, torch.compile generates
one fused reduction kernel whose shape it tunes itself (gpt-fast's int8 decode path does the same).
A candidate for the decode step, judged by `benchmarks/decode_probe.py` (variant +gemvsum) before use.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROWS = 8  # up to this many rows (batch x tokens) the product is a reduction; above it, F.linear


class ReductionLinear(nn.Linear):
    """nn.Linear whose few-row products are a multiply and a fp32-accumulated sum."""

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[:-1].numel() > ROWS:
            return F.linear(x, self.weight, self.bias)
        out = (x[..., None, :].float() * self.weight.float()).sum(-1)
        if self.bias is not None:
            out = out + self.bias.float()
        return out.to(x.dtype if not torch.is_autocast_enabled(x.device.type) else torch.get_autocast_dtype(x.device.type))


def use_reduction_gemv(model: nn.Module, names: tuple[str, ...] = ("o_proj", "down_proj")) -> nn.Module:
    """Make the named linear layers of every block ReductionLinear, in place (same weights)."""
    for module in model.modules():
        for name in names:
            child = getattr(module, name, None)
            if type(child) is nn.Linear:
                child.__class__ = ReductionLinear
    return model
