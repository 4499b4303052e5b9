"""Shared fixtures: a small prepared corpus and micro model configs that run in seconds on a CPU."""

from __future__ import annotations

import os
import socket
import threading
import time
from contextlib import contextmanager

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from onebox.config import ModelConfig, TrainConfig  # noqa: E402
from onebox.data import prepare  # noqa: E402
from onebox.tokenizer import shakespeare_play_files  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory):
    """Six plays tokenized with a 512-entry BPE (one play held out)."""
    out = tmp_path_factory.mktemp("corpus")
    prepare(shakespeare_play_files()[:6], out, vocab_size=512, val_fraction=0.2)
    return out


SERVING_CONTEXT = 96  # the context of the model the serving tests run


@pytest.fixture(scope="session")
def serving_model():
    """A micro model (seed 0) with a 96-token context, for the engine and server tests."""
    from onebox.model import Transformer

    torch.manual_seed(0)
    return Transformer(micro_model(seq_len=SERVING_CONTEXT)).eval()


@pytest.fixture(scope="session")
def corpus_tokenizer(corpus_dir):
    """The corpus fixture's tokenizer."""
    from onebox.tokenizer import tokenizer_from_json

    return tokenizer_from_json((corpus_dir / "tokenizer.json").read_text())


MICRO_SHAPE = dict(vocab_size=512, dim=64, hidden=160, layers=2, heads=4, kv_heads=2, seq_len=64)
MICRO_FLAGS = [
    item for key, value in MICRO_SHAPE.items() for item in (f"--{key.replace('_', '-')}", str(value))
]  # the same, as CLI flags


def micro_model(**changes) -> ModelConfig:
    """A two-layer GQA model of about 100k parameters."""
    return ModelConfig(**{"name": "micro", **MICRO_SHAPE, **changes}).validate()


def micro_train(out_dir, data_dir, **changes) -> TrainConfig:
    """A short CPU training run writing to out_dir."""
    base = dict(
        data=str(data_dir),
        out_dir=str(out_dir),
        batch_size=4,
        max_steps=12,
        lr=3e-3,
        warmup_steps=2,
        eval_every=6,
        eval_batches=2,
        ckpt_every=6,
        log_every=1,
        device="cpu",
        compile="off",
    )
    base.update(changes)
    return TrainConfig(**base).validate()


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_app(app):
    """Serve an ASGI app with uvicorn in a thread on localhost; yields its base URL."""
    import uvicorn

    port = free_port()
    http = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=http.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not http.started and time.time() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        http.should_exit = True
        thread.join(timeout=10)
