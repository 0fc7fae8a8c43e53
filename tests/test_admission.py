"""Admission: the AIMD limit's rules, the gate's counts, and over real HTTP the door (429 before the body is
read), slow senders (no slot held, 408) and counts that return to zero whatever the request did."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import time
from pathlib import Path

import httpx
import pytest

from service.admission import BACKOFF, CLOSE_OVER_BYTES, AimdLimit, FixedLimit, Gate
from service.app import service_of
from tests.conftest import ServiceThread, service_settings, slow_model

POST = {"Content-Type": "application/json"}


def body(model_root: Path, timeout_ms: int = 5000) -> bytes:
    row = json.loads((model_root / "tiny-v1" / "heldout.jsonl").read_text().splitlines()[0])
    return json.dumps(row["request"] | {"timeout_ms": timeout_ms}).encode()


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def gate_of(svc: ServiceThread) -> Gate:
    return service_of(svc.app).gate


# ------------------------------------------------------------------------------------------- pure logic


def test_aimd_slow_starts_then_adds_one_per_limit_and_cuts_once_per_round() -> None:
    limit = AimdLimit(floor=4, ceiling=40)
    assert limit.value == 4 and limit.slow_start
    for _ in range(6):  # fast answers while the limit is in use: +1 each (slow start)
        limit.sample(0.001, 0.1, in_flight=limit.value, round_=limit.round)
    assert limit.value == 10
    limit.sample(0.001, 0.1, in_flight=2, round_=limit.round)  # under half in use: no evidence more would help
    assert limit.value == 10
    entered = limit.round
    limit.sample(0.06, 0.1, in_flight=10, round_=entered)  # over half the budget in the model stage: cut
    assert limit.value == int(10 * BACKOFF) and not limit.slow_start
    limit.sample(0.09, 0.1, in_flight=9, round_=entered)  # admitted before that cut: already counted
    assert limit.value == 9
    before = limit.limit
    limit.sample(0.001, 0.1, in_flight=9, round_=limit.round)  # after slow start: +1/limit per answer
    assert limit.limit == pytest.approx(before + 1 / before)
    for _ in range(100):
        limit.sample(1.0, 0.1, in_flight=1, round_=limit.round)
    assert limit.value == 4  # the floor
    for _ in range(10_000):
        limit.sample(0.0, 0.1, in_flight=100, round_=limit.round)
    assert limit.value == 40  # the ceiling
    with pytest.raises(ValueError, match="floor 5, ceiling 4"):
        AimdLimit(floor=5, ceiling=4)


def test_gate_counts_and_refuses_with_the_one_error_body() -> None:
    shed: list[int] = []
    gate = Gate(FixedLimit(2), retry_after_s=3, on_shed=lambda: shed.append(1))
    a, b = gate.try_enter(), gate.try_enter()
    assert (a, b, gate.full, gate.try_enter()) == (0, 0, True, None)
    exc = gate.refusal()
    assert (exc.status, exc.code, exc.field, exc.value, exc.headers) == (429, "overloaded", "in_flight", 2,
                                                                         {"Retry-After": "3"})
    gate.leave(0, latency_s=0.5, budget_s=0.1)  # a fixed limit ignores latency
    gate.leave(0)
    assert gate.in_flight == 0 and gate.limit.value == 2 and not shed


# ------------------------------------------------------------------------------------------- real HTTP


@pytest.mark.parametrize("door", ["asgi", "parser"])
def test_the_door_refuses_before_parsing_the_body_and_keeps_the_connection(model_root: Path, door: str) -> None:
    """Both doors: the ASGI middleware (default) and the opt-in one in uvicorn's parser (service/parser_door.py)."""
    settings = service_settings(model_root, admission="fixed", max_in_flight=2, admission_door=door)
    with ServiceThread(settings) as svc:
        assert (svc.server.config.http == "httptools") == (door == "asgi")
        gate = gate_of(svc)
        conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=10)
        gate.in_flight = 2  # two requests being answered: the gate is full

        conn.request("POST", "/rerank", b"{not json", POST)  # the door answers before anyone parses this
        resp = conn.getresponse()
        sock = conn.sock
        assert resp.status == 429 and resp.getheader("Retry-After") == "1"
        assert resp.getheader("Connection") is None
        assert json.loads(resp.read()) == {"error": {
            "code": "overloaded", "message": "over capacity: 2 requests in flight (limit 2); retry later",
            "field": "in_flight", "value": 2}}

        conn.request("GET", "/readyz")  # other paths are never shed, on the same keep-alive connection
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["status"] == "ready"

        gate.in_flight = 0
        conn.request("POST", "/rerank", body(model_root), POST)
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["fallback"] is False
        assert conn.sock is sock  # one connection throughout: the refusal kept the stream in step
        conn.close()
        assert metric(svc.url, 'rerank_rejections_total{reason="in_flight"}') == 1
        assert gate.in_flight == 0


