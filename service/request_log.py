"""The opt-in request log: a sampled JSONL of what ``/rerank`` was asked and what it answered, the raw material for
training on your own traffic once joined with feedback (README, Request log).

Owns: sampling, a bounded hand-off to one writer thread (the answer never waits on the disk; a record that finds
the queue full is dropped and counted), one file per process, and size-based rotation that keeps ``keep`` old
files. Does not know: HTTP, models or features.

A record: ``{"ts", "request_id", "user_id", "model_version", "k", "candidates": [[item_id, score], ...],
"returned": [item_id, ...], "fallback_reason", "history": [item_id, ...], "features"}``, candidates in the order the
retriever sent them, ``history`` the user's history as the model was given it (most recent last) and ``features``
where it came from (local, redis, snapshot, cold_start): features as served, so a model trained on the log sees
what the service saw (``training/candidate_log.py`` reads the joined log).
"""

from __future__ import annotations

import os
import queue
import random
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

STOP = object()


class RequestLog:
    """Sampled records to ``folder/requests-<pid>.jsonl``, rotated at ``max_bytes`` to ``.1`` .. ``.<keep>``."""

    def __init__(self, folder: Path, sample: float, max_bytes: int, keep: int, queue_size: int = 10_000,
                 draw: Callable[[], float] = random.random) -> None:
        if not 0.0 <= sample <= 1.0 or max_bytes < 1 or keep < 0:
            raise ValueError(f"need 0 <= sample <= 1, max_bytes >= 1, keep >= 0; got {sample}, {max_bytes}, {keep}")
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"requests-{os.getpid()}.jsonl"
        self.sample, self.max_bytes, self.keep, self.draw = sample, max_bytes, keep, draw
        self.queue: queue.Queue[Any] = queue.Queue(queue_size)
        self.written = self.dropped = 0
        self._file = open(self.path, "ab")  # noqa: SIM115 (closed by the writer thread)
        self._thread = threading.Thread(target=self._write, name="request-log", daemon=True)
        self._thread.start()

    def sampled(self) -> bool:
        """Whether to log this request (draw before building a record, so unsampled requests cost one draw)."""
        return self.sample > 0 and self.draw() < self.sample

    def offer(self, record: dict[str, Any]) -> bool:
        """Hand ``record`` to the writer without waiting; False (and counted) when the queue is full."""
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1
            return False
        return True

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is queued, then stop."""
        self.queue.put(STOP)
        self._thread.join(timeout_s)

    def _write(self) -> None:
        while (record := self.queue.get()) is not STOP:
            self._file.write(orjson.dumps(record) + b"\n")
            self.written += 1
            if self._file.tell() >= self.max_bytes:
                self._rotate()
        self._file.close()

    def _rotate(self) -> None:
        """requests.jsonl -> .1 -> .2 ... (the oldest beyond ``keep`` goes); a fresh file takes the next record."""
        self._file.close()
        if self.keep == 0:
            self.path.unlink()
        else:
            for i in range(self.keep - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{i}")
                if older.exists():
                    older.replace(self.path.with_name(f"{self.path.name}.{i + 1}"))
            self.path.replace(self.path.with_name(f"{self.path.name}.1"))
        self._file = open(self.path, "ab")  # noqa: SIM115 (closed on the next rotation or at STOP)


def record(request_id: str | None, user_id: str, model_version: str, k: int, candidates: list[tuple[str, float]],
           returned: list[str], fallback_reason: str | None, ts: float, history: tuple[str, ...] = (),
           features: str = "") -> dict[str, Any]:
    return {"ts": ts, "request_id": request_id, "user_id": user_id, "model_version": model_version, "k": k,
            "candidates": candidates, "returned": returned, "fallback_reason": fallback_reason,
            "history": history, "features": features}
