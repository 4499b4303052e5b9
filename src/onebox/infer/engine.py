"""The decode engine behind `onebox serve`: continuous batching over a static KV cache, and a prefix cache.

The cache holds `max_batch` rows (slots). A new request is prefilled into a free slot (after
copying the KV of the longest cached prefix of its prompt, if any) and then decodes together with
every other active request, one token per step, each row at its own position; a finished or
cancelled request frees its slot at once, and waiting requests join between two decode steps.
One thread runs the model; callers submit requests from any thread and read tokens from each
request's queue.
"""

from __future__ import annotations

import collections
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from onebox.errors import OneboxError
from onebox.infer.sampling import sample_next
from onebox.model import Transformer


@dataclass
class Request:
    """One completion: the prompt, how to sample, and the channel its tokens come back on."""

    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: tuple[int, ...] = ()
    events: queue.Queue = field(default_factory=queue.Queue)  # token ids, then None at the end
    cancelled: threading.Event = field(default_factory=threading.Event)
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    finish_reason: str | None = None  # "stop", "length" or "cancelled", set before the final None
    error: str | None = None

    def cancel(self) -> None:
        """Ask the engine to stop this request and free its slot (e.g. the client went away)."""
        self.cancelled.set()

    def tokens(self, timeout: float | None = None) -> Iterator[int]:
        """The generated token ids as they arrive (blocking), ending when the request finishes."""
        while True:
            token = self.events.get(timeout=timeout)
            if token is None:
                return
            yield token


@dataclass
class _Active:
    request: Request
    position: int  # where the next token's KV is written
    last: int  # the token fed at the next step
    generated: int
    generator: torch.Generator


class PrefixCache:
    """KV of recent prompts, least recently used first out, bounded by entries and by tokens held."""

    def __init__(self, max_entries: int = 16, max_tokens: int = 65536) -> None:
        self.max_entries, self.max_tokens = max_entries, max_tokens
        self.entries: collections.OrderedDict[tuple[int, ...], list[tuple[Tensor, Tensor]]] = collections.OrderedDict()

    def lookup(self, prompt: list[int]) -> tuple[int, list[tuple[Tensor, Tensor]] | None]:
        """The longest cached prefix of `prompt` usable for it (at least one token is left to prefill)."""
        best, best_key = 0, None
        for key in self.entries:
            common = 0
            for a, b in zip(key, prompt):
                if a != b:
                    break
                common += 1
            common = min(common, len(prompt) - 1)
            if common > best:
                best, best_key = common, key
        if best_key is None:
            return 0, None
        self.entries.move_to_end(best_key)
        return best, self.entries[best_key]

    def store(self, prompt: list[int], kv: list[tuple[Tensor, Tensor]]) -> None:
        key = tuple(prompt)
        if len(key) > self.max_tokens or self.max_entries < 1:
            return
        self.entries[key] = kv
        self.entries.move_to_end(key)
        while len(self.entries) > self.max_entries or sum(len(k) for k in self.entries) > self.max_tokens:
            self.entries.popitem(last=False)


