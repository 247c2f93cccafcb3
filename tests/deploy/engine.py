"""A private Docker engine for the deployment tests: its own containerd, dockerd, data root and socket.

Nothing of it is shared with a Docker the machine may already run, nor with the rest of the test
session: no environment variable is changed (clients get `DOCKER_HOST` per call, from `env()`),
the default socket is never touched. The engine runs with `--iptables=false --ip-forward=false
--ip-masq=false --bridge=none`: containers reach each other on the networks compose creates and
the host reaches them through published ports on 127.0.0.1, and nothing else (no NAT, no
forwarding, the host's firewall and sysctls untouched). Its networks come from a /22 of
172.16.0.0/12 that no route of the host uses, picked at random so two engines on one machine do
not collide. No registry is configured or reachable: `docker pull` fails, images are built.
"""

from __future__ import annotations

import ipaddress
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

STOP_TIMEOUT = 30.0
"""Seconds dockerd (then containerd) gets to stop after SIGTERM before SIGKILL."""


class EngineUnavailable(Exception):
    """No engine can be started here; the message says why (the tests skip with it)."""


def _host_networks() -> list[ipaddress.IPv4Network]:
    networks = []
    with open("/proc/net/route") as routes:
        next(routes)
        for line in routes:
            fields = line.split()
            destination = ipaddress.IPv4Address(bytes.fromhex(fields[1])[::-1])
            mask = ipaddress.IPv4Address(bytes.fromhex(fields[7])[::-1])
            networks.append(ipaddress.IPv4Network(f"{destination}/{mask}", strict=False))
    return networks


def free_address_pool() -> ipaddress.IPv4Network:
    """A /22 in 172.16.0.0/12 that overlaps no route of this machine (the default route excepted)."""
    taken = [n for n in _host_networks() if n.prefixlen > 0]
    candidates = list(ipaddress.IPv4Network("172.16.0.0/12").subnets(new_prefix=22))
    random.shuffle(candidates)
    for pool in candidates:
        if not any(pool.overlaps(n) for n in taken):
            return pool
    raise EngineUnavailable("no free /22 in 172.16.0.0/12 for the engine's networks")


class DockerEngine:
    """containerd + dockerd under one temporary directory; `start()`, `stop()`, `docker(...)`."""

    def __init__(self) -> None:
        # A short path: the sockets live here and a unix socket path has at most 107 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="tp-engine-", dir="/tmp"))
        self.pool = free_address_pool()
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def host(self) -> str:
        return f"unix://{self.root}/docker.sock"

    def env(self, **extra: str) -> dict[str, str]:
        """The environment for a docker / compose client of this engine (and of no other)."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("DOCKER_", "COMPOSE_")) and k != "TESTCONTAINERS_HOST_OVERRIDE"}
        env["DOCKER_HOST"] = self.host
        env.update(extra)
        return env

    def docker(self, *args: str, timeout: float = 120,
               check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(["docker", *args], capture_output=True, text=True, env=self.env(),
                                timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} failed ({result.returncode}): "
                                 f"{result.stderr[-3000:]}")
        return result

    def log_tail(self, name: str, size: int = 3000) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace")[-size:] if path.exists() else ""

    def start(self, timeout: float = 60.0) -> None:
        missing = [b for b in ("dockerd", "containerd", "runc", "docker") if shutil.which(b) is None]
        if missing:
            raise EngineUnavailable(f"{', '.join(missing)} not installed "
                                    "(Debian/Ubuntu: apt-get install docker.io)")
        if os.geteuid() != 0:
            raise EngineUnavailable("starting a Docker engine needs root")
        root = self.root
        (root / "containerd.toml").write_text(f"""version = 2
root = "{root}/containerd"
state = "{root}/containerd-state"
[grpc]
  address = "{root}/containerd.sock"
[ttrpc]
  address = "{root}/containerd.sock.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
""")
        self._spawn("containerd", ["containerd", "--config", str(root / "containerd.toml")])
        self._wait(lambda: (root / "containerd.sock").exists(), timeout, "containerd")
        self._spawn("dockerd", [
            "dockerd", "--containerd", str(root / "containerd.sock"), "--data-root", str(root / "data"),
            "--exec-root", str(root / "exec"), "--pidfile", str(root / "dockerd.pid"), "--host", self.host,
            "--iptables=false", "--ip6tables=false", "--ip-forward=false", "--ip-masq=false", "--bridge=none",
            "--default-address-pool", f"base={self.pool},size=24", "--log-level=warn"])
        self._wait(lambda: self.docker("version", timeout=5, check=False).returncode == 0, timeout, "dockerd")

    def _spawn(self, name: str, argv: list[str]) -> None:
        with open(self.root / f"{name}.log", "wb") as log:
            self.processes[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                                    start_new_session=True)

    def _wait(self, ready: object, timeout: float, name: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.processes[name].poll() is not None:
                self.stop()
                raise EngineUnavailable(f"{name} exited at start: {self.log_tail(name, 1500)}")
            if ready():  # type: ignore[operator]
                return
            time.sleep(0.1)
        self.stop()
        raise EngineUnavailable(f"{name} did not answer within {timeout} s: {self.log_tail(name, 1500)}")

    def stop(self) -> list[str]:
        """Stop dockerd, then containerd; unmount and delete the engine's directory.

        Returns what could not be cleaned (processes that needed SIGKILL, mounts left), for the
        caller to report; an empty list is a clean stop.
        """
        problems: list[str] = []
        for name in ("dockerd", "containerd"):
            process = self.processes.pop(name, None)
            if process is None or process.poll() is not None:
                continue
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                problems.append(f"{name} ignored SIGTERM for {STOP_TIMEOUT} s")
                process.kill()
                process.wait()
        for shim in self._own_shims():
            problems.append(f"a containerd shim outlived the engine (pid {shim})")
            os.kill(shim, signal.SIGKILL)
        for mount in self._own_mounts():
            if not mount.startswith(f"{self.root}/exec/netns/"):  # dockerd leaves its default netns mounted
                problems.append(f"left mounted: {mount}")
            subprocess.run(["umount", "-l", mount], capture_output=True, check=False)
        shutil.rmtree(self.root, ignore_errors=True)
        return problems

    def _own_mounts(self) -> list[str]:
        with open("/proc/mounts") as mounts:
            points = [line.split()[1] for line in mounts]
        return sorted((p for p in points if p.startswith(f"{self.root}/")), key=len, reverse=True)

    def _own_shims(self) -> list[int]:
        """containerd-shim processes started for this engine (their command line names its socket)."""
        found = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "containerd-shim" in cmdline and str(self.root) in cmdline:
                found.append(int(proc.name))
        return found
