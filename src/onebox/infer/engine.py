"""The decode engine behind `onebox serve`: continuous batching over a static KV cache, and a prefix cache.

The cache holds `max_batch` rows (slots). Waiting requests are prefilled together, one padded batch
into the free slots (after copying the KV of the longest cached prefix of each prompt, if any); then
every active request decodes together, one token per step, each row at its own position. A finished
or cancelled request frees its slot at once, and waiting requests join between two decode steps.

A decode step keeps its state on the device: the token each row feeds next and its position live in
static buffers that the (CUDA-graph-captured) step updates itself, so the host launches one graph
and one small copy per step and never waits for the step it just launched: it reads the previous
step's tokens (copied to pinned memory) while the GPU computes the next (gpt-fast's static-cache
recipe, with the host work overlapped). A row whose request just ended is decoded once more for
nothing, which is the price of never stalling the GPU. One thread runs the model; callers submit
requests from any thread and read tokens from each request's queue.
"""

from __future__ import annotations

import collections
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from onebox.errors import OneboxError
from onebox.infer.decode import to_decode
from onebox.infer.requests import check_prompt, check_sampling
from onebox.infer.sampling import sample_next, seeded_generator
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
    listener: Callable[[int | None], None] | None = None  # set by listen(): tokens go there instead of to events
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def deliver(self, token: int | None) -> None:
        """Hand one token (None: the end) to the listener, or queue it for tokens() (the engine's thread). A
        listener that fails (its client's event loop has gone, say) cancels this request and no other."""
        with self.lock:
            if self.listener is None:
                self.events.put(token)
                return
            try:
                self.listener(token)
            except Exception:
                self.listener = lambda token: None
                self.cancelled.set()

    def listen(self, listener: Callable[[int | None], None]) -> None:
        """Pass the tokens to `listener` as they come, on the engine's thread (those already queued first), so a
        server need not hold a thread per request waiting on the queue."""
        with self.lock:
            while not self.events.empty():
                listener(self.events.get_nowait())
            self.listener = listener

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


class QueueFull(OneboxError):
    """The engine's queue of waiting requests is full (a server answers 429)."""


@dataclass
class _Active:
    request: Request
    generator: torch.Generator
    position: int  # where the token this row feeds at the next decode step sits
    generated: int = 0


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


def compile_options(mode: str, pdl: bool) -> dict:
    """torch.compile's arguments for the decode step: the mode, or with `pdl` the mode's inductor options
    plus programmatic dependent launch for inductor's own kernels (where this torch has it)."""
    import torch._inductor.config as inductor_config

    if not pdl or not hasattr(inductor_config.triton, "enable_pdl"):
        return {"mode": mode}
    return {"options": {**torch._inductor.list_mode_options(mode), "triton.enable_pdl": True}}


class Engine:
    """Continuous-batching decoder over one model."""

    def __init__(
        self,
        model: Transformer,
        max_batch: int = 8,
        prefix_entries: int = 16,
        compile: bool | str | None = None,
        prefill_tokens: int = 8192,
        fuse: bool = True,
        kernels: bool | str | None = None,
        max_queue: int | None = None,
    ) -> None:
        """compile: True, False, None (on CUDA only) or a torch.compile mode (default reduce-overhead: CUDA graphs).
        kernels: the decode model's Triton kernels (`infer.decode.to_decode`: True, False, None for all that
        run here, or a comma-separated choice of gemv, attention, rope, pdl, chain); with fuse False the
        model runs as given (no fused products, no kernels).
        max_queue: the most requests that may wait for a slot (None: no bound); submit() raises QueueFull past it."""
        self.model = to_decode(model, kernels) if fuse else model.eval()
        self.kernels = list(getattr(self.model, "kernels", []))  # what the decode steps use (for the record)
        self.kernel_notes = list(getattr(self.model, "notes", []))  # why a chosen kernel will not run here
        self.config = model.config
        self.plain = model  # the model as given (scoring a text's log-probabilities runs it whole)
        self.max_batch = max_batch
        self.prefill_tokens = prefill_tokens  # the most (padded) prompt tokens one batched prefill takes
        self.max_queue = max_queue
        self.device = model.embed_tokens.weight.device
        self.caches = self.model.new_kv_caches(max_batch, self.config.seq_len)
        # What each row feeds at the next decode step, and at which position: device state, updated by the step itself.
        self.tokens = torch.zeros(max_batch, 1, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(max_batch, 1, dtype=torch.long, device=self.device)
        pinned = self.device.type == "cuda"
        self.fed = torch.zeros(max_batch, dtype=torch.long, pin_memory=pinned)  # host copy of the tokens a step was fed
        self.slots: list[_Active | None] = [None] * max_batch
        self.pending: collections.deque[Request] = collections.deque()
        self.prefix = PrefixCache(prefix_entries)
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.decode_steps = 0
        self.emitted = 0  # tokens handed to requests
        self.most_active = 0  # the largest number of requests decoded in one step
        # The decode step has static shapes (all max_batch rows, one token each), so on CUDA it is
        # compiled with CUDA graphs (gpt-fast's recipe): one graph launch per token instead of hundreds.
        offloaded = hasattr(model, "expert_cache")  # its experts are chosen on the host: no CUDA graph can hold that
        compile = self.device.type == "cuda" and not offloaded if compile is None else compile
        if compile:  # buffers mutated in place at fixed addresses: let CUDA graphs keep them where they are
            for buffer in [self.tokens, self.positions] + [t for cache in self.caches for t in cache.buffers()]:
                torch._dynamo.mark_static_address(buffer)
        mode = compile if isinstance(compile, str) else "reduce-overhead"
        self._decode = (
            torch.compile(self._decode_eager, fullgraph=True, **compile_options(mode, "pdl" in self.kernels))
            if compile
            else self._decode_eager
        )

    def _decode_eager(self) -> Tensor:
        """One token for every row: logits (max_batch, vocab); the greedy choice becomes each row's next input."""
        logits = self.model(self.tokens, self.positions, self.caches)[:, -1]
        self.tokens.copy_(logits.argmax(dim=-1, keepdim=True))
        # Idle rows and rows just finished advance too (their results are never read): keep them inside the cache.
        self.positions.copy_((self.positions + 1).clamp_(max=self.config.seq_len - 1))
        return logits

    # ---- submitting (any thread)
    def submit(self, request: Request) -> Request:
        """Queue one request for decoding (see submit_all)."""
        return self.submit_all([request])[0]

    def submit_all(self, requests: list[Request]) -> list[Request]:
        """Queue requests together: all of them, or (QueueFull, InvalidRequest for a bad one) none; each one's
        max_new_tokens is cut to the context its prompt leaves."""
        for request in requests:
            check_sampling(request.temperature, request.top_k, request.top_p, request.seed)
            config = self.config
            request.max_new_tokens = check_prompt(
                request.prompt_ids, config.vocab_size, config.seq_len, request.max_new_tokens
            )
        with self.cond:
            if self.max_queue is not None and len(self.pending) + len(requests) > self.max_queue:
                raise QueueFull(
                    f"the server is busy: {len(self.pending)} requests wait for a slot (at most {self.max_queue}); try again shortly."
                )
            self.pending.extend(requests)
            self.cond.notify()
        return requests

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
            except Exception as err:  # a failing decode step ends the requests it was decoding, not the engine
                self._fail_active(f"{type(err).__name__}: {err}")

    def _fail_active(self, message: str) -> None:
        for slot, active in enumerate(self.slots):
            if active is not None:
                self.slots[slot] = None
                self._fail(active.request, message)

    @staticmethod
    def _fail(request: Request, message: str) -> None:
        request.error = message
        request.finish_reason = "error"
        request.deliver(None)

    # ---- the model thread
    @torch.inference_mode()
    def step(self) -> None:
        """Admit waiting requests (one batched prefill), launch one decode step for every active row, then
        hand out the tokens fed to this step (the previous step's results), while the GPU computes."""
        self._admit()
        active = [(i, a) for i, a in enumerate(self.slots) if a is not None]
        if not active:
            return
        self.fed.copy_(self.tokens[:, 0], non_blocking=True)  # ordered before the step below overwrites them
        copied = torch.cuda.Event() if self.device.type == "cuda" else None
        if copied is not None:
            copied.record()
        logits = self._decode()
        for _, a in active:
            a.position += 1
        self.decode_steps += 1
        self.most_active = max(self.most_active, len(active))
        for i, a in active:  # sampled rows replace the greedy choice the step wrote (still on the device, in order)
            if a.request.temperature > 0:
                self.tokens[i] = self._sample(a, logits[i : i + 1])
        if copied is not None:
            copied.synchronize()
        values = self.fed.tolist()  # read before the next step's copy is enqueued
        for i, _ in active:
            self._emit(i, values[i])

    @torch.inference_mode()
    def warmup(self) -> Engine:
        """Compile (and capture) the decode step before the first request, so no request waits for a
        compilation. Call it before any request is admitted: it steps the idle rows."""
        if any(self.slots) or self.pending:
            raise OneboxError("warm the engine up before submitting requests.")
        for _ in range(3):  # CUDA graph trees record on the second or third call
            self._decode()
        self.positions.zero_()
        return self

    def _admit(self) -> None:
        """Prefill as many waiting requests as there are free slots, in padded batches of at most prefill_tokens."""
        chosen: list[tuple[int, Request]] = []
        with self.cond:
            free = [i for i, a in enumerate(self.slots) if a is None]
            while free and self.pending:
                request = self.pending.popleft()
                if request.cancelled.is_set():
                    self._finish(request, "cancelled")
                else:
                    chosen.append((free.pop(0), request))
        batch: list[tuple[int, Request]] = []
        for slot, request in chosen:
            longest = max([len(r.prompt_ids) for _, r in batch] + [len(request.prompt_ids)])
            if batch and longest * (len(batch) + 1) > self.prefill_tokens:
                self._prefill_isolated(batch)
                batch = []
            batch.append((slot, request))
        if batch:
            self._prefill_isolated(batch)

    def _prefill_isolated(self, batch: list[tuple[int, Request]]) -> None:
        """Prefill a batch; if that fails, each request alone, so that a request that cannot be served ends with its
        own error and takes no slot, while the others go on."""
        try:
            self._prefill(batch)
            return
        except Exception as err:
            if len(batch) == 1:
                slot, request = batch[0]
                self.slots[slot] = None
                self._fail(request, f"{type(err).__name__}: {err}")
                return
        for slot, _ in batch:
            self.slots[slot] = None
        for one in batch:
            self._prefill_isolated([one])

    def _prefill(self, batch: list[tuple[int, Request]]) -> None:
        """Fill the KV of each request's slot from its prompt (reusing a cached prefix), and set its first token."""
        seq_len = self.config.seq_len
        starts = []
        for slot, request in batch:
            cached, kv = self.prefix.lookup(request.prompt_ids)
            if kv is not None:
                for cache, (k, v) in zip(self.caches, kv):
                    cache.k[slot, :, :cached] = k[:, :cached]
                    cache.v[slot, :, :cached] = v[:, :cached]
            request.cached_tokens = cached
            starts.append(cached)
        width = max(len(r.prompt_ids) - start for (_, r), start in zip(batch, starts))
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        for row, ((_, request), start) in enumerate(zip(batch, starts)):
            rest = request.prompt_ids[start:]
            ids[row, : len(rest)] = torch.tensor(rest)
        # Padding sits after each prompt, at positions its own later tokens overwrite before reading them.
        positions = (torch.tensor(starts)[:, None] + torch.arange(width)).clamp_(max=seq_len - 1)
        last = torch.tensor([len(r.prompt_ids) - start - 1 for (_, r), start in zip(batch, starts)])
        slots = torch.tensor([slot for slot, _ in batch], device=self.device)
        views = [cache.select(slots) for cache in self.caches]
        hidden = self.model.hidden_states(ids.to(self.device), positions.to(self.device), views)
        logits = self.model.logits(hidden[torch.arange(len(batch), device=self.device), last.to(self.device)])
        first = logits.argmax(dim=-1)
        for row, (slot, request) in enumerate(batch):
            if self.prefix.max_entries > 0:
                length = len(request.prompt_ids)
                self.prefix.store(
                    request.prompt_ids,
                    [(c.k[slot, :, :length].clone(), c.v[slot, :, :length].clone()) for c in self.caches],
                )
            self.slots[slot] = active = _Active(
                request, seeded_generator(request.seed, self.device), len(request.prompt_ids)
            )
            if request.temperature > 0:
                first[row] = self._sample(active, logits[row : row + 1])[0]
        self.tokens[slots] = first[:, None]
        self.positions[slots] = torch.tensor([[len(r.prompt_ids)] for _, r in batch], device=self.device)

    def _sample(self, active: _Active, logits: Tensor) -> Tensor:
        r = active.request
        return sample_next(logits, r.temperature, r.top_k, r.top_p, active.generator)

    def _emit(self, slot: int, token: int) -> None:
        active = self.slots[slot]
        request = active.request
        if request.cancelled.is_set():
            reason = "cancelled"
        elif token in request.stop_ids:
            reason = "stop"
        else:
            request.deliver(token)
            active.generated += 1
            self.emitted += 1
            reason = "length" if active.generated >= request.max_new_tokens else None
        if reason is not None:
            self.slots[slot] = None
            self._finish(request, reason)

    @staticmethod
    def _finish(request: Request, reason: str) -> None:
        request.finish_reason = reason
        request.deliver(None)
