"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus), and the one check
of sampling settings that generate, the server and the engine share."""

from __future__ import annotations

import torch
from torch import Tensor

from onebox.errors import OneboxError

SEED_RANGE = (-(2**63), 2**63 - 1)  # a 64-bit signed integer, as the OpenAI API and vLLM take it
MAX_TEMPERATURE = 2.0


class InvalidSampling(OneboxError):
    """A sampling setting out of its range; `param` names it (as the API calls it)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def check_sampling(
    temperature: float, top_k: int, top_p: float, seed: int | None = None, max_tokens: int | None = None
) -> None:
    """Raise InvalidSampling naming the first setting out of range."""
    if not 0 <= temperature <= MAX_TEMPERATURE:
        raise InvalidSampling(
            f"temperature must be between 0 (greedy) and {MAX_TEMPERATURE:g}, got {temperature}.", "temperature"
        )
    if not 0 < top_p <= 1:
        raise InvalidSampling(f"top_p must be in (0, 1], got {top_p}.", "top_p")
    if top_k < 0:
        raise InvalidSampling(f"top_k must be 0 (off) or positive, got {top_k}.", "top_k")
    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise InvalidSampling(
            f"seed must be a 64-bit signed integer (between {SEED_RANGE[0]} and {SEED_RANGE[1]}), got {seed}.", "seed"
        )
    if max_tokens is not None and max_tokens < 1:
        raise InvalidSampling(f"max_tokens must be at least 1, got {max_tokens}.", "max_tokens")


def seeded_generator(seed: int | None, device: torch.device | str) -> torch.Generator:
    """A generator on `device` seeded with `seed` (any 64-bit value; wrapped into torch's unsigned range), or randomly."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed % 2**64)
    return generator


def sample_next(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Next token ids (B,) from last-position logits (B, vocab). temperature 0 = greedy argmax."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens before it already hold top_p of the mass (the first is always kept).
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
