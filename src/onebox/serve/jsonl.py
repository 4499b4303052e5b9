"""`onebox generate --jsonl`: one completion per JSON line on stdin, one JSON response per line on stdout."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from pydantic import ValidationError

from onebox.infer.engine import Request as EngineRequest
from onebox.serve.api import ApiError, CompletionBody, Server, TextStream, usage


def collect(server: Server, request: EngineRequest, stops: list[str]) -> tuple[str, int, str]:
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
            stops = server.stop_strings(body, chat=False)
            requests = server.requests(body, prompt_ids, default_max=16)
            results = [collect(server, r, stops) for r in requests]
            response = {
                "choices": [{"index": i, "text": t, "finish_reason": f} for i, (t, _, f) in enumerate(results)],
                "usage": usage(prompt_ids, sum(r[1] for r in results), requests[0].cached_tokens),
            }
        except (json.JSONDecodeError, ValidationError, ApiError) as err:
            failed += 1
            message = err.message if isinstance(err, ApiError) else f"line {number}: {err}".splitlines()[0]
            response = {"error": {"message": message, "type": "invalid_request_error"}}
        if isinstance(data, dict) and "id" in data:
            response = {"id": data["id"], **response}
        write(json.dumps(response))
    return failed
