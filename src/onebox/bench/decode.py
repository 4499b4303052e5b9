"""`onebox bench decode`: prefill and decode speed against the memory-bandwidth bound, beside transformers.

A decode step at batch B reads every weight once (a mixture of experts: the experts its rows pick, see
step_bytes), so B x (measured HBM bandwidth / bytes a step reads) tokens/s is the bound (the KV cache's reads are left out: the bound is generous). The device's
bandwidth is measured in the same run with a large device-to-device copy (bytes read + written).
Decode runs through the serving engine (static KV cache, CUDA graphs on CUDA), greedy, with every
row kept busy for the whole run. The baseline is transformers' generate() on the same weights (bf16,
SDPA, greedy, the same prompts) in the same process, twice: with its default (dynamic) cache, and
with its static cache, which generate() compiles; each call is warmed up at its own length first,
and its time includes its prefill.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from onebox.bench.peers import transformers_model
from onebox.bench.schema import config_record, new_document
from onebox.device import synchronize
from onebox.errors import OneboxError
from onebox.infer.engine import Engine, Request
from onebox.model import Transformer

Say = Callable[[str], None]


def memory_bandwidth(device: torch.device, nbytes: int = 2**30, repeats: int = 5) -> float | None:
    """Bytes/s of a large device-to-device copy, counting bytes read plus written (None off CUDA)."""
    if device.type != "cuda":
        return None
    source = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        target.copy_(source)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000.0)
    return 2 * nbytes / sorted(times)[len(times) // 2]


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def step_bytes(config: Any, nbytes: int, batch: int) -> float:
    """Weight bytes one decode step of `batch` rows reads: all of them for a dense model; for a mixture of
    experts everything but the experts, plus the distinct experts the rows pick, expected under uniform
    routing (E (1 - (1 - k/E)^batch) a layer: k at batch 1)."""
    if not config.experts:
        return nbytes
    expert = 3 * config.dim * config.expert_hidden * nbytes / config.num_params()  # bytes of one expert
    experts, k = config.experts, config.experts_per_token
    picked = experts * (1 - (1 - k / experts) ** batch)
    return nbytes - config.layers * (experts - picked) * expert


def _prompts(config: Any, batch: int, length: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (batch, length), generator=generator).tolist()


@torch.inference_mode()
def time_prefill(model: Transformer, prompt_len: int, device: torch.device, repeats: int = 3) -> float:
    """Prompt tokens/s of one prefill (best of a few, after a warm-up)."""
    ids = torch.tensor(_prompts(model.config, 1, prompt_len, 0), device=device)
    best = float("inf")
    for _ in range(repeats + 1):
        caches = model.new_kv_caches(1)
        synchronize(device)
        start = time.perf_counter()
        model(ids, torch.arange(prompt_len, device=device), caches)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return prompt_len / best


def time_decode(engine: Engine, batch: int, prompt_len: int, new_tokens: int, temperature: float = 0.0) -> float:
    """Decode tokens/s with `batch` requests decoding together (greedy, or sampled at `temperature` with fixed
    seeds; no stop token), after a warm-up round: the tokens handed out from the end of the first step (which
    prefills every request) to the last."""
    config = engine.config
    for round_ in range(2):  # the first round compiles and captures the graphs
        requests = [
            engine.submit(Request(p, new_tokens if round_ else 4, temperature=temperature, seed=i))
            for i, p in enumerate(_prompts(config, batch, prompt_len, round_))
        ]
        engine.step()  # admits (prefills) every request and launches their first decode step
        synchronize(engine.device)
        start, emitted_before = time.perf_counter(), engine.emitted
        while any(engine.slots):
            engine.step()
        synchronize(engine.device)
        elapsed = time.perf_counter() - start
        emitted = engine.emitted - emitted_before
        for request in requests:
            assert request.finish_reason == "length"
    return emitted / elapsed


HF_CACHES = ("dynamic", "static")  # transformers' default cache, and its static cache (which generate() compiles)


def hf_baseline(model: Transformer) -> Any:
    """transformers' model of the same family with onebox's weights, in their dtype on their device (SDPA attention)."""
    from onebox.export import hf_state_dict

    dtype = model.embed_tokens.weight.dtype
    baseline = transformers_model(model.config, model.embed_tokens.weight.device, dtype).eval()
    state = hf_state_dict(model.state_dict(), model.config, dtype)
    wanted = baseline.state_dict().keys()
    if any(name.endswith("experts.gate_up_proj") for name in wanted):  # transformers 5 holds experts stacked in memory
        state = stacked_experts(model, state, wanted, dtype)
    missing, unexpected = baseline.load_state_dict(state, strict=False)
    if unexpected or any(name != "lm_head.weight" for name in missing):  # lm_head is tied to the embedding
        raise OneboxError(
            f"the transformers model did not take onebox's weights (missing {missing}, unexpected {unexpected})."
        )
    baseline.tie_weights()
    baseline.generation_config.pad_token_id = 0
    return baseline


def stacked_experts(
    model: Transformer, state: dict[str, torch.Tensor], wanted: Any, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """`state` (the files' names: one tensor per expert) with each layer's experts and router as a transformers
    model holds them in memory (5.x): mlp.experts.gate_up_proj (E, 2 x hidden, dim, gate rows first, as onebox
    stacks them), mlp.experts.down_proj (E, dim, hidden) and mlp.gate.weight, whatever the files call them."""
    from onebox.families import hf_names

    ends = {"gate_up": "mlp.experts.gate_up_proj", "down": "mlp.experts.down_proj", "weight": "mlp.gate.weight"}
    out = dict(state)
    for name, tensor in model.state_dict().items():
        if not name.endswith(("mlp.gate_up", "mlp.down", "mlp.router.weight")):
            continue
        layer, kind = name.split(".")[1], name.rsplit(".", 1)[1]
        for hf_name in hf_names(name, model.config):
            out.pop(hf_name, None)
        target = next(w for w in wanted if w.endswith(f"layers.{layer}.{ends[kind]}"))
        out[target] = tensor.detach().to("cpu", dtype).contiguous()
    return out


def hf_generate_speed(
    baseline: Any, config: Any, batch: int, prompt_len: int, new_tokens: int, cache: str = "dynamic", repeats: int = 2
) -> float:
    """transformers' generate() tokens/s (greedy, fixed length) as its documentation makes it fast: the call
    timed is repeated first, untimed, so that first-time costs (allocator growth to the cache's sizes,
    kernels loaded on first use; with the static cache, compilation) stay outside the timed window; the
    best of `repeats` timed calls, each timed whole (its prefill included)."""
    device = baseline.device
    ids = torch.tensor(_prompts(config, batch, prompt_len, 7), device=device)
    kwargs = dict(
        attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False
    )  # (no eos: the length is fixed)
    if cache == "static":
        kwargs["cache_implementation"] = "static"
    best = float("inf")
    with torch.inference_mode():
        for attempt in range(
            repeats + (3 if cache == "static" else 1)
        ):  # static: compile, then the graphs' first replays
            synchronize(device)
            start = time.perf_counter()
            out = baseline.generate(ids, **kwargs)
            synchronize(device)
            elapsed = time.perf_counter() - start
            if attempt >= (3 if cache == "static" else 1):
                best = min(best, elapsed)
    return batch * (out.shape[1] - prompt_len) / best


def run_decode(
    model: Transformer,
    device: torch.device,
    say: Say,
    batches: list[int],
    prompt_len: int = 128,
    new_tokens: int = 128,
    baseline: bool = False,
    kernels: bool | str | None = None,
) -> dict[str, Any]:
    """The `decode` document: one entry per batch size (`kernels` as Engine takes it)."""
    config = model.config
    if prompt_len + new_tokens > config.seq_len:
        raise OneboxError(
            f"prompt {prompt_len} + new tokens {new_tokens} exceed the model's context of {config.seq_len}: lower --prompt-len or --new-tokens."
        )
    bandwidth = memory_bandwidth(device)
    nbytes = weight_bytes(model)
    doc = new_document(
        "decode",
        device,
        {
            "prompt_len": prompt_len,
            "new_tokens": new_tokens,
            "batches": batches,
            "dtype": str(model.embed_tokens.weight.dtype).replace("torch.", ""),
            "baseline": "hf" if baseline else None,
            "memory_bytes_per_second": bandwidth,
            "weight_bytes": nbytes,
        },
    )
    prefill = time_prefill(model, prompt_len, device)
    say(
        f"{config.name}: {nbytes / 1e9:.2f} GB of weights | prefill {prefill:,.0f} tok/s ({prompt_len} tokens) | "
        f"memory bandwidth {'n/a' if bandwidth is None else f'{bandwidth / 1e12:.2f} TB/s'}"
    )
    for batch in batches:
        engine = Engine(model, max_batch=batch, prefix_entries=0, kernels=kernels)
        for note in engine.kernel_notes:
            say(f"note: {note}")
        decode = time_decode(engine, batch, prompt_len, new_tokens)
        bound = batch * bandwidth / step_bytes(config, nbytes, batch) if bandwidth else None
        result = {
            "status": "ok",
            "prefill_tokens_per_second": prefill,
            "decode_tokens_per_second": decode,
            "bound_tokens_per_second": bound,
            "bound_fraction": decode / bound if bound else None,
            "kernels": ",".join(engine.kernels) or "torch",
        }
        line = f"  batch {batch}: decode {decode:,.0f} tok/s" + (
            f" = {result['bound_fraction']:.1%} of the bound ({bound:,.0f} tok/s)" if bound else ""
        )
        if baseline:
            hf = hf_baseline(model)
            speeds = {cache: hf_generate_speed(hf, config, batch, prompt_len, new_tokens, cache) for cache in HF_CACHES}
            del hf
            result["baseline"] = {
                "kind": "hf",
                "decode_tokens_per_second": speeds["dynamic"],
                "ratio": decode / speeds["dynamic"],
                "static_decode_tokens_per_second": speeds["static"],
                "static_ratio": decode / speeds["static"],
            }
            line += (
                f" | transformers generate() {speeds['dynamic']:,.0f} tok/s ({decode / speeds['dynamic']:.1f}x), "
                f"with its static cache, compiled, {speeds['static']:,.0f} ({decode / speeds['static']:.1f}x)"
            )
        doc["entries"].append({"config": config_record(config), "batch": batch, "result": result})
        say(line)
        del engine
    return doc
