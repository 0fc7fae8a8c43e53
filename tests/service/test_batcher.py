"""Batcher logic with a fake process gated on a threading.Event (it runs in the worker thread) and a fake clock:
no assert depends on how fast this machine runs."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest

from service.batcher import Batcher, BatcherClosed, BatchStats, DeadlineExceeded, QueueFull

FAR = 3600.0


class Gate:
    """process(): records each batch, blocks until opened, fails a batch holding "boom"."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.batches: list[list[str]] = []
        self.entered = threading.Event()

    def __call__(self, items: list[str]) -> Sequence[str]:
        self.batches.append(list(items))
        self.entered.set()
        self.open.wait(10)
        if "boom" in items:
            raise RuntimeError("model exploded")
        return [f"done:{i}" for i in items]


class Clock:
    """The batcher's clock, moved by hand. ``thread_skew``: what the worker thread reads on top, as if the
    hand-off to it had taken that long."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.thread_skew = 0.0

    def __call__(self) -> float:
        if threading.current_thread().name.startswith("batcher"):
            return self.now + self.thread_skew
        return self.now


CLOCK = Clock()


def deadline(seconds: float = FAR) -> float:
    return CLOCK.now + seconds


async def wait_entered(gate: Gate) -> None:
    await asyncio.to_thread(gate.entered.wait, 5)
    gate.entered.clear()


def make(gate: Gate, **kwargs: float) -> Batcher[str, str]:
    opts = {"max_batch_size": 4, "max_batch_cost": 1000, "max_wait_ms": 0.0, "max_queue_size": 100}
    opts.update(kwargs)
    b: Batcher[str, str] = Batcher(gate, clock=CLOCK, **opts)  # type: ignore[arg-type]
    b.start()
    return b


async def test_size_trigger_splits_what_queued_during_a_batch() -> None:
    gate = Gate()
    b = make(gate)
    first = b.submit("a0", deadline())
    await wait_entered(gate)  # a0 runs alone; the rest queue behind it
    rest = [b.submit(f"a{i}", deadline()) for i in range(1, 10)]
    assert b.depth == 9
    gate.open.set()
    results = await asyncio.gather(first, *rest)
    assert results == [f"done:a{i}" for i in range(10)]
    assert [len(x) for x in gate.batches] == [1, 4, 4, 1]
    await b.close()


async def test_cost_limit_splits_batches() -> None:
    gate = Gate()
    gate.open.set()
    b = make(gate, max_batch_size=100, max_batch_cost=100)
    # Queue three requests of cost 50 before the loop runs: two fit in one batch, the third waits.
    tasks = [b.submit(f"c{i}", deadline(), cost=50) for i in range(3)]
    await asyncio.gather(*tasks)
    assert [len(x) for x in gate.batches] == [2, 1]
    await b.close()


async def test_wait_trigger_gathers_late_arrivals() -> None:
    gate = Gate()
    gate.open.set()
    b = make(gate, max_batch_size=10, max_wait_ms=300.0)
    t1 = b.submit("w1", deadline())
    await asyncio.sleep(0.05)  # any real time: on the batcher's clock no time passes, so it waits on
    assert gate.batches == []
    t2 = b.submit("w2", deadline())
    CLOCK.now += 0.3  # the wait is over once w2 is in
    await asyncio.gather(t1, t2)
    assert gate.batches == [["w1", "w2"]]
    await b.close()


async def test_no_wait_on_cpu_runs_alone() -> None:
    gate = Gate()
    gate.open.set()
    b = make(gate, max_batch_size=10, max_wait_ms=0.0)
    assert await b.submit("x1", deadline()) == "done:x1"
    assert await b.submit("x2", deadline()) == "done:x2"
    assert gate.batches == [["x1"], ["x2"]]
    await b.close()


async def test_full_queue_refuses_at_once() -> None:
    gate = Gate()
    b = make(gate, max_queue_size=2)
    running = b.submit("r0", deadline())
    await wait_entered(gate)
    queued = [b.submit(f"q{i}", deadline()) for i in range(2)]
    with pytest.raises(QueueFull, match="max_queue_size 2"):  # at once: raised by submit itself, not its future
        b.submit("overflow", deadline())
    gate.open.set()
    await asyncio.gather(running, *queued)
    assert all("overflow" not in batch for batch in gate.batches)
    await b.close()


async def test_expired_request_never_reaches_the_model() -> None:
    gate = Gate()
    stats: list[BatchStats] = []
    b: Batcher[str, str] = Batcher(gate, max_batch_size=4, max_batch_cost=100, max_wait_ms=0.0,
                                   max_queue_size=10, on_batch=stats.append, clock=CLOCK)
    b.start()
    running = b.submit("slow", deadline())
    await wait_entered(gate)
    late = b.submit("late", deadline(0.02))
    fine = b.submit("fine", deadline())
    CLOCK.now += 0.05  # "late" expires while queued
    gate.open.set()
    with pytest.raises(DeadlineExceeded):
        await late
    assert await running == "done:slow" and await fine == "done:fine"
    assert not any("late" in batch for batch in gate.batches)
    assert sum(s.expired for s in stats) == 1
    assert sum(s.late for s in stats) == 0  # dropped in the queue, not as a batch started
    await b.close()


async def test_a_deadline_that_passes_during_the_hand_off_to_the_thread_never_reaches_the_model() -> None:
    """``_collect`` saw it alive; the worker thread, starting the batch 0.5 s later on the clock, drops it."""
    gate = Gate()
    gate.open.set()
    stats: list[BatchStats] = []
    b: Batcher[str, str] = Batcher(gate, max_batch_size=4, max_batch_cost=100, max_wait_ms=0.0,
                                   max_queue_size=10, on_batch=stats.append, clock=CLOCK)
    b.start()
    CLOCK.thread_skew = 0.5
    try:
        late, fine = b.submit("late", deadline(0.2)), b.submit("fine", deadline(1.0))
        assert await fine == "done:fine"
        with pytest.raises(DeadlineExceeded, match="before its batch started"):
            await late
    finally:
        CLOCK.thread_skew = 0.0
    assert gate.batches == [["fine"]]
    assert [(s.size, s.late, s.expired) for s in stats] == [(1, 1, 0)]
    all_late = b.submit("gone", deadline(0.2))
    CLOCK.thread_skew = 0.5
    try:
        with pytest.raises(DeadlineExceeded):
            await all_late
    finally:
        CLOCK.thread_skew = 0.0
    assert gate.batches == [["fine"]] and stats[-1].late == 1  # a batch with nothing alive calls nothing
    await b.close()


async def test_cancelled_caller_is_skipped() -> None:
    gate = Gate()
    b = make(gate)
    running = b.submit("first", deadline())
    await wait_entered(gate)
    gone = b.submit("gone", deadline())
    kept = b.submit("kept", deadline())
    gone.cancel()
    gate.open.set()
    assert await kept == "done:kept" and await running == "done:first"
    assert gone.cancelled()
    assert all("gone" not in batch for batch in gate.batches)
    await b.close()


async def test_batch_failure_reaches_every_caller_and_the_loop_lives_on() -> None:
    gate = Gate()
    b = make(gate)
    running = b.submit("first", deadline())
    await wait_entered(gate)
    doomed = [b.submit(x, deadline()) for x in ("boom", "bystander")]
    gate.open.set()
    await running
    for task in doomed:
        with pytest.raises(RuntimeError, match="model exploded"):
            await task
    assert await b.submit("after", deadline()) == "done:after"
    await b.close()


async def test_close_drains_queued_requests_then_refuses() -> None:
    gate = Gate()
    b = make(gate)
    running = b.submit("r", deadline())
    await wait_entered(gate)
    queued = [b.submit(f"q{i}", deadline()) for i in range(3)]
    await asyncio.sleep(0)
    closing = asyncio.create_task(b.close())
    await asyncio.sleep(0)
    with pytest.raises(BatcherClosed):
        await b.submit("late", deadline())
    gate.open.set()
    await closing
    assert await running == "done:r"
    assert [await q for q in queued] == ["done:q0", "done:q1", "done:q2"]


async def test_a_lone_request_runs_inline_when_nothing_is_queued_or_running() -> None:
    threads: list[int] = []
    stats: list[BatchStats] = []

    def process(items: list[str]) -> list[str]:
        threads.append(threading.get_ident())
        return [f"done:{i}" for i in items]

    b: Batcher[str, str] = Batcher(process, max_batch_size=4, max_batch_cost=1000, max_wait_ms=0.0,
                                   max_queue_size=100, on_batch=stats.append, inline_when_idle=True, clock=CLOCK,
                                   inline_max_ms=60_000)  # any lone call counts as fast: no wall-clock assert
    b.start()
    # Until a lone request has run (on the worker thread), its cost is unknown: no inline yet.
    first = b.submit("first", deadline())
    assert not first.done() and await first == "done:first" and threads[0] != threading.get_ident()
    assert b.solo_run_s == stats[0].run_s
    queued = b.submit("not alone", deadline())  # the caller knows of other requests on their way: no inline
    assert not queued.done() and await queued == "done:not alone" and threads[1] != threading.get_ident()
    threads.pop()
    stats.pop()
    future = b.submit("a", deadline(), alone=True)
    assert future.done() and future.result() == "done:a"  # settled before enqueue returned: no thread hop
    assert threads[1:] == [threading.get_ident()] and (stats[1].size, stats[1].queue_waits_s) == (1, [0.0])
    expired = b.submit("late", CLOCK.now - 1, alone=True)
    assert isinstance(expired.exception(), DeadlineExceeded) and threads[1:] == [threading.get_ident()]
    # A model slower than the hop it saves (a moving average of lone requests over inline_max_ms) goes back
    # to the worker thread, so a slow call does not hold the event loop.
    b.solo_run_s = 61.0
    slow = b.submit("b", deadline(), alone=True)
    assert not slow.done() and await slow == "done:b" and threads[-1] != threading.get_ident()
    await b.close()


async def test_inline_is_skipped_while_a_batch_runs_or_when_batches_wait_to_fill() -> None:
    gate = Gate()
    b = make(gate)
    first = b.submit("a0", deadline())  # inline off: a0 goes to the worker thread
    await wait_entered(gate)
    b.inline_when_idle = True
    second = b.submit("a1", deadline(), alone=True)
    assert not second.done() and b.depth == 1  # a batch is running: a1 queues behind it
    gate.open.set()
    assert await first == "done:a0" and await second == "done:a1"
    await b.close()
    waiting = make(Gate(), max_wait_ms=2.0)
    waiting.inline_when_idle = True
    queued = waiting.submit("b0", deadline(), alone=True)
    assert not queued.done()  # batching that waits for a batch to fill (the GPU default) never runs inline
    queued.cancel()
    await waiting.close()


async def test_the_worker_thread_runs_at_a_lower_priority_than_the_loop() -> None:
    import os

    niceness: list[int] = []

    def process(items: list[str]) -> Sequence[str]:
        niceness.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return items

    loop_nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    b: Batcher[str, str] = Batcher(process, max_batch_size=4, max_batch_cost=1000, max_wait_ms=0.0,
                                   max_queue_size=10, thread_nice=5, clock=CLOCK)
    b.start()
    assert await b.submit("a", deadline()) == "a"
    await b.close()
    assert niceness == [min(19, loop_nice + 5)]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == loop_nice  # the loop's own is untouched
