"""The three HTTP servers `make bench` compares, behind one timing wrapper and one set of uvicorn settings.

    python -m loadtest.servers service --port 8100              # the real app (RERANK_* settings)
    python -m loadtest.servers ceiling --port 8101              # HTTP + parse + a fixed answer
    python -m loadtest.servers ceiling --port 8101 --reuse-port --bare   # one of N copies on one port
    python -m loadtest.servers naive --port 8102 --models models

- ``service``: ``service.app.create_app``, exactly what ``python -m service`` serves.
- ``ceiling``: POST /rerank reads the body, parses and type-checks it with the service's own parser and
  answers a fixed body: what HTTP and JSON alone cost on this machine, the most any Python service could do.
- ``naive``: what a user might write first: FastAPI with a pydantic body, the torch model in eager mode
  called inline (so one request at a time), user features from a dict, ids mapped in Python.

Every app is wrapped in ``Timed``: server-side time from uvicorn calling the app to the last body byte handed
back, for POST /rerank only, read with ``GET /bench/latency?start=N`` (raw samples, exact percentiles).
"""

# No `from __future__ import annotations`: FastAPI must see the handlers' annotations as real classes, and
# the request models are local to the app factories.
import argparse
import json
import time
from array import array
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import orjson

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class Timed:
    """ASGI wrapper recording the server-side duration of every POST to ``path``."""

    def __init__(self, app: ASGIApp, path: str = "/rerank") -> None:
        self.app = app
        self.path = path
        self.samples = array("d")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in (self.path, "/bench/latency"):
            return await self.app(scope, receive, send)
        if scope["path"] == "/bench/latency":
            start = int(parse_qs(scope["query_string"].decode()).get("start", ["0"])[0])
            body = orjson.dumps({"count": len(self.samples), "samples_s": self.samples[start:].tolist()})
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json")]})
            return await send({"type": "http.response.body", "body": body})
        t0 = time.perf_counter()

        async def timed_send(message: Message) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self.samples.append(time.perf_counter() - t0)

        await self.app(scope, receive, timed_send)


def ceiling_app() -> ASGIApp:
    from fastapi import FastAPI, Request
    from starlette.responses import Response
    from starlette.routing import Route

    from service.schemas import parse_request

    # Built the way the service is (telemetry off, /rerank behind a plain Starlette Route), so the
    # difference between the two is what the service does, not how it is routed.
    app = FastAPI(telemetry={"tracing": False, "metrics": False, "logs": False})
    fixed = orjson.dumps({"request_id": "", "model_version": "ceiling", "fallback": False, "fallback_reason": None,
                          "items": [{"item_id": str(i), "score": 0.0, "rank": i + 1} for i in range(6)]})

    async def rerank(request: Request) -> Response:
        parse_request(await request.body())
        return Response(fixed, media_type="application/json")

    app.router.routes.insert(0, Route("/rerank", rerank, methods=["POST"]))

    @app.get("/readyz")
    async def readyz() -> Response:
        return Response(b'{"status":"ready"}', media_type="application/json")

    return app


def naive_app(folder: Path) -> ASGIApp:
    import torch
    from fastapi import FastAPI
    from pydantic import BaseModel

    from training.export import load_reranker

    manifest = json.loads((folder / "manifest.json").read_text())
    model = load_reranker(folder)
    first = manifest["items"]["first_index"]
    oov = manifest["items"]["oov_index"]
    index = {raw: i + first for i, raw in enumerate(json.loads((folder / "items.json").read_text()))}
    fields = [(f["name"], {v: i + 1 for i, v in enumerate(f["vocab"])}) for f in manifest["profile_fields"]]
    users = {u["user_id"]: u for u in map(json.loads, (folder / "user_features.jsonl").read_text().splitlines())}
    history_len = manifest["history_len"]

    class Candidate(BaseModel):
        item_id: str
        score: float

    class RerankRequest(BaseModel):
        request_id: str
        user_id: str
        candidates: list[Candidate]
        k: int = 6

    app = FastAPI()

    @app.post("/rerank")
    async def rerank(req: RerankRequest) -> dict[str, Any]:
        user = users.get(req.user_id, {"profile": {}, "history": []})
        items = torch.tensor([[index.get(c.item_id, oov) for c in req.candidates]])
        scores = torch.tensor([[c.score for c in req.candidates]])
        past = [index.get(i, oov) for i in user["history"]][-history_len:]
        history = torch.tensor([[0] * (history_len - len(past)) + past])
        profile = torch.tensor([[vocab.get(user["profile"].get(name, ""), 0) for name, vocab in fields]])
        with torch.no_grad():
            logits = model(items, scores, torch.ones_like(items, dtype=torch.bool), history, profile)[0]
        top = torch.topk(logits, min(req.k, len(req.candidates)))
        return {"request_id": req.request_id, "model_version": manifest["version"],
                "items": [{"item_id": req.candidates[int(i)].item_id, "score": float(s), "rank": r + 1}
                          for r, (s, i) in enumerate(zip(top.values, top.indices, strict=True))]}

    @app.get("/readyz")
    async def readyz() -> dict[str, str]:
        return {"status": "ready"}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["service", "ceiling", "naive"])
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--models", type=Path, default=Path("models"), help="model folder (naive: newest version)")
    parser.add_argument("--reuse-port", action="store_true",
                        help="bind with SO_REUSEPORT, as the service's workers do, so N copies share the port")
    parser.add_argument("--bare", action="store_true", help="without the Timed wrapper (no /bench/latency)")
    args = parser.parse_args()
    import uvicorn

    from service.app import create_app
    from service.config import Settings
    from service.model import find_version

    settings = Settings()
    app: ASGIApp
    if args.kind == "service":
        app = create_app(settings)
    elif args.kind == "ceiling":
        app = ceiling_app()
    else:
        app = naive_app(find_version(args.models, settings.model_version))
    # The service's own server settings (service/server.py): uvloop + httptools, no access log.
    served = app if args.bare else Timed(app)
    if not args.reuse_port:
        uvicorn.run(served, host="127.0.0.1", port=args.port, log_level="warning", access_log=False,
                    timeout_graceful_shutdown=5)
        return
    from service.server import reuse_port_socket

    config = uvicorn.Config(served, host="127.0.0.1", port=args.port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[reuse_port_socket("127.0.0.1", args.port)])


if __name__ == "__main__":
    main()
