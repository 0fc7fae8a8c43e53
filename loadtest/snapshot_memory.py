"""Memory per service worker against the size of the user-feature snapshot every worker holds.

    python -m loadtest.snapshot_memory                                  # 0, 10k, 100k users; reports/snapshot_memory.md
    python -m loadtest.snapshot_memory --users 0,100000 --compare ../before   # beside another checkout's service

The newest model version is copied with its ``user_features.jsonl`` replaced by ``--users`` synthetic users (a
profile drawn from the manifest's vocabularies, a history of ``history_len`` item ids drawn from the model's items,
seeded); the real ``python -m service`` runs on it with ``--workers`` workers and no Redis, and each worker's RSS is
read from /proc once every worker is ready and has answered a request for a snapshot user.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from loadtest.client import send
from loadtest.heldout import newest_heldout, requests
from loadtest.procs import ServiceProcess, rss_mb


def write_snapshot(version: Path, users: int, seed: int = 0) -> None:
    """``users`` synthetic users in ``version/user_features.jsonl`` (module docstring)."""
    manifest = json.loads((version / "manifest.json").read_text())
    items = json.loads((version / "items.json").read_text())
    fields = {f["name"]: f["vocab"] for f in manifest.get("profile_fields", [])}
    rng = np.random.default_rng(seed)
    history = rng.integers(len(items), size=(users, manifest["history_len"]))
    path = version / "user_features.jsonl"
    with open(path, "w") as f:
        for u in range(users):
            profile = {name: vocab[int(rng.integers(len(vocab)))] for name, vocab in fields.items() if vocab}
            f.write(json.dumps({"user_id": f"s{u}", "profile": profile,
                                "history": [items[i] for i in history[u]]}) + "\n")
    data = path.read_bytes()  # the manifest pins every file's bytes: re-pin the new snapshot
    manifest["files"][path.name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    manifest["user_features"]["count"] = users
    (version / "manifest.json").write_text(json.dumps(manifest, indent=2))


def measure(models: Path, users: int, workers: int, checkout: Path | None) -> list[float]:
    """Each worker's RSS (MiB) serving a copy of the newest version with ``users`` synthetic users."""
    source = newest_heldout(models).parent
    body = requests(models)[0]
    with tempfile.TemporaryDirectory() as tmp:
        version = Path(tmp) / source.name
        shutil.copytree(source, version)
        write_snapshot(version, users)
        env = {"RERANK_MODEL_DIR": tmp, "RERANK_MODEL_VERSION": source.name, "RERANK_REDIS_URL": "",
               "RERANK_WORKERS": str(workers)}
        svc = ServiceProcess(env, Path(tmp) / "service.log", cwd=checkout).start()
        try:
            for i in range(4 * workers):  # every worker touches the snapshot at least once, most likely
                send(svc.url, {"Content-Type": "application/json"},
                     json.dumps({**body, "user_id": f"s{i % max(users, 1)}"}).encode())
            return [rss_mb(pid) for pid in svc.pids()]
        finally:
            svc.terminate()


def render(rows: list[tuple[str, list[list[float]]]], sizes: list[int], workers: int, command: str) -> str:
    """The report: per service, each size's mean RSS per worker with every worker's in brackets."""
    lines = ["# Memory per worker against the user-feature snapshot", "",
             f"Produced by `{command}`: {workers} workers, no Redis, RSS per worker (MiB) after each has answered "
             "requests.", "",
             "| service | " + " | ".join(f"{u:,} users" for u in sizes) + " |", "|---" * (1 + len(sizes)) + "|"]
    for name, per_size in rows:
        cells = [f"{statistics.mean(rss):.0f} ({', '.join(f'{r:.0f}' for r in rss)})" for rss in per_size]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join([*lines, "", "Mean over workers (each worker in brackets)."]) + "\n"


def label(checkout: Path, name: str = "") -> str:
    """A checkout as the report names it: ``name`` or its path, and its commit."""
    commit = subprocess.run(["git", "-C", str(checkout), "log", "-1", "--format=%h %s"], capture_output=True,
                            text=True).stdout.strip()[:60]
    return f"{name or f'`{checkout}`'} ({commit or 'not a git checkout'})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.snapshot_memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=Path("models"), help="model folder (newest version used)")
    parser.add_argument("--users", default="0,10000,100000", help="snapshot sizes, comma-separated")
    parser.add_argument("--workers", type=int, default=2, help="service workers (default: 2)")
    parser.add_argument("--compare", type=Path, default=None, metavar="CHECKOUT",
                        help="also measure the service of this checkout (its own `python -m service`)")
    parser.add_argument("--out", type=Path, default=Path("reports"), help="report folder (default: reports)")
    args = parser.parse_args(argv)
    sizes = [int(u) for u in args.users.split(",") if u]
    targets: list[tuple[str, Path | None]] = [(label(Path("."), "this checkout"), None)]
    if args.compare:
        targets.append((label(args.compare), args.compare.resolve()))
    rows = []
    for name, checkout in targets:
        per_size = []
        for users in sizes:
            per_size.append(measure(args.models, users, args.workers, checkout))
            print(name, users, per_size[-1], flush=True)
        rows.append((name, per_size))
    command = f"python -m loadtest.snapshot_memory {shlex.join(sys.argv[1:] if argv is None else argv)}".strip()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "snapshot_memory.md"
    path.write_text(render(rows, sizes, args.workers, command))
    print(path.read_text(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
