"""Admission: the measured rate, the lag probe and the deadline rule on an injected clock; over real HTTP the door
(429 before the body is read, judged by X-Timeout-Ms or the default deadline), the handler's second look with the
body's own timeout_ms, slow senders (no slot held, 408) and counts that return to zero whatever the request did."""

from __future__ import annotations

import asyncio
import http.client
import json
import math
import socket
import time
from pathlib import Path

import httpx
import pytest

from service.admission import CLOSE_OVER_BYTES, MIN_BUSY_S, BusyRate, Gate, LagProbe, header_budget_s
from service.app import service_of
from service.errors import Overloaded
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


async def burst(url: str, payload: bytes, n: int) -> list[httpx.Response]:
    """``n`` POSTs of ``payload`` at once, each on its own connection."""
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        return await asyncio.gather(*(client.post("/rerank", content=payload, headers=POST) for _ in range(n)))


# ------------------------------------------------------------------------------------------- pure logic


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def busy_gate(rate_per_s: float, clock: Clock, **kwargs: float) -> Gate:
    """A deadline gate that has measured ``rate_per_s``: 0.5 s busy, answers evenly spaced, then idle."""
    gate = Gate(10_000, retry_after_s=1, clock=clock, **kwargs)  # type: ignore[arg-type]
    gate.enter()
    for _ in range(int(rate_per_s * 0.5)):
        clock.now += 1 / rate_per_s
        gate.enter()
        gate.leave()
    gate.leave()
    return gate


