"""What a generation request may ask, checked in one place for `onebox generate`, the engine and the
server: the sampling settings, and the prompt against the model's vocabulary and context."""

from __future__ import annotations

from onebox.errors import OneboxError

SEED_RANGE = (-(2**63), 2**63 - 1)  # a 64-bit signed integer, as the OpenAI API and vLLM take it
MAX_TEMPERATURE = 2.0


class InvalidRequest(OneboxError):
    """A request that cannot be served: `param` names the setting at fault as the API calls it, `code` is
    the API's error code where it has one."""

    def __init__(self, message: str, param: str, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code


def check_sampling(
    temperature: float, top_k: int, top_p: float, seed: int | None = None, max_tokens: int | None = None
) -> None:
    """Raise InvalidRequest naming the first sampling setting out of range."""
    if not 0 <= temperature <= MAX_TEMPERATURE:
        raise InvalidRequest(
            f"temperature must be between 0 (greedy) and {MAX_TEMPERATURE:g}, got {temperature}.", "temperature"
        )
    if not 0 < top_p <= 1:
        raise InvalidRequest(f"top_p must be in (0, 1], got {top_p}.", "top_p")
    if top_k < 0:
        raise InvalidRequest(f"top_k must be 0 (off) or positive, got {top_k}.", "top_k")
    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise InvalidRequest(
            f"seed must be a 64-bit signed integer (between {SEED_RANGE[0]} and {SEED_RANGE[1]}), got {seed}.", "seed"
        )
    if max_tokens is not None and max_tokens < 1:
        raise InvalidRequest(f"max_tokens must be at least 1, got {max_tokens}.", "max_tokens")


def check_prompt(
    prompt_ids: list[int],
    vocab_size: int,
    context: int,
    max_tokens: int | None = None,
    strict: bool = False,
    leading: int = 0,
) -> int:
    """Raise InvalidRequest for a prompt the model cannot continue (empty once its `leading` tokens, such
    as an end-of-text token put before a text prompt, are left out; ids outside the vocabulary; no room
    left in the context); return the tokens to generate: `max_tokens` (default: the context left), cut to
    the context left, or refused past it where `strict` (the API's rule)."""
    if len(prompt_ids) <= leading:
        raise InvalidRequest("the prompt is empty.", "prompt")
    if min(prompt_ids) < 0 or max(prompt_ids) >= vocab_size:
        raise InvalidRequest(f"prompt token ids must lie in [0, {vocab_size}).", "prompt")
    if len(prompt_ids) >= context:
        raise InvalidRequest(
            f"the prompt has {len(prompt_ids)} tokens; this model's context is {context} tokens (prompt plus completion).",
            "prompt",
            "context_length_exceeded",
        )
    room = context - len(prompt_ids)
    if max_tokens is None:
        return room
    if max_tokens < 1:
        raise InvalidRequest(f"max_tokens must be at least 1, got {max_tokens}.", "max_tokens")
    if strict and max_tokens > room:
        raise InvalidRequest(
            f"max_tokens {max_tokens} plus the prompt's {len(prompt_ids)} tokens exceed this model's context of {context} tokens.",
            "max_tokens",
            "context_length_exceeded",
        )
    return min(max_tokens, room)
