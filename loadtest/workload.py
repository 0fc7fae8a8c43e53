"""What the locust load test sends, and when: kept apart from locust so it can be tested without gevent.

Owns: realistic requests from a model's held-out lists (real users with a Zipf-skewed popularity, their
real 50 candidates with retriever scores, a share of cold-start users) and the steady / ramp / spike
user-count schedules. Does not know: HTTP or locust.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtest import heldout

SCENARIOS = ("steady", "ramp", "spike")


@dataclass(frozen=True)
class Stage:
    until_s: float  # this stage lasts until this many seconds into the run
    users: int
    spawn_rate: float  # users started (or stopped) per second to get there


def schedule(scenario: str, users: int, duration_s: float) -> list[Stage]:
    """steady: ``users`` throughout. ramp: five equal steps up to ``users``. spike: ``users``, then 4x for
    the middle fifth of the run (reached within a second), then ``users`` again."""
    if scenario not in SCENARIOS:
        raise ValueError(f"LOCUST_SCENARIO={scenario!r} is not one of {SCENARIOS}")
    if users < 1 or duration_s <= 0:
        raise ValueError(f"users ({users}) must be >= 1 and duration_s ({duration_s}) > 0")
    if scenario == "steady":
        return [Stage(duration_s, users, users)]
    if scenario == "ramp":
        steps = 5
        return [Stage(duration_s * (i + 1) / steps, max(1, round(users * (i + 1) / steps)), users)
                for i in range(steps)]
    fifth = duration_s / 5
    return [Stage(2 * fifth, users, users), Stage(3 * fifth, 4 * users, 4 * users), Stage(duration_s, users, 4 * users)]


def stage_at(stages: list[Stage], run_s: float) -> Stage | None:
    """The stage in force ``run_s`` seconds in; None once the schedule is over (locust then stops)."""
    return next((s for s in stages if run_s < s.until_s), None)


class Requests:
    """Request bodies drawn like production traffic: user u with probability ~ 1 / rank(u)^s."""

    def __init__(self, models: Path, zipf_s: float = 1.1, cold_share: float = 0.02, seed: int = 0) -> None:
        rows = heldout.requests(models)
        self.rng = random.Random(seed)
        self.rows = rows
        order = list(range(len(rows)))
        self.rng.shuffle(order)  # popularity rank independent of file order
        self.order = order
        self.weights = [1.0 / (rank + 1) ** zipf_s for rank in range(len(rows))]
        self.cold_share = cold_share
        self.sent = 0

    def next(self) -> dict[str, Any]:
        self.sent += 1
        row = self.rows[self.rng.choices(self.order, weights=self.weights)[0]]
        body = {**row, "request_id": f"locust-{self.sent}"}
        if self.rng.random() < self.cold_share:
            body["user_id"] = f"cold-{self.rng.randrange(1 << 30)}"
        return body