def test_a_refused_large_body_closes_its_connection_unread(model_root: Path) -> None:
    size = CLOSE_OVER_BYTES + 1
    with ServiceThread(service_settings(model_root, admission="fixed", max_in_flight=1)) as svc:
        gate_of(svc).in_flight = 1
        with socket.create_connection(("127.0.0.1", svc.port), timeout=10) as sock:
            sock.sendall(b"POST /rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + str(size).encode() + b"\r\n\r\n")  # headers only, no body yet
            answer = b""
            while chunk := sock.recv(65536):  # the server closes after its answer: recv returns b""
                answer += chunk
        gate_of(svc).in_flight = 0
    head = answer.split(b"\r\n\r\n", 1)[0].lower()
    assert head.startswith(b"http/1.1 429") and b"connection: close" in head


def test_a_slow_sender_holds_no_slot_and_gets_408(model_root: Path) -> None:
    """Fixed limit 1: while one client trickles its body, another request is still served; the slow one is
    answered 408 naming body_timeout_ms once that passes."""
    payload = body(model_root)
    settings = service_settings(model_root, admission="fixed", max_in_flight=1, body_timeout_ms=500)
    with ServiceThread(settings) as svc:
        with socket.create_connection(("127.0.0.1", svc.port), timeout=30) as slow:
            slow.sendall(b"POST /rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
                         + str(len(payload)).encode() + b"\r\n\r\n" + payload[:10])
            fast = httpx.post(f"{svc.url}/rerank", content=payload, headers=POST, timeout=30)
            assert fast.status_code == 200 and fast.json()["fallback"] is False
            answer = slow.recv(65536)
        assert gate_of(svc).in_flight == 0
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408")
    assert json.loads(rest)["error"] | {"message": ""} == {"code": "request_timeout", "message": "",
                                                           "field": "body_timeout_ms", "value": 500}


def test_a_burst_is_admitted_up_to_the_limit_and_the_rest_is_refused(model_root: Path) -> None:
    """50 requests at once against a fixed limit of 4 and a model that takes 0.5 s: exactly 4 are served and
    46 refused, every refusal counted once, and no slot is left taken."""
    settings = service_settings(model_root, admission="fixed", max_in_flight=4, max_batch_size=64)
    with ServiceThread(settings) as svc:
        slow_model(svc, 0.5)
        payload = body(model_root)

        async def burst() -> list[httpx.Response]:
            limits = httpx.Limits(max_connections=50, max_keepalive_connections=50)
            async with httpx.AsyncClient(base_url=svc.url, timeout=30, limits=limits) as client:
                return await asyncio.gather(*(client.post("/rerank", content=payload, headers=POST)
                                              for _ in range(50)))

        responses = asyncio.run(burst())
        assert gate_of(svc).in_flight == 0
        assert metric(svc.url, 'rerank_rejections_total{reason="in_flight"}') == 46
    codes = [r.status_code for r in responses]
    assert codes.count(200) == 4 and codes.count(429) == 46, codes
    assert all(r.headers["retry-after"] == "1" for r in responses if r.status_code == 429)


def test_a_slow_model_cuts_the_adaptive_limit(model_root: Path) -> None:
    """A request that spends most of its deadline waiting for the model is the congestion signal."""
    settings = service_settings(model_root, admission="adaptive", min_in_flight=2, max_in_flight=64)
    with ServiceThread(settings) as svc:
        limit = gate_of(svc).limit
        assert isinstance(limit, AimdLimit)
        limit.limit = 10.0
        slow_model(svc, 0.4)
        answer = httpx.post(f"{svc.url}/rerank", content=body(model_root, timeout_ms=500), headers=POST, timeout=30)
        assert answer.status_code == 200
        assert limit.value == 9 and limit.cuts == 1
        assert metric(svc.url, "rerank_admission_limit") == 9


def test_counts_return_to_zero_after_requests_of_every_kind(model_root: Path) -> None:
    good = body(model_root)
    cases = [(good, "application/json"), (b"{not json", "application/json"), (good, "text/plain"),
             (b"[" * 10_000, "application/json"), (b"x" * 400_000, "application/json"),
             (json.dumps({"user_id": "1", "candidates": []}).encode(), "application/json")]
    with ServiceThread(service_settings(model_root)) as svc:
        with httpx.Client(base_url=svc.url, timeout=30) as client:
            codes = sorted({client.post("/rerank", content=b, headers={"content-type": t}).status_code
                            for b, t in cases * 5})
        assert gate_of(svc).in_flight == 0
    assert codes == [200, 400, 413, 415, 422], codes


def test_pipelined_requests_on_a_closed_connection_leave_no_slot_taken(model_root: Path) -> None:
    payload = body(model_root)
    request = (b"POST /rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
               + str(len(payload)).encode() + b"\r\n\r\n" + payload)
    with ServiceThread(service_settings(model_root)) as svc:
        slow_model(svc, 0.2)
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", svc.port)) as sock:
                sock.sendall(request * 3)
                time.sleep(0.05)
        gate = gate_of(svc)
        deadline = time.monotonic() + 30  # a bound on waiting, not a speed assert
        while gate.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gate.in_flight == 0


# ------------------------------------------------------------------------------------------- the opt-in parser door


def test_the_parser_door_refuses_on_a_uvicorn_it_was_not_written_for() -> None:
    from service.parser_door import UnsupportedUvicorn, check_version

    check_version()  # the installed uvicorn: supported, or this fails loudly before anyone serves with it
    with pytest.raises(UnsupportedUvicorn, match=r"written for uvicorn 0\.54\.x, 0\.55\.x, this is 0\.99\.0"):
        check_version("0.99.0")
