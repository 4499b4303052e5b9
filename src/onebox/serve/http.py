"""`onebox serve`: an OpenAI-compatible HTTP API (FastAPI + uvicorn) over the continuous-batching engine.

Endpoints: GET /healthz, GET /v1/models, POST /v1/completions, POST /v1/chat/completions, with
`stream: true` as server-sent events (a final usage chunk only when `stream_options.include_usage`
asks for it, as OpenAI does), n, max_tokens, temperature, top_p, top_k, seed, stop, usage (with the
prompt tokens served from the prefix cache) and finish_reason "stop" or "length".

Chat messages go through the model folder's chat template (rendered in a sandbox, see onebox.chat);
without one, through the plain template below, which also stops a reply at the next speaker's turn:

    <|endoftext|>System: {content}\\nUser: {content}\\nAssistant: {content}\\n ... Assistant:

One request never harms another: bodies are limited in size (413), prompts are rendered and
tokenized off the event loop, the queue of waiting requests is bounded (429), a request whose
client goes away (streaming or not) is cancelled and frees its slot, and any failure inside the
engine ends only the request it belongs to.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from onebox.errors import OneboxError
from onebox.infer.engine import Engine
from onebox.infer.engine import Request as EngineRequest
from onebox.serve.api import ApiError, ChatBody, CompletionBody, Sampling, Server, TextStream, usage
from onebox.serve.logprobs import score

DEFAULT_MAX_BODY_BYTES = 8 * 2**20
DISCONNECT_POLL_SECONDS = 0.25  # how often a waiting non-streaming request looks whether its client is still there


def _error_response(message: str, status: int, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = "server_error" if status >= 500 else "rate_limit_error" if status == 429 else "invalid_request_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is answered 413 (by its Content-Length before it
    is read, or as soon as the bytes read pass the limit), so no body is ever held whole past the limit."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(
        self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable[[dict], Awaitable[None]]
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            response = _error_response(
                f"the request body is larger than this server's limit of {self.limit:,} bytes.",
                413,
                None,
                "body_too_large",
            )
            await response(scope, receive, send)
            return
        received = 0

        async def limited() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise StarletteHTTPException(
                        413, f"the request body is larger than this server's limit of {self.limit:,} bytes."
                    )
            return message

        await self.app(scope, limited, send)


class ClientGone(Exception):
    """The client of a request disconnected: its engine requests were cancelled."""


async def _tokens(
    requests: list[EngineRequest], disconnected: Callable[[], Awaitable[bool]] | None = None
) -> AsyncIterator[tuple[int, int | None]]:
    """(choice index, token) as the engine hands them out, None ending a choice; every choice's end is yielded.
    With `disconnected` (looked at every DISCONNECT_POLL_SECONDS), a client that leaves cancels the requests (ClientGone)."""
    queue: asyncio.Queue[tuple[int, int | None]] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    for index, request in enumerate(requests):  # the engine thread hands tokens straight into this event loop
        request.listen(lambda token, index=index: loop.call_soon_threadsafe(queue.put_nowait, (index, token)))
    open_choices = len(requests)
    checked = time.monotonic()
    while open_choices:
        try:
            index, token = (
                await asyncio.wait_for(queue.get(), DISCONNECT_POLL_SECONDS) if disconnected else await queue.get()
            )
        except asyncio.TimeoutError:
            index = None
        if disconnected is not None and time.monotonic() - checked >= DISCONNECT_POLL_SECONDS:
            checked = time.monotonic()
            if await disconnected():
                for request in requests:
                    request.cancel()
                raise ClientGone
        if index is None:
            continue
        open_choices -= token is None
        yield index, token


def _reason(stream: TextStream, request: EngineRequest) -> str:
    return "stop" if stream.stopped or request.finish_reason == "stop" else "length"


async def _complete(
    server: Server, requests: list[EngineRequest], stops: list[str], http: Request
) -> list[tuple[str, list[int], str]]:
    """Run every choice to its end: (text, completion token ids, finish reason) each; a client that leaves cancels them."""
    streams = [TextStream(server, stops) for _ in requests]
    texts = [""] * len(requests)
    async for index, token in _tokens(requests, http.is_disconnected):
        stream, request = streams[index], requests[index]
        if token is None:
            if request.error:
                raise ApiError(f"generation failed: {request.error}", 500)
            texts[index] += stream.finish()
        elif not stream.stopped:
            texts[index] += stream.push(token)
            if stream.stopped:
                request.cancel()
    return [
        (text, list(stream.ids), _reason(stream, request)) for text, stream, request in zip(texts, streams, requests)
    ]


async def _events(
    server: Server,
    requests: list[EngineRequest],
    stops: list[str],
    prompt_ids: list[int],
    ident: str,
    model: str,
    chat: bool,
    include_usage: bool,
) -> AsyncIterator[str]:
    """Server-sent events for all choices, interleaved as tokens arrive; a client that leaves cancels them."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    created = int(time.time())
    extra = {"usage": None} if include_usage else {}

    def chunk(index: int, text: str | None, reason: str | None, first: bool = False) -> str:
        if chat:
            delta: dict[str, Any] = (
                {"role": "assistant", "content": ""} if first else ({} if text is None else {"content": text})
            )
            choice = {"index": index, "delta": delta, "finish_reason": reason, "logprobs": None}
        else:
            choice = {"index": index, "text": text or "", "finish_reason": reason, "logprobs": None}
        return f"data: {json.dumps({'id': ident, 'object': kind, 'created': created, 'model': model, 'choices': [choice], **extra})}\n\n"

    streams = [TextStream(server, stops) for _ in requests]
    try:
        if chat:
            for i in range(len(requests)):
                yield chunk(i, None, None, first=True)
        async for index, token in _tokens(requests):
            stream, request = streams[index], requests[index]
            if token is None:
                if request.error:
                    yield f"data: {json.dumps({'error': {'message': f'generation failed: {request.error}', 'type': 'server_error', 'param': None, 'code': None}})}\n\n"
                    continue
                tail = stream.finish()
                if tail:
                    yield chunk(index, tail, None)
                yield chunk(index, None if chat else "", _reason(stream, request))
            elif not stream.stopped:
                text = stream.push(token)
                if stream.stopped:
                    request.cancel()
                if text:
                    yield chunk(index, text, None)
        if include_usage:
            total = usage(prompt_ids, sum(len(s.ids) for s in streams), requests[0].cached_tokens)
            yield f"data: {json.dumps({'id': ident, 'object': kind, 'created': created, 'model': model, 'choices': [], 'usage': total})}\n\n"
        yield "data: [DONE]\n\n"
    finally:  # the client went away (or we finished): free every slot this response holds
        for request in requests:
            request.cancel()


