"""`onebox bench moe`: a mixture of experts decoded within device and host budgets, beside the floor its
expert copies set and beside transformers + accelerate under the same budgets.

The model comes from a Hugging Face folder (a preset's random weights are written to one first: the disk
tier and the baseline read files). It is loaded as `generate` and `serve` load it with `--gpu-memory` and
`--host-memory` (infer.experts.place_experts picks the device slots and the tier). Measured in one run:
the bandwidth the experts come at (pinned host to device; the folder's files read with the page cache
dropped first, for the disk tier), prefill tokens/s, and per batch size the decode tokens/s, the expert
cache's hit rate and the bytes copied per generated token (prefills included). The floor is the tokens/s
at which those bytes alone would take all the time at the measured bandwidth: decode / floor says how
much else (compute, the host's work per layer) adds. Decoding samples (temperature 1, fixed seeds): a
greedy decode of random weights soon repeats one token, and with it one routing, which a cache serves
from memory; sampled tokens route near-uniformly, the hardest case for a cache. The baseline is
transformers' model of the family loaded with `device_map="auto"` and `max_memory` set to the same
budgets (accelerate places what does not fit on the device in host memory, then on disk), greedy
generate() of the same length, timed after an identical untimed call, once onebox's model is freed (the
process's device cap holds for both).
"""

from __future__ import annotations

import gc
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from onebox.bench.decode import time_decode, time_prefill
from onebox.bench.schema import config_record, new_document
from onebox.device import synchronize
from onebox.errors import OneboxError
from onebox.infer.engine import Engine
from onebox.infer.generate import load_model

Say = Any


def preset_folder(name: str, work_dir: str | Path | None) -> Path:
    """A Hugging Face folder of the preset's shape with random weights (bf16), written once under work_dir."""
    from onebox.export import export_hf
    from onebox.model import build_model
    from onebox.presets import preset

    root = Path(work_dir) if work_dir else Path(tempfile.gettempdir()) / "onebox-moe"
    folder = root / name
    if (folder / "config.json").is_file():
        return folder
    config = preset(name)
    if not config.experts:
        raise OneboxError(f"bench moe is for a mixture of experts; {name} is dense: use bench decode.")
    model = build_model(config, "cpu", torch.bfloat16)
    export_hf(model.state_dict(), config, None, folder, dtype="bfloat16")
    return folder


def host_bandwidth(device: torch.device, nbytes: int = 2**28, repeats: int = 5) -> float | None:
    """Pinned host to device copy bytes/s (None off a GPU: the experts are already where they compute)."""
    if device.type != "cuda":
        return None
    host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    target = torch.empty(nbytes, dtype=torch.uint8, device=device)
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        target.copy_(host, non_blocking=True)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return nbytes / sorted(times)[len(times) // 2]


def drop_page_cache(folder: Path) -> None:
    """Ask the kernel to forget the folder's safetensors pages, so that reads come from the disk."""
    for path in folder.glob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def disk_bandwidth(folder: Path, nbytes: int = 2**30, chunk: int = 2**24) -> float:
    """Bytes/s of reading the largest safetensors file from its start (up to nbytes), page cache dropped."""
    path = max(folder.glob("*.safetensors"), key=lambda p: p.stat().st_size)
    drop_page_cache(folder)
    buffer = bytearray(chunk)
    fd, done = os.open(path, os.O_RDONLY), 0
    start = time.perf_counter()
    try:
        while done < nbytes:
            got = os.preadv(fd, [buffer], done) if hasattr(os, "preadv") else len(os.pread(fd, chunk, done))
            if not got:
                break
            done += got
    finally:
        os.close(fd)
    return done / (time.perf_counter() - start)


def accelerate_speed(
    folder: Path,
    device: torch.device,
    dtype: torch.dtype,
    budgets: dict[str, int | None],
    prompt_len: int,
    new_tokens: int,
) -> tuple[float | None, str]:
    """transformers + accelerate offload tokens/s (greedy, batch 1, prefill included), or None and why not."""
    try:
        import accelerate  # noqa: F401
        import transformers
    except ImportError:
        return None, "transformers and accelerate are needed for the baseline"
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    max_memory: dict[Any, int] = {"cpu": budgets["host_memory"] or int(available * 0.9)}
    if device.type == "cuda":
        index = device.index or 0
        max_memory[index] = budgets["gpu_memory"] or torch.cuda.get_device_properties(index).total_memory
    how = "device_map=auto, max_memory " + ", ".join(f"{k}: {v / 1e9:.3g} GB" for k, v in max_memory.items())
    try:
        elapsed = _accelerate_generate(transformers, folder, device, dtype, max_memory, prompt_len, new_tokens)
    except Exception as err:  # the peer's own failure under these budgets is a result, recorded as n/a
        return None, f"{how}: transformers + accelerate failed: {type(err).__name__}: {str(err)[:200]}"
    return new_tokens / elapsed, how


def _accelerate_generate(
    transformers: Any,
    folder: Path,
    device: torch.device,
    dtype: torch.dtype,
    max_memory: dict[Any, int],
    prompt_len: int,
    new_tokens: int,
) -> float:
    """Seconds of one greedy generate() of the accelerate-placed model, after the same call untimed."""
    with tempfile.TemporaryDirectory() as offload:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, device_map="auto", max_memory=max_memory, offload_folder=offload
        ).eval()
        ids = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
        first = device if device.type == "cuda" else torch.device("cpu")  # where accelerate's hooks take inputs
        kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        inputs = dict(input_ids=ids.to(first), attention_mask=torch.ones_like(ids).to(first))
        with torch.inference_mode():
            model.generate(**inputs, **kwargs)  # the same call untimed first
            synchronize(device)
            start = time.perf_counter()
            model.generate(**inputs, **kwargs)
            synchronize(device)
        elapsed = time.perf_counter() - start
        del model
    return elapsed


