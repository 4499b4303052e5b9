"""`onebox bench serve`: concurrent streaming clients against a live server on localhost.

For each client count, that many clients each send the same number of streaming completion
requests at once (greedy, a fixed number of tokens, no stop); the run reports p50/p95 time to
first token, p50/p95 total latency and the aggregate tokens/s over the wall time of the round.
The server runs in this process (uvicorn in a thread) over the same engine `onebox serve` uses.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import multiprocessing
import socket
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from onebox.bench.schema import config_record, new_document
from onebox.display import plural
from onebox.errors import OneboxError
from onebox.infer.engine import Engine
from onebox.model import Transformer

Say = Callable[[str], None]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _one_stream(client: Any, url: str, prompt: list[int], max_tokens: int) -> tuple[float, float, int]:
    """(seconds to the first token, seconds to the end, tokens received) of one streaming request."""
    body = {
        "model": "bench",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as response:
        if response.status_code != 200:
            raise OneboxError(f"the server answered {response.status_code}: {(await response.aread()).decode()[:200]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            elif first is None and any(c.get("text") for c in event.get("choices", [])):
                first = time.perf_counter() - start
    total = time.perf_counter() - start
    return (first if first is not None else total), total, tokens


def _round(url: str, prompts: list[list[int]], max_tokens: int) -> tuple[list[tuple[float, float, int]], float]:
    """All prompts as concurrent streaming requests (asyncio, one connection each): their timings, and the wall time."""
    import httpx

    async def main() -> list[tuple[float, float, int]]:
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=len(prompts))) as client:
            return await asyncio.gather(*(_one_stream(client, url, p, max_tokens) for p in prompts))

    started = time.perf_counter()
    results = asyncio.run(main())
    return results, time.perf_counter() - started


def run_serve_bench(
    model: Transformer, say: Say, clients: list[int], max_tokens: int = 64, prompt_len: int = 32
) -> dict[str, Any]:
    """The `serve` document: one entry per client count."""
    import uvicorn

    from onebox.serve import Server, create_app

    config = model.config
    if prompt_len + max_tokens > config.seq_len:
        raise OneboxError(
            f"prompt {prompt_len} + max tokens {max_tokens} exceed the model's context of {config.seq_len}."
        )
    device = model.embed_tokens.weight.device
    engine = Engine(model, max_batch=max(clients), prefix_entries=0).warmup().start()
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(Server(engine, None, "bench", max_n=1)), host="127.0.0.1", port=port, log_level="warning"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    url = f"http://127.0.0.1:{port}"
    generator = torch.Generator().manual_seed(0)
    doc = new_document(
        "serve",
        device,
        {"clients": clients, "max_tokens": max_tokens, "prompt_len": prompt_len, "max_batch": max(clients)},
    )
    # The clients run in a process of their own, so that they do not take the server's interpreter lock.
    clients_process = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    try:
        clients_process.submit(
            _round, url, [[1] * prompt_len] * max(clients), 4
        ).result()  # warm-up: compile and capture first
        for count in clients:
            prompts = [
                torch.randint(0, config.vocab_size, (prompt_len,), generator=generator).tolist() for _ in range(count)
            ]
            results, wall = clients_process.submit(_round, url, prompts, max_tokens).result()
            ttft, total, tokens = [r[0] for r in results], [r[1] for r in results], sum(r[2] for r in results)
            result = {
                "status": "ok",
                "requests": count,
                "tokens": tokens,
                "wall_seconds": wall,
                "tokens_per_second": tokens / wall,
                "ttft_p50_ms": 1000 * statistics.median(ttft),
                "ttft_p95_ms": 1000 * _percentile(ttft, 0.95),
                "latency_p50_ms": 1000 * statistics.median(total),
                "latency_p95_ms": 1000 * _percentile(total, 0.95),
            }
            doc["entries"].append({"config": config_record(config), "batch": count, "result": result})
            say(
                f"  {plural(count, 'client'):>11}: {result['tokens_per_second']:,.0f} tok/s aggregate | time to first token p50 {result['ttft_p50_ms']:,.0f} ms, "
                f"p95 {result['ttft_p95_ms']:,.0f} ms | latency p50 {result['latency_p50_ms']:,.0f} ms, p95 {result['latency_p95_ms']:,.0f} ms"
            )
        base = doc["entries"][0]["result"]["tokens_per_second"]
        for entry in doc["entries"]:
            entry["result"]["over_first"] = entry["result"]["tokens_per_second"] / base
    finally:
        clients_process.shutdown()
        server.should_exit = True
        thread.join(timeout=10)
        engine.stop()
    return doc
