"""`redis-server` on a free localhost port for the tests that need a real Redis
(tests/test_store_redis.py, tests/test_states_redis.py): the `redis_server`
fixture of tests/conftest.py.

Started with an append-only file fsynced on every write, as docs/deploy.md asks
of production: killed and restarted, it still has everything it acknowledged.
Tests using it are skipped where `redis-server` is not installed (`.ci/run`
installs it).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import redis
from support import free_port, wait_until

REDIS = shutil.which("redis-server")
TIMEOUT = 20.0


class RedisServer:
    """`redis-server` on a free port, its data in `directory`; `kill()` and `start()` again.
    With `password`, clients must give it (`url` does)."""

    def __init__(self, directory: Path, password: str = "") -> None:
        self.directory = directory
        self.port = free_port()
        self.password = password
        credentials = f":{password}@" if password else ""
        self.url = f"redis://{credentials}127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        assert REDIS is not None
        command = [
            REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
            "--save", "", "--appendonly", "yes", "--appendfsync", "always",
            *(["--requirepass", self.password] if self.password else []),
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        client = redis.Redis(port=self.port, password=self.password or None, socket_timeout=1)
        wait_until(lambda: _pings(client), timeout=TIMEOUT, what="redis-server")
        client.close()

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=TIMEOUT)
            self.process = None


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
