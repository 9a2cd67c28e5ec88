"""`--store redis://`: modules kept in a real `redis-server`, shared by replicas.

The tests start `redis-server` themselves on a free localhost port (skipped
where it is not installed; `.ci/run` installs it), with an append-only file
fsynced on every write, as docs/deploy.md asks of production: killed and
restarted, it still has every module it acknowledged.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from redis_process import REDIS, RedisServer
from server_process import ServerProcess
from support import free_port

from bpfexec.client.client import Client
from bpfexec.client.errors import NotFound, Unavailable
from bpfexec.server.metrics import Metrics
from bpfexec.server.store_redis import RedisModuleStore, StoreUnavailable, redacted
from bpfexec.vm.program import content_id

pytestmark = pytest.mark.skipif(REDIS is None, reason="redis-server is not installed")
TIMEOUT = 20.0
ADD_ONE = b"r0 = r1\nr0 += 1\nexit\n"
TIMES_TWO = b"r0 = r1\nr0 *= 2\nexit\n"


def test_modules_are_stored_with_their_tenants(redis_server: RedisServer) -> None:
    store = RedisModuleStore(redis_server.url, Metrics())
    first, second = ADD_ONE, TIMES_TWO
    a, b = content_id(first), content_id(second)
    store.add_tenant(a, first, "add", "alice")
    store.add_tenant(a, first, "plus", "bob")
    store.save(b, second, "twice", ["alice"])
    assert store.ids() == [a, b] and store.has(a) and not store.has(content_id(b"x"))
    stored = store.read(a)
    assert stored is not None and stored.code == first
    assert stored.tenants == {"alice", "bob"}
    assert (stored.name_for("alice"), stored.name_for("bob"), stored.name) == ("add", "plus", "add")
    store.remove_tenant(a, "alice")
    assert store.tenants(a) == {"bob"}
    store.remove_tenant(a, "bob")  # the last tenant: the module goes
    assert not store.has(a) and store.ids() == [b] and store.read(a) is None
    assert store.delete(b) and not store.delete(b)
    assert store.read("sha256:../../etc") is None and not store.has("nonsense")
    with pytest.raises(ValueError, match="is not the sha256"):
        store.add_tenant(a, second, None, "alice")
    store.close()


def test_corrupt_bytes_are_not_served(redis_server: RedisServer) -> None:
    store = RedisModuleStore(redis_server.url, Metrics())
    module_id = content_id(ADD_ONE)
    store.add_tenant(module_id, ADD_ONE, None, "")
    raw = redis.Redis(port=redis_server.port)
    raw.hset(f"bpfexec:module:{module_id.split(':')[1]}", "code", TIMES_TWO)
    assert store.read(module_id) is None
    raw.close()
    store.close()


def test_an_unreachable_redis_is_store_unavailable(tmp_path: Path) -> None:
    store = RedisModuleStore(f"redis://127.0.0.1:{free_port()}/0", Metrics())
    with pytest.raises(StoreUnavailable, match=r"^the module store \(Redis\) is unavailable: "):
        store.ids()
    store.close()
    assert redacted("redis://user:secret@host:6379/0") == "redis://user:***@host:6379/0"


def test_a_module_uploaded_to_one_replica_runs_on_another(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    flags = ("--store", redis_server.url)
    one = ServerProcess(tmp_path / "one.log", *flags)
    two = ServerProcess(tmp_path / "two.log", *flags)
    try:
        with Client(one.address, timeout=TIMEOUT) as a, Client(two.address, timeout=TIMEOUT) as b:
            module = a.load(ADD_ONE, "add.s")
            assert b.execute(module.id, None, [41]).return_value == 42  # read from Redis
            assert b.get_module(module.id).name == "add.s"
            # Redis goes away: what is cached keeps working, what needs the store is
            # UNAVAILABLE with a message that says why; nothing acknowledged is lost.
            redis_server.kill()
            assert a.execute(module.id, None, [1]).return_value == 2
            with pytest.raises(Unavailable, match="module store \\(Redis\\) is unavailable"):
                a.load(TIMES_TWO, "twice.s")
            redis_server.start()
            twice = a.load(TIMES_TWO, "twice.s")
            three = ServerProcess(tmp_path / "three.log", *flags)  # restores both at start
            try:
                with Client(three.address, timeout=TIMEOUT) as c:
                    assert c.execute(module.id, None, [1]).return_value == 2
                    assert c.execute(twice.id, None, [21]).return_value == 42
            finally:
                three.kill()
            a.delete_module(module)
            with pytest.raises(NotFound):
                a.get_module(module.id)
    finally:
        one.kill()
        two.kill()
