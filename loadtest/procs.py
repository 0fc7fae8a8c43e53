"""Real processes on loopback for tests and the fault suite: redis-server, the service, a delaying proxy.

Owns: starting, waiting for, stopping and inspecting them (RSS, CPU). Does not know: load or scenarios.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Self

import redis

from service.config import default_workers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_cluster_port() -> int:
    """A free loopback port whose cluster bus port (it plus 10,000) is free and valid too, as a Redis Cluster
    node needs; an ephemeral port above 55,535 has no bus port."""
    for port in random.sample(range(20_000, 30_000), 200):
        with socket.socket() as a, socket.socket() as b:
            try:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10_000))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port pair for a cluster node")


def pinned(cpus: set[int] | None) -> Callable[[], None] | None:
    """A ``preexec_fn`` that pins the child to ``cpus`` (Linux), or None to leave it free."""
    if not cpus:
        return None
    chosen = set(cpus)
    return lambda: os.sched_setaffinity(0, chosen)


def rss_mb(pid: int) -> float:
    """Resident set size of ``pid`` in MiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pids: list[int] | set[int]) -> float:
    """User + system CPU seconds of these processes so far, all threads (Linux /proc; a process that is gone
    counts 0)."""
    ticks, total = os.sysconf("SC_CLK_TCK"), 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def load_features(redis_url: str, env: dict[str, str]) -> None:
    """``python -m service load-features`` into ``redis_url``, with the model settings in ``env``."""
    subprocess.run([sys.executable, "-m", "service", "load-features"], check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, **env, "RERANK_REDIS_URL": redis_url})


