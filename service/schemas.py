"""The /rerank request and response: pydantic models (types, OpenAPI, examples) and the checks that
depend on the served model (list length, score range, k).

Owns: parsing a body into a ``RerankRequest`` or an ``InvalidRequest``/``MalformedJSON`` naming the field
and value. Does not know: features, batching or ONNX.
"""

from __future__ import annotations

import math
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.errors import InvalidRequest, MalformedJSON

ID_MAX_CHARS = 128


class Candidate(BaseModel):
    model_config = ConfigDict(coerce_numbers_to_str=True, extra="ignore")

    item_id: str = Field(min_length=1, max_length=ID_MAX_CHARS, description="the item's raw id")
    score: float = Field(allow_inf_nan=False, description="retriever score, within the model's score range")


class RerankRequest(BaseModel):
    model_config = ConfigDict(
        coerce_numbers_to_str=True,
        extra="ignore",
        json_schema_extra={"examples": [{
            "request_id": "r-1", "user_id": "196", "k": 6, "timeout_ms": 50,
            "candidates": [{"item_id": "242", "score": 0.91}, {"item_id": "302", "score": 0.87},
                           {"item_id": "377", "score": 0.52}, {"item_id": "51", "score": 0.33}],
        }]},
    )

    request_id: str = Field("", max_length=ID_MAX_CHARS, description="echoed back; free text")
    user_id: str = Field(min_length=1, max_length=ID_MAX_CHARS, description="unknown users get cold-start features")
    candidates: list[Candidate] = Field(min_length=1, description="the retriever's candidates, any order")
    # minimum / exclusiveMinimum are documented in the schema only: check_request says what is wrong and why.
    k: int | None = Field(None, json_schema_extra={"minimum": 1},
                          description="items to return; default from settings, at most len(candidates)")
    timeout_ms: float | None = Field(None, allow_inf_nan=False, json_schema_extra={"exclusiveMinimum": 0},
                                     description="deadline for the whole request; default from settings, at most "
                                                 "RERANK_MAX_TIMEOUT_MS")


class RankedItem(BaseModel):
    item_id: str
    score: float = Field(description="reranker logit (higher is better); the retriever score on fallback")
    rank: int = Field(description="1-based")


FallbackReason = Literal["deadline", "draining", "model_error"]
FALLBACK_REASONS: tuple[str, ...] = get_args(FallbackReason)  # the values of ``fallback_reason``


class RerankResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "request_id": "r-1", "model_version": "ml100k-prm-v1",
        "items": [{"item_id": "302", "score": 3.21, "rank": 1}, {"item_id": "242", "score": 2.5, "rank": 2}],
        "fallback": False, "fallback_reason": None,
    }]})

    request_id: str
    model_version: str
    items: list[RankedItem]
    fallback: bool = Field(description="true when the answer is the retriever order, not the model's")
    fallback_reason: FallbackReason | None = Field(description=(
        "why the answer is the retriever order: deadline (the request's deadline passed before the model answered), "
        "draining (the service shut down before the request ran) or model_error (the model raised); null otherwise"))


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None
    value: Any


class ErrorBody(BaseModel):
    error: ErrorDetail
    request_id: str | None = None


def _path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def parse_request(body: bytes) -> RerankRequest:
    """Parse and type-check a body; the first problem becomes the error, naming its field and value."""
    try:
        return RerankRequest.model_validate_json(body)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        if err["type"] == "json_invalid":
            raise MalformedJSON(f"body is not valid JSON: {err['msg']}", "body", body[:80].decode("utf-8", "replace")) \
                from None
        if err["type"] == "model_type" and not err["loc"]:
            raise InvalidRequest("body must be a JSON object", "body", err.get("input")) from None
        field = _path(tuple(err["loc"]))
        value = err.get("input")
        raise InvalidRequest(f"{field}: {err['msg']} (got {value!r})"[:300], field, value) from None


def check_request(req: RerankRequest, max_candidates: int, score_range: tuple[float, float], default_k: int,
                  max_timeout_ms: float) -> int:
    """Checks that need the served model; returns the effective k. Raises ``InvalidRequest``."""
    n = len(req.candidates)
    if n > max_candidates:
        raise InvalidRequest(f"candidates: {n} candidates, the model takes at most {max_candidates}",
                             "candidates", n)
    low, high = score_range
    seen: set[str] = set()
    for i, c in enumerate(req.candidates):
        if not low <= c.score <= high:
            raise InvalidRequest(f"candidates[{i}].score: {c.score!r} is outside the model's score range "
                                 f"[{low}, {high}]", f"candidates[{i}].score", c.score)
        if c.item_id in seen:
            raise InvalidRequest(f"candidates[{i}].item_id: duplicate item id {c.item_id!r}",
                                 f"candidates[{i}].item_id", c.item_id)
        seen.add(c.item_id)
    k = default_k if req.k is None else req.k
    if req.k is not None and not 1 <= k <= n:
        raise InvalidRequest(f"k: {k} is out of range [1, {n}] (the number of candidates)", "k", k)
    if req.timeout_ms is not None and not (0 < req.timeout_ms <= max_timeout_ms and math.isfinite(req.timeout_ms)):
        raise InvalidRequest(f"timeout_ms: {req.timeout_ms!r} is out of range (0, {max_timeout_ms}]",
                             "timeout_ms", req.timeout_ms)
    return min(k, n)
