"""A real multi-node Ray cluster on this machine, inside a network namespace with only loopback.

Each node is started with `ray start` (its own --temp-dir, ports, --num-cpus/--memory/
--object-store-memory) through `ip netns exec`, so the cluster can neither reach nor be reached
from the host's network, including any other Ray on the host's 127.0.0.1. Token auth is on: one
random token in a file (RAY_AUTH_TOKEN_PATH) is given to every node and every driver.

Everything runs in subprocesses; the calling process never connects to this cluster. A network
namespace is not a PID namespace, so `ray stop` would kill every Ray process on the machine (the
test session's own Ray included): teardown kills exactly the processes inside the namespace
(`ip netns pids`), then deletes it, and checks that none of the processes it saw is left.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
GIB = 1024**3
MIB = 1024**2


def unavailable_reason() -> str | None:
    """Why a namespaced cluster cannot be started here, or None when it can."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "creating a network namespace (ip netns add) needs root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if not (BIN / "ray").exists():
        return f"no `ray` executable beside {sys.executable}"
    probe = f"esc50-probe-{uuid.uuid4().hex[:8]}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"network namespaces are not permitted here: {r.stderr.strip()}"
    try:
        r = subprocess.run(
            ["ip", "netns", "exec", probe, "ip", "link", "set", "lo", "up"], capture_output=True, text=True
        )
        if r.returncode != 0:
            return f"cannot run commands in a network namespace: {r.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, ...), None if it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (field 22 of /proc/PID/stat), None if it is gone or a zombie."""
    fields = _stat(pid)
    return None if fields is None or fields[0] in ("Z", "X") else fields[19]


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@dataclass
class Node:
    name: str
    temp_dir: Path
    node_manager_port: int
    pids: dict[int, str] = field(default_factory=dict)  # pid -> start time, seen right after start

    def raylet_pid(self) -> int | None:
        for pid in self.pids:
            cmd = cmdline(pid)
            if "/raylet/raylet " in cmd and f"--node_manager_port={self.node_manager_port}" in cmd:
                return pid
        return None


class NetnsCluster:
    """Head + workers in network namespace `self.ns`: `start()`, then always `close()`."""

    def __init__(
        self,
        *,
        num_cpus: int = 2,
        memory: int = 2 * GIB,
        object_store_memory: int = 200 * MIB,
        port: int = 6379,
    ) -> None:
        self.ns = f"esc50-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        # Short root: Ray's unix sockets live under --temp-dir and paths are limited to 107 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="esc50-mn-", dir="/tmp"))
        self.address = f"127.0.0.1:{port}"
        self.port = port
        self.resources = {
            "--num-cpus": str(num_cpus),
            "--num-gpus": "0",
            "--memory": str(memory),
            "--object-store-memory": str(object_store_memory),
        }
        self.token_path = self.root / "auth_token"
        self.token_path.write_text(secrets.token_hex(32))
        self.token_path.chmod(0o600)
        self.storage = self.root / "storage"  # seen by both nodes: same machine, same filesystem
        self.storage.mkdir()
        self.nodes: list[Node] = []
        self.seen: dict[int, str] = {}  # every process ever seen in the namespace
        self._namespace_created = False
        self._closed = False

    # ---- environment and commands ------------------------------------------------------------
    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(self.token_path),
            RAY_USAGE_STATS_ENABLED="0",
            MLFLOW_DISABLE_TELEMETRY="true",
            # Notice a dead node in ~2 s instead of ~30 s (read by the GCS on the head).
            RAY_health_check_initial_delay_ms="1000",
            RAY_health_check_period_ms="500",
            RAY_health_check_timeout_ms="1000",
            RAY_health_check_failure_threshold="3",
            PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            PYTHONUNBUFFERED="1",
        )
        env.update(extra or {})
        return env

    def command(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *map(str, argv)]

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float,
        env: Mapping[str, str] | None = None,
        log: Path | None = None,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Run argv inside the namespace; output to `log` (never a pipe a daemon could hold open)."""
        log = log or self.root / f"cmd-{uuid.uuid4().hex[:8]}.log"
        with open(log, "w") as out:
            r = subprocess.run(
                self.command(argv),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env(env),
                cwd=REPO,
                timeout=timeout,
                text=True,
            )
        r.stdout = log.read_text(errors="replace")
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, argv))} exited {r.returncode}:\n{r.stdout[-4000:]}")
        return r

    def popen(
        self, argv: Sequence[str], *, log: Path, env: Mapping[str, str] | None = None
    ) -> subprocess.Popen:
        out = open(log, "w")  # noqa: SIM115 - closed by the child's exit; the parent keeps no copy
        try:
            return subprocess.Popen(
                self.command(argv),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env(env),
                cwd=REPO,
                text=True,
            )
        finally:
            out.close()

    def python(self, code: str, *args: str, timeout: float = 60, env: Mapping[str, str] | None = None) -> Any:
        """Run a Python snippet inside the namespace; it calls `result(obj)`, which is returned.

        The snippet gets `result` (prints obj as one marked JSON line), `connect()` (ray.init to
        this cluster as a driver, quietly) and `gcs()` (Ray's GlobalState on the cluster's GCS: the
        node and actor tables, without becoming a driver; about a second faster).
        """
        prelude = f"""
import json, sys
def result(obj):
    print("@@result " + json.dumps(obj), flush=True)
def connect():
    import ray
    ray.init(address={self.address!r}, log_to_driver=False, configure_logging=False)
