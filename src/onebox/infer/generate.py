"""Autoregressive generation with a static KV cache (one prefill, then one token per step)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from onebox.checkpoint import load_checkpoint
from onebox.config import ModelConfig, model_config_from_dict
from onebox.device import synchronize
from onebox.errors import OneboxError
from onebox.export import load_hf
from onebox.infer.experts import ExpertPlacement
from onebox.infer.requests import check_prompt, check_sampling
from onebox.infer.sampling import sample_next
from onebox.model import Transformer, build_model
from onebox.tokenizer import tokenizer_from_json
from onebox.training.start import checkpoint_state


@dataclass
class Generation:
    """Sampled continuations and where the time went."""

    prompt_ids: list[int]
    samples: list[list[int]]  # new tokens of each sample, without the prompt (and without EOS)
    finish_reasons: list[str]  # "stop" (EOS) or "length"
    prefill_seconds: float
    decode_seconds: float

    @property
    def decode_tokens_per_second(self) -> float | None:
        """New tokens per second over the decode phase, all samples together."""
        steps = sum(len(s) for s in self.samples)
        return steps / self.decode_seconds if self.decode_seconds > 0 and steps else None


def load_model(
    path: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    context: int | None = None,
    expert_slots: int | None = None,
    gpu_memory: int | None = None,
    host_memory: int | None = None,
    batch: int = 1,
    cold_experts: str = "copy",
) -> tuple[Transformer, Tokenizer | None]:
    """A model for inference, in `dtype` on `device`, from a Hugging Face folder, a checkpoint file or a run folder;
    `context`: the tokens it runs at (prompt and completion; KV caches are sized by it), up to its own limit.
    A mixture of experts beyond the device: `expert_slots` keeps that many experts on `device` and the rest in
    host memory; `gpu_memory` / `host_memory` (bytes) choose the slots and the tier instead (infer.experts.
    place_experts, with the KV cache of `batch` sequences; past the host budget the experts are read from the
    folder's files), and `gpu_memory` caps what this process may take of a GPU; `cold_experts`: copy, host
    or auto (infer.experts)."""
    path = Path(path)
    target = torch.device(device)
    if path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        config, state, tokenizer_json = load_hf(path)
        folder: Path | None = path
    else:
        payload = load_checkpoint(path)
        config, state = model_config_from_dict(payload["model_config"]), checkpoint_state(payload)
        tokenizer_json, folder = payload.get("tokenizer_json"), None
    placement = None
    if expert_slots is not None or gpu_memory is not None or host_memory is not None:
        placement = _placement(config, target, dtype, context, expert_slots, gpu_memory, host_memory, batch, folder)
    paged = placement is not None and placement.slots is not None
    expert_device = None if not paged else "meta" if placement.tier == "disk" else "cpu"
    model = build_model(config, target, dtype, state=state, expert_device=expert_device)
    if context is not None:
        set_context(model, context)
    if paged:  # the experts in host memory or the folder's files, `slots` of them on the device
        from onebox.infer.experts import offload_experts

        disk = folder if placement.tier == "disk" else None
        model.expert_cache = offload_experts(model, placement.slots, folder=disk, device=target, cold=cold_experts)
    model.eval()
    return model, tokenizer_from_json(tokenizer_json) if tokenizer_json else None


def _placement(
    config: ModelConfig,
    target: torch.device,
    dtype: torch.dtype,
    context: int | None,
    slots: int | None,
    gpu_memory: int | None,
    host_memory: int | None,
    batch: int,
    folder: Path | None,
) -> ExpertPlacement | None:
    """Cap the GPU and place a mixture of experts' experts (see load_model); None for a dense model."""
    from onebox.device import cap_gpu_memory
    from onebox.infer.experts import place_experts

    if gpu_memory is not None and gpu_memory <= 0 or host_memory is not None and host_memory <= 0:
        raise OneboxError("--gpu-memory and --host-memory are GB to run within: give more than 0.")
    if not config.experts and slots is not None:
        raise OneboxError(f"--expert-slots is for a mixture of experts; {config.name} is dense: leave it out.")
    if target.type == "cuda":
        cap_gpu_memory(target, gpu_memory)
    if not config.experts:
        return None
    kv_tokens = batch * (context or config.seq_len)
    return place_experts(config, dtype, slots, gpu_memory, host_memory, kv_tokens, has_files=folder is not None)


def set_context(model: Transformer, context: int) -> None:
    """Run the model at `context` tokens: at most the context its weights were made for (max_positions, else the
    one it was trained at) and, for a sliding-window model, its window."""
    config = model.config
    limit = min(config.max_positions or config.seq_len, config.sliding_window or 1 << 62)
    if not 1 < context <= limit:
        raise OneboxError(
            f"--context {context}: this model runs at 2 to {limit} tokens (its max_positions"
            f"{' and sliding window' if config.sliding_window else ''}); give a context in that range."
        )
    max_positions = config.max_positions or config.seq_len
    model.config = dataclasses.replace(config, seq_len=context, max_positions=max_positions).validate()
    model.reset_rope()


@torch.no_grad()
def generate(
    model: Transformer,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    samples: int = 1,
    stop_ids: tuple[int, ...] | list[int] = (),
    use_cache: bool = True,
    on_token: Callable[[int], None] | None = None,
) -> Generation:
    """Sample `samples` continuations of one prompt; with use_cache they share a single prefill. A sample ends
    at any of `stop_ids` (not kept); `on_token` is given each new token of a single sample as it comes."""
    config = model.config
    if samples < 1:
        raise OneboxError(f"samples must be at least 1, got {samples}.")
    check_sampling(temperature, top_k, top_p, seed)
    max_new_tokens = check_prompt(prompt_ids, config.vocab_size, config.seq_len, max_new_tokens)
    device = model.embed_tokens.weight.device
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else torch.seed())
    prompt = torch.tensor([prompt_ids], device=device)

    started = time.perf_counter()
    if use_cache:
        caches = model.new_kv_caches(1, len(prompt_ids) + max_new_tokens)
        logits = model(prompt, torch.arange(len(prompt_ids), device=device), caches)[:, -1]
        for cache in caches:
            cache.expand_batch(samples)
        logits = logits.expand(samples, -1)
    else:
        logits = model(prompt)[:, -1].expand(samples, -1)
    synchronize(device)
    prefill = time.perf_counter() - started

    started = time.perf_counter()
    out = torch.empty(samples, 0, dtype=torch.long, device=device)
    done = torch.zeros(samples, dtype=torch.bool, device=device)
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    for step in range(max_new_tokens):
        token = sample_next(logits, temperature, top_k, top_p, generator)
        out = torch.cat([out, token[:, None]], dim=1)
        if len(stop_ids):
            done |= torch.isin(token, stops)
            if bool(done.all()):
                break
        if on_token is not None and samples == 1:
            on_token(int(token[0]))
        if step == max_new_tokens - 1:
            break
        if use_cache:
            position = torch.tensor([len(prompt_ids) + step], device=device)
            logits = model(token[:, None], position, caches)[:, -1]
        else:
            logits = model(torch.cat([prompt.expand(samples, -1), out], dim=1))[:, -1]
    synchronize(device)
    decode = time.perf_counter() - started

    samples_out, reasons = [], []
    for row in out.tolist():
        end = next((i for i, t in enumerate(row) if t in stop_ids), None)
        if end is not None:
            samples_out.append(row[:end])
            reasons.append("stop")
        else:
            samples_out.append(row)
            reasons.append("length")
    return Generation(prompt_ids, samples_out, reasons, prefill, decode)
