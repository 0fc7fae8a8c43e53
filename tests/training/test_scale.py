"""The scale table's parts: the seeded synthetic log, the per-stage RSS sampler, the linearity verdict, and the
log round trip's comparison on tiny data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from tests.training.fixtures import Tiny
from training import log_roundtrip, scale, synthetic


def test_the_synthetic_log_is_seeded_and_sized() -> None:
    size = synthetic.Size(300, 1_000, 20_000)  # ML-100K's density (6%)
    ratings, users, items = synthetic.generate(size, seed=1)
    again, _, _ = synthetic.generate(size, seed=1)
    other, _, _ = synthetic.generate(size, seed=2)
    pd.testing.assert_frame_equal(ratings, again)
    assert not ratings.equals(other)
    assert abs(len(ratings) - size.interactions) <= 0.02 * size.interactions
    assert ratings.groupby("user_id").size().min() >= synthetic.MIN_PER_USER
    assert not ratings.duplicated(["user_id", "item_id"]).any()
    assert set(ratings["rating"]) <= {1, 2, 3, 4, 5} and len(users) == 300 and len(items) == 1_000
    assert synthetic.Size.times(100) == synthetic.Size(94_300, 16_820, 10_000_000)


def test_a_stage_peak_sees_memory_freed_before_the_stage_ends() -> None:
    stages = scale.Stages(every_s=0.005)
    with stages.stage("allocate"):
        block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
        block[::512] += 1
        import time

        time.sleep(0.1)
        del block
    stages.close()
    (row,) = stages.rows
    assert row["rss_peak_mib"] - row["rss_start_mib"] >= 48 and row["rss_end_mib"] < row["rss_peak_mib"]


def test_the_report_says_whether_memory_grew_faster_than_the_data(tmp_path: Path) -> None:
    def result(factor: float, interactions: int, peak: int) -> dict[str, object]:
        return {"factor": factor, "users": 1, "items": 1, "interactions": interactions,
                "lists": {"train": 1, "valid": 1, "test": 1}, "trained_lists": 1, "mf_dense_mib": 1,
                "floor_mib": 100, "config": {"mf_epochs": 2, "mf_folds": 2, "threads": 2},
                "stages": [{"stage": s, "seconds": 1.0, "rss_start_mib": 100, "rss_peak_mib": peak,
                            "rss_end_mib": peak} for s in scale.STAGES]}

    text = scale.write_report([result(1, 1000, 200), result(10, 10_000, 700), result(100, 100_000, 20_100)],
                              tmp_path, "cmd").read_text()
    assert "- 10x: interactions x10.0, peak RSS above the floor x6.0 (at most linear)" in text
    assert "- 100x: interactions x100.0, peak RSS above the floor x200.0 (MORE THAN LINEAR)" in text
    assert (tmp_path / "scale.png").stat().st_size > 0


def test_the_log_round_trip_finds_only_the_fold_different(tiny: Tiny, tmp_path: Path) -> None:
    built, logged, diffs, facts = log_roundtrip.compare(tiny.dataset, tiny.lists, tmp_path, None)
    assert diffs == {"train": ["fold"], "valid": [], "test": []}
    assert facts["same_items"] and facts["same_users"]
    for name in ("random", "retriever", "reversed", "memorisation"):
        assert built.audit.n6[name] == logged.audit.n6[name]
    text = log_roundtrip.render(built, logged, diffs, facts, "cmd")
    assert "| train |" in text and "| valid | " in text