def test_the_rate_is_answers_per_busy_second_and_holds_through_idle_time() -> None:
    clock = Clock()
    rate = BusyRate(window_s=1.0, clock=clock)
    assert rate.per_s is None
    rate.mark(busy=True)
    for _ in range(int(MIN_BUSY_S * 1000) // 2):  # 1 answer per ms while busy
        clock.now += 0.001
        rate.mark(busy=True, completed=True)
    assert rate.per_s is None  # too little busy time to trust
    for _ in range(100):
        clock.now += 0.001
        rate.mark(busy=True, completed=True)
    assert rate.per_s == pytest.approx(1000, rel=0.05)
    for _ in range(200):  # then half as fast for 0.4 s: the current rate falls towards it...
        clock.now += 0.002
        rate.mark(busy=True, completed=True)
    assert rate.current is not None and rate.current < 800
    held = 1000 * math.exp(-0.4 / 10.0)  # ...while the estimate holds the peak, decaying over hold_s (10 s)
    assert rate.per_s == pytest.approx(held, rel=0.05)
    for _ in range(15_000):  # 30 s more at the slower pace: the hold has decayed to the rate measured now
        clock.now += 0.002
        rate.mark(busy=True, completed=True)
    assert rate.per_s == pytest.approx(500, rel=0.05)
    rate.mark(busy=False)
    clock.now += 30.0  # a long lull: nothing in flight, the measured rate stands
    rate.mark(busy=False)
    assert rate.per_s == pytest.approx(500, rel=0.05)


def test_a_missed_deadline_drops_the_held_rate() -> None:
    clock = Clock()
    gate = busy_gate(1000.0, clock)
    gate.enter()
    for _ in range(100):  # then 0.2 s at a quarter of the pace
        clock.now += 0.004
        gate.enter()
        gate.leave()
    assert gate.rate.per_s == pytest.approx(1000, rel=0.05)  # held
    gate.leave(missed=True)
    rate = gate.rate.per_s
    assert rate is not None and rate < 700  # the rate measured now (still weighing the faster past)


def test_the_lag_probe_averages_its_readings() -> None:
    probe = LagProbe()
    probe.observe(0.100)  # one stall counts, not in full
    assert probe.lag_s == pytest.approx(0.030)
    probe.observe(-0.001)  # early: no lag
    assert probe.lag_s == pytest.approx(0.021)
    for _ in range(20):  # a loop that stays 20 ms late: the estimate gets there in a few readings
        probe.observe(0.020)
    assert probe.lag_s == pytest.approx(0.020, abs=1e-4)


def test_the_deadline_rule_admits_what_littles_law_fits_in_the_share_of_the_deadline() -> None:
    clock = Clock()
    gate = busy_gate(1000.0, clock, deadline_share=0.8)
    assert gate.rate.per_s == pytest.approx(1000, rel=0.01) and gate.in_flight == 0
    rate = gate.rate.per_s
    assert rate is not None
    fits = int(0.8 * 0.100 * rate)  # requests in flight whose predicted wait fits 80 ms
    gate.in_flight = fits - 1
    assert gate.verdict(0.100) is None  # its own turn included: fits / rate <= 80 ms
    gate.in_flight = fits
    exc = gate.verdict(0.100)
    assert exc is not None and (exc.status, exc.field, exc.value) == (429, "timeout_ms", 100.0)
    assert "would miss its deadline" in exc.message and exc.headers == {"Retry-After": "1"}
    assert gate.verdict(0.200) is None  # a longer deadline fits the same wait
    assert gate.capacity(0.100) == fits
    gate.lag.lag_s = 0.010  # 10 ms of event-loop lag comes off what fits
    assert gate.capacity(0.100) == int((0.08 - 0.010) * rate)
    gate.in_flight = gate.capacity(0.100)
    assert gate.verdict(0.100) is not None
    gate.in_flight = 0
    assert gate.verdict(0.0001) is None  # idle: even a hopeless deadline is taken (it falls back; no retry helps)


def test_flooded_means_refusals_outrun_the_measured_answer_rate_by_the_ratio() -> None:
    clock = Clock()
    gate = Gate(10_000, retry_after_s=1, clock=clock, flood_ratio=4.0)
    refusal = Overloaded("full", "timeout_ms", 100.0)
    for _ in range(10_000):  # no answer rate measured yet: never flooded
        gate.refuse(refusal)
    assert not gate.flooded()
    gate = busy_gate(1000.0, clock, flood_ratio=4.0)
    for _ in range(3_000):  # 3,000 refusals in 0.3 s, about 2,600/s weighted over the 1 s window
        clock.now += 0.0001
        gate.refuse(refusal)
    assert 2_000 < gate.refusals.per_s < 3_000 and not gate.flooded()
    for _ in range(3_000):  # as many again: about 5,000/s, over 4 x 1,000
        clock.now += 0.0001
        gate.refuse(refusal)
    assert gate.refusals.per_s > 4_000 and gate.flooded()
    clock.now += 0.5  # refusals decay to about 3,000/s: under the ratio again
    assert 2_000 < gate.refusals.per_s < 4_000 and not gate.flooded()


def test_the_ceiling_holds_under_either_rule_and_fixed_ignores_deadlines() -> None:
    shed: list[str] = []
    gate = Gate(2, retry_after_s=3, on_shed=shed.append)
    assert gate.verdict(0.1) is None  # no rate measured yet: only the ceiling applies
    gate.enter()
    gate.enter()
    exc = gate.verdict(10.0)
    assert exc is not None and (exc.status, exc.code, exc.field, exc.value, exc.headers) == (
        429, "overloaded", "in_flight", 2, {"Retry-After": "3"})
    assert gate.refuse(exc) is exc and shed == ["in_flight"]
    gate.leave()
    gate.leave()
    assert gate.in_flight == 0

    clock = Clock()
    fixed = busy_gate(1000.0, clock, by_deadline=False)
    fixed.in_flight = 5000  # 5 s of predicted wait: fixed admission does not look
    assert fixed.verdict(0.001) is None and fixed.capacity(0.001) == 10_000
    with pytest.raises(ValueError, match="deadline_share"):
        Gate(1, 1, deadline_share=1.5)


def test_the_door_reads_the_deadline_from_x_timeout_ms_or_takes_the_default() -> None:
    assert header_budget_s([(b"host", b"x"), (b"x-timeout-ms", b"250")], 0.1) == 0.25
    assert header_budget_s([(b"X-Timeout-Ms", b"40.5")], 0.1) == pytest.approx(0.0405)
    for bad in (b"soon", b"-5", b"0", b"inf", b"nan"):
        assert header_budget_s([(b"x-timeout-ms", bad)], 0.1) == 0.1
    assert header_budget_s([], 0.1) == 0.1


# ------------------------------------------------------------------------------------------- real HTTP


@pytest.mark.parametrize("door", ["asgi", "parser"])
def test_the_door_refuses_before_parsing_the_body_and_keeps_the_connection(model_root: Path, door: str) -> None:
    """Both doors: the one in uvicorn's parser (service/parser_door.py, the default) and the ASGI middleware."""
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
            "code": "overloaded", "message": "over capacity: 2 requests in flight (ceiling 2); retry later",
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


@pytest.mark.parametrize("door", ["asgi", "parser"])
def test_a_refused_large_body_closes_its_connection_unread(model_root: Path, door: str) -> None:
    size = CLOSE_OVER_BYTES + 1
    with ServiceThread(service_settings(model_root, admission="fixed", max_in_flight=1, admission_door=door)) as svc:
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
        responses = asyncio.run(burst(svc.url, body(model_root), 50))
        assert gate_of(svc).in_flight == 0
        assert metric(svc.url, 'rerank_rejections_total{reason="in_flight"}') == 46
    codes = [r.status_code for r in responses]
    assert codes.count(200) == 4 and codes.count(429) == 46, codes
    assert all(r.headers["retry-after"] == "1" for r in responses if r.status_code == 429)


@pytest.mark.parametrize("door", ["asgi", "parser"])
def test_the_deadline_door_refuses_what_would_miss_and_the_handler_judges_the_bodys_deadline(
        model_root: Path, door: str) -> None:
    """A measured 1,000 answers/s and 200 requests in flight predict a ~200 ms wait: a request on the default
    100 ms deadline is refused at the door unread; one whose X-Timeout-Ms allows a second is let in, and its body's
    timeout_ms decides in the handler (5 s: answered; 50 ms: refused there, field timeout_ms)."""
    with ServiceThread(service_settings(model_root, admission_door=door)) as svc:
        gate = gate_of(svc)
        gate.rate.current = 1000.0
        gate.in_flight = 200
        conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=10)
        conn.request("POST", "/rerank", b"{not json", POST)  # refused before anyone parses this
        resp = conn.getresponse()
        err = json.loads(resp.read())["error"]
        assert resp.status == 429 and resp.getheader("Retry-After") == "1"
        assert (err["code"], err["field"], err["value"]) == ("overloaded", "timeout_ms", 100.0)
        assert "would miss its deadline" in err["message"]

        conn.request("POST", "/rerank", body(model_root, timeout_ms=5000), POST | {"X-Timeout-Ms": "1000"})
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["fallback"] is False

        # as measured before the answer above, which moves it: one departure over however long that request was
        # busy (on a loaded CI machine, slow enough to predict a wait over a second and refuse at the door)
        gate.rate.current = 1000.0
        conn.request("POST", "/rerank", body(model_root, timeout_ms=50), POST | {"X-Timeout-Ms": "1000"})
        resp = conn.getresponse()
        err = json.loads(resp.read())["error"]
        assert resp.status == 429 and err["field"] == "timeout_ms" and 0 < err["value"] <= 50  # what was left of it
        conn.close()
        assert gate.in_flight == 200
        gate.in_flight = 0
        assert metric(svc.url, 'rerank_rejections_total{reason="deadline"}') == 2
        assert metric(svc.url, "rerank_refusal_duration_seconds_count") == 1  # the door's; the handler's is an answer


