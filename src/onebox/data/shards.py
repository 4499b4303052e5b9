"""Token shards: the file format, memory-mapped reading, what a data folder holds, and the batch loader.

Shards use the llm.c / modded-nanogpt format, so FineWeb folders prepared by those tools train as
they are: a header of 256 little-endian int32 (magic 20240520, version, token count, zeros), then
the tokens: uint16 for version 1, uint32 for version 2 (llm.c's choice for vocabularies > 65536).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from onebox.errors import OneboxError
from onebox.files import read_json

MAGIC = 20240520
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
VERSION_DTYPES = {1: np.uint16, 2: np.uint32}


# --- shard files ------------------------------------------------------------------------------


def write_shard(path: str | Path, tokens: np.ndarray) -> None:
    """Write tokens as one shard, atomically (temp file, then rename)."""
    path = Path(path)
    version = 1 if tokens.dtype == np.uint16 else 2
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MAGIC, version, len(tokens))
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as handle:
        handle.write(header.tobytes())
        handle.write(tokens.astype(np.dtype(VERSION_DTYPES[version]).newbyteorder("<"), copy=False).tobytes())
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_shard(path: str | Path) -> np.memmap:
    """Memory-map a shard's tokens after checking its header against the file's size."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size < HEADER_BYTES:
            raise OneboxError(
                f"token shard {path} is truncated ({size} bytes, shorter than its 1024-byte header): prepare the data again."
            )
        header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    except OSError as err:
        raise OneboxError(f"cannot read token shard {path}: {err.strerror}.") from None
    if header[0] != MAGIC:
        raise OneboxError(
            f"{path} is not a token shard (magic {header[0]}, expected {MAGIC}): prepare it with `onebox prepare` or llm.c."
        )
    if header[1] not in VERSION_DTYPES:
        raise OneboxError(f"token shard {path} has unknown version {header[1]} (known: 1 = uint16, 2 = uint32).")
    dtype = np.dtype(VERSION_DTYPES[int(header[1])]).newbyteorder("<")
    count = int(header[2])
    expected = HEADER_BYTES + count * dtype.itemsize
    if size != expected:
        raise OneboxError(
            f"token shard {path} is truncated or corrupt: its header promises {count} tokens "
            f"({expected} bytes) but the file has {size} bytes. Prepare or download it again."
        )
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(count,))


def check_token_ids(path: Path, tokens: np.ndarray, vocab_size: int) -> None:
    """Refuse a shard holding a token id outside the vocabulary (the max of a memory map is cheap)."""
    if len(tokens) and (largest := int(tokens.max())) >= vocab_size:
        raise OneboxError(
            f"token shard {path} holds token id {largest}, outside the model's vocabulary of {vocab_size}: the data was tokenized "
            "with another tokenizer. Prepare it again with the model's tokenizer (onebox prepare --tokenizer), or train a model "
            f"with --vocab-size {largest + 1} or more."
        )


