"""User features: in-process TTL cache -> Redis (behind a circuit breaker) -> snapshot -> cold start.

Owns: the lookup order, Redis keys (``rerank:user:v<schema>:<user_id>``, JSON, TTL), the breaker, and
loading a snapshot into Redis (``python -m service load-features``). Does not know: models, ONNX or HTTP.
A lookup never raises: a slow or dead Redis costs at most ``redis_timeout_ms`` and then is skipped while
the breaker is open.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import RedisError

from service.model import COLD_START, UserFeatures
from service.redis_url import CLUSTER_SCHEMES, SENTINEL_SCHEMES, parse_multi_host

log = logging.getLogger("rerank.features")

SCHEMA = 1
Source = Literal["local", "redis", "snapshot", "cold_start"]


def redis_key(user_id: str, schema: int = SCHEMA) -> str:
    return f"rerank:user:v{schema}:{user_id}"


def encode(features: UserFeatures) -> bytes:
    return json.dumps({"profile": features.profile, "history": list(features.history)}).encode()


def decode(raw: bytes | str) -> UserFeatures:
    return from_json(json.loads(raw))


def from_json(obj: dict[str, Any]) -> UserFeatures:
    return UserFeatures({str(k): str(v) for k, v in obj.get("profile", {}).items()},
                        tuple(str(i) for i in obj.get("history", [])))


class Snapshot(Mapping[str, UserFeatures]):
    """Every user's features, held compactly: histories as one int32 array of indices into a vocabulary of the item
    ids they name, profiles as one code array per field. A user's ``UserFeatures`` is built when looked up (the
    snapshot answers only after the local cache and Redis). With 100k users and 30-item histories it adds 33 MiB to
    a worker where a dict of ``UserFeatures`` added 279 (reports/snapshot_memory.md), and every worker holds one."""

    def __init__(self, rows: dict[str, int], items: list[str], flat: np.ndarray, offsets: np.ndarray,
                 fields: dict[str, tuple[list[str], np.ndarray]]) -> None:
        self._rows, self._items, self._flat, self._offsets, self._fields = rows, items, flat, offsets, fields

    def __getitem__(self, user_id: str) -> UserFeatures:
        row = self._rows[user_id]
        items = self._items
        history = tuple(items[i] for i in self._flat[self._offsets[row] : self._offsets[row + 1]].tolist())
        profile = {name: vocab[code] for name, (vocab, codes) in self._fields.items()
                   if (code := int(codes[row])) >= 0}
        return UserFeatures(profile, history)

    def __iter__(self) -> Iterator[str]:
        return iter(self._rows)

    def __len__(self) -> int:
        return len(self._rows)


def read_snapshot(path: Path) -> Snapshot:
    """``user_features.jsonl`` as the export writes it: one {"user_id", "profile", "history"} per line."""
    rows: dict[str, int] = {}
    item_index: dict[str, int] = {}
    flat: list[int] = []
    offsets = [0]
    values: dict[str, dict[str, int]] = {}
    codes: dict[str, list[int]] = {}
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            obj = json.loads(line)
            row = len(offsets) - 1
            rows[str(obj["user_id"])] = row  # a later line for the same user wins, as in a dict
            flat.extend(item_index.setdefault(str(i), len(item_index)) for i in obj.get("history", []))
            offsets.append(len(flat))
            for name, value in obj.get("profile", {}).items():
                column = codes.setdefault(str(name), [-1] * row)
                column.append(values.setdefault(str(name), {}).setdefault(str(value), len(values[str(name)])))
            for column in codes.values():
                column.extend([-1] * (row + 1 - len(column)))
    fields = {name: (list(values[name]), np.asarray(column, dtype=np.int32)) for name, column in codes.items()}
    return Snapshot(rows, list(item_index), np.asarray(flat, dtype=np.int32), np.asarray(offsets, dtype=np.int64),
                    fields)


class CircuitBreaker:
    """closed -> (``failures`` consecutive errors) -> open -> (``reset_s``) -> half-open: one trial call;
    success closes, failure re-opens. ``allow()`` says whether to try the dependency at all."""

    def __init__(self, failures: int, reset_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = failures
        self.reset_s = reset_s
        self.clock = clock
        self.consecutive = 0
        self.opened_at: float | None = None
        self._trial = False

    @property
    def state(self) -> Literal["closed", "open", "half_open"]:
        if self.opened_at is None:
            return "closed"
        return "half_open" if self.clock() - self.opened_at >= self.reset_s else "open"

    def allow(self) -> bool:
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self._trial:
            self._trial = True
            return True
        return False

    def success(self) -> None:
        self.consecutive = 0
        self.opened_at = None
        self._trial = False

    def failure(self) -> None:
        self.consecutive += 1
        if self._trial or self.consecutive >= self.threshold:
            self.opened_at = self.clock()
        self._trial = False


class TTLCache:
    """A bounded LRU dict whose entries expire ``ttl_s`` after they were put."""

    def __init__(self, size: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.size = size
        self.ttl_s = ttl_s
        self.clock = clock
        self._data: collections.OrderedDict[str, tuple[float, UserFeatures]] = collections.OrderedDict()

    def get(self, key: str) -> UserFeatures | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        if entry[0] <= self.clock():
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return entry[1]

    def put(self, key: str, value: UserFeatures) -> None:
        if self.size <= 0 or self.ttl_s <= 0:
            return
        self._data[key] = (self.clock() + self.ttl_s, value)
        self._data.move_to_end(key)
        while len(self._data) > self.size:
            self._data.popitem(last=False)

    def clear(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


class FeatureStore:
    """Looks up a user's features; reports which layer answered and whether Redis failed."""

    def __init__(self, redis_client: aioredis.Redis | None, *, timeout_ms: float, ttl_s: int, cache_size: int,
                 cache_ttl_s: float, breaker: CircuitBreaker, clock: Callable[[], float] = time.monotonic) -> None:
        self.redis = redis_client
        self.timeout_s = timeout_ms / 1000.0
        self.ttl_s = ttl_s
        self.cache = TTLCache(cache_size, cache_ttl_s, clock)
        self.breaker = breaker
        self.snapshot: Mapping[str, UserFeatures] = {}
        self._backfills: set[asyncio.Task[None]] = set()

    def set_snapshot(self, snapshot: Mapping[str, UserFeatures]) -> None:
        """Swap the snapshot (on model reload) and forget cached answers derived from the old one."""
        self.snapshot = snapshot
        self.cache.clear()

    async def get(self, user_id: str) -> tuple[UserFeatures, Source, bool]:
        """(features, the layer that answered, whether Redis failed on the way). Never raises."""
        cached = self.cache.get(user_id)
        if cached is not None:
            return cached, "local", False
        redis_failed = False
        if self.redis is not None and self.breaker.allow():
            try:
                raw = await asyncio.wait_for(self.redis.get(redis_key(user_id)), self.timeout_s)
                features = decode(raw) if raw is not None else None
            except (RedisError, OSError, TimeoutError, ValueError) as exc:
                redis_failed = True
                self.breaker.failure()
                log.debug("redis get %s failed: %r", user_id, exc)
            except BaseException:  # cancelled mid-call: count it, or a half-open trial would never end
                self.breaker.failure()
                raise
            else:
                self.breaker.success()
                if features is not None:
                    self.cache.put(user_id, features)
                    return features, "redis", False
        features_or_none = self.snapshot.get(user_id)
        if features_or_none is None:
            return COLD_START, "cold_start", redis_failed
        self.cache.put(user_id, features_or_none)
        if self.redis is not None and not redis_failed and self.breaker.state == "closed":
            self._backfill(user_id, features_or_none)
        return features_or_none, "snapshot", redis_failed

    def _backfill(self, user_id: str, features: UserFeatures) -> None:
        """Write a snapshot answer to Redis in the background so other replicas find it there."""
        assert self.redis is not None
        client = self.redis

        async def write() -> None:
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                await asyncio.wait_for(client.set(redis_key(user_id), encode(features), ex=self.ttl_s),
                                       self.timeout_s)

        task = asyncio.get_running_loop().create_task(write())
        self._backfills.add(task)
        task.add_done_callback(self._backfills.discard)

    async def close(self) -> None:
        for task in list(self._backfills):
            task.cancel()
        if self.redis is not None:
            await self.redis.aclose()