def gcs():
    from ray._private.state import GlobalState
    from ray._raylet import GcsClientOptions
    state = GlobalState()
    state._initialize_global_state(
        GcsClientOptions.create({self.address!r}, None, allow_cluster_id_nil=True, fetch_cluster_id_if_nil=False)
    )
    return state
"""
        out = self.run([sys.executable, "-c", prelude + code, *args], timeout=timeout, env=env).stdout
        lines = [line for line in out.splitlines() if line.startswith("@@result ")]
        if not lines:
            raise RuntimeError(f"the snippet reported no result:\n{out[-4000:]}")
        return json.loads(lines[-1].removeprefix("@@result "))

    # ---- processes ---------------------------------------------------------------------------
    def pids(self) -> set[int]:
        if not self._namespace_created:
            return set()
        r = subprocess.run(["ip", "netns", "pids", self.ns], capture_output=True, text=True)
        return {int(p) for p in r.stdout.split()}

    def _record(self, node: Node | None) -> None:
        for pid in self.pids():
            started = _start_time(pid)
            if started is None:
                continue
            if pid not in self.seen and node is not None:
                node.pids[pid] = started
            self.seen.setdefault(pid, started)

    def children(self, node: Node) -> list[str]:
        """Command lines of the processes the node's raylet started (its workers and agents)."""
        raylet = node.raylet_pid()
        return [cmdline(pid) for pid in self.pids() if (st := _stat(pid)) and raylet and int(st[1]) == raylet]

    def snapshot(self) -> dict[int, str]:
        """Every process the namespace holds or held so far (pid -> start time)."""
        self._record(None)
        return dict(self.seen)

    def alive(self, pids: Mapping[int, str]) -> list[int]:
        """Those of `pids` still running (same pid and same start time: not a reused pid)."""
        return [pid for pid, started in pids.items() if _start_time(pid) == started]

    # ---- nodes -------------------------------------------------------------------------------
    def start(self, workers: int = 1) -> NetnsCluster:
        subprocess.run(["ip", "netns", "add", self.ns], check=True, capture_output=True)
        self._namespace_created = True
        subprocess.run(["ip", "netns", "exec", self.ns, "ip", "link", "set", "lo", "up"], check=True)
        self._start_node(head=True)
        for _ in range(workers):
            self.add_worker()
        return self

    def _start_node(self, *, head: bool) -> Node:
        i = len(self.nodes)
        node = Node(
            name="head" if head else f"worker{i}",
            temp_dir=self.root / ("h" if head else f"w{i}"),
            node_manager_port=self.port + 100 + i,
        )
        argv = [BIN / "ray", "start", "--node-ip-address", "127.0.0.1", *self._flat(self.resources)]
        argv += ["--temp-dir", node.temp_dir, "--node-manager-port", node.node_manager_port]
        argv += ["--dashboard-agent-listen-port", 52365 + i, "--disable-usage-stats"]
        if head:
            argv += ["--head", "--port", self.port, "--include-dashboard", "false"]
        else:
            argv += ["--address", self.address]
        self.run(argv, timeout=120, log=self.root / f"start-{node.name}.log")
        self._record(node)
        self.nodes.append(node)
        return node

    @staticmethod
    def _flat(options: Mapping[str, str]) -> list[str]:
        return [x for kv in options.items() for x in kv]

    def add_worker(self) -> Node:
        node = self._start_node(head=False)
        self.wait_for_nodes(sum(1 for n in self.nodes if n.raylet_pid()))
        return node

    def kill_node(self, node: Node) -> None:
        """The node dies as a machine would: its raylet is killed; its workers follow."""
        pid = node.raylet_pid()
        assert pid is not None, f"{node.name} has no raylet"
        os.kill(pid, signal.SIGKILL)

    def node_table(self) -> list[dict]:
        return self.python(
            "result([{'id': n['NodeID'], 'alive': n['Alive'], 'port': n['NodeManagerPort']}"
            " for n in gcs().node_table()])"
        )

    def node_id(self, node: Node) -> str:
        for n in self.node_table():
            if n["alive"] and n["port"] == node.node_manager_port:
                return n["id"]
        raise LookupError(f"{node.name} is not alive in the cluster")

    def wait_for_nodes(self, alive: int, timeout: float = 60) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            table = self.node_table()
            if sum(n["alive"] for n in table) == alive or time.monotonic() > deadline:
                assert sum(n["alive"] for n in table) == alive, f"expected {alive} alive nodes: {table}"
                return table
            time.sleep(0.5)

    # ---- teardown ----------------------------------------------------------------------------
    def close(self) -> list[str]:
        """Kill every process in the namespace, delete it, remove files; returns what survived."""
        if self._closed:
            return []
        self._closed = True
        for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
            self._record(None)
            for pid in self.alive(self.seen):  # start time checked: never a reused pid
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            while self.alive(self.seen) and time.monotonic() < deadline:
                time.sleep(0.1)
        survivors = [f"{pid} {cmdline(pid)[:200]}" for pid in self.alive(self.seen)]
        if self._namespace_created:
            subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)
        survivors += [
            f"{pid} {cmd[:200]}"
            for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
            if str(self.root) in (cmd := cmdline(pid)) and _start_time(pid) is not None
        ]
        shutil.rmtree(self.root, ignore_errors=True)
        return sorted(set(survivors))

    def namespace_exists(self) -> bool:
        r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
        return any(line.split()[0] == self.ns for line in r.stdout.splitlines() if line.strip())
