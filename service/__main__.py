"""Run and operate the service.

    python -m service                                   # serve on RERANK_HOST:RERANK_PORT (127.0.0.1:8000)
    python -m service reload [--version V]              # hot reload through /admin/reload (RERANK_ADMIN_TOKEN)
    python -m service load-features [--snapshot FILE]   # the model's user_features.jsonl -> RERANK_REDIS_URL

Settings come from RERANK_* environment variables (see .env.example).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from pydantic import ValidationError

from service import logs
from service.config import Settings, refusals


def serve(settings: Settings) -> None:
    """``RERANK_WORKERS`` processes behind the port (one per core by default); with one, this process serves."""
    from service.app import create_stack
    from service.server import serve
    from service.workers import Supervisor

    workers = settings.resolved_workers()
    if workers == 1:
        serve(create_stack(settings), settings)
        return
    code = Supervisor(settings, workers).run()
    if code:
        sys.exit(code)


def reload(settings: Settings, version: str) -> int:
    url = f"http://{settings.host}:{settings.port}/admin/reload"
    if version:
        url += f"?version={urllib.parse.quote(version)}"
    req = urllib.request.Request(url, method="POST", headers={"Authorization": f"Bearer {settings.admin_token}"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            print(resp.read().decode())
            return 0
    except urllib.error.HTTPError as exc:
        print(f"reload failed ({exc.code}): {exc.read().decode()}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"reload failed: cannot reach {url}: {exc}", file=sys.stderr)
        return 1


def load_features(settings: Settings, snapshot: Path | None) -> int:
    from service.features import load_into_redis, make_redis, read_snapshot
    from service.model import find_version

    if not settings.redis_url:
        print("load-features: set RERANK_REDIS_URL", file=sys.stderr)
        return 2
    path = snapshot or find_version(settings.model_dir, settings.model_version) / "user_features.jsonl"
    users = read_snapshot(path)

    async def run() -> int:
        client = make_redis(settings.redis_url, 4, 5000)
        try:
            return await load_into_redis(client, users.items(), settings.feature_ttl_s)
        finally:
            await client.aclose()

    written = asyncio.run(run())
    print(json.dumps({"snapshot": str(path), "written": written, "ttl_s": settings.feature_ttl_s}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve", help="run the HTTP service (the default)")
    rel = sub.add_parser("reload", help="ask a running service to hot-reload a model version")
    rel.add_argument("--version", default="", help="version folder under RERANK_MODEL_DIR (default: newest)")
    load = sub.add_parser("load-features", help="write a feature snapshot into Redis")
    load.add_argument("--snapshot", type=Path, default=None,
                      help="user_features.jsonl (default: the served model's)")
    args = parser.parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as exc:
        for line in refusals(exc):
            print(f"python -m service: {line}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level, settings.log_format)
    if args.command == "reload":
        return reload(settings, args.version)
    if args.command == "load-features":
        return load_features(settings, args.snapshot)
    serve(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