def test_a_burst_beyond_the_measured_rate_is_refused_and_every_admitted_answer_is_the_models(
        model_root: Path) -> None:
    """A model that takes 0.1 s a batch: sequential requests measure the rate (~10/s); then 30 requests at once
    with a 500 ms deadline. Some are refused (field timeout_ms), none that was admitted falls back, every refusal
    is counted, and no slot is left taken."""
    with ServiceThread(service_settings(model_root)) as svc:
        slow_model(svc, 0.1)
        with httpx.Client(base_url=svc.url, timeout=30) as client:
            for _ in range(4):
                assert client.post("/rerank", content=body(model_root), headers=POST).status_code == 200
        gate = gate_of(svc)
        assert gate.rate.per_s is not None and gate.rate.per_s < 20
        responses = asyncio.run(burst(svc.url, body(model_root, timeout_ms=500), 30))
        assert gate.in_flight == 0
        refused = metric(svc.url, 'rerank_rejections_total{reason="deadline"}')
    codes = [r.status_code for r in responses]
    assert 1 <= codes.count(200) < 30 and codes.count(200) + codes.count(429) == 30, codes
    assert all(r.json()["fallback"] is False for r in responses if r.status_code == 200)
    assert all(r.json()["error"]["field"] == "timeout_ms" for r in responses if r.status_code == 429)
    assert refused == codes.count(429)


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


