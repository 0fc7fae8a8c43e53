"""The held-out requests of an exported model (``heldout.jsonl``): the one reader every load tool uses.

Each line holds a real user's 50-candidate request with the retriever's scores, the labels of its candidates and
the offline top-k. Owns: finding the newest version's file, and reading it as request bodies, as request dicts or
as the model's jobs with their labels. Does not know: how the requests are sent.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from service.features import read_snapshot
from service.model import Job


def newest_heldout(models: Path) -> Path:
    """``heldout.jsonl`` of ``models`` itself or of its newest version folder."""
    if (models / "heldout.jsonl").is_file():
        return models / "heldout.jsonl"
    files = sorted(models.glob("*/heldout.jsonl"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no heldout.jsonl under {models}: export a model first (make model)")
    return files[-1]


def records(models: Path) -> list[dict[str, Any]]:
    """Every line of the newest ``heldout.jsonl`` under ``models`` (or that folder's): request, labels,
    offline top-k."""
    path = newest_heldout(models)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path} holds no requests")
    return rows


def requests(models: Path) -> list[dict[str, Any]]:
    """The ``POST /rerank`` bodies, as dicts."""
    return [row["request"] for row in records(models)]


def bodies(models: Path) -> list[bytes]:
    """The ``POST /rerank`` bodies, as the bytes a client sends."""
    return [json.dumps(body).encode() for body in requests(models)]


def jobs(folder: Path, k: int = 6) -> tuple[list[Job], list[list[int]]]:
    """The requests as the model sees them (real user features from the version's snapshot), and their labels."""
    users = read_snapshot(folder / "user_features.jsonl")
    out, labels = [], []
    for row in records(folder):
        req, cands = row["request"], row["request"]["candidates"]
        out.append(Job([c["item_id"] for c in cands], np.array([c["score"] for c in cands], np.float32),
                       users[req["user_id"]], k))
        labels.append(row["labels"])
    return out, labels
