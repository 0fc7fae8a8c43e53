"""Dynamic batching in front of a synchronous batch function.

Owns: a bounded queue, the flush rule, deadlines, cancellation and fan-out of results and failures.
Does not know: ONNX, HTTP or what an item is.

Flush rule: take the oldest live request, then every request already queued (up to ``max_batch_size``
requests and ``max_batch_cost`` cost), waiting at most ``max_wait_ms`` for more; while a batch runs in the
worker thread, new requests queue, so with ``max_wait_ms = 0`` the next batch is exactly what arrived
during the previous one (continuous batching).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")
SOLO_EWMA = 0.2  # weight of the newest batch of one in ``Batcher.solo_run_s``
R = TypeVar("R")


class QueueFull(Exception):
    """The queue holds ``max_queue_size`` requests; answer 429 now."""


class DeadlineExceeded(Exception):
    """The request's deadline passed before its batch reached the model; it never ran."""


class BatcherClosed(Exception):
    """The batcher is draining or stopped and takes no new requests."""


@dataclass
class _Pending(Generic[T, R]):
    item: T
    cost: int
    deadline: float  # on the batcher's clock (time.monotonic by default)
    future: asyncio.Future[R]
    enqueued: float


@dataclass
class BatchStats:
    """What one flush did, for metrics: sizes and the queue wait of each request that ran."""

    size: int
    cost: int
    queue_waits_s: list[float]
    expired: int
    run_s: float
    late: int = 0  # requests whose deadline passed between ``_collect`` and the worker thread's start: dropped


def lower_priority(nice: int) -> None:
    """Add ``nice`` to the calling thread's nice value (Linux threads have their own); no-op elsewhere or at 0."""
    if nice > 0 and hasattr(os, "setpriority") and hasattr(threading, "get_native_id"):
        with contextlib.suppress(OSError):
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + nice)