def create_app(server: Server, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """The FastAPI application over a started engine."""
    app = FastAPI(title="onebox", version="1")
    app.add_middleware(BodyLimit, limit=max_body_bytes)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError) -> JSONResponse:
        return _error_response(err.message, err.status, err.param, err.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        problem = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in problem.get("loc", ()) if p != "body")
        if problem.get("type") == "json_invalid":
            return _error_response("the request body is not valid JSON.", 400, None, "invalid_json")
        return _error_response(
            f"invalid request: {where or 'body'}: {problem.get('msg', 'invalid value')}.", 400, where or None
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        return _error_response(str(err.detail), err.status_code)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, err: Exception) -> JSONResponse:  # never a traceback or a path to the client
        return _error_response(f"the server failed on this request ({type(err).__name__}).", 500)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "model": server.model_name}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": server.model_name, "object": "model", "created": server.created, "owned_by": "onebox"}],
        }

    async def respond(body: Sampling, prompt_ids: list[int], chat: bool, http: Request) -> Any:
        stops = server.stop_strings(body, chat)
        requests = server.requests(body, prompt_ids, default_max=16 if not chat else 256)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if body.stream:
            return StreamingResponse(
                _events(server, requests, stops, prompt_ids, ident, body.model, chat, body.include_usage),
                media_type="text/event-stream",
            )
        try:
            results = await _complete(server, requests, stops, http)
        except ClientGone:
            return JSONResponse({}, status_code=499)  # nobody reads it
        finally:
            for r in requests:
                r.cancel()
        choices = []
        for i, (text, _, reason) in enumerate(results):
            if chat:
                choices.append(
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": reason,
                        "logprobs": None,
                    }
                )
            else:
                choices.append({"index": i, "text": text, "finish_reason": reason, "logprobs": None})
        if not chat and (body.echo or body.logprobs is not None):
            for choice, (_, ids, _) in zip(choices, results):
                await with_logprobs(choice, body, prompt_ids, ids)
        total = usage(prompt_ids, sum(len(r[1]) for r in results), requests[0].cached_tokens)
        return {
            "id": ident,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": body.model,
            "choices": choices,
            "usage": total,
        }

    async def with_logprobs(
        choice: dict[str, Any], body: CompletionBody, prompt_ids: list[int], ids: list[int]
    ) -> None:
        """echo: the prompt before the text; logprobs: the tokens' log-probabilities (serve.logprobs.score)."""
        start = 0 if body.echo else len(prompt_ids)
        top = body.logprobs or 0
        scored = await run_in_threadpool(score, server.engine.plain, server.tokenizer, prompt_ids + ids, start, top)
        if body.echo:
            prompt = body.prompt if isinstance(body.prompt, str) else "".join(scored["tokens"][: len(prompt_ids)])
            choice["text"] = prompt + choice["text"]
        choice["logprobs"] = scored if body.logprobs is not None else None

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: Request) -> Any:
        if (body.echo or body.logprobs is not None) and body.stream:
            raise ApiError("logprobs and echo are answered whole: send them with stream false.", 400, "stream")
        if body.max_tokens == 0 and body.echo:  # scoring the prompt alone (lm-evaluation-harness' loglikelihood)
            server.check(body.model_copy(update={"max_tokens": None}))
            prompt_ids = await run_in_threadpool(server.prompt_ids, body)
            server.check_context(prompt_ids)
            choice = {"index": 0, "text": "", "finish_reason": "length", "logprobs": None}
            await with_logprobs(choice, body, prompt_ids, [])
            return {
                "id": f"cmpl-{uuid.uuid4().hex[:24]}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": body.model,
                "choices": [dict(choice, index=i) for i in range(body.n)],
                "usage": usage(prompt_ids, 0, 0),
            }
        server.check(body)
        return await respond(body, await run_in_threadpool(server.prompt_ids, body), False, http)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, http: Request) -> Any:
        server.check(body)
        return await respond(body, await run_in_threadpool(server.chat_prompt_ids, body), True, http)

    return app


