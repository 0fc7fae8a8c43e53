"""Reading the service's ``/metrics``: one scraper, on ``prometheus_client``'s own text parser.

Owns: a scrape as samples (every worker's, every label set), sums of a counter or gauge with optional label
filters, a histogram's cumulative buckets, the quantile of the observations between two scrapes, and a thread
that samples one metric over time. Does not know: what a benchmark or a fault scenario does with them.
"""

from __future__ import annotations

import contextlib
import threading
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample


@dataclass(frozen=True)
class Scrape:
    """The samples of one ``/metrics`` answer."""

    samples: tuple[Sample, ...]

    @classmethod
    def parse(cls, text: str) -> Scrape:
        return cls(tuple(s for family in text_string_to_metric_families(text) for s in family.samples))

    def total(self, name: str, **labels: str) -> float:
        """The sum of every sample called ``name`` whose labels include ``labels`` (all workers, all label sets)."""
        return sum(s.value for s in self.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    def label(self, name: str, label: str) -> str | None:
        """``label``'s value on the first sample called ``name`` with a non-zero value (an info gauge's)."""
        return next((s.labels.get(label) for s in self.samples if s.name == name and s.value), None)

    def histogram(self, name: str) -> dict[float, float]:
        """Cumulative bucket counts of histogram ``name`` (upper bound -> count), summed over label sets; empty
        when the service does not export it."""
        buckets: dict[float, float] = {}
        for s in self.samples:
            if s.name == f"{name}_bucket":
                bound = float(s.labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + s.value
        return dict(sorted(buckets.items()))


def scrape(url: str, timeout_s: float = 10) -> Scrape:
    """One scrape of the service at ``url`` (its base URL)."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=timeout_s) as r:
        return Scrape.parse(r.read().decode())


def metric(url: str, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples in one scrape."""
    return scrape(url).total(name, **labels)


def quantile(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """q-quantile of the observations between two scrapes of one histogram, linear within the bucket (seconds)."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0
    if total <= 0:
        return float("nan")
    rank = q * total
    lower, prev = 0.0, 0.0
    for bound, cum in zip(bounds, counts, strict=True):
        if cum >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - prev) / max(cum - prev, 1e-12)
        lower, prev = bound, cum
    return bounds[-2]


def quantiles_ms(before: Scrape, after: Scrape, name: str, qs: Iterable[float]) -> dict[str, float]:
    """``p50_ms``-style keys: histogram ``name``'s quantiles between two scrapes, in milliseconds."""
    b, a = before.histogram(name), after.histogram(name)
    return {f"p{int(q * 1000) / 10:g}_ms": round(quantile(b, a, q) * 1000, 3) for q in qs}


class Sampler:
    """Scrapes one metric every ``every_s`` in a thread: (monotonic time, value) pairs."""

    def __init__(self, url: str, name: str, every_s: float = 0.1) -> None:
        self.url, self.name, self.every_s = url, name, every_s
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, ValueError):
                self.samples.append((time.monotonic(), metric(self.url, self.name)))
            self._stop.wait(self.every_s)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
