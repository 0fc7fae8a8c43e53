"""Feature lookups against a real redis-server: hit/miss/TTL, backfill, breaker open and close. Expiry and the
breaker's reset run on a clock the tests move, so no assert depends on how fast this machine is."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from service.features import (
    CircuitBreaker,
    FeatureStore,
    TTLCache,
    encode,
    load_into_redis,
    make_redis,
    read_snapshot,
    redis_key,
)
from service.model import COLD_START, UserFeatures
from tests.conftest import RedisServer


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


ALICE = UserFeatures({"group": "g1"}, ("1001", "1002"))
BOB = UserFeatures({"group": "g0"}, ("1003",))


def store(url: str | None, *, cache_ttl_s: float = 30.0, failures: int = 2, reset_s: float = 0.3,
          timeout_ms: float = 200.0, clock: Clock | None = None) -> FeatureStore:
    clock = clock or Clock()
    client = make_redis(url, 4, timeout_ms) if url else None
    s = FeatureStore(client, timeout_ms=timeout_ms, ttl_s=60, cache_size=100, cache_ttl_s=cache_ttl_s,
                     breaker=CircuitBreaker(failures, reset_s, clock), clock=clock)
    s.set_snapshot({"alice": ALICE})
    return s


# ------------------------------------------------------------------------------------------- pure logic


def test_breaker_opens_after_consecutive_failures_and_half_opens_once() -> None:
    clock = Clock()
    b = CircuitBreaker(failures=2, reset_s=5.0, clock=clock)
    b.failure()
    assert b.state == "closed" and b.allow()
    b.success()
    b.failure()
    b.failure()
    assert b.state == "open" and not b.allow()
    clock.now += 4.9
    assert b.state == "open"
    clock.now += 0.1
    assert b.state == "half_open"
    assert b.allow() and not b.allow(), "half-open lets exactly one trial through"
    b.failure()
    assert b.state == "open"
    clock.now += 5.0
    assert b.allow()
    b.success()
    assert b.state == "closed" and b.allow()


def test_ttl_cache_expires_and_evicts_least_recent() -> None:
    clock = Clock()
    c = TTLCache(size=2, ttl_s=30.0, clock=clock)
    c.put("a", ALICE)
    c.put("b", BOB)
    assert c.get("a") == ALICE  # a is now most recent
    c.put("c", BOB)
    assert c.get("b") is None and c.get("a") == ALICE
    clock.now += 29.9
    assert c.get("a") == ALICE
    clock.now += 0.1
    assert c.get("a") is None and len(c) == 1


async def test_without_redis_snapshot_then_cold_start() -> None:
    s = store(None)
    assert await s.get("alice") == (ALICE, "snapshot", False)
    assert await s.get("alice") == (ALICE, "local", False)
    assert await s.get("nobody") == (COLD_START, "cold_start", False)


def test_snapshot_file_roundtrip(tmp_path: Path) -> None:
    path = tmp_path / "user_features.jsonl"
    path.write_text('{"user_id": "7", "profile": {"age": "25"}, "history": ["1", "2"]}\n\n')
    assert read_snapshot(path) == {"7": UserFeatures({"age": "25"}, ("1", "2"))}


# ------------------------------------------------------------------------------------------- real Redis


async def test_redis_hit_miss_backfill_and_key_ttl(redis_server: RedisServer) -> None:
    clock = Clock()
    s = store(redis_server.url, cache_ttl_s=30.0, clock=clock)
    raw = aioredis.Redis.from_url(redis_server.url)
    await raw.set(redis_key("bob"), encode(BOB), ex=60)
    assert await s.get("bob") == (BOB, "redis", False)
    assert await s.get("bob") == (BOB, "local", False)
    clock.now += 30  # local entry expired: back to Redis
    assert (await s.get("bob"))[1] == "redis"
    # Miss in Redis -> snapshot, written back to Redis with a TTL for other replicas.
    assert await s.get("alice") == (ALICE, "snapshot", False)
    for _ in range(50):
        if await raw.exists(redis_key("alice")):
            break
        await asyncio.sleep(0.01)
    assert 0 < await raw.ttl(redis_key("alice")) <= 60
    clock.now += 30
    assert await s.get("alice") == (ALICE, "redis", False)
    assert redis_key("alice").startswith("rerank:user:v1:")
    await raw.aclose()
    await s.close()


async def test_load_snapshot_into_redis(redis_server: RedisServer) -> None:
    client = make_redis(redis_server.url, 2, 1000)
    users = [(f"u{i}", UserFeatures({"g": str(i % 3)}, (str(i),))) for i in range(2500)]
    assert await load_into_redis(client, users, ttl_s=120, chunk=1000) == 2500
    assert await client.dbsize() == 2500
    assert 0 < await client.ttl(redis_key("u2499")) <= 120
    s = store(redis_server.url)
    assert await s.get("u17") == (UserFeatures({"g": "2"}, ("17",)), "redis", False)
    await client.aclose()
    await s.close()


async def test_redis_stopped_mid_run_opens_breaker_then_restart_closes_it(redis_server: RedisServer) -> None:
    clock = Clock()
    s = store(redis_server.url, cache_ttl_s=0.0, failures=2, reset_s=5.0, clock=clock)
    assert (await s.get("alice"))[1] == "snapshot"
    redis_server.stop()
    answers = [await s.get("alice") for _ in range(5)]
    assert all(f == ALICE for f, _, _ in answers), "requests keep being answered from the snapshot"
    assert [failed for _, _, failed in answers[:2]] == [True, True]
    assert s.breaker.state == "open"
    assert not any(failed for _, _, failed in answers[2:]), "an open breaker skips Redis entirely"
    assert await s.get("nobody") == (COLD_START, "cold_start", False), "an open breaker does not try Redis"

    redis_server.start()
    for _ in range(100):  # each round: past reset_s, so the next call is the half-open trial
        clock.now += 5.0
        features, _source, failed = await s.get("alice")
        if s.breaker.state == "closed" and not failed:
            break
        await asyncio.sleep(0.1)  # Redis still starting
    assert s.breaker.state == "closed"
    assert features == ALICE
    await s.close()


async def test_slow_redis_is_cut_at_the_timeout(redis_server: RedisServer) -> None:
    s = store(redis_server.url, cache_ttl_s=0.0, timeout_ms=50.0, failures=1, reset_s=30)
    blocker = aioredis.Redis.from_url(redis_server.url)
    pause = asyncio.create_task(blocker.execute_command("DEBUG", "SLEEP", "3"))  # Redis freezes
    for _ in range(100):  # until a probe sees it frozen (an event, not a guess at how long the command takes)
        probe = aioredis.Redis.from_url(redis_server.url)
        try:
            await asyncio.wait_for(probe.ping(), 0.2)
        except TimeoutError:
            break
        finally:
            await probe.aclose()
        await asyncio.sleep(0.01)
    # Cut at the timeout: had the lookup waited for Redis, it would have found no key and no failure.
    assert await s.get("alice") == (ALICE, "snapshot", True)
    assert s.breaker.state == "open"
    await pause
    await blocker.aclose()
    await s.close()


@pytest.mark.parametrize("url", ["http://x", "localhost:6379"])
def test_settings_refuse_a_non_redis_url(url: str) -> None:
    from pydantic import ValidationError

    from service.config import Settings

    with pytest.raises(ValidationError, match="is not a redis://"):
        Settings(_env_file=None, redis_url=url)


def test_the_compact_snapshot_reads_as_the_file(tmp_path: Path) -> None:
    path = tmp_path / "user_features.jsonl"
    lines = [{"user_id": "a", "profile": {"age": "25", "job": "x"}, "history": ["1", "2", "3"]},
             {"user_id": "b", "profile": {"job": "y"}, "history": []},
             {"user_id": 3, "profile": {"age": "25", "zip": "9"}, "history": ["3", "1"]},
             {"user_id": "b", "profile": {"job": "z"}, "history": ["4"]}]  # a later line for b wins
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    snapshot = read_snapshot(path)
    assert len(snapshot) == 3 and sorted(snapshot) == ["3", "a", "b"]
    assert snapshot["a"] == UserFeatures({"age": "25", "job": "x"}, ("1", "2", "3"))
    assert snapshot["b"] == UserFeatures({"job": "z"}, ("4",))
    assert snapshot["3"] == UserFeatures({"age": "25", "zip": "9"}, ("3", "1"))
    assert snapshot.get("nobody") is None and "a" in snapshot
