"""The candidate-log format: lists written and read back as the same arrays, the split by request time, the history
as served or as chosen, the joined request log, and errors that name the file, column, row and value."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.training.fixtures import Tiny
from training import candidate_log, data, train
from training.__main__ import main
from training.candidate_log import LogFiles, read_log

LISTS_FIELDS = [f.name for f in dataclasses.fields(train.CandidateLists) if f.name != "fold"]


def write(path: Path, rows: list[dict[str, object]]) -> Path:
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def row(rid: str, user: str, item: str, score: float, label: int, **extra: object) -> dict[str, object]:
    return {"request_id": rid, "user_id": user, "item_id": item, "score": score, "label": label, **extra}


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_lists_written_as_a_log_read_back_as_the_same_arrays(tiny: Tiny, tmp_path: Path, suffix: str) -> None:
    log, users, items = (tmp_path / f"{n}{suffix}" for n in ("candidates", "users", "items"))
    candidate_log.write_log(tiny.dataset, tiny.lists, log)
    candidate_log.write_sides(tiny.dataset, users, items)
    dataset, lists = read_log(LogFiles(log, users, items), tiny.dataset.history_len)
    assert dataset.item_ids == tiny.dataset.item_ids and dataset.user_ids == tiny.dataset.user_ids
    for split in ("train", "valid", "test"):
        for name in LISTS_FIELDS:
            assert np.array_equal(getattr(lists[split], name), getattr(tiny.lists[split], name)), (split, name)
    for ours, theirs in zip(dataset.user_fields + dataset.item_fields,
                            tiny.dataset.user_fields + tiny.dataset.item_fields, strict=True):
        assert ours.vocab == theirs.vocab and np.array_equal(ours.tokens, theirs.tokens)
    # and one trained epoch on either gives the same model
    cfg = dataclasses.replace(tiny.cfg, epochs=1)
    a, b = train.train(tiny.dataset, tiny.lists, cfg, False), train.train(dataset, lists, cfg, False)
    assert a.best_valid == b.best_valid


def test_split_by_request_time_and_the_history_of_chosen_items(tmp_path: Path) -> None:
    rows = []
    for t in (3, 1, 2, 4):  # out of order in the file: the timestamp decides
        rows += [row(f"a{t}", "ua", f"i{t}", 0.9, 1, timestamp=t), row(f"a{t}", "ua", "x", 0.5, 0, timestamp=t)]
    rows += [row("b1", "ub", "i1", 0.2, 0, timestamp=1), row("b1", "ub", "i2", 0.7, 1, timestamp=1)]
    rows += [row(f"c{t}", "uc", "i1", 0.5, 1, timestamp=t) for t in (1, 2)]
    dataset, lists = read_log(LogFiles(write(tmp_path / "log.csv", rows)), history_len=3)
    a, b, c = (dataset.user_ids.index(u) for u in ("ua", "ub", "uc"))
    index = {raw: i + data.ITEM_OFFSET for i, raw in enumerate(dataset.item_ids)}
    assert lists["test"].user.tolist() == [a] and lists["valid"].user.tolist() == [a]
    assert lists["test"].items[0, 0] == index["i4"] and lists["valid"].items[0, 0] == index["i3"]
    assert sorted(lists["train"].user.tolist()) == sorted([a, a, b, c, c])  # under three requests: training only
    # ua's test request: the items ua chose in its three earlier requests, most recent last
    assert lists["test"].history[0].tolist() == [index["i1"], index["i2"], index["i3"]]
    # without positions, candidates sort by descending score
    row_b = int(np.flatnonzero(lists["train"].user == b)[0])
    assert lists["train"].items[row_b].tolist() == [index["i2"], index["i1"]]


def test_positions_and_the_served_history_are_kept(tmp_path: Path) -> None:
    rows = [row("r", "u", "low", 0.1, 0, position=0, history="h1 h2"),
            row("r", "u", "high", 0.9, 1, position=1, history="h1 h2")]
    dataset, lists = read_log(LogFiles(write(tmp_path / "log.csv", rows)), history_len=4)
    index = {raw: i + data.ITEM_OFFSET for i, raw in enumerate(dataset.item_ids)}
    assert lists["train"].items[0].tolist() == [index["low"], index["high"]]  # as sent, not by score
    assert lists["train"].history[0].tolist() == [0, 0, index["h1"], index["h2"]]


def test_column_mapping_renames_the_log(tmp_path: Path) -> None:
    rows = [{"req": "r", "uid": "u", "iid": "i", "score": 0.5, "clicked": 1}]
    path = write(tmp_path / "log.csv", rows)
    dataset, lists = read_log(LogFiles(path, columns=data.parse_columns("req=request_id,uid=user_id,iid=item_id,"
                                                                        "clicked=label")))
    assert dataset.item_ids == ["i"] and lists["train"].labels.tolist() == [[1.0]]


@pytest.mark.parametrize(("change", "message"), [
    ({"label": None}, "missing column(s) ['label']"),
    ({"score": "high"}, "column 'score' must be a number; data row 2 has 'high'"),
    ({"score": 1.5}, "column 'score' must be in [0, 1]; data row 2 has '1.5'"),
    ({"label": 2}, "column 'label' must be 0 or 1; data row 2 has '2'"),
    ({"position": 0.5}, "column 'position' must be an integer; data row 2 has '0.5'"),
    ({"item_id": "a"}, "column 'item_id' repeats within a request"),
    ({"user_id": "other"}, "column 'user_id' differs between rows of one request"),
    ({"request_id": ""}, "column 'request_id' must not be empty"),
])
def test_a_malformed_log_is_refused_naming_file_column_and_value(tmp_path: Path, change: dict[str, object],
                                                                  message: str) -> None:
    rows = [row("r", "u", "a", 0.5, 1, position=0), row("r", "u", "b", 0.4, 0, position=1)]
    for key, value in change.items():
        for r in rows:
            if value is None:
                r.pop(key)
        if value is not None:
            rows[1][key] = value
    path = write(tmp_path / "log.csv", rows)
    with pytest.raises(data.DataError) as err:
        read_log(LogFiles(path))
    assert str(path) in str(err.value) and message in str(err.value)


def test_the_cli_names_a_missing_log_column(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "log.csv", [{"request_id": "r", "user_id": "u", "item_id": "i", "score": 0.5}])
    assert main(["stats", "--dataset", "log", "--path", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "'label'" in err


def test_the_request_log_joined_with_feedback_is_a_candidate_log(tmp_path: Path) -> None:
    folder = tmp_path / "requests"
    folder.mkdir()
    first = {"ts": 1.0, "request_id": "q1", "user_id": "u", "candidates": [["a", 0.9], ["b", 0.3]],
             "returned": ["b", "a"], "history": ["h"], "features": "redis"}
    second = {**first, "ts": 2.0, "request_id": "q2"}
    (folder / "requests-7.jsonl.1").write_text(json.dumps(first) + "\n")  # rotated: older
    (folder / "requests-7.jsonl").write_text(json.dumps(second) + "\n")
    records = candidate_log.read_request_logs(folder)
    assert [r["request_id"] for r in records] == ["q1", "q2"]
    joined = candidate_log.join_request_log(records, pd.DataFrame({"request_id": ["q2"], "item_id": ["b"]}))
    assert joined[["request_id", "item_id", "label", "position"]].values.tolist() == [
        ["q1", "a", 0, 0], ["q1", "b", 0, 1], ["q2", "a", 0, 0], ["q2", "b", 1, 1]]
    path = tmp_path / "log.parquet"
    joined.to_parquet(path)
    dataset, lists = read_log(LogFiles(path), history_len=2)
    assert len(lists["train"]) == 2 and lists["train"].labels.sum() == 1
    assert dataset.item_ids == ["a", "b", "h"]


def test_parquet_nulls_are_empty_values(tmp_path: Path) -> None:
    path = tmp_path / "log.parquet"
    rows = [row("r", "u", "a", 0.5, 1, history=None), row("r", "u", "b", 0.4, 0, history=None)]
    pd.DataFrame(rows).to_parquet(path)
    dataset, lists = read_log(LogFiles(path), history_len=2)
    assert dataset.item_ids == ["a", "b"] and not lists["train"].history.any()  # no item called "None"
    rows[1]["user_id"] = None
    pd.DataFrame(rows).to_parquet(path)
    with pytest.raises(data.DataError, match="column 'user_id' must not be empty"):
        read_log(LogFiles(path))