def run_moe(
    folder: Path,
    device: torch.device,
    say: Say,
    batches: list[int],
    budgets: dict[str, int | None],
    prompt_len: int = 64,
    new_tokens: int = 64,
    baseline_tokens: int | None = 16,
    partial: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """The `moe` document: one entry per batch size; `budgets`: load_model's expert_slots, gpu_memory and
    host_memory; baseline_tokens None skips the baseline; `partial` is handed the document after each
    batch (a run cut short keeps what it measured)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, _ = load_model(folder, device, dtype, context=prompt_len + new_tokens + 8, batch=max(batches), **budgets)
    config, cache = model.config, getattr(model, "expert_cache", None)
    tier = cache.tier if cache is not None else "resident"
    host = host_bandwidth(device)
    disk = disk_bandwidth(folder) if tier == "disk" else None
    bandwidth = disk if tier == "disk" else host
    if tier == "disk" and host is not None:
        bandwidth = min(disk, host)
    settings = {"prompt_len": prompt_len, "new_tokens": new_tokens, "batches": batches, "dtype": str(dtype)[6:]}
    settings.update(budgets, tier=tier, slots=cache.slots if cache else None, temperature=TEMPERATURE)
    settings.update(host_bytes_per_second=host, disk_bytes_per_second=disk)
    doc = new_document("moe", device, settings)
    if tier == "disk":
        drop_page_cache(folder)
    prefill = time_prefill(model, prompt_len, device)
    rate = "n/a" if bandwidth is None else f"{bandwidth / 1e9:.2f} GB/s"
    say(
        f"{config.name}: experts {tier}" + (f" ({cache.slots} on the device)" if cache else "") + f" | copies at {rate}"
        f" | prefill {prefill:,.0f} tok/s ({prompt_len} tokens)"
    )
    for batch in batches:
        engine = Engine(model, max_batch=batch, prefix_entries=0)
        before = (cache.hits, cache.misses, cache.bytes_in, cache.computed_on_host) if cache else None
        decode = time_decode(engine, batch, prompt_len, new_tokens, TEMPERATURE)
        result: dict[str, Any] = {
            "status": "ok",
            "prefill_tokens_per_second": prefill,
            "decode_tokens_per_second": decode,
        }
        line = f"  batch {batch}: decode {decode:,.1f} tok/s"
        if cache is not None:  # both of time_decode's rounds, whose copies the counters hold
            line += _cache_figures(result, cache, before, engine.emitted, bandwidth, decode)
        doc["entries"].append({"config": config_record(config), "batch": batch, "result": result})
        say(line)
        del engine
        if partial is not None:
            partial(doc)
    if baseline_tokens and 1 in batches:
        del model, cache  # the peer gets the same budgets to itself
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        speed, how = accelerate_speed(folder, device, dtype, budgets, prompt_len, baseline_tokens)
        result = next(e["result"] for e in doc["entries"] if e["batch"] == 1)
        decode = result["decode_tokens_per_second"]
        result["baseline"] = {"kind": "hf-accelerate", "decode_tokens_per_second": speed, "how": how}
        result["baseline"]["ratio"] = decode / speed if speed else None
        say(
            f"  batch 1, transformers + accelerate: {speed:,.2f} tok/s (onebox {decode / speed:.1f}x) | {how}"
            if speed
            else f"  batch 1, transformers + accelerate: n/a ({how})"
        )
    return doc


TEMPERATURE = 1.0  # sampled with fixed seeds: greedy decoding of random weights repeats itself, and so its routing


def _cache_figures(
    result: dict[str, Any],
    cache: Any,
    before: tuple[int, int, int, int],
    emitted: int,
    bandwidth: float | None,
    decode: float,
) -> str:
    """The expert cache's hit rate, bytes copied a token and floor since `before`, into result; the line's part."""
    hits, misses, bytes_in, on_host = before
    asked = cache.hits - hits + cache.misses - misses
    per_token = (cache.bytes_in - bytes_in) / max(emitted, 1)
    floor = bandwidth / per_token if bandwidth and per_token else None
    result.update(hit_rate=(cache.hits - hits) / asked if asked else None, bytes_per_token=per_token)
    result["computed_on_host_per_token"] = (cache.computed_on_host - on_host) / max(emitted, 1)
    result.update(floor_tokens_per_second=floor, floor_fraction=decode / floor if floor else None)
    rate = "n/a" if result["hit_rate"] is None else f"{result['hit_rate']:.1%}"
    line = f" | hit rate {rate} | {per_token / 1e6:,.1f} MB copied a token"
    return line + (f" | floor {floor:,.1f} tok/s ({decode / floor:.0%} of it)" if floor else " | floor n/a")
