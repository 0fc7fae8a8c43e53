"""The HTTP surface in process (TestClient runs the lifespan): every 4xx, fallbacks, metrics, admin."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.app import create_app, runtime_of, service_of
from tests.conftest import service_settings


@pytest.fixture(scope="module")
def heldout(model_root: Path) -> list[dict[str, Any]]:
    lines = (model_root / "tiny-v1" / "heldout.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def client(model_root: Path) -> Iterator[TestClient]:
    app = create_app(service_settings(model_root, max_body_bytes=4096))
    with TestClient(app) as c:
        yield c


def good(heldout: list[dict[str, Any]], **changes: Any) -> dict[str, Any]:
    body = json.loads(json.dumps(heldout[0]["request"]))
    body["candidates"] = body["candidates"][:10]
    body["k"] = 3
    body.update(changes)
    return body


def cands(n: int, score: Any = 0.5) -> list[dict[str, Any]]:
    return [{"item_id": str(1000 + i), "score": score} for i in range(n)]


BAD_JSON_CASES: list[tuple[str, Any, int, str]] = [
    # name, body (dict -> JSON, bytes -> raw), status, field named in the error
    ("empty candidates", {"user_id": "u1", "candidates": []}, 422, "candidates"),
    ("too many candidates", {"user_id": "u1", "candidates": cands(31)}, 422, "candidates"),
    ("candidates not a list", {"user_id": "u1", "candidates": "1,2,3"}, 422, "candidates"),
    ("missing user_id", {"candidates": cands(3)}, 422, "user_id"),
    ("empty user_id", {"user_id": "", "candidates": cands(3)}, 422, "user_id"),
    ("score not a number", {"user_id": "u1", "candidates": [{"item_id": "1", "score": "high"}]}, 422,
     "candidates[0].score"),
    ("NaN score", b'{"user_id": "u1", "candidates": [{"item_id": "1", "score": NaN}]}', 422, "candidates[0].score"),
    ("infinite score", b'{"user_id": "u1", "candidates": [{"item_id": "1", "score": 1e400}]}', 422,
     "candidates[0].score"),
    ("score above range", {"user_id": "u1", "candidates": [*cands(2), {"item_id": "9", "score": 1.5}]}, 422,
     "candidates[2].score"),
    ("negative score", {"user_id": "u1", "candidates": [{"item_id": "9", "score": -0.1}]}, 422,
     "candidates[0].score"),
    ("missing item_id", {"user_id": "u1", "candidates": [{"score": 0.3}]}, 422, "candidates[0].item_id"),
    ("duplicate item id", {"user_id": "u1", "candidates": [*cands(2), {"item_id": "1000", "score": 0.1}]}, 422,
     "candidates[2].item_id"),
    ("k zero", {"user_id": "u1", "candidates": cands(3), "k": 0}, 422, "k"),
    ("k above candidates", {"user_id": "u1", "candidates": cands(3), "k": 4}, 422, "k"),
    ("k not an int", {"user_id": "u1", "candidates": cands(3), "k": "six"}, 422, "k"),
    ("timeout negative", {"user_id": "u1", "candidates": cands(3), "timeout_ms": -5}, 422, "timeout_ms"),
    ("timeout too long", {"user_id": "u1", "candidates": cands(3), "timeout_ms": 1e9}, 422, "timeout_ms"),
    ("body is an array", [1, 2], 422, "body"),
    ("body is a 65-bit integer", b"-42015983831773577216", 422, "body"),  # found by schemathesis: once a 500
    ("k beyond 64 bits", {"user_id": "u1", "candidates": cands(3), "k": 1 << 70}, 422, "k"),
    ("malformed JSON", b'{"user_id": "u1", "candidates": [', 400, "body"),
    ("not UTF-8", b'{"user_id": "\xff\xfe"}', 400, "body"),
    ("empty body", b"", 400, "body"),
    ("body over the limit", {"user_id": "u1", "candidates": cands(20), "pad": "x" * 5000}, 413, "body"),
]


# The offending value each error names, as the body carries it (JSON-safe, at most 80 characters).
BAD_VALUES: dict[str, Any] = {
    "empty candidates": "[]", "too many candidates": 31, "candidates not a list": "1,2,3",
    "missing user_id": "{'candidates': [{'item_id': '1000', 'score': 0.5}, {'item_id': '1001', 'score...",
    "empty user_id": "", "score not a number": "high", "NaN score": "nan", "infinite score": "inf",
    "score above range": 1.5, "negative score": -0.1, "missing item_id": "{'score': 0.3}",
    "duplicate item id": "1000", "k zero": 0, "k above candidates": 4, "k not an int": "six",
    "timeout negative": -5.0, "timeout too long": 1e9, "body is an array": "[1, 2]",
    "body is a 65-bit integer": "-42015983831773577216", "k beyond 64 bits": str(1 << 70),
    "malformed JSON": '{"user_id": "u1", "candidates": [', "not UTF-8": '{"user_id": "\ufffd\ufffd"}',
    "empty body": "", "body over the limit": 5744,
}


@pytest.mark.parametrize(("name", "body", "status", "field"), BAD_JSON_CASES, ids=[c[0] for c in BAD_JSON_CASES])
def test_bad_input_is_a_4xx_naming_the_field(client: TestClient, name: str, body: Any, status: int,
                                             field: str) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = client.post("/rerank", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["field"] == field
    assert field.split("[")[0] in error["message"] or status in (400, 413)
    assert error["value"] == BAD_VALUES[name]


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", ""])
def test_wrong_content_type_is_415(client: TestClient, heldout: list[dict[str, Any]], ctype: str) -> None:
    r = client.post("/rerank", content=json.dumps(good(heldout)).encode(), headers={"content-type": ctype})
    assert r.status_code == 415
    assert r.json()["error"]["field"] == "Content-Type" and repr(ctype) in r.json()["error"]["message"]


def test_declared_oversized_body_is_refused_before_reading(client: TestClient) -> None:
    r = client.post("/rerank", content=b"{}", headers={"content-type": "application/json",
                                                       "content-length": "99999999"})
    assert r.status_code == 413 and r.json()["error"]["value"] == 99999999


def test_valid_request_answers_k_ranked_items(client: TestClient, heldout: list[dict[str, Any]]) -> None:
    body = good(heldout, request_id="r-1")
    r = client.post("/rerank", json=body)
    assert r.status_code == 200
    out = r.json()
    assert out["request_id"] == "r-1" and out["model_version"] == "tiny-v1" and out["fallback"] is False
    assert [i["rank"] for i in out["items"]] == [1, 2, 3]
    scores = [i["score"] for i in out["items"]]
    assert scores == sorted(scores, reverse=True)
    assert {i["item_id"] for i in out["items"]} <= {c["item_id"] for c in body["candidates"]}


def test_default_k_and_numeric_ids(client: TestClient, heldout: list[dict[str, Any]]) -> None:
    body = good(heldout)
    del body["k"]
    body["candidates"] = [{"item_id": int(c["item_id"]), "score": c["score"]} for c in body["candidates"]]
    r = client.post("/rerank", json=body)
    assert r.status_code == 200 and len(r.json()["items"]) == 6
    assert all(isinstance(i["item_id"], str) for i in r.json()["items"])


def metric(client: TestClient, line_start: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_unknown_user_and_items_are_answered_and_counted(client: TestClient) -> None:
    cold0 = metric(client, "rerank_cold_start_users_total")
    oov0 = metric(client, "rerank_oov_items_total")
    r = client.post("/rerank", json={"user_id": "never-seen", "k": 2,
                                     "candidates": [{"item_id": "no-such-item", "score": 0.4},
                                                    {"item_id": "another-new-one", "score": 0.6}]})
    assert r.status_code == 200 and r.json()["fallback"] is False and len(r.json()["items"]) == 2
    assert metric(client, "rerank_cold_start_users_total") == cold0 + 1
    assert metric(client, "rerank_oov_items_total") == oov0 + 2


def test_model_failure_falls_back_to_retriever_order(client: TestClient, heldout: list[dict[str, Any]],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    model = runtime_of(service_of(client.app)).model  # type: ignore[arg-type]

    def broken(jobs: Any) -> Any:
        raise RuntimeError("onnx exploded")

    monkeypatch.setattr(model, "rank", broken)
    body = good(heldout, k=4)
    r = client.post("/rerank", json=body)
    assert r.status_code == 200
    out = r.json()
    assert out["fallback"] is True and out["fallback_reason"] == "model_error"
    expected = sorted(body["candidates"], key=lambda c: -c["score"])[:4]
    assert [i["item_id"] for i in out["items"]] == [c["item_id"] for c in expected]
    assert metric(client, 'rerank_fallbacks_total{reason="model_error"}') >= 1


def test_deadline_falls_back(client: TestClient, heldout: list[dict[str, Any]]) -> None:
    r = client.post("/rerank", json=good(heldout, timeout_ms=0.001))
    assert r.status_code == 200 and r.json()["fallback_reason"] == "deadline"


def test_operations_endpoints(client: TestClient) -> None:
    assert client.get("/livez").status_code == 200
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["providers"] == ["CPUExecutionProvider"]
    text = client.get("/metrics").text
    for name in ("rerank_request_duration_seconds_bucket", "rerank_inference_duration_seconds_bucket",
                 "rerank_queue_wait_seconds_bucket", "rerank_feature_duration_seconds_bucket",
                 "rerank_batch_size_bucket", "rerank_queue_depth",
                 'rerank_model_info{providers="CPUExecutionProvider"'):
        assert name in text, name
    assert client.get("/nope").json()["error"]["code"] == "not_found"
    assert client.get("/rerank").status_code == 405
    spec = client.get("/openapi.json").json()
    assert "example" in spec["paths"]["/rerank"]["post"]["requestBody"]["content"]["application/json"]


def test_every_openapi_reference_resolves(client: TestClient) -> None:
    """schemathesis skipped the /rerank body when Candidate was referenced but not defined."""
    spec = client.get("/openapi.json").json()

    def refs(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            for key, value in node.items():
                yield from [value] if key == "$ref" else refs(value)
        elif isinstance(node, list):
            for value in node:
                yield from refs(value)

    found = set(refs(spec))
    assert "#/components/schemas/Candidate" in found and "#/components/schemas/RerankRequest" in found
    schemas = spec["components"]["schemas"]
    model = runtime_of(service_of(client.app)).model  # type: ignore[arg-type]
    assert schemas["RerankRequest"]["properties"]["candidates"]["maxItems"] == model.max_candidates
    score = schemas["Candidate"]["properties"]["score"]
    assert (score["minimum"], score["maximum"]) == model.score_range
    assert all(ref.removeprefix("#/components/schemas/") in schemas for ref in found), found - {
        f"#/components/schemas/{name}" for name in schemas}


def test_admin_needs_the_token(client: TestClient) -> None:
    assert client.post("/admin/reload").status_code == 401
    assert client.post("/admin/reload", headers={"authorization": "Bearer wrong"}).status_code == 401


@pytest.mark.parametrize("version", ["../tiny-v2", "/etc", "..", "tiny-v2/../tiny-v1", ".hidden"])
def test_reload_refuses_a_version_outside_the_model_folder(client: TestClient, version: str) -> None:
    resp = client.post("/admin/reload", params={"version": version}, headers={"authorization": "Bearer test-token"})
    err = resp.json()["error"]
    assert resp.status_code == 422 and err["field"] == "version" and err["value"] == version
    assert "not a version folder name" in err["message"]


def test_admin_disabled_without_a_token(model_root: Path) -> None:
    with TestClient(create_app(service_settings(model_root, admin_token=""))) as c:
        assert c.post("/admin/reload", headers={"authorization": "Bearer "}).status_code == 404
