"""Chat templates of Hugging Face model folders, rendered as transformers renders them, in a sandbox.

A folder's template (chat_template.jinja, or tokenizer_config.json's `chat_template`) is untrusted
text from the internet, so it is rendered in Jinja's immutable sandbox: it can read the messages and
call the few helpers chat templates use (raise_exception, strftime_now, a JSON filter, namespace,
dict), but reach no Python attribute that starts with an underscore, no module and no file. The
environment's options (trim_blocks, lstrip_blocks, loop controls) and variables (messages,
add_generation_prompt, the special tokens of tokenizer_config.json) are those of transformers'
apply_chat_template, so a template renders the same text in both.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from onebox.errors import OneboxError

MAX_TEMPLATE_BYTES = 1 << 20  # the largest chat template onebox renders (real ones are a few KB)
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class TemplateError(OneboxError):
    """A chat template refused the conversation (its raise_exception) or failed to render."""


def _environment() -> Any:
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        value: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        # Jinja's own filter escapes HTML characters, which chat templates do not want
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format: str) -> str:
        return datetime.now().strftime(format)

    class Namespace(jinja2.utils.Namespace):
        """jinja2's namespace(), refusing names that start with an underscore."""

        def __init__(*args: Any, **kwargs: Any) -> None:  # jinja2's own signature trick, so namespace(self=...) works
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a chat template may not set the attribute {name!r}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(
        raise_exception=raise_exception,
        strftime_now=strftime_now,
        namespace=Namespace,
        dict=lambda *args, **kwargs: dict(*args, **kwargs),
    )
    return env


class ChatTemplate:
    """A compiled chat template and the special tokens it may refer to."""

    def __init__(self, text: str, special_tokens: dict[str, str] | None = None) -> None:
        import jinja2

        if len(text.encode("utf-8", "replace")) > MAX_TEMPLATE_BYTES:
            raise OneboxError(
                f"the chat template is larger than {MAX_TEMPLATE_BYTES // 1024} KB: it is not a real one."
            )
        try:
            self.template = _environment().from_string(text)
        except jinja2.exceptions.TemplateError as err:
            raise OneboxError(f"the model folder's chat template does not parse ({err}): fix or remove it.") from None
        self.text = text
        self.special_tokens = dict(special_tokens or {})

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **variables: Any) -> str:
        """The conversation as the model's prompt text; TemplateError when the template refuses it."""
        import jinja2

        try:
            return self.template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens, **variables
            )
        except jinja2.exceptions.SecurityError as err:
            raise TemplateError(f"the chat template tried something a template may not do ({err}).") from None
        except jinja2.exceptions.TemplateError as err:
            raise TemplateError(f"the chat template refused the conversation: {err}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError, RecursionError) as err:
            raise TemplateError(
                f"the chat template failed on this conversation ({type(err).__name__}: {err})."
            ) from None


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(
        value.get("content"), str
    ):  # AddedToken as tokenizer_config.json writes it
        return value["content"]
    return None


def load_chat_template(folder: str | Path) -> ChatTemplate | None:
    """The chat template of a Hugging Face folder (chat_template.jinja first, then tokenizer_config.json's
    `chat_template`: a string, or a list of named templates whose "default" is used), or None."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    config: dict[str, Any] = {}
    config_path = folder / "tokenizer_config.json"
    if config_path.is_file() and config_path.stat().st_size <= 64 * MAX_TEMPLATE_BYTES:
        try:
            loaded = json.loads(config_path.read_text(encoding="utf-8"))
            config = loaded if isinstance(loaded, dict) else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise OneboxError(
                f"{config_path} is not valid JSON: fix it, or remove it to serve without its chat template."
            ) from None
    text: Any = None
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        text = jinja_file.read_text(encoding="utf-8", errors="replace")
    else:
        text = config.get("chat_template")
        if isinstance(text, list):
            named = {t.get("name"): t.get("template") for t in text if isinstance(t, dict)}
            text = named.get("default")
    if not isinstance(text, str) or not text.strip():
        return None
    special = {key: token for key in SPECIAL_TOKEN_KEYS if (token := _token_text(config.get(key))) is not None}
    return ChatTemplate(text, special)