def find_shards(data_dir: str | Path) -> tuple[list[Path], list[Path]]:
    """Train and validation shard paths of a folder (names containing 'train' / 'val')."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise OneboxError(
            f"data folder {data_dir} does not exist: create it with `onebox prepare INPUT --out {data_dir}`."
        )
    shards = sorted(p for p in data_dir.glob("*.bin") if p.is_file())
    train = [p for p in shards if "train" in p.name]
    val = [p for p in shards if "val" in p.name]
    if not train:
        raise OneboxError(f"{data_dir} holds no training shards (*train*.bin): prepare it with `onebox prepare`.")
    return train, val


@dataclass
class DatasetInfo:
    """What a data folder holds: shards, tokenizer and the bytes-per-token needed for bits per byte."""

    path: Path
    train_shards: list[Path]
    val_shards: list[Path]
    vocab_size: int | None
    tokenizer_path: Path | None
    val_bytes_per_token: float | None


def dataset_info(data_dir: str | Path) -> DatasetInfo:
    """Inspect a data folder: shards, and meta.json / tokenizer.json where present."""
    data_dir = Path(data_dir)
    train, val = find_shards(data_dir)
    meta_path = data_dir / "meta.json"
    meta: dict[str, Any] = read_json(meta_path, "data description") if meta_path.is_file() else {}
    tok = data_dir / "tokenizer.json"
    bytes_per_token = None
    if meta.get("val_tokens") and meta.get("val_bytes"):
        bytes_per_token = meta["val_bytes"] / meta["val_tokens"]
    return DatasetInfo(data_dir, train, val, meta.get("vocab_size"), tok if tok.is_file() else None, bytes_per_token)


# --- the batch loader -------------------------------------------------------------------------


class BatchLoader:
    """Deterministic (input, target) batches of seq_len tokens from memory-mapped shards.

    The shards are cut into non-overlapping windows of seq_len + 1 tokens (never crossing a shard
    boundary). With shuffle, each epoch visits the windows in a permutation drawn from
    (seed, epoch); the position is (epoch, cursor) and is saved in checkpoints. Each of `world`
    processes takes its own `batch`-sized slice of every global batch. With vocab_size, every shard's
    tokens are checked to lie below it. With partial (evaluation), data holding fewer windows than
    one batch gives smaller batches instead (`partial` is then True); with less than one window
    a process, or for training, too little data is refused.
    """

    def __init__(
        self,
        shards: list[Path],
        batch: int,
        seq_len: int,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world: int = 1,
        vocab_size: int | None = None,
        partial: bool = False,
    ) -> None:
        self.tokens = [read_shard(p) for p in shards]
        if vocab_size is not None:
            for path, tokens in zip(shards, self.tokens):
                check_token_ids(path, tokens, vocab_size)
        self.batch, self.seq_len, self.seed, self.shuffle, self.rank, self.world = (
            batch,
            seq_len,
            seed,
            shuffle,
            rank,
            world,
        )
        counts = [max(0, (len(t) - 1) // seq_len) for t in self.tokens]
        self.starts = np.cumsum([0] + counts)
        self.windows = int(self.starts[-1])
        self.partial = partial and world <= self.windows < batch * world
        if self.partial:
            self.batch = self.windows // world
        if self.windows < self.batch * world:
            total = sum(len(t) for t in self.tokens)
            raise OneboxError(
                f"the data ({total} tokens in {len(shards)} shard{'s' if len(shards) != 1 else ''}) holds {self.windows} windows of {seq_len + 1} tokens, "
                f"fewer than {'one a process' if partial else f'one batch of {batch * world}'}: "
                f"{'give more validation text (a larger --val-fraction when preparing) or a smaller seq_len' if partial else 'use a smaller batch_size or seq_len, or more data'}."
            )
        self.epoch = 0
        self.cursor = 0
        self._order = self._permutation()

    def _permutation(self) -> np.ndarray | None:
        if not self.shuffle:
            return None
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.windows)

    def _window(self, index: int) -> np.ndarray:
        shard = int(np.searchsorted(self.starts, index, side="right") - 1)
        offset = (index - int(self.starts[shard])) * self.seq_len
        return self.tokens[shard][offset : offset + self.seq_len + 1]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (inputs, targets) pair, each (batch, seq_len) int64 on the CPU."""
        span = self.batch * self.world
        if self.cursor + span > self.windows:
            self.epoch += 1
            self.cursor = 0
            self._order = self._permutation()
        first = self.cursor + self.rank * self.batch
        picks = range(first, first + self.batch)
        indices = [int(self._order[i]) if self._order is not None else i for i in picks]
        rows = np.stack([self._window(i) for i in indices]).astype(np.int64)
        self.cursor += span
        data = torch.from_numpy(rows)
        return data[:, :-1], data[:, 1:]

    def state_dict(self) -> dict[str, int]:
        """Position in the data, for checkpoints."""
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "windows": self.windows}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a saved position."""
        if state.get("windows") != self.windows:
            raise OneboxError(
                f"the checkpoint's data position is for {state.get('windows')} windows but this data has {self.windows}: "
                "resume with the same data folder, batch and seq_len as the original run."
            )
        self.seed, self.epoch, self.cursor = state["seed"], state["epoch"], state["cursor"]
        self._order = self._permutation()
