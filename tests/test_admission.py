"""The admission gate over real HTTP: 429 at the door (uvicorn's parser), the app's own copy of the check,
and counts that return to zero whatever the request did."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServiceThread, service_settings, slow_model


def body(model_root: Path) -> bytes:
    row = json.loads((model_root / "tiny-v1" / "heldout.jsonl").read_text().splitlines()[0])
    return json.dumps(row["request"] | {"timeout_ms": 5000}).encode()


def rejections(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith('rerank_rejections_total{reason="in_flight"}'))


@pytest.mark.parametrize("door", [True, False], ids=["at the door", "in the app"])
def test_full_gate_answers_429_and_the_connection_stays_usable(model_root: Path, door: bool) -> None:
    with ServiceThread(service_settings(model_root, max_in_flight=2), door=door) as svc:
        gate = svc.app.state.gate
        conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=10)
        post = {"Content-Type": "application/json"}
        gate.in_flight = 2  # two requests being answered: the gate is full

        conn.request("POST", "/rerank", body(model_root), post)
        resp = conn.getresponse()
        err = json.loads(resp.read())["error"]
        sock = conn.sock
        assert resp.status == 429 and resp.getheader("Retry-After") == "1"
        assert err["code"] == "overloaded" and err["field"] == "max_in_flight" and err["value"] == 2
        assert ("at the door" in err["message"]) == door

        conn.request("GET", "/readyz")  # other paths are never shed, on the same keep-alive connection
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["status"] == "ready"

        gate.in_flight = 0
        conn.request("POST", "/rerank", body(model_root), post)
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["fallback"] is False
        assert conn.sock is sock  # one connection throughout: the canned answer kept the stream in step
        conn.close()
        assert rejections(svc.url) == 1
        assert gate.in_flight == 0 and gate.pending == 0


def test_a_burst_is_admitted_up_to_the_limit_and_the_rest_is_shed_at_the_door(model_root: Path) -> None:
    """50 requests at once against max_in_flight 4 and a model that takes 0.5 s: exactly 4 are served. All
    46 others are refused at the door, even those parsed in the same event-loop turn as the first four
    (``Gate.pending``), so none of them costs the app a handler."""
    with ServiceThread(service_settings(model_root, max_in_flight=4, max_batch_size=64)) as svc:
        slow_model(svc, 0.5)
        payload = body(model_root)

        async def burst() -> list[httpx.Response]:
            limits = httpx.Limits(max_connections=50, max_keepalive_connections=50)
            async with httpx.AsyncClient(base_url=svc.url, timeout=30, limits=limits) as client:
                return await asyncio.gather(*(client.post("/rerank", content=payload, headers={
                    "content-type": "application/json"}) for _ in range(50)))

        responses = asyncio.run(burst())
        gate = svc.app.state.gate
        assert gate.in_flight == 0 and gate.pending == 0
    codes = [r.status_code for r in responses]
    assert codes.count(200) == 4 and codes.count(429) == 46, codes
    assert all("at the door" in r.json()["error"]["message"] for r in responses if r.status_code == 429)
    assert max(r.elapsed.total_seconds() for r in responses if r.status_code == 429) < 0.4


def test_counts_return_to_zero_after_requests_of_every_kind(model_root: Path) -> None:
    good = body(model_root)
    cases = [(good, "application/json"), (b"{not json", "application/json"), (good, "text/plain"),
             (b"[" * 10_000, "application/json"), (b"x" * 400_000, "application/json"),
             (json.dumps({"user_id": "1", "candidates": []}).encode(), "application/json")]
    with ServiceThread(service_settings(model_root)) as svc:
        with httpx.Client(base_url=svc.url, timeout=30) as client:
            codes = sorted({client.post("/rerank", content=b, headers={"content-type": t}).status_code
                            for b, t in cases * 5})
        gate = svc.app.state.gate
        assert gate.in_flight == 0 and gate.pending == 0
    assert codes[0] == 200 and all(400 <= c < 500 for c in codes[1:]), codes


def test_pipelined_requests_on_a_closed_connection_leave_no_slot_taken(model_root: Path) -> None:
    """uvicorn never starts a pipelined request whose connection closed first, so the door must not have
    counted it as pending: 64 such connections would otherwise close the gate for good."""
    payload = body(model_root)
    request = (b"POST /rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
               + str(len(payload)).encode() + b"\r\n\r\n" + payload)
    with ServiceThread(service_settings(model_root)) as svc:
        slow_model(svc, 0.2)
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", svc.port)) as sock:
                sock.sendall(request * 3)
                time.sleep(0.05)
        gate = svc.app.state.gate
        deadline = time.monotonic() + 5
        while (gate.in_flight or gate.pending) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (gate.in_flight, gate.pending) == (0, 0)
