"""How a model's text is framed in tokens: what goes before a text prompt, how a chat is written, and which
ids end a generation. `onebox generate`, `onebox chat` and the server share it.

onebox's own models (its checkpoints, and folders it exported) begin every training document with the
end-of-text token, so a prompt starts with it and generation stops at it. A Hugging Face model's
tokenizer frames a text itself (Llama 3's post-processor puts <|begin_of_text|> first; Qwen's adds
nothing), as transformers' tokenizer(text) does; a chat is its chat template rendered with
add_generation_prompt and encoded without special tokens, as apply_chat_template does; and generation
stops at every eos id the folder names (generation_config.json's, a list for Llama 3's instruct
models, or where it has none config.json's; and the tokenizer's eos_token).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from onebox.chat import ChatTemplate, TemplateError, load_chat_template
from onebox.errors import OneboxError
from onebox.tokenizer import eos_id

PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
PLAIN_STOPS = ["\nUser:", "\nSystem:"]  # where a chat without a template hands the turn back


@dataclass
class Framing:
    """A model's text framing (see the module docstring)."""

    tokenizer: Tokenizer | None
    start: list[int]  # ids before a text prompt
    own_special: bool  # the tokenizer frames text itself (its post-processor's special tokens)
    stops: tuple[int, ...]  # ids that end a generation
    template: ChatTemplate | None = None

    def encode(self, text: str) -> list[int]:
        """A text prompt as the model's training framed its documents."""
        if self.tokenizer is None:
            raise OneboxError("this model has no tokenizer.json: give the prompt as token ids (--prompt-ids 1,2,3).")
        return self.start + self.tokenizer.encode(text, add_special_tokens=self.own_special).ids

    def render(self, messages: list[dict[str, Any]]) -> str:
        """A conversation as the text the model continues: its chat template with the generation prompt, or
        (no template) plain 'Role: text' lines and 'Assistant:'."""
        if self.template is not None:
            return self.template.render(messages, add_generation_prompt=True)
        for message in messages:
            if message.get("role") not in PLAIN_ROLES:
                raise TemplateError(f"unknown role {str(message.get('role'))[:50]!r}: use system, user or assistant.")
        return "".join(f"{PLAIN_ROLES[m['role']]}: {m['content']}\n" for m in messages) + "Assistant:"

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        """A conversation's prompt ids (a template writes its own special tokens, so none are added)."""
        if self.tokenizer is None:
            raise OneboxError("this model has no tokenizer.json, so a chat cannot be written for it.")
        text = self.render(messages)
        if self.template is not None:
            return self.tokenizer.encode(text, add_special_tokens=False).ids
        return self.encode(text)

    def stop_strings(self, chat: bool) -> list[str]:
        """Text that ends a chat turn where no template and no stop id does (the plain format's next speaker)."""
        return PLAIN_STOPS if chat and self.template is None else []

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else " ".join(map(str, ids))


def onebox_framing(tokenizer: Tokenizer | None, template: ChatTemplate | None = None) -> Framing:
    """The framing of onebox's own models: the end-of-text token before a prompt and at the end."""
    eos = eos_id(tokenizer) if tokenizer is not None else None
    ids = [] if eos is None else [eos]
    return Framing(tokenizer, ids, False, tuple(ids), template)


def _ids(value: Any) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _json(path: Path) -> dict[str, Any]:
    if not path.is_file() or path.stat().st_size > 1 << 20:
        return {}
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise OneboxError(f"{path} is not valid JSON: fix it, or remove it.") from None
    return loaded if isinstance(loaded, dict) else {}


def load_framing(path: str | Path, tokenizer: Tokenizer | None) -> Framing:
    """The framing of the model at `path` (a Hugging Face folder, a checkpoint or a run folder)."""
    folder = Path(path)
    config = _json(folder / "config.json") if folder.is_dir() else {}
    if not config or "onebox_version" in config:  # a checkpoint, a run, or a folder onebox exported
        return onebox_framing(tokenizer, load_chat_template(folder) if config else None)
    generation = _json(folder / "generation_config.json")  # what transformers' generate() stops at, else config.json's
    stops = list(dict.fromkeys(_ids(generation.get("eos_token_id", config.get("eos_token_id")))))
    eos_text = _json(folder / "tokenizer_config.json").get("eos_token")
    eos_text = eos_text.get("content") if isinstance(eos_text, dict) else eos_text
    if tokenizer is not None and isinstance(eos_text, str):
        token = tokenizer.token_to_id(eos_text)
        if token is not None and token not in stops:
            stops.append(token)
    return Framing(tokenizer, [], True, tuple(stops), load_chat_template(folder))
