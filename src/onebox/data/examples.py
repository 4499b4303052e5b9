"""Batches of whole examples (conversations) with their loss masks, as `prepare --format chat|instruction`
writes them: one example a row, cut at seq_len + 1 tokens and padded, the targets -100 (which the loss
ignores) wherever the mask is 0 and in the padding.

The same interface as shards.BatchLoader (next_batch, windows, batch, partial, state_dict), so training
and evaluation take either. Examples whose loss tokens all lie past the cut are left out (a row with
nothing to learn would make a batch's mean loss undefined).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from onebox.data.shards import check_token_ids, read_shard
from onebox.errors import OneboxError

IGNORE = -100  # F.cross_entropy's ignore_index


def example_files(data_dir: Path, split: str) -> tuple[Path, Path, Path] | None:
    """The tokens, mask and offsets of a split of conversation data, or None for text data."""
    files = (data_dir / f"{split}_000000.bin", data_dir / f"{split}_mask.npy", data_dir / f"{split}_examples.npy")
    return files if all(f.is_file() for f in files) else None


class ExampleLoader:
    """Deterministic (input, target) batches of whole examples from a prepared split."""

    def __init__(
        self,
        files: tuple[Path, Path, Path],
        batch: int,
        seq_len: int,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world: int = 1,
        vocab_size: int | None = None,
        partial: bool = False,
        pad_id: int = 0,
    ) -> None:
        tokens_path, mask_path, starts_path = files
        self.tokens = read_shard(tokens_path)
        self.mask = np.load(mask_path, allow_pickle=False)
        starts = np.load(starts_path, allow_pickle=False)
        if len(self.mask) != len(self.tokens) or starts[-1] != len(self.tokens) or np.any(np.diff(starts) <= 0):
            raise OneboxError(
                f"{tokens_path.parent}: the masks or example offsets do not match the tokens: prepare it again."
            )
        if vocab_size is not None:
            check_token_ids(tokens_path, self.tokens, vocab_size)
        self.batch, self.seq_len, self.seed, self.shuffle, self.rank, self.world = (
            batch,
            seq_len,
            seed,
            shuffle,
            rank,
            world,
        )
        self.pad_id = pad_id
        spans = [(int(a), int(min(b, a + seq_len + 1))) for a, b in zip(starts[:-1], starts[1:])]
        self.spans = [(a, b) for a, b in spans if b - a > 1 and self.mask[a + 1 : b].any()]
        self.windows = len(self.spans)
        self.partial = partial and world <= self.windows < batch * world
        if self.partial:
            self.batch = self.windows // world
        if self.windows < self.batch * world:
            raise OneboxError(
                f"{tokens_path.parent} holds {self.windows} examples with assistant tokens within {seq_len + 1} tokens, "
                f"fewer than {'one a process' if partial else f'one batch of {batch * world}'}: use a smaller batch_size, "
                "more examples, or a longer seq_len."
            )
        self.epoch = self.cursor = 0
        self._order = self._permutation()

    def _permutation(self) -> np.ndarray | None:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.windows) if self.shuffle else None

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (inputs, targets), each (batch, seq_len) int64 on the CPU; targets IGNORE outside the loss."""
        span = self.batch * self.world
        if self.cursor + span > self.windows:
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._permutation()
        first = self.cursor + self.rank * self.batch
        x = np.full((self.batch, self.seq_len), self.pad_id, dtype=np.int64)
        y = np.full((self.batch, self.seq_len), IGNORE, dtype=np.int64)
        for row, i in enumerate(range(first, first + self.batch)):
            start, stop = self.spans[int(self._order[i]) if self._order is not None else i]
            ids, mask = self.tokens[start:stop].astype(np.int64), self.mask[start:stop]
            n = len(ids) - 1
            x[row, :n] = ids[:-1]
            y[row, :n] = np.where(mask[1:] > 0, ids[1:], IGNORE)
        self.cursor += span
        return torch.from_numpy(x), torch.from_numpy(y)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "windows": self.windows}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("windows") != self.windows:
            raise OneboxError(
                f"the checkpoint's data position is for {state.get('windows')} examples but this data has {self.windows}: "
                "resume with the same data folder, batch and seq_len as the original run."
            )
        self.seed, self.epoch, self.cursor = state["seed"], state["epoch"], state["cursor"]
        self._order = self._permutation()


def make_loader(data_dir: Path, split: str, shards: list[Path], batch: int, seq_len: int, **kwargs):
    """The loader of a split: whole masked examples for conversation data, windows of the shards for text."""
    import json

    from onebox.data.shards import BatchLoader

    meta_path = Path(data_dir) / "meta.json"
    kind = json.loads(meta_path.read_text()).get("kind") if meta_path.is_file() else None
    if kind == "preference":
        raise OneboxError(
            f"{data_dir} holds preference pairs (prompt, chosen, rejected): they train with a preference objective, "
            "not next-token loss; prepare the chosen conversations with --format chat to fine-tune on them."
        )
    files = example_files(Path(data_dir), split)
    if files is not None:
        return ExampleLoader(files, batch, seq_len, **kwargs)
    return BatchLoader(shards, batch, seq_len, **kwargs)
