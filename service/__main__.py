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
import logging
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn

from service.config import Settings

if TYPE_CHECKING:
    from fastapi import FastAPI

# After the drain delay, in-flight requests get this long to finish (deploy/ grace periods are longer than
# the drain delay plus this).
GRACEFUL_SHUTDOWN_S = 30
log = logging.getLogger("service")


class DrainingServer(uvicorn.Server):
    """uvicorn with a drain phase. On the first SIGTERM or SIGINT readiness goes red at once (``on_drain``)
    while requests keep being served for ``delay_s``, so load balancers stop sending before the socket
    closes; then uvicorn's graceful shutdown stops accepting and lets in-flight requests finish. A second
    signal skips the rest of the delay."""

    def __init__(self, config: uvicorn.Config, on_drain: Callable[[], None], delay_s: float) -> None:
        super().__init__(config)
        self.on_drain, self.delay_s = on_drain, delay_s
        self.timer: threading.Timer | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.timer is None:
            self.on_drain()
            if self.delay_s > 0:
                log.info("signal %d: /readyz is red; serving %.1f s more, then shutting down", sig, self.delay_s)
                self.timer = threading.Timer(self.delay_s, super().handle_exit, (sig, frame))
                self.timer.daemon = True
                self.timer.start()
                return
        elif self.timer.is_alive():
            self.timer.cancel()
        super().handle_exit(sig, frame)


def uvicorn_config(app: FastAPI, settings: Settings) -> uvicorn.Config:
    """How the service runs under uvicorn, here and in the tests: the admission gate at the door."""
    from service.admission import shedding_protocol

    return uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                          timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, access_log=False,
                          http=shedding_protocol(app.state.gate))


def serve(settings: Settings) -> None:
    from service.app import begin_drain, create_app

    app = create_app(settings)
    # One event loop, one worker: batching needs every request in the same process. Scale out with
    # replicas (deploy/), not with uvicorn workers.
    DrainingServer(uvicorn_config(app, settings), lambda: begin_drain(app), settings.drain_delay_s).run()


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
    settings = Settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "reload":
        return reload(settings, args.version)
    if args.command == "load-features":
        return load_features(settings, args.snapshot)
    serve(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
