"""Candidate logs -> the reranker's lists: training on your own retriever's traffic.

Owns: the candidate-log format, reading it (CSV or Parquet, ``--columns`` renamed, errors that name the file, the
column, the row and the value), the per-user split by request time, the ``Dataset`` and ``CandidateLists`` it
gives; writing lists in that format (``write_log``); joining the service's request log with feedback
(``join_request_log``).
Does not know: retrievers, negative samplers, the reranker or ONNX.

The format, one row per candidate of a logged request:

- ``request_id`` (str), ``user_id`` (str), ``item_id`` (str), ``score`` (the retriever's score, in [0, 1] as the
  service takes it), ``label`` (0 or 1: the user chose the item after the answer);
- optional ``position`` (int, the candidate's index in the request as the retriever sent it; without it,
  descending score), ``timestamp`` (number: when the request was served; without it, the file's order) and
  ``history`` (the user's history as served, item ids separated by spaces, most recent last, the same on every
  row of a request; without it, the items the user labelled 1 in earlier logged requests).

The split follows each user's requests in time (timestamp, then file order): the last is a test list, the one
before a validation list, the rest training lists; a user with fewer than three requests gives training lists
only. Items are indexed over every item the log names (candidates and histories), in the ratings path's natural
order, so ML-100K's lists written by ``write_log`` read back as the same arrays.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from training import data
from training.candidates import CandidateLists, in_retriever_order
from training.data import ITEM_OFFSET, PAD, DataError, Dataset, Slates
from training.retriever import PRE_VALID

REQUIRED = ("request_id", "user_id", "item_id", "score", "label")
OPTIONAL = ("position", "timestamp", "history")
SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class LogFiles:
    """A candidate log and its optional side tables, with the column renames to apply to each."""

    log: Path
    users: Path | None = None
    items: Path | None = None
    columns: dict[str, str] | None = None

    def digest(self) -> str:
        """sha256 over the files' bytes: the run cache's key for data that lives outside the repository."""
        h = hashlib.sha256()
        for path in (self.log, self.users, self.items):
            if path is not None:
                h.update(path.read_bytes())
        return h.hexdigest()[:16]


def _numbers(df: pd.DataFrame, path: Path, column: str, integer: bool = False) -> np.ndarray:
    """``column`` as float64 (or int64), refusing the first non-numeric, infinite or (``integer``) fractional value
    with its data row."""
    values = pd.to_numeric(df[column], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(values) | (integer & (values != np.round(values)))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        kind = "an integer" if integer else "a number"
        raise DataError(f"{path}: column '{column}' must be {kind}; data row {row + 1} has {df[column].iloc[row]!r}")
    return values.astype(np.int64) if integer else values


def _refuse(path: Path, df: pd.DataFrame, bad: np.ndarray, column: str, what: str) -> None:
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(f"{path}: column '{column}' {what}; data row {row + 1} has {df[column].iloc[row]!r}")


def clean_log(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    """The log's columns typed and checked: ids non-empty, scores in [0, 1], labels 0/1, positions unique within a
    request, one user (timestamp, history) per request, no item twice in a request."""
    data.require_columns(df, path, list(REQUIRED))
    if df.empty:
        raise DataError(f"{path}: no rows")
    # A Parquet null is an empty value, not the text "None".
    out = pd.DataFrame({c: df[c].fillna("").astype(str).str.strip() for c in ("request_id", "user_id", "item_id")})
    for c in ("request_id", "user_id", "item_id"):
        _refuse(path, df, (out[c] == "").to_numpy(), c, "must not be empty")
    out["score"] = _numbers(df, path, "score")
    _refuse(path, df, ((out["score"] < 0) | (out["score"] > 1)).to_numpy(), "score", "must be in [0, 1]")
    out["label"] = _numbers(df, path, "label")
    _refuse(path, df, ~out["label"].isin((0.0, 1.0)).to_numpy(), "label", "must be 0 or 1")
    if "position" in df.columns:
        out["position"] = _numbers(df, path, "position", integer=True)
        _refuse(path, df, (out["position"] < 0).to_numpy(), "position", "must be >= 0")
    out["timestamp"] = _numbers(df, path, "timestamp") if "timestamp" in df.columns else 0.0
    if "history" in df.columns:
        out["history"] = df["history"].fillna("").astype(str).str.strip()
    out["order"] = np.arange(len(out))
    _refuse(path, out, out.duplicated(["request_id", "item_id"]).to_numpy(), "item_id", "repeats within a request")
    if "position" in out.columns:
        _refuse(path, out, out.duplicated(["request_id", "position"]).to_numpy(), "position",
                "repeats within a request")
    for c in ("user_id", "timestamp", "history"):
        if c in out.columns:
            varies = out.groupby("request_id", sort=False)[c].transform("nunique").to_numpy() > 1
            _refuse(path, out, varies, c, "differs between rows of one request")
    return out


def read_log(files: LogFiles, history_len: int = 30, name: str | None = None
             ) -> tuple[Dataset, dict[str, CandidateLists]]:
    """The ``Dataset`` and the train/valid/test lists of a candidate log (module docstring)."""
    tables = data.read_renamed([files.log, files.users, files.items], files.columns or {})
    log = clean_log(tables[files.log], files.log)
    users = data.side_table(tables[files.users], files.users, "user_id") if files.users else None
    items = data.side_table(tables[files.items], files.items, "item_id") if files.items else None
    requests = log.groupby("request_id", sort=False).head(1)[["request_id", "user_id", "timestamp", "order"]]
    served = ([h.split() for h in log.groupby("request_id", sort=False)["history"].first()]
              if "history" in log.columns else [])
    item_ids = sorted(set(log["item_id"]) | {i for h in served for i in h}, key=data.natural_key)
    user_ids = sorted(set(requests["user_id"]))
    item_index = {raw: i + ITEM_OFFSET for i, raw in enumerate(item_ids)}
    requests = requests.assign(user=requests["user_id"].map({raw: u for u, raw in enumerate(user_ids)}),
                               served=range(len(requests)))
    requests = requests.sort_values(["user", "timestamp", "order"], kind="stable").reset_index(drop=True)
    log = log.assign(item=log["item_id"].map(item_index))
    every = _arrays(log, requests)
    if served:
        history = _served_history([served[i] for i in requests["served"]], item_index, history_len)
    else:
        history = _chosen_history(every, requests["user"].to_numpy(), history_len)
    user_fields, item_fields = data.encode_sides(users, items, user_ids, item_ids)
    profile = (np.concatenate([f.tokens for f in user_fields], axis=1) if user_fields
               else np.zeros((len(user_ids), 0), dtype=np.int64))
    all_lists = CandidateLists(user=requests["user"].to_numpy(dtype=np.int64), **every, history=history,
                               profile=profile[requests["user"].to_numpy()],
                               fold=np.full(len(requests), PRE_VALID, dtype=np.int64))
    if "position" not in log.columns:
        all_lists = in_retriever_order(all_lists)
    split = _split_of(all_lists.user)
    lists = {s: all_lists.subset(split == s) for s in SPLITS}
    seq = [all_lists.items[all_lists.user == u][all_lists.labels[all_lists.user == u] > 0]
           for u in range(len(user_ids))]
    dataset = Dataset(name or files.log.stem, user_ids, item_ids, seq, [np.ones(len(s), np.int8) for s in seq],
                      user_fields, item_fields,
                      {s: Slates(lists[s].user.copy(), np.flatnonzero(split == s)) for s in SPLITS},
                      slate_size=0, history_len=history_len, n_interactions=len(log))
    dataset.stats = {"users": len(user_ids), "items": len(item_ids), "interactions": len(log),
                     "positive_rate": float(log["label"].mean()),
                     **{f"slates_{s}": len(lists[s]) for s in SPLITS}}
    return dataset, lists


def _arrays(log: pd.DataFrame, requests: pd.DataFrame) -> dict[str, np.ndarray]:
    """items, scores, labels and mask of every request (``requests`` order), candidates by position (or in file
    order, to be sorted by score), padded to the longest request."""
    key = "position" if "position" in log.columns else "order"
    row_of = dict(zip(requests["request_id"], range(len(requests)), strict=True))
    rows = log.assign(row=log["request_id"].map(row_of)).sort_values(["row", key], kind="stable")
    row = rows["row"].to_numpy()
    starts = np.r_[0, np.flatnonzero(row[1:] != row[:-1]) + 1]
    col = np.arange(len(rows)) - np.repeat(starts, np.diff(np.r_[starts, len(rows)]))
    n, width = len(requests), int(col.max()) + 1
    items = np.full((n, width), PAD, dtype=np.int64)
    scores = np.zeros((n, width), dtype=np.float32)
    labels = np.zeros((n, width), dtype=np.float32)
    items[row, col] = rows["item"].to_numpy()
    scores[row, col] = rows["score"].to_numpy(dtype=np.float32)
    labels[row, col] = rows["label"].to_numpy(dtype=np.float32)
    return {"items": items, "scores": scores, "labels": labels, "mask": items != PAD}


def _served_history(histories: list[list[str]], item_index: dict[str, int], history_len: int) -> np.ndarray:
    """(N, history_len) the logged histories as item indices, most recent last, left-padded."""
    out = np.zeros((len(histories), history_len), dtype=np.int64)
    for row, ids in enumerate(histories):
        past = [item_index[i] for i in ids][-history_len:] if history_len else []
        if past:
            out[row, -len(past):] = past
    return out


def _chosen_history(every: dict[str, np.ndarray], users: np.ndarray, history_len: int) -> np.ndarray:
    """(N, history_len) per request, the items its user labelled 1 in earlier requests (rows sorted by user and
    time), most recent last, left-padded."""
    out = np.zeros((len(users), history_len), dtype=np.int64)
    past: list[int] = []
    for row in range(len(users)):
        if row and users[row] != users[row - 1]:
            past = []
        recent = past[-history_len:] if history_len else []
        if recent:
            out[row, -len(recent):] = recent
        past.extend(every["items"][row][every["labels"][row] > 0].tolist())
    return out


def _split_of(users: np.ndarray) -> np.ndarray:
    """Per request (sorted by user, then time): test for a user's last, valid for the one before, train for the
    rest; train only for a user with fewer than three requests."""
    split = np.full(len(users), "train", dtype=object)
    ends = np.flatnonzero(np.r_[users[1:] != users[:-1], True])
    starts = np.r_[0, ends[:-1] + 1]
    enough = ends - starts >= 2
    split[ends[enough]] = "test"
    split[ends[enough] - 1] = "valid"
    return split


def write_log(dataset: Dataset, lists: dict[str, CandidateLists], path: Path) -> int:
    """``lists`` as a candidate log at ``path`` (``.parquet`` or CSV): request ids ``<user>-<n>``, timestamps that
    order each user's requests, positions, and the histories as served. Returns the rows written."""
    frames = []
    for split in SPLITS:
        cl = lists[split]
        rows, cols = np.nonzero(cl.mask)
        when = dataset.splits[split].start
        user = np.asarray(dataset.user_ids, dtype=object)[cl.user]
        ids = np.asarray([""] * ITEM_OFFSET + dataset.item_ids, dtype=object)  # row = item index
        history = np.asarray([" ".join(ids[h[h >= ITEM_OFFSET]]) for h in cl.history], dtype=object)
        frames.append(pd.DataFrame({
            "request_id": [f"{u}-{t}" for u, t in zip(user[rows], when[rows], strict=True)],
            "user_id": user[rows], "item_id": ids[cl.items[rows, cols]], "score": cl.scores[rows, cols],
            "label": cl.labels[rows, cols].astype(np.int64), "position": cols, "timestamp": when[rows],
            "history": history[rows]}))
    log = pd.concat(frames, ignore_index=True)
    log = log.sort_values(["user_id", "timestamp", "position"], kind="stable")
    _write_table(log, path)
    return len(log)