async def load_into_redis(client: aioredis.Redis, users: Iterable[tuple[str, UserFeatures]], ttl_s: int,
                          chunk: int = 1000) -> int:
    """Write every user's features with a TTL in pipelined chunks; returns how many were written."""
    written = 0
    batch: list[tuple[str, UserFeatures]] = []

    async def flush() -> None:
        nonlocal written
        pipe = client.pipeline(transaction=False)
        for user_id, features in batch:
            pipe.set(redis_key(user_id), encode(features), ex=ttl_s)
        await pipe.execute()
        written += len(batch)
        batch.clear()

    for pair in users:
        batch.append(pair)
        if len(batch) >= chunk:
            await flush()
    if batch:
        await flush()
    return written


async def connect(client: aioredis.Redis, timeout_s: float) -> bool:
    """Reach Redis once before serving, so the first lookups do not pay for it: a Cluster client learns the slot
    map, a Sentinel client finds the master, a plain one opens its first connection. False (and nothing raised)
    when it does not answer in ``timeout_s``: the breaker takes it from there."""
    try:
        await asyncio.wait_for(client.ping(), timeout_s)
    except (RedisError, OSError, TimeoutError) as exc:
        log.warning("Redis did not answer a PING at start-up (%r): lookups fall back to the snapshot until it does",
                    exc)
        return False
    return True


def make_redis(url: str, pool_size: int, timeout_ms: float) -> aioredis.Redis:
    """An async client with a bounded pool for the URL's topology (``service/redis_url.py``); password and TLS come
    from the URL (redis://:pw@, rediss://; the sentinels' own from ?sentinel_password=). A Cluster client follows
    MOVED and ASK redirections; a Sentinel client asks the sentinels for the current master whenever a connection to
    it fails, so after a failover the next lookup the breaker lets through reaches the promoted replica."""
    timeout_s = timeout_ms / 1000.0
    common: dict[str, Any] = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
    client: Any
    if url.startswith(CLUSTER_SCHEMES):
        target = parse_multi_host(url)
        client = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in target.nodes], password=target.password,
                              ssl=target.tls, max_connections=pool_size, **common)
    elif url.startswith(SENTINEL_SCHEMES):
        target = parse_multi_host(url)
        to_sentinels = common | ({"password": target.sentinel_password} if target.sentinel_password else {})
        sentinel = Sentinel(target.nodes, sentinel_kwargs=to_sentinels, password=target.password, ssl=target.tls,
                            db=target.db, max_connections=pool_size, **common)
        client = sentinel.master_for(target.service)
    else:
        client = aioredis.Redis.from_url(url, max_connections=pool_size, health_check_interval=0, **common)
    return client  # type: ignore[no-any-return]