class RedisServer:
    """A real redis-server on a free loopback port; stop() and start() again on the same port."""

    def __init__(self, folder: Path, password: str = "", args: list[str] | None = None, port: int = 0) -> None:
        self.port = port or free_port()
        self.folder = folder
        self.password = password
        self.args = args or []  # more redis-server options (cluster mode, replicaof, ...)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed: `make test` installs it (see the Makefile)"
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.folder), "--enable-debug-command", "yes"]
        if self.password:
            args += ["--requirepass", self.password, "--masterauth", self.password]
        self.proc = subprocess.Popen([*args, *self.args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    reply = s.recv(64)
                    if reply.startswith((b"+PONG", b"-NOAUTH")):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def redis_client(port: int, password: str = "") -> redis.Redis:
    """A synchronous client for the harness's own checks (never the service's)."""
    return redis.Redis(host="127.0.0.1", port=port, password=password or None, socket_timeout=2)


def wait_for(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(redis.RedisError, OSError):
            if check():
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what}: not after {timeout_s:.0f} s")


class Servers:
    """Several processes started as one: ``start`` runs ``_start`` and, if that fails part-way, ``stop``s what had
    started, so no server outlives a failed start."""

    def start(self) -> Self:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


class RedisClusterServers(Servers):
    """A real Redis Cluster on loopback (``redis-cli --cluster create``): three masters, and ``replicas`` replicas of
    each; ``fail_master`` kills a master, and its replica takes over about the node timeout (2 s) later."""

    def __init__(self, folder: Path, password: str = "", masters: int = 3, replicas: int = 0) -> None:
        self.password, self.masters, self.replicas = password, masters, replicas
        self.nodes = []
        for i in range(masters * (1 + replicas)):
            (folder / f"cluster-{i}").mkdir(parents=True, exist_ok=True)
            # validity factor 0: a replica always stands for election, however long its link was down (on a loaded
            # machine a replica judged too stale never did, and its master's slots stayed down)
            self.nodes.append(RedisServer(folder / f"cluster-{i}", password, [
                "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{i}.conf", "--cluster-node-timeout",
                "2000", "--cluster-replica-validity-factor", "0"], port=free_cluster_port()))

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis+cluster://{auth}" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def _start(self) -> None:
        for node in self.nodes:
            node.start()
        auth = ["-a", self.password, "--no-auth-warning"] if self.password else []
        subprocess.run(["redis-cli", *auth, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
                        "--cluster-replicas", str(self.replicas), "--cluster-yes"], check=True, capture_output=True,
                       timeout=60)
        for node in self.nodes:
            client = redis_client(node.port, self.password)
            wait_for(lambda c=client: c.execute_command("CLUSTER INFO").get("cluster_state") == "ok", 30,
                     "cluster state ok")
        if self.replicas:  # every replica known as one and linked to its master, so a failover has one to promote
            wanted = self.masters * self.replicas
            wait_for(lambda: sum(role == "replica" for role, _ in self.roles().values()) == wanted, 30,
                     "cluster replicas assigned")
            for port in (p for p, role in self.roles().items() if role[0] == "replica"):
                replica = redis_client(port, self.password)
                wait_for(lambda c=replica: c.info("replication").get("master_link_status") == "up", 30,
                         "cluster replica linked")

    def roles(self, via: int | None = None) -> dict[int, tuple[str, int]]:
        """Each live node's port -> ("master", 0) or ("replica", its master's port), as the cluster (asked through
        node ``via``, else the first live one) sees it now."""
        port = via or next(n.port for n in self.nodes if n.proc is not None)
        nodes = redis_client(port, self.password).execute_command("CLUSTER NODES")  # parsed: {address: fields}
        rows = [(addr.split("@")[0], f["flags"], f["master_id"], f["node_id"]) for addr, f in nodes.items()]
        port_of = {node_id: int(addr.rsplit(":", 1)[1]) for addr, _, _, node_id in rows}
        return {int(addr.rsplit(":", 1)[1]): ("master", 0) if "master" in flags else ("replica", port_of[master])
                for addr, flags, master, _ in rows if "fail" not in flags}

    def fail_master(self) -> tuple[int, int]:
        """Kill the first node that is a master, once its replica has acknowledged every write it took (``WAIT``);
        its port and its replica's."""
        roles = self.roles()
        master = next(n for n in self.nodes if n.proc is not None and roles.get(n.port) == ("master", 0))
        replica = next(p for p, (role, of) in roles.items() if role == "replica" and of == master.port)
        if int(redis_client(master.port, self.password).execute_command("WAIT", 1, 10_000)) < 1:
            raise RuntimeError(f"the replica {replica} of {master.port} did not acknowledge its writes in 10 s")
        master.stop()
        return master.port, replica

    def wait_failover(self, replica: int, timeout_s: float = 30) -> None:
        """Until ``replica`` is a master and the cluster covers every slot again."""
        client = redis_client(replica, self.password)
        wait_for(lambda: client.info("replication").get("role") == "master"
                 and client.execute_command("CLUSTER INFO").get("cluster_state") == "ok", timeout_s,
                 "cluster failover")

    def keys_per_node(self) -> list[int]:
        return [int(redis_client(n.port, self.password).dbsize()) for n in self.nodes if n.proc is not None]

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


class RedisSentinelServers(Servers):
    """A real master, one replica and one sentinel (quorum 1) on loopback; ``fail_master`` kills the master, and
    the sentinel promotes the replica about ``down_after_ms`` later."""

    MASTER = "rerank"

    def __init__(self, folder: Path, password: str = "", down_after_ms: int = 1000, sentinel_password: str = ""
                 ) -> None:
        self.folder, self.password, self.down_after_ms = folder, password, down_after_ms
        self.sentinel_password = sentinel_password  # the sentinel's own requirepass; empty: none
        (folder / "master").mkdir(parents=True, exist_ok=True)
        (folder / "replica").mkdir(parents=True, exist_ok=True)
        self.master = RedisServer(folder / "master", password)
        self.replica = RedisServer(folder / "replica", password, ["--replicaof", "127.0.0.1", str(self.master.port)])
        self.sentinel_port = free_port()
        self.sentinel: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        option = f"?sentinel_password={self.sentinel_password}" if self.sentinel_password else ""
        return f"redis+sentinel://{auth}127.0.0.1:{self.sentinel_port}/{self.MASTER}/0{option}"

    def master_port(self) -> int:
        """The port of the master the sentinel reports now."""
        reply = redis_client(self.sentinel_port, self.sentinel_password).execute_command(
            "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.MASTER)
        return int(reply[1])

    def _start(self) -> None:
        self.master.start()
        self.replica.start()
        replica = redis_client(self.replica.port, self.password)
        wait_for(lambda: replica.info("replication").get("master_link_status") == "up", 30,
                 "replica linked")
        conf = self.folder / "sentinel.conf"  # the sentinel rewrites it: a writable file of its own
        lines = [f"port {self.sentinel_port}", "bind 127.0.0.1", f"dir {self.folder}",
                 f"sentinel monitor {self.MASTER} 127.0.0.1 {self.master.port} 1",
                 f"sentinel down-after-milliseconds {self.MASTER} {self.down_after_ms}",
                 f"sentinel failover-timeout {self.MASTER} 5000"]
        if self.password:
            lines.append(f"sentinel auth-pass {self.MASTER} {self.password}")
        if self.sentinel_password:
            lines.append(f"requirepass {self.sentinel_password}")
        conf.write_text("\n".join(lines) + "\n")
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed: `make test` installs it (see the Makefile)"
        self.sentinel = subprocess.Popen([binary, str(conf), "--sentinel"], stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
        sentinel = redis_client(self.sentinel_port, self.sentinel_password)
        wait_for(lambda: len(sentinel.execute_command("SENTINEL", "REPLICAS", self.MASTER)) == 1, 30,
                 "sentinel sees the replica")

    def fail_master(self) -> None:
        self.master.stop()

    def wait_failover(self, timeout_s: float = 30) -> int:
        """The promoted replica's port, once the sentinel reports it and it accepts writes."""
        wait_for(lambda: self.master_port() == self.replica.port, timeout_s, "failover")
        replica = redis_client(self.replica.port, self.password)
        wait_for(lambda: replica.info("replication").get("role") == "master", timeout_s,
                 "replica promoted")
        return self.replica.port

    def stop(self) -> None:
        if self.sentinel is not None:
            self.sentinel.kill()
            self.sentinel.wait()
            self.sentinel = None
        self.replica.stop()
        self.master.stop()


def child_pids(pid: int) -> list[int]:
    """The direct children of ``pid`` (Linux /proc)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                children.append(int(stat.parent.name))
    return children


def ready_pids(url: str, want: int, timeout_s: float) -> set[int]:
    """Worker pids seen on /readyz over fresh connections (the kernel spreads them over the workers) until
    ``want`` distinct ones answered ready, or ``timeout_s`` passed."""
    seen: set[int] = set()
    deadline = time.monotonic() + timeout_s
    while len(seen) < want and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=1) as resp:
                seen.add(int(json.loads(resp.read())["pid"]))
        except (OSError, ValueError):  # a worker still starting answers 503 (HTTPError is an OSError)
            time.sleep(0.05)
    return seen


class ServiceProcess:
    """``python -m service`` as its own process, configured by RERANK_* variables (one worker unless
    RERANK_WORKERS says otherwise); ready when /readyz has answered 200 from every worker."""

    def __init__(self, env: dict[str, str], log: Path | None = None, cwd: Path | None = None,
                 cpus: set[int] | None = None) -> None:
        self.cwd = cwd  # another checkout: `python -m service` runs that checkout's code
        self.cpus = cpus  # pinned to these cores (sched_setaffinity, inherited by its workers); None: any
        self.port = int(env.get("RERANK_PORT") or free_port())
        self.env = {**os.environ, "RERANK_LOG_LEVEL": "warning", "RERANK_WORKERS": "1", **env,
                    "RERANK_PORT": str(self.port)}
        self.workers = int(self.env["RERANK_WORKERS"]) or (
            len(cpus) if cpus else default_workers(self.env.get("RERANK_PROVIDERS", "auto")))
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout_s: float = 120) -> ServiceProcess:
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL  # noqa: SIM115 (closed with the process)
        self.proc = subprocess.Popen([sys.executable, "-m", "service"], env=self.env, stdout=out, stderr=out,
                                     cwd=self.cwd, preexec_fn=pinned(self.cpus))
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the service exited with {self.proc.returncode} during start-up (log: {self.log})")
            if len(ready_pids(self.url, self.workers, 1.0)) == self.workers:
                return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"the service was not ready after {timeout_s:.0f} s")
            time.sleep(0.1)

    def cpu(self) -> float:
        """CPU seconds the service's processes (the supervisor and its workers) have used so far."""
        return cpu_seconds({self.pid, *self.pids()})

    def pids(self) -> list[int]:
        """The processes that serve: the service itself, or with several workers its worker processes."""
        if self.workers == 1:
            return [self.pid]
        workers = []
        for pid in child_pids(self.pid):  # not multiprocessing's resource tracker
            with contextlib.suppress(OSError):
                if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    workers.append(pid)
        return workers

    def terminate(self, timeout_s: float = 60) -> int:
        """SIGTERM and wait; the exit code (uvicorn re-raises the signal after a clean shutdown: -15)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class DelayProxy:
    """A loopback TCP proxy that holds every reply chunk from the upstream for ``delay_ms`` (settable while
    running): a slow Redis without touching Redis. Runs its own event loop in a thread."""

    def __init__(self, upstream_port: int, delay_ms: float = 0.0) -> None:
        self.port = free_port()
        self.upstream_port = upstream_port
        self.delay_ms = delay_ms
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: asyncio.Server | None = None

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delayed: bool) -> None:
        try:
            while data := await reader.read(65536):
                if delayed and self.delay_ms > 0:
                    await asyncio.sleep(self.delay_ms / 1000)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return
        # Cancelled at shutdown: end normally, since Python 3.11's start_server reports a cancelled client task
        # as an error.
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(self._pipe(reader, up_writer, False), self._pipe(up_reader, writer, True))

    def __enter__(self) -> DelayProxy:
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._client, "127.0.0.1", self.port), self.loop).result(10)
        return self

    async def _shutdown(self) -> None:
        """Stop accepting, cancel every pipe (each closes its writer) and let the closes run, so nothing is left
        pending for the garbage collector to report against a closed loop."""
        if self.server is not None:
            self.server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(0.05)  # transports close on the next loop iterations

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        if not self.thread.is_alive():
            self.loop.close()