def check_port(host: str, port: int) -> None:
    """Refuse a port that is taken (before the model loads, so the user hears it at once)."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as err:
        raise OneboxError(
            f"cannot listen on {host}:{port} ({err.strerror}): another program holds that port, or the address is not this "
            f"machine's. Choose another with --port (e.g. --port {port + 1}) or --host."
        ) from None


def run_server(
    model_path: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_name: str | None = None,
    device: str = "auto",
    max_batch: int = 8,
    max_n: int = 8,
    max_queue: int = 64,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    context: int | None = None,
    experts: dict[str, int | None] | None = None,
) -> None:
    """Load a model (at `context` tokens; `experts`: load_model's expert_slots, gpu_memory and host_memory,
    where given), start the engine and serve until interrupted."""
    import uvicorn

    from onebox.device import pick_device
    from onebox.infer.framing import load_framing
    from onebox.infer.generate import load_model

    check_port(host, port)
    target = pick_device(device)  # bf16 on a GPU, as the decode kernels and `bench serve` run it
    dtype = torch.bfloat16 if target.type == "cuda" else torch.float32
    model, tokenizer = load_model(model_path, target, dtype, context, batch=max_batch, **(experts or {}))
    framing = load_framing(model_path, tokenizer)  # its chat template, what starts a prompt, its stop ids
    engine = Engine(model, max_batch=max_batch, max_queue=max_queue)
    for note in engine.kernel_notes:
        print(f"note: {note}", file=sys.stderr, flush=True)
    if engine.device.type == "cuda":  # the compiled decode step's CUDA graphs, made before the first request
        print("compiling the decode step (once, before serving) ...", file=sys.stderr, flush=True)
    engine.warmup().start()
    name = model_name or Path(model_path).resolve().name
    app = create_app(Server(engine, tokenizer, name, max_n, framing=framing), max_body_bytes)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info")
    finally:
        engine.stop()
