"""`onebox serve`: an OpenAI-compatible HTTP API (FastAPI + uvicorn) over the continuous-batching engine.

Endpoints: GET /healthz, GET /v1/models, POST /v1/completions, POST /v1/chat/completions, with
`stream: true` as server-sent events, n, max_tokens, temperature, top_p, top_k, seed, stop, usage
(with the prompt tokens served from the prefix cache) and finish_reason "stop" or "length".

Chat messages go through the tokenizer's chat template when the model folder has one
(tokenizer_config.json); otherwise through the plain template below, which also stops a reply at
the next speaker's turn:

    <|endoftext|>System: {content}\\nUser: {content}\\nAssistant: {content}\\n ... Assistant:

Every bad request gets an OpenAI-shaped error ({"error": {"message", "type", "param", "code"}})
with a 4xx status; a prompt longer than the context is refused, not truncated.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from tokenizers import Tokenizer

from onebox.errors import OneboxError
from onebox.infer.engine import Engine
from onebox.infer.engine import Request as EngineRequest
from onebox.tokenizer import eos_id

PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
CHAT_STOPS = ["\nUser:", "\nSystem:"]


class ApiError(Exception):
    """A request the API refuses: becomes an OpenAI-shaped JSON error."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code


def _error_response(message: str, status: int, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


class Sampling(BaseModel):
    model_config = ConfigDict(protected_namespaces=(), extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None


class CompletionBody(Sampling):
    prompt: str | list[int]


class Message(BaseModel):
    role: str
    content: str


class ChatBody(Sampling):
    messages: list[Message] = Field(min_length=1)


class Server:
    """What the endpoints share: the engine, the tokenizer, the served name and the limits."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer | None, model_name: str, max_n: int = 8, chat_template: str | None = None) -> None:
        self.engine, self.tokenizer, self.model_name, self.max_n = engine, tokenizer, model_name, max_n
        self.chat_template = chat_template
        self.eos = eos_id(tokenizer) if tokenizer is not None else None
        self.created = int(time.time())

    # ---- requests into engine requests
    def check(self, body: Sampling) -> None:
        if body.model != self.model_name:
            raise ApiError(f"The model '{body.model}' does not exist; this server serves '{self.model_name}'.", 404, "model", "model_not_found")
        if not 1 <= body.n <= self.max_n:
            raise ApiError(f"n must be between 1 and {self.max_n} on this server, got {body.n}.", 400, "n")
        if not 0 <= body.temperature <= 2:
            raise ApiError(f"temperature must be between 0 and 2, got {body.temperature}.", 400, "temperature")
        if not 0 < body.top_p <= 1:
            raise ApiError(f"top_p must be in (0, 1], got {body.top_p}.", 400, "top_p")
        if body.top_k < 0:
            raise ApiError(f"top_k must be 0 (off) or positive, got {body.top_k}.", 400, "top_k")
        if body.max_tokens is not None and body.max_tokens < 1:
            raise ApiError(f"max_tokens must be at least 1, got {body.max_tokens}.", 400, "max_tokens")

    def encode(self, text: str, param: str) -> list[int]:
        if self.tokenizer is None:
            raise ApiError("this model has no tokenizer: send the prompt as a list of token ids.", 400, param)
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return ([self.eos] if self.eos is not None else []) + ids

    def prompt_ids(self, body: CompletionBody) -> list[int]:
        """A completion's prompt as token ids (text is encoded after the end-of-text token)."""
        if isinstance(body.prompt, str):
            return self.encode(body.prompt, "prompt")
        if not body.prompt:
            raise ApiError("the prompt is empty.", 400, "prompt")
        return list(body.prompt)

    def requests(self, body: Sampling, prompt_ids: list[int], default_max: int) -> list[EngineRequest]:
        context = self.engine.config.seq_len
        if len(prompt_ids) <= (1 if self.eos is not None and prompt_ids[:1] == [self.eos] else 0):
            raise ApiError("the prompt is empty.", 400, "prompt")
        if len(prompt_ids) >= context:
            raise ApiError(f"the prompt has {len(prompt_ids)} tokens; this model's context is {context} tokens (prompt plus completion).",
                           400, "prompt", "context_length_exceeded")
        max_tokens = body.max_tokens if body.max_tokens is not None else min(default_max, context - len(prompt_ids))
        if len(prompt_ids) + max_tokens > context:
            raise ApiError(f"max_tokens {max_tokens} plus the prompt's {len(prompt_ids)} tokens exceed this model's context of {context} tokens.",
                           400, "max_tokens", "context_length_exceeded")
        if max(prompt_ids) >= self.engine.config.vocab_size or min(prompt_ids) < 0:
            raise ApiError(f"prompt token ids must lie in [0, {self.engine.config.vocab_size}).", 400, "prompt")
        stops = (self.eos,) if self.eos is not None else ()
        made = []
        for i in range(body.n):
            seed = None if body.seed is None else body.seed + i
            request = EngineRequest(list(prompt_ids), max_tokens, body.temperature, body.top_k, body.top_p, seed, stops)
            try:
                made.append(self.engine.submit(request))
            except OneboxError as err:
                raise ApiError(str(err), 400, "prompt") from None
        return made

    def render_chat(self, messages: list[Message]) -> str:
        if self.chat_template:
            import jinja2

            template = jinja2.Environment().from_string(self.chat_template)
            return template.render(messages=[m.model_dump() for m in messages], add_generation_prompt=True)
        for message in messages:
            if message.role not in PLAIN_ROLES:
                raise ApiError(f"unknown role {message.role!r}: use system, user or assistant.", 400, "messages")
        return "".join(f"{PLAIN_ROLES[m.role]}: {m.content}\n" for m in messages) + "Assistant:"

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else " ".join(map(str, ids))


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


def _stops(body: Sampling, chat: bool) -> list[str]:
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > 4:
        raise ApiError("at most 4 stop sequences.", 400, "stop")
    return stops + (CHAT_STOPS if chat else [])


def _collect(server: Server, request: EngineRequest, stops: list[str]) -> tuple[str, int, str]:
    """Run one choice to its end (blocking): its text, completion tokens and finish reason."""
    stream = TextStream(server, stops)
    text = ""
    for token in request.tokens():
        text += stream.push(token)
        if stream.stopped:
            request.cancel()
            for _ in request.tokens():  # drain until the engine confirms the end
                pass
            break
    if request.error:
        raise ApiError(f"generation failed: {request.error}", 500)
    text += stream.finish()
    reason = "stop" if stream.stopped or request.finish_reason == "stop" else "length"
    return text, len(stream.ids), reason


def _usage(prompt_ids: list[int], completion: int, cached: int) -> dict[str, Any]:
    return {"prompt_tokens": len(prompt_ids), "completion_tokens": completion, "total_tokens": len(prompt_ids) + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def create_app(server: Server) -> FastAPI:
    """The FastAPI application over a started engine."""
    app = FastAPI(title="onebox", version="1")

    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError) -> JSONResponse:
        return _error_response(err.message, err.status, err.param, err.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        problem = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in problem.get("loc", ()) if p != "body")
        if problem.get("type") == "json_invalid":
            return _error_response("the request body is not valid JSON.", 400, None, "invalid_json")
        return _error_response(f"invalid request: {where or 'body'}: {problem.get('msg', 'invalid value')}.", 400, where or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        return _error_response(str(err.detail), err.status_code)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "model": server.model_name}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.created, "owned_by": "onebox"}]}

    async def respond(body: Sampling, prompt_ids: list[int], chat: bool) -> Any:
        stops = _stops(body, chat)
        requests = server.requests(body, prompt_ids, default_max=16 if not chat else 256)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if body.stream:
            return StreamingResponse(_events(server, requests, stops, prompt_ids, ident, body.model, chat), media_type="text/event-stream")
        try:
            results = [await run_in_threadpool(_collect, server, r, stops) for r in requests]
        finally:
            for r in requests:
                r.cancel()
        choices = []
        for i, (text, _, reason) in enumerate(results):
            if chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason, "logprobs": None})
            else:
                choices.append({"index": i, "text": text, "finish_reason": reason, "logprobs": None})
        usage = _usage(prompt_ids, sum(r[1] for r in results), requests[0].cached_tokens)
        return {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()), "model": body.model,
                "choices": choices, "usage": usage}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody) -> Any:
        server.check(body)
        return await respond(body, server.prompt_ids(body), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody) -> Any:
        server.check(body)
        return await respond(body, server.encode(server.render_chat(body.messages), "messages"), chat=True)

    return app