# ------------------------------------------------------------------------------------------- the parser door


def test_the_parser_door_refuses_on_a_uvicorn_it_was_not_written_for() -> None:
    from service.parser_door import UnsupportedUvicorn, check_version

    check_version()  # the installed uvicorn: supported, or this fails loudly before anyone serves with it
    with pytest.raises(UnsupportedUvicorn, match=r"written for uvicorn 0\.54\.x, 0\.55\.x, this is 0\.99\.0"):
        check_version("0.99.0")


def test_auto_falls_back_to_the_asgi_door_on_an_untested_uvicorn_and_parser_refuses_to_start(
        model_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from service.app import create_stack
    from service.parser_door import UnsupportedUvicorn
    from service.server import uvicorn_config

    default = service_settings(model_root)
    assert uvicorn_config(create_stack(default), default).http != "httptools"
    monkeypatch.setattr("service.parser_door.SUPPORTED", ("0.99.",))
    auto = service_settings(model_root, admission_door="auto")
    assert uvicorn_config(create_stack(auto), auto).http == "httptools"
    parser = service_settings(model_root, admission_door="parser")
    with pytest.raises(UnsupportedUvicorn):
        create_stack(parser)


def test_the_parser_door_pauses_a_refused_connection_when_flooded_and_charges_the_pause_to_its_next_request(
        model_root: Path) -> None:
    """1,000 answers/s measured and 200 in flight predict a 200 ms wait. Not flooded, a refusal pauses nothing (the
    next request, X-Timeout-Ms 1,200, is admitted at once). Flooded, a refused connection is not read for 1 s, and
    a request sent during that pause is judged as having waited all of it: at the door (X-Timeout-Ms 1,200 leaves
    200 ms, refused) and in the handler (body timeout_ms 1,200 behind a generous header, refused there). The
    request after an admitted one, and one sent once a pause is over, are charged nothing (1,200 ms: admitted)."""
    settings = service_settings(model_root, admission_door="parser", refusal_pause_ms=1000)
    with ServiceThread(settings) as svc:
        gate = gate_of(svc)
        gate.rate.current = 1000.0
        gate.in_flight = 200
        conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=10)

        def send(timeout_ms: int, header_ms: int | None) -> tuple[int, dict[str, object]]:
            headers = POST | ({"X-Timeout-Ms": str(header_ms)} if header_ms else {})
            conn.request("POST", "/rerank", body(model_root, timeout_ms=timeout_ms), headers)
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())

        assert not gate.flooded()
        assert send(5000, None)[0] == 429  # the default 100 ms deadline: refused
        assert send(5000, 1200)[0] == 200  # not flooded: no pause, nothing charged

        gate.rate.current = 1000.0  # as measured before the answer above, which would move it
        gate.refusals.count = 1e12  # refusals far beyond 4x the answer rate, for the rest of the test
        assert gate.flooded()
        assert send(5000, None)[0] == 429  # refused; the connection pauses
        assert metric(svc.url, "rerank_refusal_pauses_total") == 1
        status, answer = send(5000, 1200)  # written during the pause
        assert status == 429 and answer["error"]["value"] == 200.0, answer  # type: ignore[index]
        status, answer = send(1200, 5000)  # during the next pause: the door admits, the handler charges it
        error = answer["error"]
        assert status == 429 and error["field"] == "timeout_ms" and 0 < error["value"] <= 200, answer  # type: ignore[index]
        assert send(5000, 1200)[0] == 200  # the handler's refusal pauses nothing: no charge

        gate.rate.current = 1000.0
        assert send(5000, None)[0] == 429
        time.sleep(1.5)  # past the pause before writing: nothing was waiting when reading resumed
        assert send(5000, 1200)[0] == 200
        conn.close()
        gate.in_flight = 0