class Batcher(Generic[T, R]):
    """Collects concurrent ``submit`` calls into batches for ``process`` (run in one worker thread).

    No request reaches ``process`` after its deadline: ``_collect`` drops expired ones, and the worker thread
    checks again as the batch starts (the hand-off to the thread can take longer than a deadline's rest)."""

    def __init__(self, process: Callable[[list[T]], Sequence[R]], *, max_batch_size: int, max_batch_cost: int,
                 max_wait_ms: float, max_queue_size: int, on_batch: Callable[[BatchStats], None] | None = None,
                 inline_when_idle: bool = False, inline_max_ms: float = 5.0, thread_nice: int = 0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.process = process
        self.clock = clock  # deadlines are on this clock; tests inject their own
        # Nothing queued and nothing running: run the lone request on the caller's thread, not the worker's.
        # The hop to the worker thread and back costs more than a batch-1 model call; while the call runs the
        # event loop waits, so it is only taken when nothing else is waiting for the model, and only while a
        # lone request's call takes at most ``inline_max_ms`` (a moving average of batches of one).
        self.inline_when_idle = inline_when_idle
        self.inline_max_s = inline_max_ms / 1000.0
        # Moving average of the run time of batches of one request; unknown (no inline) until one has run.
        self.solo_run_s = float("inf")
        self.max_batch_size = max_batch_size
        self.max_batch_cost = max_batch_cost
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue_size = max_queue_size
        self.on_batch = on_batch
        self._queue: collections.deque[_Pending[T, R]] = collections.deque()
        self._wakeup = asyncio.Event()
        # The worker thread may run at a lower CPU priority than the event loop (Linux: a nice value per thread):
        # where they share a core, the loop's short jobs (read, refuse, answer) then preempt the batch computation.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batcher",
                                            initializer=lower_priority, initargs=(thread_nice,))
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._running = 0  # requests inside the worker right now

    @property
    def depth(self) -> int:
        """Requests waiting in the queue (not the batch in flight)."""
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        return len(self._queue) + self._running

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="batcher")

    def submit(self, item: T, deadline: float, cost: int = 1, alone: bool = False) -> asyncio.Future[R]:
        """Queue ``item``; await the returned future for its result. Raises ``QueueFull`` at once when full
        and ``BatcherClosed`` while draining; the future raises ``DeadlineExceeded`` if the deadline passed
        before the request reached the model, or whatever ``process`` raised for its batch. A future, not a
        coroutine, so a caller can bound the wait with ``asyncio.wait_for`` without wrapping it in a task
        (measured: a task per request costs the event loop more than the rest of the batcher). Cancelling
        the future withdraws the request.

        ``alone``: the caller knows no other request is on its way (the app: none in flight or parsed at the
        door). Only then may the request run inline: a model call on the event loop blocks it, so requests
        that arrive meanwhile are not read until it ends, and without this test each of them would find the
        batcher idle and run inline in turn, one at a time, and batches would never form (measured: at 4-64
        connections throughput fell to the one-connection rate)."""
        if self._closed:
            raise BatcherClosed("the batcher is shutting down")
        if len(self._queue) >= self.max_queue_size:
            raise QueueFull(f"queue holds {len(self._queue)} requests (max_queue_size {self.max_queue_size})")
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        if (alone and self.inline_when_idle and not self._queue and not self._running and self.max_wait_s == 0
                and self.solo_run_s <= self.inline_max_s):
            self._run_inline(item, cost, deadline, future)
            return future
        self._queue.append(_Pending(item, cost, deadline, future, self.clock()))
        self._wakeup.set()
        return future

    def _run_inline(self, item: T, cost: int, deadline: float, future: asyncio.Future[R]) -> None:
        """The one-request fast path: ``process`` on this thread, the future settled before it is returned."""
        started = self.clock()
        if deadline <= started:
            future.set_exception(DeadlineExceeded("deadline passed before the request reached the model"))
            self._report(BatchStats(0, 0, [], 1, 0.0))
            return
        self._running = 1
        try:
            results = self.process([item])
            if len(results) != 1:
                raise RuntimeError(f"process returned {len(results)} results for 1 request")
            future.set_result(results[0])
        except Exception as exc:  # as for a batch: the caller gets the failure
            future.set_exception(exc)
        finally:
            self._running = 0
        self._report(BatchStats(1, cost, [0.0], 0, self.clock() - started))

    async def _loop(self) -> None:
        while True:
            while not self._queue:
                if self._closed:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            batch, expired = await self._collect()
            if not batch:
                self._report(BatchStats(0, 0, [], expired, 0.0))
                continue
            await self._run(batch, expired)

    async def _collect(self) -> tuple[list[_Pending[T, R]], int]:
        """Take live requests up to the limits; expired ones are answered here and never run."""
        batch: list[_Pending[T, R]] = []
        cost, expired = 0, 0
        first_at = self.clock()
        while True:
            now = self.clock()
            while self._queue and len(batch) < self.max_batch_size:
                head = self._queue[0]
                if batch and cost + head.cost > self.max_batch_cost:
                    return batch, expired
                self._queue.popleft()
                if head.future.done():  # the caller went away
                    continue
                if head.deadline <= now:
                    head.future.set_exception(DeadlineExceeded("deadline passed while queued"))
                    expired += 1
                    continue
                batch.append(head)
                cost += head.cost
            remaining = first_at + self.max_wait_s - self.clock()
            if len(batch) >= self.max_batch_size or remaining <= 0 or not batch:
                return batch, expired
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), remaining)

    def _process_live(self, batch: list[_Pending[T, R]]) -> tuple[list[_Pending[T, R]], Sequence[R], float]:
        """In the worker thread: the requests still inside their deadline now, their results, and when the run
        started. The others never reach ``process``."""
        started = self.clock()
        live = [p for p in batch if p.deadline > started]
        return live, self.process([p.item for p in live]) if live else [], started

    async def _run(self, batch: list[_Pending[T, R]], expired: int) -> None:
        self._running = len(batch)
        live: list[_Pending[T, R]] = batch
        started = self.clock()
        try:
            live, results, started = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._process_live, batch)
            if len(results) != len(live):
                raise RuntimeError(f"process returned {len(results)} results for {len(live)} requests")
        except Exception as exc:  # one batch failure goes to every caller; the loop lives on
            for p in live:
                if not p.future.done():
                    p.future.set_exception(exc)
        else:
            for p, result in zip(live, results, strict=True):
                if not p.future.done():
                    p.future.set_result(result)
        finally:
            self._running = 0
        late = len(batch) - len(live)
        if late:
            for p in batch:
                if not p.future.done():  # not in ``live``: dropped as the batch started
                    p.future.set_exception(DeadlineExceeded("deadline passed before its batch started"))
        self._report(BatchStats(len(live), sum(p.cost for p in live), [started - p.enqueued for p in live],
                                expired, self.clock() - started, late))

    def _report(self, stats: BatchStats) -> None:
        if stats.size == 1:
            known = self.solo_run_s != float("inf")
            self.solo_run_s = self.solo_run_s + SOLO_EWMA * (stats.run_s - self.solo_run_s) if known else stats.run_s
        if self.on_batch is not None:
            with contextlib.suppress(Exception):  # metrics must never break serving
                self.on_batch(stats)

    async def close(self, drain_timeout_s: float = 10.0) -> None:
        """Stop taking requests, finish the queued ones (up to ``drain_timeout_s``), stop the loop."""
        self._closed = True
        self._wakeup.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), drain_timeout_s)
            except TimeoutError:
                self._task.cancel()
            for p in self._queue:
                if not p.future.done():
                    p.future.set_exception(BatcherClosed("shut down before this request ran"))
            self._queue.clear()
        self._executor.shutdown(wait=True)