class Engine:
    """Continuous-batching decoder over one model."""

    def __init__(self, model: Transformer, max_batch: int = 8, prefix_entries: int = 16, compile: bool | None = None) -> None:
        self.model = model.eval()
        self.config = model.config
        self.max_batch = max_batch
        self.device = model.embed_tokens.weight.device
        self.caches = model.new_kv_caches(max_batch, self.config.seq_len)
        self.slots: list[_Active | None] = [None] * max_batch
        self.pending: collections.deque[Request] = collections.deque()
        self.prefix = PrefixCache(prefix_entries)
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.decode_steps = 0
        self.most_active = 0  # the largest number of requests decoded in one step
        # The decode step has static shapes (all max_batch rows, one token each), so on CUDA it is
        # compiled with CUDA graphs (gpt-fast's recipe): one graph launch per token instead of hundreds.
        compile = self.device.type == "cuda" if compile is None else compile
        if compile:  # the caches are mutated in place at fixed addresses: let CUDA graphs keep them as they are
            for cache in self.caches:
                torch._dynamo.mark_static_address(cache.k)
                torch._dynamo.mark_static_address(cache.v)
        self._decode = torch.compile(self._decode_eager, mode="reduce-overhead", fullgraph=True) if compile else self._decode_eager

    def _decode_eager(self, tokens: Tensor, positions: Tensor) -> Tensor:
        return self.model(tokens, positions, self.caches)[:, -1]

    # ---- submitting (any thread)
    def check(self, prompt_ids: list[int], max_new_tokens: int) -> int:
        """Refuse a request the model cannot serve; return max_new_tokens cut to the context left."""
        if not prompt_ids:
            raise OneboxError("the prompt is empty.")
        if min(prompt_ids) < 0 or max(prompt_ids) >= self.config.vocab_size:
            raise OneboxError(f"prompt token ids must lie in [0, {self.config.vocab_size}).")
        if len(prompt_ids) >= self.config.seq_len:
            raise OneboxError(f"the prompt has {len(prompt_ids)} tokens; the model's context is {self.config.seq_len} (prompt plus completion).")
        if max_new_tokens < 1:
            raise OneboxError("max_tokens must be at least 1.")
        return min(max_new_tokens, self.config.seq_len - len(prompt_ids))

    def submit(self, request: Request) -> Request:
        request.max_new_tokens = self.check(request.prompt_ids, request.max_new_tokens)
        with self.cond:
            self.pending.append(request)
            self.cond.notify()
        return request

    def start(self) -> Engine:
        """Run the decode loop in a background thread."""
        self.thread = threading.Thread(target=self._loop, name="onebox-engine", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        if self.thread is not None:
            self.thread.join()

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.stopping and not self.pending and not any(self.slots):
                    self.cond.wait()
                if self.stopping:
                    return
            try:
                self.step()
            except Exception as err:  # a failing step must not leave clients waiting forever
                self._fail_all(f"{type(err).__name__}: {err}")

    def _fail_all(self, message: str) -> None:
        with self.cond:
            waiting = list(self.pending)
            self.pending.clear()
        for request in waiting + [a.request for a in self.slots if a is not None]:
            request.error = message
            request.finish_reason = "error"
            request.events.put(None)
        self.slots = [None] * self.max_batch

    # ---- the model thread
    @torch.inference_mode()
    def step(self) -> None:
        """Admit waiting requests into free slots (prefill), then decode one token for every active one."""
        self._admit()
        rows = [i for i, a in enumerate(self.slots) if a is not None]
        if not rows:
            return
        tokens = torch.zeros(self.max_batch, 1, dtype=torch.long)
        positions = torch.zeros(self.max_batch, 1, dtype=torch.long)
        for i in rows:  # idle rows decode a dummy token at position 0 of their own, unused, row
            tokens[i, 0], positions[i, 0] = self.slots[i].last, self.slots[i].position
        logits = self._decode(tokens.to(self.device), positions.to(self.device))
        self.decode_steps += 1
        self.most_active = max(self.most_active, len(rows))
        greedy = logits.argmax(dim=-1)  # one kernel for every greedy row; sampled rows draw with their own generator
        chosen = [greedy[i] if self.slots[i].request.temperature <= 0 else self._sample(self.slots[i], logits[i : i + 1]) for i in rows]
        for i, token in zip(rows, torch.stack(chosen).tolist()):
            self.slots[i].position += 1
            self._emit(i, token)

    def _admit(self) -> None:
        while True:
            with self.cond:
                free = next((i for i, a in enumerate(self.slots) if a is None), None)
                if free is None or not self.pending:
                    return
                request = self.pending.popleft()
            if request.cancelled.is_set():
                self._finish(request, "cancelled")
                continue
            self._prefill(free, request)

    def _prefill(self, slot: int, request: Request) -> None:
        prompt = request.prompt_ids
        cached, kv = self.prefix.lookup(prompt)
        views = [cache.rows(slot, slot + 1) for cache in self.caches]
        if kv is not None:
            for view, (k, v) in zip(views, kv):
                view.k[:, :, :cached] = k[:, :, :cached]
                view.v[:, :, :cached] = v[:, :, :cached]
        request.cached_tokens = cached
        ids = torch.tensor([prompt[cached:]], device=self.device)
        logits = self.model(ids, torch.arange(cached, len(prompt), device=self.device), views)[:, -1]
        self.prefix.store(prompt, [(view.k[:, :, : len(prompt)].clone(), view.v[:, :, : len(prompt)].clone()) for view in views])
        generator = torch.Generator(device=self.device)
        generator.manual_seed(request.seed if request.seed is not None else int(torch.randint(0, 2**62, ()).item()))
        active = _Active(request, len(prompt), 0, 0, generator)
        self.slots[slot] = active
        self._emit(slot, int(self._sample(active, logits)))

    def _sample(self, active: _Active, logits: Tensor) -> Tensor:
        r = active.request
        return sample_next(logits, r.temperature, r.top_k, r.top_p, active.generator)[0]

    def _emit(self, slot: int, token: int) -> None:
        active = self.slots[slot]
        request = active.request
        if request.cancelled.is_set():
            reason = "cancelled"
        elif token in request.stop_ids:
            reason = "stop"
        else:
            request.events.put(token)
            active.generated += 1
            active.last = token
            reason = "length" if active.generated >= request.max_new_tokens else None
        if reason is not None:
            self.slots[slot] = None
            self._finish(request, reason)

    @staticmethod
    def _finish(request: Request, reason: str) -> None:
        request.finish_reason = reason
        request.events.put(None)
