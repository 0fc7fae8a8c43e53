"""User features from a Redis Cluster and from a master found through Sentinel, against real redis-server processes
the test starts: keys spread over three masters, and a master failover that no lookup notices but the breaker."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from loadtest.procs import RedisClusterServers, RedisSentinelServers, free_port, redis_client
from service.features import CircuitBreaker, FeatureStore, connect, load_into_redis, make_redis
from service.model import UserFeatures
from service.redis_url import check, parse_multi_host, redacted

USERS = [(f"u{i}", UserFeatures({"age": str(i % 7)}, (f"i{i}", f"i{i + 1}"))) for i in range(300)]
PASSWORD = "topology-password"


async def store(url: str) -> FeatureStore:
    """No in-process cache: every lookup asks Redis, so the topology's behaviour shows. Connected first, as the
    service's start-up does; a generous timeout, since a loaded CI machine is not what these tests measure."""
    client = make_redis(url, 8, 500)
    assert await connect(client, 10)
    return FeatureStore(client, timeout_ms=500, ttl_s=600, cache_size=0, cache_ttl_s=0,
                        breaker=CircuitBreaker(3, 0.5))


def test_multi_host_urls_parse_and_bad_ones_are_refused() -> None:
    t = parse_multi_host("redis+sentinel://:p%40ss@10.0.0.1:26379,10.0.0.2:26380/rerank/2")
    assert t.nodes == [("10.0.0.1", 26379), ("10.0.0.2", 26380)] and t.password == "p@ss"
    assert (t.service, t.db, t.tls) == ("rerank", 2, False)
    assert t.sentinel_password is None
    c = parse_multi_host("rediss+cluster://h1:7000,h2:7001")
    assert c.nodes == [("h1", 7000), ("h2", 7001)] and c.tls and c.password is None
    s = parse_multi_host("redis+sentinel://:data@h:26379/rerank?sentinel_password=s%26cret")
    assert (s.password, s.sentinel_password, s.service, s.db) == ("data", "s&cret", "rerank", 0)
    for bad, why in (("redis+sentinel://h:26379", "names no master"), ("redis+cluster://h1:7000,h2", "host:port"),
                     ("http://h:1", "is not a"), ("redis+cluster://h:7000?sentinel_password=x", "takes none"),
                     ("redis+sentinel://h:1/m?timeout=1", "unknown option.*timeout.*takes only sentinel_password")):
        with pytest.raises(ValueError, match=why):
            check(bad)


def test_a_refused_url_never_shows_its_passwords() -> None:
    for url in ("redis+sentinel://:hunter2@h:26379?sentinel_password=hunter3",
                "redis+cluster://:hunter2@h:7000,h2?sentinel_password=hunter3",
                "http://:hunter2@h:1/0?sentinel_password=hunter3"):
        with pytest.raises(ValueError) as refused:
            check(url)
        assert "hunter" not in str(refused.value) and "***" in str(refused.value), str(refused.value)
    assert redacted("redis+sentinel://:pw@h:1/m/0?sentinel_password=x") == \
        "redis+sentinel://:***@h:1/m/0?sentinel_password=***"
    assert redacted("redis://h:6379/0") == "redis://h:6379/0"


@pytest.mark.slow
def test_features_from_a_three_master_cluster(tmp_path: Path) -> None:
    cluster = RedisClusterServers(tmp_path, PASSWORD).start()
    try:
        async def run() -> list[str]:
            client = make_redis(cluster.url, 8, 500)
            assert await load_into_redis(client, USERS, ttl_s=600) == len(USERS)
            await client.aclose()
            features = await store(cluster.url)
            got = [await features.get(user) for user, _ in USERS]
            await features.close()
            assert [f for f, _, _ in got] == [f for _, f in USERS]
            return [source for _, source, _ in got]

        sources = asyncio.run(run())
        assert set(sources) == {"redis"}
        assert all(n > 0 for n in cluster.keys_per_node()) and sum(cluster.keys_per_node()) == len(USERS)
    finally:
        cluster.stop()