async def _events(server: Server, requests: list[EngineRequest], stops: list[str], prompt_ids: list[int], ident: str, model: str,
                  chat: bool) -> AsyncIterator[str]:
    """Server-sent events for all choices, interleaved as tokens arrive; a client that leaves cancels them."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    created = int(time.time())

    def chunk(index: int, text: str | None, reason: str | None, first: bool = False) -> str:
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else ({} if text is None else {"content": text})
            choice = {"index": index, "delta": delta, "finish_reason": reason, "logprobs": None}
        else:
            choice = {"index": index, "text": text or "", "finish_reason": reason, "logprobs": None}
        return f"data: {json.dumps({'id': ident, 'object': kind, 'created': created, 'model': model, 'choices': [choice]})}\n\n"

    streams = [TextStream(server, stops) for _ in requests]
    queue: asyncio.Queue[tuple[int, int | None]] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    for index, request in enumerate(requests):  # the engine thread hands tokens straight into this event loop
        request.listen(lambda token, index=index: loop.call_soon_threadsafe(queue.put_nowait, (index, token)))
    try:
        if chat:
            for i in range(len(requests)):
                yield chunk(i, None, None, first=True)
        open_choices = len(requests)
        while open_choices:
            index, token = await queue.get()
            stream, request = streams[index], requests[index]
            if token is None:
                open_choices -= 1
                if request.error:
                    yield f"data: {json.dumps({'error': {'message': request.error, 'type': 'server_error', 'param': None, 'code': None}})}\n\n"
                    continue
                tail = stream.finish()
                reason = "stop" if stream.stopped or request.finish_reason == "stop" else "length"
                if tail:
                    yield chunk(index, tail, None)
                yield chunk(index, None if chat else "", reason)
                continue
            if stream.stopped:
                continue
            text = stream.push(token)
            if stream.stopped:
                request.cancel()
            if text:
                yield chunk(index, text, None)
        usage = _usage(prompt_ids, sum(len(s.ids) for s in streams), requests[0].cached_tokens)
        yield f"data: {json.dumps({'id': ident, 'object': kind, 'created': created, 'model': model, 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"
    finally:  # the client went away (or we finished): free every slot this response holds
        for request in requests:
            request.cancel()


def load_chat_template(model_path: str | Path) -> str | None:
    """The chat template of a Hugging Face folder's tokenizer_config.json, if it has one."""
    config = Path(model_path) / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text()).get("chat_template")
    except (json.JSONDecodeError, AttributeError):
        return None


