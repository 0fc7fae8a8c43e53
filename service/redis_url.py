"""Which Redis a ``RERANK_REDIS_URL`` names: one server, a Redis Cluster, or a master found through Sentinel.

Owns: the URL schemes and parsing the multi-host ones. Does not know: clients, keys or features (``features.py``
builds the client). Kept apart so the settings can refuse a malformed URL at start-up without importing a client.

    redis://[:password@]host:port/db, rediss://... (TLS), unix:///path.sock       one server
    redis+cluster://[:password@]host:port[,host:port...]                          a Redis Cluster, from any nodes
    redis+sentinel://[:password@]host:port[,host:port...]/master_name[/db]        the master Sentinel reports
    (rediss+cluster://, rediss+sentinel:// for TLS)
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

SINGLE_SCHEMES = ("redis://", "rediss://", "unix://")
CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")
SENTINEL_SCHEMES = ("redis+sentinel://", "rediss+sentinel://")
SCHEMES = SINGLE_SCHEMES + CLUSTER_SCHEMES + SENTINEL_SCHEMES


@dataclass(frozen=True)
class RedisTarget:
    """A parsed ``+cluster`` or ``+sentinel`` URL: the nodes, the data nodes' password, TLS, and for Sentinel the
    monitored master's name and the database."""

    nodes: list[tuple[str, int]]
    password: str | None
    tls: bool
    service: str = ""
    db: int = 0


def parse_multi_host(url: str) -> RedisTarget:
    """``redis+cluster://[:password@]host:port[,host:port...]`` or
    ``redis+sentinel://[:password@]host:port[,host:port...]/master_name[/db]`` (``rediss+`` for TLS). The password
    is the data nodes' (Sentinel: the master's and replicas'); the sentinels themselves are reached without one."""
    scheme, rest = url.split("://", 1)
    netloc, _, path = rest.partition("/")
    userinfo, _, hosts = netloc.rpartition("@")
    password = urllib.parse.unquote(userinfo.split(":", 1)[1]) if ":" in userinfo else (userinfo or None)
    nodes = []
    for part in hosts.split(","):
        host, _, port = part.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"'{part}' in '{url}' is not host:port")
        nodes.append((host.strip("[]"), int(port)))
    parts = [p for p in path.split("/") if p]
    if scheme.endswith("+sentinel") and not parts:
        raise ValueError(f"'{url}' names no master: redis+sentinel://host:port/master_name")
    db = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    return RedisTarget(nodes, password or None, scheme.startswith("rediss"), parts[0] if parts else "", db)


def check(url: str) -> str:
    """``url`` if it names a Redis this service can reach, else ValueError saying what is wrong."""
    if url and not url.startswith(SCHEMES):
        raise ValueError(f"'{url}' is not a {', '.join(SCHEMES)} URL")
    if url.startswith(CLUSTER_SCHEMES + SENTINEL_SCHEMES):
        parse_multi_host(url)
    return url
