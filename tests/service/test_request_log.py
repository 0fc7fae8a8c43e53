"""The request log: sampled, bounded by rotation, every record written whole and none lost across rotations, and
from the real app the request and its answer as they were."""

from __future__ import annotations

import json
import random
from pathlib import Path

from fastapi.testclient import TestClient

from service.app import create_app
from service.request_log import RequestLog, record
from tests.conftest import service_settings


def rec(i: int) -> dict[str, object]:
    return record(f"r{i}", f"u{i}", "v1", 6, [(f"i{j}", 0.5) for j in range(50)], [f"i{j}" for j in range(6)],
                  None, 1.0)


def read_all(folder: Path) -> list[dict[str, object]]:
    return [json.loads(line) for path in sorted(folder.iterdir()) for line in path.read_text().splitlines()]


def test_rotation_keeps_every_record_whole_and_bounds_the_files(tmp_path: Path) -> None:
    log = RequestLog(tmp_path, sample=1.0, max_bytes=20_000, keep=100)
    assert all(log.offer(rec(i)) for i in range(300))
    log.close()
    files = sorted(tmp_path.iterdir())
    assert len(files) > 5  # it rotated
    got = read_all(tmp_path)
    assert sorted(str(r["request_id"]) for r in got) == sorted(f"r{i}" for i in range(300))  # none lost, all whole
    one = len(json.dumps(rec(0), separators=(",", ":"))) + 1
    assert all(p.stat().st_size < 20_000 + one for p in files)

    bounded = tmp_path / "bounded"
    log = RequestLog(bounded, sample=1.0, max_bytes=20_000, keep=2)
    for i in range(300):
        log.offer(rec(i))
    log.close()
    assert len(list(bounded.iterdir())) <= 3  # the file and .1, .2: the oldest went
    assert sum(p.stat().st_size for p in bounded.iterdir()) < 3 * (20_000 + one)
    kept = [int(str(r["request_id"])[1:]) for r in read_all(bounded)]
    assert max(kept) == 299 and len(kept) == len(set(kept))  # the newest are kept


def test_sampling_and_a_full_queue_drop_and_count(tmp_path: Path) -> None:
    draws = random.Random(0)
    log = RequestLog(tmp_path, sample=0.1, max_bytes=10**6, keep=1, draw=draws.random)
    share = sum(log.sampled() for _ in range(10_000)) / 10_000
    assert 0.08 < share < 0.12
    log.close()
    off = RequestLog(tmp_path / "off", sample=0.0, max_bytes=10**6, keep=1)
    assert not any(off.sampled() for _ in range(1000))
    off.close()
    tiny = RequestLog(tmp_path / "tiny", sample=1.0, max_bytes=10**6, keep=1, queue_size=1)
    tiny.queue.put(rec(0))  # the writer may take it at once; fill until the queue holds one and refuses the next
    offered = [tiny.offer(rec(i)) for i in range(1000)]
    tiny.close()
    assert not all(offered) and tiny.dropped == offered.count(False)
    assert tiny.written == 1 + offered.count(True)


def test_the_app_logs_each_sampled_request_with_its_answer(model_root: Path, tmp_path: Path) -> None:
    folder = tmp_path / "requests"
    app = create_app(service_settings(model_root, request_log_dir=str(folder), request_log_sample=1.0))
    rows = [json.loads(line) for line in (model_root / "tiny-v1" / "heldout.jsonl").read_text().splitlines()[:5]]
    with TestClient(app) as client:
        answers = [client.post("/rerank", json={**r["request"], "request_id": f"q{i}"}).json()
                   for i, r in enumerate(rows)]
        assert client.post("/rerank", json={"user_id": "u"}).status_code == 422  # refused: not logged
    logged = {str(r["request_id"]): r for r in read_all(folder)}  # the lifespan closed it: everything is on disk
    assert set(logged) == {f"q{i}" for i in range(5)}
    for i, (row, answer) in enumerate(zip(rows, answers, strict=True)):
        entry = logged[f"q{i}"]
        assert entry["user_id"] == row["request"]["user_id"] and entry["model_version"] == "tiny-v1"
        assert entry["candidates"] == [[c["item_id"], c["score"]] for c in row["request"]["candidates"]]
        assert entry["returned"] == [item["item_id"] for item in answer["items"]]
        # features as served: the snapshot's history for this user, most recent last
        snapshot = {json.loads(line)["user_id"]: json.loads(line)
                    for line in (model_root / "tiny-v1" / "user_features.jsonl").read_text().splitlines()}
        assert entry["history"] == snapshot[row["request"]["user_id"]]["history"]
        assert entry["features"] in ("local", "redis", "snapshot")
