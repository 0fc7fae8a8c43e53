"""The request log end to end: the held-out requests replayed through the real service with its request log on,
the log joined with their labels (the feedback), and the joined candidate log read back through the pipeline's
reader, every request, candidate, score, label and served history compared with what was sent.

    python -m loadtest.log_replay                       # the newest model under models/; reports/log_replay.md
    python -m loadtest.log_replay --models models --connections 8 --out reports

The service runs as its own process (``python -m service``) with RERANK_REQUEST_LOG_SAMPLE=1 and as many workers
as asked, one log file each; the load client sends each held-out request once on keep-alive connections. SIGTERM
ends the service, whose lifespan writes what is queued; nothing is read before that.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from loadtest import heldout
from loadtest.client import drive
from loadtest.procs import ServiceProcess
from training import candidate_log
from training.data import ITEM_OFFSET


@dataclass
class Replay:
    """What was sent, answered, logged and read back."""

    sent: int = 0
    answered: int = 0
    logged: int = 0
    log_rows: int = 0
    read_back: int = 0
    mismatches: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def intact(self) -> bool:
        return self.sent == self.answered == self.logged == self.read_back and not self.mismatches


def feedback(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The held-out labels as feedback: (request_id, item_id) of each candidate labelled 1."""
    pairs = [(r["request"]["request_id"], c["item_id"]) for r in rows
             for c, z in zip(r["request"]["candidates"], r["labels"], strict=True) if z]
    return pd.DataFrame(pairs, columns=["request_id", "item_id"])


def check(rows: list[dict[str, Any]], snapshot: dict[str, list[str]], folder: Path, out: Replay) -> None:
    """Join the request log under ``folder`` with the labels, write it as a candidate log, read it back and compare
    each request with what was sent (into ``out.mismatches``)."""
    records = candidate_log.read_request_logs(folder)
    out.logged = len(records)
    joined = candidate_log.join_request_log(records, feedback(rows))
    out.log_rows = len(joined)
    path = folder.parent / "candidates.parquet"
    joined.to_parquet(path, index=False)
    longest = max((len(h) for h in snapshot.values()), default=0)
    dataset, lists = candidate_log.read_log(candidate_log.LogFiles(path), history_len=longest)
    every = [(split, row) for split in candidate_log.SPLITS for row in range(len(lists[split]))]
    out.read_back = len(every)
    by_user = {r["request"]["user_id"]: r for r in rows}  # held-out: one request per user
    ids = np.asarray([""] * ITEM_OFFSET + dataset.item_ids, dtype=object)
    for split, row in every:
        cl = lists[split]
        user = dataset.user_ids[cl.user[row]]
        sent = by_user[user]
        m = cl.mask[row]
        want_items = [c["item_id"] for c in sent["request"]["candidates"]]
        want_scores = np.asarray([c["score"] for c in sent["request"]["candidates"]], dtype=np.float32)
        history = [str(i) for i in ids[cl.history[row][cl.history[row] >= ITEM_OFFSET]]]
        for what, ok in (("candidates", list(ids[cl.items[row][m]]) == want_items),
                         ("scores", np.array_equal(cl.scores[row][m], want_scores)),
                         ("labels", cl.labels[row][m].astype(int).tolist() == sent["labels"]),
                         ("history", history == snapshot.get(user, []))):
            if not ok:
                out.mismatches.append(f"user {user}: {what}")


def replay(models: Path, connections: int, workers: int) -> Replay:
    rows = heldout.records(models)
    version = heldout.newest_heldout(models).parent
    snapshot = {u["user_id"]: u["history"] for u in map(json.loads, (version / "user_features.jsonl").read_text()
                                                          .splitlines())}
    bodies = [json.dumps(r["request"]).encode() for r in rows]
    out = Replay(sent=len(bodies))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "requests"
        env = {"RERANK_MODEL_DIR": str(version.parent), "RERANK_MODEL_VERSION": version.name, "RERANK_REDIS_URL": "",
               "RERANK_WORKERS": str(workers), "RERANK_REQUEST_LOG_DIR": str(folder),
               "RERANK_REQUEST_LOG_SAMPLE": "1"}
        svc = ServiceProcess(env, Path(tmp) / "service.log").start()
        try:
            records = asyncio.run(drive(svc.url, bodies, connections, requests=len(bodies)))
        finally:
            svc.terminate()
        out.answered = sum(r.status == 200 for r in records)
        check(rows, snapshot, folder, out)
    out.seconds = time.perf_counter() - t0
    return out


def render(result: Replay, command: str, models: Path) -> str:
    lines = ["# The request log, end to end", "", f"Produced by `{command}` (model folder `{models}`).", "",
             "| step | count |", "|---|---|",
             f"| held-out requests sent | {result.sent:,} |", f"| answered 200 | {result.answered:,} |",
             f"| records in the request log | {result.logged:,} |",
             f"| candidate rows after the join with their labels | {result.log_rows:,} |",
             f"| requests read back by `training/candidate_log.py` | {result.read_back:,} |",
             f"| requests whose candidates, scores, labels or history differ | {len(result.mismatches):,} |", "",
             f"Intact: **{'yes' if result.intact else 'NO'}** ({result.seconds:.1f} s in all)."]
    lines += [f"- {m}" for m in result.mismatches[:20]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.log_replay", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=Path("models"), help="model folder (newest version served)")
    parser.add_argument("--connections", type=int, default=8, help="load client connections (default: 8)")
    parser.add_argument("--workers", type=int, default=2, help="service worker processes (default: 2)")
    parser.add_argument("--out", type=Path, default=Path("reports"), help="report folder (default: reports)")
    args = parser.parse_args(argv)
    result = replay(args.models, args.connections, args.workers)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "log_replay.md"
    command = "python -m loadtest.log_replay " + shlex.join(sys.argv[1:] if argv is None else argv)
    path.write_text(render(result, command.strip(), args.models))
    print(path.read_text(), flush=True)
    return 0 if result.intact else 1


if __name__ == "__main__":
    raise SystemExit(main())