async def lookups_through_a_failover(url: str, fail: Callable[[], None], failed_over: Callable[[], bool]
                                     ) -> list[tuple[float, str]]:
    """Load the users through ``url``, then look one up every 5 ms, each checked against what was loaded, while
    ``fail`` kills a master at 0.5 s, until 4 s after ``failed_over`` first says its replica took over; the
    (seconds, source) of every lookup."""
    client = make_redis(url, 8, 500)
    await load_into_redis(client, USERS, ttl_s=600)
    await client.aclose()
    features = await store(url)
    features.set_snapshot(dict(USERS))
    seen: list[tuple[float, str]] = []
    failed, failed_over_at = False, 0.0
    t0 = time.monotonic()
    for i in range(100_000):
        now = time.monotonic() - t0
        if now > 0.5 and not failed:
            fail()
            failed = True
        if failed and not failed_over_at and now > 0.6 and failed_over():
            failed_over_at = now
        assert failed_over_at or now < 30.5, "no replica took over within 30 s of the kill"
        if failed_over_at and now > failed_over_at + 4.0:
            break
        user, expected = USERS[i % len(USERS)]
        got, source, _ = await features.get(user)  # never raises
        assert got == expected
        seen.append((now, source))
        await asyncio.sleep(0.005)
    await features.close()
    return seen


def through_the_outage_and_back(seen: list[tuple[float, str]]) -> None:
    before = Counter(s for t, s in seen if t < 0.5)
    last = Counter(s for t, s in seen[-100:])
    assert set(before) == {"redis"}, before
    assert "snapshot" in {s for _, s in seen}  # the outage was seen, and answered from the snapshot
    assert set(last) == {"redis"}, last  # the promoted replica answers, with the master's keys


@pytest.mark.slow
def test_a_sentinel_failover_under_lookups_answers_every_one_and_returns_to_redis(tmp_path: Path) -> None:
    """The sentinel requires a password of its own (``?sentinel_password=``): without it the service cannot find the
    master, and says so at start-up without raising."""
    servers = RedisSentinelServers(tmp_path, PASSWORD, sentinel_password="sentinel-secret").start()
    try:
        async def run() -> list[tuple[float, str]]:
            anonymous = make_redis(servers.url.split("?")[0], 1, 500)
            assert not await connect(anonymous, 5)  # the sentinel refuses a client without its password
            await anonymous.aclose()
            return await lookups_through_a_failover(servers.url, servers.fail_master,
                                                    lambda: servers.master_port() == servers.replica.port)

        seen = asyncio.run(run())
        assert servers.wait_failover(1) == servers.replica.port
        through_the_outage_and_back(seen)
    finally:
        servers.stop()


@pytest.mark.slow
def test_a_cluster_master_failover_under_lookups_answers_every_one_and_returns_to_redis(tmp_path: Path) -> None:
    """Three masters with a replica each; one master killed. Its slots' users come from the snapshot until the
    cluster promotes the replica, then from Redis again: the client relearns the slot map on its own."""
    cluster = RedisClusterServers(tmp_path, PASSWORD, replicas=1).start()
    killed: list[int] = []

    def fail() -> None:
        killed.extend(cluster.fail_master())

    def failed_over() -> bool:
        return redis_client(killed[1], PASSWORD).info("replication").get("role") == "master"

    try:
        seen = asyncio.run(lookups_through_a_failover(cluster.url, fail, failed_over))
        cluster.wait_failover(killed[1], 1)
        through_the_outage_and_back(seen)
        masters = [port for port, (role, _) in cluster.roles(via=killed[1]).items() if role == "master"]
        assert killed[1] in masters and killed[0] not in masters
        assert sum(int(redis_client(m, PASSWORD).dbsize()) for m in masters) == len(USERS)  # no key lost
    finally:
        cluster.stop()


def test_connect_says_when_redis_does_not_answer_and_raises_nothing() -> None:
    async def run() -> bool:
        client = make_redis(f"redis://127.0.0.1:{free_port()}/0", 1, 50)  # nothing listens there
        try:
            return await connect(client, 1.0)
        finally:
            await client.aclose()

    assert asyncio.run(run()) is False
