"""Which Redis a ``RERANK_REDIS_URL`` names: one server, a Redis Cluster, or a master found through Sentinel.

Owns: the URL schemes and parsing the multi-host ones. Does not know: clients, keys or features (``features.py``
builds the client). Kept apart so the settings can refuse a malformed URL at start-up without importing a client.

    redis://[:password@]host:port/db, rediss://... (TLS), unix:///path.sock       one server
    redis+cluster://[:password@]host:port[,host:port...]                          a Redis Cluster, from any nodes
    redis+sentinel://[:password@]host:port[,host:port...]/master_name[/db]        the master Sentinel reports
        [?sentinel_password=...]                                                     sentinels with requirepass
    (rediss+cluster://, rediss+sentinel:// for TLS)

A URL in an error message has its passwords replaced by ``***`` (``redacted``): start-up errors go to logs.
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
    sentinel_password: str | None = None  # the sentinels' own password (their requirepass); None: they need none


def redacted(url: str) -> str:
    """``url`` with the password after ``:`` in its user info and any ``*password=`` option replaced by ``***``."""
    scheme, sep, rest = url.partition("://")
    netloc, slash, tail = rest.partition("/")
    if "?" in netloc:  # no path: the query starts in the netloc
        netloc, mark, query = netloc.partition("?")
        tail, slash = mark + query + tail, ""
    userinfo, at, hosts = netloc.rpartition("@")
    if at and ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":***"
    path, mark, query = tail.partition("?")
    options = [(k, "***" if k.endswith("password") else v)
               for k, v in urllib.parse.parse_qsl(query, keep_blank_values=True)]
    query = "&".join(f"{k}={v}" for k, v in options)
    return f"{scheme}{sep}{userinfo}{at}{hosts}{slash}{path}{mark}{query}"


def parse_multi_host(url: str) -> RedisTarget:
    """``redis+cluster://[:password@]host:port[,host:port...]`` or
    ``redis+sentinel://[:password@]host:port[,host:port...]/master_name[/db]`` (``rediss+`` for TLS). The password
    is the data nodes' (Sentinel: the master's and replicas'); sentinels that require one of their own get it from
    the ``sentinel_password`` option (percent-encoded like the rest)."""
    scheme, rest = url.split("://", 1)
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, _, hosts = netloc.rpartition("@")
    password = urllib.parse.unquote(userinfo.split(":", 1)[1]) if ":" in userinfo else (userinfo or None)
    nodes = []
    for part in hosts.split(","):
        host, _, port = part.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"'{part}' in '{redacted(url)}' is not host:port")
        nodes.append((host.strip("[]"), int(port)))
    parts = [p for p in path.split("/") if p]
    sentinel = scheme.endswith("+sentinel")
    if sentinel and not parts:
        raise ValueError(f"'{redacted(url)}' names no master: redis+sentinel://host:port/master_name")
    options = dict(urllib.parse.parse_qsl(query, keep_blank_values=True))
    unknown = sorted(set(options) - ({"sentinel_password"} if sentinel else set()))
    if unknown:
        takes = "takes only sentinel_password" if sentinel else "takes none"
        raise ValueError(f"'{redacted(url)}': unknown option(s) {', '.join(unknown)}; a {scheme}:// URL {takes}")
    db = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    return RedisTarget(nodes, password or None, scheme.startswith("rediss"), parts[0] if parts else "", db,
                       options.get("sentinel_password") or None)


def check(url: str) -> str:
    """``url`` if it names a Redis this service can reach, else ValueError saying what is wrong."""
    if url and not url.startswith(SCHEMES):
        raise ValueError(f"'{redacted(url)}' is not a {', '.join(SCHEMES)} URL")
    if url.startswith(CLUSTER_SCHEMES + SENTINEL_SCHEMES):
        parse_multi_host(url)
    return url
