"""What the server accepts: request bodies, their checks (once, for every endpoint), and the text a choice sends.

Every bad request becomes an ApiError: an OpenAI-shaped error ({"error": {"message", "type", "param",
"code"}}) with a 4xx status, whose message says what is wrong and never carries a traceback or a path.
A prompt longer than the context is refused, not truncated, and a text prompt whose length alone
shows it cannot fit is refused before it is tokenized.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from tokenizers import Tokenizer

from onebox.chat import ChatTemplate, TemplateError
from onebox.errors import OneboxError
from onebox.infer.engine import Engine, QueueFull
from onebox.infer.engine import Request as EngineRequest
from onebox.infer.framing import Framing, onebox_framing
from onebox.infer.requests import SEED_RANGE, InvalidRequest, check_prompt, check_sampling

MAX_STOPS = 4


class ApiError(Exception):
    """A request the API refuses: becomes an OpenAI-shaped JSON error."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code


def _strings(value: Any) -> Any:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, BaseModel):
        for item in value.__dict__.values():
            yield from _strings(item)


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    model_config = ConfigDict(protected_namespaces=(), extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])

    @model_validator(mode="after")
    def _valid_unicode(self) -> Sampling:
        for text in _strings(self):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(
                    "the request holds a string that is not valid Unicode (a lone surrogate such as \\ud800)"
                ) from None
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionBody(Sampling):
    prompt: str | list[int]
    echo: bool = False  # the prompt is returned before the completion (with its log-probabilities under logprobs)
    logprobs: int | None = Field(None, ge=0, le=20)  # each token's log-probability and the top-N alternatives


class Message(BaseModel):
    role: str
    content: str


class ChatBody(Sampling):
    messages: list[Message] = Field(min_length=1)


def _max_token_bytes(tokenizer: Tokenizer) -> int:
    """The most UTF-8 bytes any one token decodes to, or is written as (special tokens included)."""
    ids = range(tokenizer.get_vocab_size(with_added_tokens=True))
    decoded = tokenizer.decode_batch([[i] for i in ids], skip_special_tokens=False)
    written = (tokenizer.id_to_token(i) or "" for i in ids)
    return max(
        max((len(t.encode("utf-8", "replace")) for t in decoded), default=1),
        max((len(t.encode("utf-8", "replace")) for t in written), default=1),
    )