def write_sides(dataset: Dataset, users: Path | None, items: Path | None) -> None:
    """The dataset's side features as the side tables ``read_log`` takes (multi-valued item fields joined by |)."""
    if users is not None and dataset.user_fields:
        table = {"user_id": dataset.user_ids}
        for f in dataset.user_fields:
            table[f.name] = [f.vocab[t - 1] if t > 0 else "" for t in f.tokens[:, 0]]
        _write_table(pd.DataFrame(table), users)
    if items is not None and dataset.item_fields:
        table = {"item_id": dataset.item_ids}
        for f in dataset.item_fields:
            table[f.name] = ["|".join(f.vocab[t - 1] for t in row if t > 0) for row in f.tokens[ITEM_OFFSET:]]
        _write_table(pd.DataFrame(table), items)


def _write_table(df: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        df.to_parquet(path, index=False)
    else:
        df.to_csv(path, index=False)


def join_request_log(records: list[dict[str, Any]], feedback: pd.DataFrame) -> pd.DataFrame:
    """The service's request-log records (``service/request_log.py``) joined with ``feedback`` (request_id,
    item_id: what the user chose after the answer) as a candidate log: one row per candidate, label 1 where the
    feedback names it, the history as the service served it."""
    chosen = set(zip(feedback["request_id"].astype(str), feedback["item_id"].astype(str), strict=True))
    rows = []
    for rec in records:
        rid, history = str(rec["request_id"]), " ".join(rec.get("history", []))
        for position, (item, score) in enumerate(rec["candidates"]):
            rows.append((rid, rec["user_id"], item, score, int((rid, item) in chosen), position, rec["ts"], history))
    return pd.DataFrame(rows, columns=[*REQUIRED, *OPTIONAL])


def read_request_logs(folder: Path) -> list[dict[str, Any]]:
    """Every record of a request-log folder (rotated files included), oldest file first."""
    paths = sorted(folder.glob("requests-*.jsonl*"), key=lambda p: (p.name.split(".jsonl")[0],
                                                                    -int(p.suffix[1:]) if p.suffix[1:].isdigit()
                                                                    else 0))
    return [json.loads(line) for p in paths for line in p.read_text().splitlines() if line]


def item_counts(dataset: Dataset, lists: dict[str, CandidateLists]) -> np.ndarray:
    """(n_items,) each item's label-1 count on the training lists: the popularity a log can see without looking at
    validation or test feedback."""
    train = lists["train"]
    chosen = train.items[(train.labels > 0) & train.mask]
    return np.bincount(chosen, minlength=dataset.n_items).astype(np.float64)
