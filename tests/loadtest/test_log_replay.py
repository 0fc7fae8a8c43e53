"""The request log end to end: held-out requests through the real service process with its request log on, joined
with their labels and read back by the pipeline's reader, intact; and a log that lost a score is caught."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtest import heldout, log_replay


@pytest.mark.slow
def test_replayed_requests_read_back_intact(model_root: Path, tmp_path: Path) -> None:
    result = log_replay.replay(model_root, connections=4, workers=2)
    assert result.sent > 0 and result.intact, result
    assert "Intact: **yes**" in log_replay.render(result, "cmd", model_root)


def test_a_changed_score_or_history_is_a_mismatch(model_root: Path, tmp_path: Path) -> None:
    rows = heldout.records(model_root)[:3]
    folder = tmp_path / "requests"
    folder.mkdir()
    records = [{"ts": float(i), "request_id": r["request"]["request_id"], "user_id": r["request"]["user_id"],
                "candidates": [[c["item_id"], c["score"]] for c in r["request"]["candidates"]],
                "history": ["h"]} for i, r in enumerate(rows)]
    records[1]["candidates"][0][1] = 0.123  # the log lost a score
    (folder / "requests-1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    snapshot = {r["request"]["user_id"]: ["h"] for r in rows}
    snapshot[rows[2]["request"]["user_id"]] = ["other"]  # served another history than the snapshot holds
    out = log_replay.Replay(sent=3, answered=3)
    log_replay.check(rows, snapshot, folder, out)
    assert out.logged == out.read_back == 3 and not out.intact
    assert out.mismatches == [f"user {rows[1]['request']['user_id']}: scores",
                              f"user {rows[2]['request']['user_id']}: history"]