def run_server(model_path: str, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None, device: str = "auto",
               max_batch: int = 8, max_n: int = 8) -> None:
    """Load a model, start the engine and serve until interrupted."""
    import uvicorn

    from onebox.device import pick_device
    from onebox.infer.generate import load_model

    model, tokenizer = load_model(model_path, pick_device(device))
    engine = Engine(model, max_batch=max_batch)
    if engine.device.type == "cuda":  # the compiled decode step's CUDA graphs, made before the first request
        print("compiling the decode step (once, before serving) ...", file=sys.stderr, flush=True)
    engine.warmup().start()
    name = model_name or Path(model_path).resolve().name
    app = create_app(Server(engine, tokenizer, name, max_n, load_chat_template(model_path)))
    try:
        uvicorn.run(app, host=host, port=port, log_level="info")
    finally:
        engine.stop()


def run_jsonl(server: Server, lines: Iterable[str], write: Callable[[str], None]) -> int:
    """One completion per JSON line ({"prompt": text or token ids, "max_tokens", "temperature", "top_p",
    "top_k", "n", "stop", "seed"}; "id" is echoed), one JSON response per line in order; a bad line
    gets an {"error": ...} line and the rest go on. Returns how many lines failed."""
    failed = 0
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        data: Any = None
        try:
            data = json.loads(line)
            if not isinstance(data, dict):
                raise ApiError("each line must be a JSON object.")
            body = CompletionBody.model_validate({"model": server.model_name, **data})
            server.check(body)
            prompt_ids = server.prompt_ids(body)
            stops = _stops(body, chat=False)
            requests = server.requests(body, prompt_ids, default_max=16)
            results = [_collect(server, r, stops) for r in requests]
            response = {"choices": [{"index": i, "text": t, "finish_reason": f} for i, (t, _, f) in enumerate(results)],
                        "usage": _usage(prompt_ids, sum(r[1] for r in results), requests[0].cached_tokens)}
        except (json.JSONDecodeError, ValidationError, ApiError) as err:
            failed += 1
            message = err.message if isinstance(err, ApiError) else f"line {number}: {err}".splitlines()[0]
            response = {"error": {"message": message, "type": "invalid_request_error"}}
        if isinstance(data, dict) and "id" in data:
            response = {"id": data["id"], **response}
        write(json.dumps(response))
    return failed
