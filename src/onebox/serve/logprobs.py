"""Log-probabilities for the completions endpoint's `logprobs` and `echo` (OpenAI's legacy format, which
EleutherAI's lm-evaluation-harness reads with `--model local-completions`): each token's log-probability
under the model given the tokens before it, and the top-N alternatives at each position, from one
teacher-forced forward pass of the plain model over prompt and completion (log-softmax in fp32)."""

from __future__ import annotations

from typing import Any

import torch
from tokenizers import Tokenizer

from onebox.model import Transformer


@torch.inference_mode()
def score(model: Transformer, tokenizer: Tokenizer | None, ids: list[int], start: int, top: int) -> dict[str, Any]:
    """The `logprobs` object for tokens ids[start:]: tokens, token_logprobs (None for the very first token, which
    nothing predicts), top_logprobs (the `top` likeliest tokens at each position, None at the first) and
    text_offset (each token's offset in the text of ids[start:])."""
    device = model.embed_tokens.weight.device
    logits = model(torch.tensor([ids], device=device))[0].float()
    logp = torch.log_softmax(logits, dim=-1).cpu()

    def text(token: int) -> str:
        return tokenizer.decode([token], skip_special_tokens=False) if tokenizer is not None else str(token)

    tokens, token_logprobs, top_logprobs, offsets, offset = [], [], [], [], 0
    for position in range(start, len(ids)):
        tokens.append(text(ids[position]))
        offsets.append(offset)
        offset += len(tokens[-1])
        if position == 0:
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        row = logp[position - 1]
        token_logprobs.append(row[ids[position]].item())
        if top:
            values, indices = torch.topk(row, top)
            top_logprobs.append({text(i): v for i, v in zip(indices.tolist(), values.tolist())})
        else:
            top_logprobs.append(None)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}