class Server:
    """What the endpoints share: the engine, the tokenizer, the served name and the limits."""

    def __init__(
        self,
        engine: Engine,
        tokenizer: Tokenizer | None,
        model_name: str,
        max_n: int = 8,
        chat_template: ChatTemplate | str | None = None,
        framing: Framing | None = None,
    ) -> None:
        """`framing`: how the model's text is framed (infer.framing.load_framing of its folder); None: onebox's
        own framing with `chat_template`."""
        self.engine, self.tokenizer, self.model_name, self.max_n = engine, tokenizer, model_name, max_n
        template = ChatTemplate(chat_template) if isinstance(chat_template, str) else chat_template
        self.framing = framing or onebox_framing(tokenizer, template)
        self.created = int(time.time())
        # The most bytes of text one token stands for: a text longer than this many bytes per token of context cannot fit.
        self.max_token_bytes = _max_token_bytes(tokenizer) if tokenizer is not None else 1

    # ---- requests into engine requests
    def check(self, body: Sampling) -> None:
        if body.model != self.model_name:
            raise ApiError(
                f"The model '{body.model[:200]}' does not exist; this server serves '{self.model_name}'.",
                404,
                "model",
                "model_not_found",
            )
        if not 1 <= body.n <= self.max_n:
            raise ApiError(f"n must be between 1 and {self.max_n} on this server, got {body.n}.", 400, "n")
        try:
            check_sampling(body.temperature, body.top_k, body.top_p, body.seed, body.max_tokens)
        except InvalidRequest as err:
            raise ApiError(str(err), 400, err.param) from None
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > MAX_STOPS or any(len(s) > 256 for s in stops):
            raise ApiError(f"at most {MAX_STOPS} stop sequences of at most 256 characters each.", 400, "stop")

    def encode(self, text: str, param: str, templated: bool = False) -> list[int]:
        """A text prompt as token ids, framed as the model's documents were (`templated`: a rendered chat
        template, encoded as it is); refused by its length alone when it cannot fit."""
        if self.tokenizer is None:
            raise ApiError("this model has no tokenizer: send the prompt as a list of token ids.", 400, param)
        context = self.engine.config.seq_len
        size = len(text.encode("utf-8"))
        if size > 2 * self.max_token_bytes * context:  # (twice: a normalizer may drop some characters)
            raise ApiError(
                f"the prompt ({size:,} bytes of text) is far longer than this model's context of {context} tokens.",
                400,
                param,
                "context_length_exceeded",
            )
        if templated:  # a chat template writes its own special tokens
            return self.tokenizer.encode(text, add_special_tokens=False).ids
        return self.framing.encode(text)

    def check_context(self, prompt_ids: list[int]) -> None:
        """A prompt to be scored whole: its ids in the vocabulary and no longer than the context."""
        config = self.engine.config
        try:
            check_prompt(prompt_ids, config.vocab_size, config.seq_len + 1)  # (room for no new token)
        except InvalidRequest as err:
            raise ApiError(str(err), 400, err.param, err.code) from None

    def prompt_ids(self, body: CompletionBody) -> list[int]:
        """A completion's prompt as token ids (text is encoded after the end-of-text token)."""
        if isinstance(body.prompt, str):
            return self.encode(body.prompt, "prompt")
        if not body.prompt:
            raise ApiError("the prompt is empty.", 400, "prompt")
        return list(body.prompt)

    def requests(self, body: Sampling, prompt_ids: list[int], default_max: int) -> list[EngineRequest]:
        """The engine requests of one API request (one a choice), all queued or none."""
        config = self.engine.config
        start = self.framing.start
        leading = len(start) if start and prompt_ids[: len(start)] == start else 0
        try:
            if body.max_tokens is None:  # the server's default, within the context the prompt leaves
                room = check_prompt(prompt_ids, config.vocab_size, config.seq_len, leading=leading)
                max_tokens = min(default_max, room)
            else:
                max_tokens = check_prompt(prompt_ids, config.vocab_size, config.seq_len, body.max_tokens, True, leading)
        except InvalidRequest as err:
            raise ApiError(str(err), 400, err.param, err.code) from None
        stops = self.framing.stops
        seeds = [None if body.seed is None else body.seed + i for i in range(body.n)]
        made = [
            EngineRequest(list(prompt_ids), max_tokens, body.temperature, body.top_k, body.top_p, seed, stops)
            for seed in seeds
        ]
        try:
            return self.engine.submit_all(made)
        except QueueFull as err:
            raise ApiError(str(err), 429, None, "queue_full") from None
        except OneboxError as err:
            raise ApiError(str(err), 400, "prompt") from None

    def chat_prompt_ids(self, body: ChatBody) -> list[int]:
        """A chat's prompt: its messages rendered (the model's chat template, or the plain format), then encoded."""
        if self.tokenizer is None:
            raise ApiError("this model has no tokenizer: use /v1/completions with token ids.", 400, "messages")
        return self.encode(self.render_chat(body.messages), "messages", templated=self.framing.template is not None)

    def render_chat(self, messages: list[Message]) -> str:
        try:
            return self.framing.render([m.model_dump() for m in messages])
        except TemplateError as err:
            raise ApiError(str(err), 400, "messages") from None

    def stop_strings(self, body: Sampling, chat: bool) -> list[str]:
        """The stop sequences of a request (a chat through the plain format also stops at the next speaker's turn)."""
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        return stops + self.framing.stop_strings(chat)

    def decode(self, ids: list[int]) -> str:
        return self.framing.decode(ids)


class TextStream:
    """Detokenizes one choice's tokens incrementally and cuts it at the first stop sequence."""

    def __init__(self, server: Server, stops: list[str]) -> None:
        self.server, self.stops = server, [s for s in stops if s]
        self.ids: list[int] = []
        self.sent = 0
        self.stopped = False

    def push(self, token: int) -> str:
        """The new text that is safe to send after this token ('' while a stop sequence may be forming)."""
        self.ids.append(token)
        text = self.server.decode(self.ids)
        cut = min((i for i in (text.find(s, max(0, self.sent - len(s) + 1)) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._take(text[:cut])
        hold = max((len(s) - 1 for s in self.stops), default=0)
        if text.endswith("\ufffd"):  # a character still missing some of its bytes
            hold = max(hold, 1)
        return self._take(text[: max(self.sent, len(text) - hold)])

    def finish(self) -> str:
        """Whatever was held back, once the choice has ended without a stop sequence."""
        return "" if self.stopped else self._take(self.server.decode(self.ids))

    def _take(self, text: str) -> str:
        new, self.sent = text[self.sent :], max(self.sent, len(text))
        return new


def usage(prompt_ids: list[int], completion: int, cached: int) -> dict[str, Any]:
    return {
        "prompt_tokens": len(prompt_ids),
        "completion_tokens": completion,
        "total_tokens": len(prompt_ids) + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }
