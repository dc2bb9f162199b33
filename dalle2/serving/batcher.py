"""One worker thread owns the pipeline and runs the waiting requests in batches; a bounded queue in front of it.

The queue holds at most ``max_queue`` requests: one more is refused at once (:class:`QueueFull`, a 429 with a
``Retry-After`` estimated from recent batch times), never buffered.  A request can be taken back while it waits
(:meth:`Batcher.cancel`: its client went away or its time ran out), so no work is done for nobody; once it runs,
the same takes its work back as far as it is its own: when every request of the running pipeline call is gone
(timed out, hung up, or cut off by a drain), the call stops at its next network call (a forward pre-hook on the
pipeline's top modules, firing in the worker thread only: within a sampling step) and the batch's remaining calls
are skipped; work shared with a request that still waits goes on.  The worker keeps the outcome of the recent batches
for ``/health``.  :meth:`Batcher.drain` begins a shutdown: new and waiting
requests are refused (:class:`ShuttingDown`, 503), the running batch gets ``timeout`` seconds to finish."""

from __future__ import annotations

import math
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

# the pipeline's modules up to this many levels down check for abandoned work before they run (a few checks per
# sampling step; deeper modules would only add cost: a hook is a Python call per module call)
INTERRUPT_DEPTH = 3


class QueueFull(RuntimeError):
    """The queue is at ``max_queue``; ``retry_after`` (s): when a place is likely free."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = int(retry_after)


class Abandoned(BaseException):
    """Raised inside the running pipeline call (at a module call) once every request it works for is gone.  A
    ``BaseException``, like ``KeyboardInterrupt``: a pipeline's own ``except Exception`` does not swallow it."""


class ShuttingDown(RuntimeError):
    """The server is shutting down: the request was not (or not fully) run."""

    retry_after = 5


@dataclass(eq=False)  # compared by identity: a queue holds jobs, and tensors have no truth value
class Job:
    """One request: ``n`` images of one prompt (``kind="generation"``) or one image (``"variation"``)."""

    kind: Literal["generation", "variation"]
    size: int
    seed: int
    n: int
    prompt: str | None = None
    image: Tensor | None = None  # (3, s, s) in [0, 1]
    future: Future = field(default_factory=Future)
    abandoned: bool = False  # taken back while running: its remaining work is for nobody

    def key(self) -> tuple[str, int]:
        return self.kind, self.size


def _settle(future: Future, *, result: Any = None, error: BaseException | None = None) -> None:
    """Resolve ``future`` unless someone (a drain, a cancel) already did."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass


class Batcher:
    """A single worker thread owning the pipeline; :meth:`submit` returns a ``Future`` of ``(n, 3, S, S)`` images.

    Jobs of the same (kind, size) that arrive within ``max_wait_ms`` of the first waiting one share a pipeline call
    of up to ``max_batch_size`` images.  ``max_queue``: requests that may wait (None: unbounded).  Health: the last
    ``window`` batches are remembered; the status is ``"unhealthy"`` once the last ``unhealthy_after`` all failed."""

    def __init__(
        self,
        pipeline,
        *,
        settings=None,
        max_batch_size: int = 8,
        max_wait_ms: float = 25.0,
        max_queue: int | None = None,
        window: int = 20,
        unhealthy_after: int = 3,
    ):
        if int(max_batch_size) < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_queue is not None and int(max_queue) < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.pipeline, self.settings = pipeline, settings
        self.max_batch_size, self.max_wait = int(max_batch_size), float(max_wait_ms) / 1000.0
        self.max_queue = None if max_queue is None else int(max_queue)
        self.unhealthy_after = int(unhealthy_after)
        self._cond = threading.Condition()  # guards everything below
        self._waiting: list[Job] = []
        self._running: list[Job] = []
        self._thread: threading.Thread | None = None
        self._stop = False
        self._closing = False  # drain began: nothing new is accepted
        self._drain_deadline: float | None = None
        self._chunk: list[Job] = []  # the requests of the running pipeline call
        self._abort = False  # every one of them is abandoned: the call stops at its next module call
        self._worker_ident: int | None = None
        self._hooks: list = []
        self._stats: dict[str, Any] = {
            "batches": 0,
            "pipeline_calls": 0,
            "requests": 0,
            "images": 0,
            "max_batch_requests": 0,
            "errors": 0,
            "rejected": 0,
            "refused": 0,
            "dropped": 0,
            "timed_out": 0,
            "aborted": 0,  # pipeline calls stopped or skipped: every request they worked for was gone
        }
        self._per_batch: Counter[int] = Counter()
        self._recent: deque[bool] = deque(maxlen=int(window))  # True: the batch succeeded
        self._consecutive_failures = 0
        self._last_error: str | None = None
        self._batch_s: float | None = None  # moving average of a batch's duration

    # -- life cycle ---------------------------------------------------------------------------------------------
    def start(self) -> "Batcher":
        with self._cond:
            self._closing, self._drain_deadline = False, None
        if not self._hooks and isinstance(self.pipeline, nn.Module):
            self._hooks = [
                m.register_forward_pre_hook(self._interrupt)
                for name, m in self.pipeline.named_modules()
                if name.count(".") < INTERRUPT_DEPTH  # the stages, their networks and the networks' blocks
            ]
        if self._thread is None or not self._thread.is_alive():
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="dalle2-batcher", daemon=True)
            self._thread.start()
        return self

    def drain(self, timeout: float = 30.0) -> None:
        """Begin shutting down: refuse new requests, fail the waiting ones with :class:`ShuttingDown`, give the
        running batch until ``timeout`` seconds from the first call, then fail its requests too."""
        with self._cond:
            now = time.monotonic()
            deadline = now + max(0.0, float(timeout))
            self._drain_deadline = deadline if self._drain_deadline is None else min(self._drain_deadline, deadline)
            self._closing = True
            left, self._waiting = self._waiting, []
            self._stats["refused"] += len(left)
            self._cond.notify_all()
        for job in left:
            _settle(job.future, error=ShuttingDown("the server is shutting down; this request was not started"))
        with self._cond:
            while self._running and (wait := self._drain_deadline - time.monotonic()) > 0:
                self._cond.wait(wait)
            stuck = list(self._running)
        with self._cond:
            for job in stuck:
                job.abandoned = True  # its answer is given: the work stops
            self._update_abort()
        for job in stuck:
            _settle(
                job.future,
                error=ShuttingDown(
                    f"the server shut down before this request finished (it had {timeout:g} s to finish running work)"
                ),
            )

    def stop(self, timeout: float | None = 30.0) -> None:
        """:meth:`drain` (``timeout``), then end the worker thread."""
        self.drain(30.0 if timeout is None else timeout)
        with self._cond:
            self._stop = True
            self._cond.notify_all()
            left = max(0.0, self._drain_deadline - time.monotonic())
        if self._thread is not None:
            self._thread.join(left)
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    # -- the queue ------------------------------------------------------------------------------------------------
    def admit(self) -> None:
        """Raise :class:`QueueFull` / :class:`ShuttingDown` now if a request would be refused (checked before its
        body is read or its image decoded); :meth:`submit` checks again."""
        with self._cond:
            self._check_room()

    def submit(self, job: Job) -> Future:
        with self._cond:
            if self._stop:
                raise RuntimeError("the batcher is stopped")
            self._check_room()
            self._waiting.append(job)
            self._cond.notify_all()
        return job.future

    def _check_room(self) -> None:  # under self._cond
        if self._closing:
            self._stats["refused"] += 1
            raise ShuttingDown("the server is shutting down; retry on another instance or later")
        if self.max_queue is not None and len(self._waiting) >= self.max_queue:
            self._stats["rejected"] += 1
            ra = self.retry_after()
            raise QueueFull(
                f"the server is busy: {len(self._waiting)} requests are waiting (max_queue="
                f"{self.max_queue}); retry after {ra} s",
                ra,
            )

    def retry_after(self) -> int:
        """Seconds until the waiting work is likely done (the batches ahead x the recent batch time), 1..600."""
        images = sum(j.n for j in self._waiting) + sum(j.n for j in self._running)
        batches = math.ceil(images / self.max_batch_size) + 1
        return int(min(600, max(1, math.ceil(batches * (self._batch_s or 0.0)))))

    def cancel(self, job: Job, reason: Literal["dropped", "timed_out"]) -> bool:
        """Take ``job`` back (its client went away: ``"dropped"``, or its time ran out: ``"timed_out"``).  True if
        it had not started (it never will); False if it is running (its remaining work stops once no live request
        shares it) or done."""
        with self._cond:
            self._waiting = [j for j in self._waiting if j is not job]
            not_started = job.future.cancel()
            if not not_started and any(j is job for j in self._running):
                job.abandoned = True
                self._update_abort()
            if reason == "timed_out" or not_started:
                self._stats[reason] += 1
            return not_started

    def stats(self) -> dict[str, Any]:
        """Counters, queue depth and health: ``status`` is ``"ok"``, ``"unhealthy"`` (the last ``unhealthy_after``
        batches all failed) or ``"draining"`` (shutting down)."""
        with self._cond:
            out = dict(self._stats)
            out["requests_per_batch"] = {str(k): v for k, v in sorted(self._per_batch.items())}
            unhealthy = self._consecutive_failures >= self.unhealthy_after
            out.update(
                status="draining" if self._closing else "unhealthy" if unhealthy else "ok",
                queued=len(self._waiting),
                queued_images=sum(j.n for j in self._waiting),
                running=len(self._running),
                max_queue=self.max_queue,
                recent_batches=len(self._recent),
                recent_failures=list(self._recent).count(False),
                consecutive_failures=self._consecutive_failures,
                last_error=self._last_error,
                batch_seconds=None if self._batch_s is None else round(self._batch_s, 4),
            )
        return out

    # -- worker ---------------------------------------------------------------------------------------------------
    def _update_abort(self) -> None:  # under self._cond
        self._abort = bool(self._chunk) and all(j.abandoned for j in self._chunk)

    def _interrupt(self, module, args) -> None:
        """Forward pre-hook on the pipeline's top modules: stops the running call when it is for nobody."""
        if self._abort and threading.get_ident() == self._worker_ident:
            raise Abandoned()

    def _take_batch(self) -> list[Job] | None:
        """Blocks for the first job, then gathers compatible ones until the deadline or the batch is full."""
        with self._cond:
            while not self._waiting and not self._stop:
                self._cond.wait()
            if self._stop:
                return None
            first = self._waiting[0]
            deadline = time.monotonic() + self.max_wait
            while True:
                same = [j for j in self._waiting if j.key() == first.key()]
                batch, total = [], 0
                for j in same:
                    if batch and total + j.n > self.max_batch_size:
                        break
                    batch.append(j)
                    total += j.n
                left = deadline - time.monotonic()
                if total >= self.max_batch_size or len(batch) < len(same) or left <= 0 or self._stop:
                    break
                self._cond.wait(left)
                if not self._waiting or self._waiting[0] is not first:  # taken back (cancel / drain) meanwhile
                    return []
            taken = {id(j) for j in batch}
            self._waiting = [j for j in self._waiting if id(j) not in taken]
            self._running = batch  # visible to drain() from here on
            return batch

    def _loop(self) -> None:
        self._worker_ident = threading.get_ident()
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            live = [j for j in batch if j.future.set_running_or_notify_cancel()]
            error, outs, t0 = None, [], time.monotonic()
            if live:
                try:
                    outs = self.run(live)
                except BaseException as e:  # noqa: BLE001 - handed to the waiting requests
                    error = e
            with self._cond:
                self._running = []
                if live:  # a call cut short says nothing of how long a batch takes
                    self._record(error, time.monotonic() - t0, timed=error is not None or None not in outs)
                self._cond.notify_all()
            for i, j in enumerate(live):
                _settle(j.future, result=None if error else outs[i], error=error)

    def _record(self, error: BaseException | None, seconds: float, timed: bool = True) -> None:  # under self._cond
        self._recent.append(error is None)
        if timed:
            self._batch_s = seconds if self._batch_s is None else 0.8 * self._batch_s + 0.2 * seconds
        if error is None:
            self._consecutive_failures = 0
        else:
            self._stats["errors"] += 1
            self._consecutive_failures += 1
            self._last_error = f"{type(error).__name__}: {error}"[:500]

    def run(self, jobs: list[Job]) -> list[Tensor | None]:
        """Runs jobs of one (kind, size) as pipeline calls of at most ``max_batch_size`` images; one tensor per job
        (None for a job abandoned while it ran, when a call it needed was stopped or skipped)."""
        kind, size = jobs[0].key()
        owners = [j for j in jobs for _ in range(j.n)]
        seeds = [j.seed for j in jobs for _ in range(j.n)]
        indices = [k for j in jobs for k in range(j.n)]
        if kind == "generation":
            inputs: list[Any] = [j.prompt for j in jobs for _ in range(j.n)]
        else:
            inputs = [j.image for j in jobs for _ in range(j.n)]
        rows: list[Tensor | None] = []
        calls = aborted = 0
        bs = self.max_batch_size
        for a in range(0, len(seeds), bs):
            with self._cond:
                self._chunk = list({id(j): j for j in owners[a : a + bs]}.values())
                self._update_abort()
                skip = self._abort
            kw = dict(seed=seeds[a : a + bs], indices=indices[a : a + bs], size=size, settings=self.settings)
            try:
                if skip:
                    raise Abandoned()
                calls += 1
                if kind == "generation":
                    out = self.pipeline(inputs[a : a + bs], **kw)
                else:
                    out = self.pipeline.variations(torch.stack(inputs[a : a + bs]), **kw)
                rows.extend(out.detach().cpu().unbind(0))
            except Abandoned:
                aborted += 1
                rows.extend([None] * len(seeds[a : a + bs]))
            finally:
                with self._cond:
                    self._chunk, self._abort = [], False
        with self._cond:
            s = self._stats
            s["batches"] += 1
            s["pipeline_calls"] += calls
            s["aborted"] += aborted
            s["requests"] += len(jobs)
            s["images"] += len(seeds)
            s["max_batch_requests"] = max(s["max_batch_requests"], len(jobs))
            self._per_batch[len(jobs)] += 1
        out, start = [], 0
        for j in jobs:
            mine, start = rows[start : start + j.n], start + j.n
            out.append(None if any(r is None for r in mine) else torch.stack(mine))
        return out
