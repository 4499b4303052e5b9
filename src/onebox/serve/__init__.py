"""The OpenAI-compatible server: request checks (api), the HTTP app (http) and the JSONL batch mode (jsonl)."""

from onebox.serve.api import ApiError, Message, Server, TextStream
from onebox.serve.http import create_app, run_server
from onebox.serve.jsonl import run_jsonl

__all__ = ["ApiError", "Message", "Server", "TextStream", "create_app", "run_jsonl", "run_server"]
