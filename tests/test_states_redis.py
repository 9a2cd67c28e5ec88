"""`--state-store redis://`: named states in a real `redis-server`, shared by servers.

The model under test is docs/state.md: one request at a time per state, its
changes committed together at its end, a commit fenced by its lease. The
program is tests/fixtures/maps/counter.o: `count(key)` adds one to
`counts[key]` and to `totals[0]` and returns the new count, so a state used
one request at a time answers every count from 1 to the total exactly once.
Redis runs on a free localhost port (`redis_server`, tests/conftest.py).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis_process import REDIS, RedisServer
from server_process import ServerProcess
from support import free_port, wait_until

from bpfexec.client.client import Client
from bpfexec.client.errors import DeadlineExceeded, Unavailable
from bpfexec.server.metrics import Metrics
from bpfexec.server.state_files import StateKey, state_digest
from bpfexec.server.states import (
    StateBusy,
    StateNotFound,
    StateRegistry,
    StateStoreUnavailable,
)
from bpfexec.server.states_redis import RedisStates
from bpfexec.vm import load

ROOT = Path(__file__).resolve().parent.parent
COUNTER = ROOT / "tests" / "fixtures" / "maps" / "counter.o"
TIMEOUT = 20.0
KEY = StateKey("", "sha256:" + "ab" * 32, "shared")


def u32(n: int) -> bytes:
    return n.to_bytes(4, "little")


def u64(n: int) -> bytes:
    return n.to_bytes(8, "little")


def registry(url: str, lease_seconds: float = 5.0) -> StateRegistry:
    """The states of one server process on `url`."""
    return StateRegistry(metrics=Metrics(), shared=RedisStates(url, lease_seconds=lease_seconds))


def count_of(found: dict, key: int) -> int:
    entries = dict(found["counts"].entries)
    return int.from_bytes(entries.get(u32(key), b""), "little")


def test_a_change_made_by_one_process_is_what_the_next_request_anywhere_sees(
    redis_server: RedisServer,
) -> None:
    program = load(COUNTER.read_bytes())
    one, two = registry(redis_server.url), registry(redis_server.url)
    with pytest.raises(StateNotFound):
        one.read(KEY)
    assert one.update(KEY, program, "counts", [(u32(1), u64(10))], 0) == ([0], True)
    summary, found = two.read(KEY)
    assert summary.map_names == ["counts", "totals"] and count_of(found, 1) == 10
    # The second process changes it under its own copy; the first catches up.
    assert two.update(KEY, program, "counts", [(u32(1), u64(11))], 0) == ([0], False)
    with one.hold(KEY, program) as state:
        assert state.map("counts").entries() == [(u32(1), u64(11))]
        state.map("counts").update(u32(2), u64(5), 0)
    assert count_of(two.read(KEY)[1], 2) == 5
    assert [s.key for s in two.summaries("")] == [KEY] and two.summaries("bob") == []
    # A request that fails commits nothing it did not start with.
    assert one.delete_entries(KEY, program, "counts", [u32(2)]) == [0]
    assert count_of(two.read(KEY)[1], 2) == 0
    two.delete(KEY)
    with pytest.raises(StateNotFound):
        one.read(KEY)
    with pytest.raises(StateNotFound):
        one.delete_entries(KEY, program, "counts", [u32(1)])
    # Created again: from its module's fresh maps, not the first process's old copy.
    with one.hold(KEY, program) as state:
        assert state.map("counts").entries() == []


def test_a_state_held_elsewhere_waits_then_is_busy_at_the_deadline(
    redis_server: RedisServer,
) -> None:
    program = load(COUNTER.read_bytes())
    one, two = registry(redis_server.url), registry(redis_server.url)
    assert one.shared is not None and two.shared is not None
    lease = one.shared.acquire(KEY, time.monotonic() + 1, None)
    start = time.monotonic()
    with pytest.raises(StateBusy, match="stayed in use by other requests"):
        two.update(KEY, program, "counts", [(u32(1), u64(1))], 0, wait=0.2)
    assert 0.2 <= time.monotonic() - start < 2
    one.shared.release(lease)
    assert two.update(KEY, program, "counts", [(u32(1), u64(1))], 0, wait=0.2)[0] == [0]


def test_a_commit_after_the_lease_expired_is_refused_and_changes_nothing(
    redis_server: RedisServer,
) -> None:
    program = load(COUNTER.read_bytes())
    one, two = registry(redis_server.url), registry(redis_server.url)
    one.update(KEY, program, "counts", [(u32(1), u64(1))], 0)
    raw = redis.Redis(port=redis_server.port)
    refused = pytest.raises(StateStoreUnavailable, match="lease on it expired")
    with refused, one.hold(KEY, program) as state:
        state.map("counts").update(u32(1), u64(99), 0)
        # This server freezes past its lease: it expires and another takes the state.
        raw.delete(f"bpfexec:state:{state_digest(KEY)}:lease")
        two.update(KEY, program, "counts", [(u32(3), u64(3))], 0)
    found = two.read(KEY)[1]
    assert (count_of(found, 1), count_of(found, 3)) == (1, 3)
    # The refused copy is not trusted again: the next request reads the state.
    with one.hold(KEY, program) as state:
        assert dict(state.map("counts").entries())[u32(1)] == u64(1)
    raw.close()


def test_an_unreachable_state_store_is_unavailable(redis_server: RedisServer) -> None:
    program = load(COUNTER.read_bytes())
    states = registry(f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(StateStoreUnavailable, match=r"state store \(Redis\) is unavailable"):
        states.update(KEY, program, "counts", [(u32(1), u64(1))], 0)


def test_a_redis_with_a_password_takes_it_from_the_url(tmp_path: Path) -> None:
    if REDIS is None:
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path, password="s3cret")
    try:
        program = load(COUNTER.read_bytes())
        assert registry(server.url).update(KEY, program, "counts", [(u32(1), u64(1))], 0)[1]
        wrong = registry(server.url.replace("s3cret", "wrong"))
        with pytest.raises(StateStoreUnavailable, match="unavailable: reading state"):
            wrong.read(KEY)
    finally:
        server.kill()


@contextlib.contextmanager
def two_servers(
    redis_server: RedisServer, tmp_path: Path, *flags: str
) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """Two `bpfexec serve` processes sharing modules and states on `redis_server`."""
    shared = ("--store", redis_server.url, "--state-store", redis_server.url, *flags)
    one = ServerProcess(tmp_path / "one.log", *shared)
    try:
        two = ServerProcess(tmp_path / "two.log", *shared)
        try:
            yield one, two
        finally:
            two.kill()
    finally:
        one.kill()


def test_two_servers_keep_one_exact_counter_under_concurrent_load(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    threads, each, batch = 4, 25, 60
    answers: list[int] = []
    errors: list[BaseException] = []

    def hammer(address: str, module: str) -> None:
        try:
            with Client(address, timeout=TIMEOUT) as client:
                for _ in range(each):
                    answers.append(client.execute(module, "count", [7], state="s").return_value)
                results = client.execute_batch(module, "count", [[7]] * batch, state="s")
                answers.extend(result.return_value for result in results)
        except BaseException as exc:  # reported below
            errors.append(exc)

    with two_servers(redis_server, tmp_path) as (one, two):
        with Client(one.address, timeout=TIMEOUT) as client:
            module = client.load(COUNTER.read_bytes(), "counter.o").id
        workers = [
            threading.Thread(target=hammer, args=(server.address, module))
            for server in (one, two)
            for _ in range(threads)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=120)
        assert not errors, errors
        total = 2 * threads * (each + batch)
        # One request at a time: every count from 1 to the total answered once.
        assert sorted(answers) == list(range(1, total + 1))
        with Client(two.address, timeout=TIMEOUT) as client:
            state = client.get_state(module, "s")
            assert int.from_bytes(dict(state.maps["counts"].entries)[u32(7)], "little") == total
            assert [s.name for s in client.list_states(module)] == ["s"]


def test_redis_restarting_under_load_loses_no_acknowledged_change(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    acknowledged, refused = [0], [0]
    stop = threading.Event()
    errors: list[BaseException] = []

    def hammer(address: str, module: str) -> None:
        with Client(address, timeout=TIMEOUT) as client:
            while not stop.is_set():
                try:
                    client.execute(module, "count", [3], state="s")
                    acknowledged[0] += 1
                except Unavailable as exc:
                    assert "state store (Redis) is unavailable" in str(exc)
                    refused[0] += 1
                    time.sleep(0.01)
                except BaseException as exc:  # reported below
                    errors.append(exc)
                    return

    with two_servers(redis_server, tmp_path) as (one, two):
        with Client(one.address, timeout=TIMEOUT) as client:
            module = client.load(COUNTER.read_bytes(), "counter.o").id
            client.execute(module, "count", [3], state="s")
            acknowledged[0] += 1
        workers = [
            threading.Thread(target=hammer, args=(server.address, module))
            for server in (one, two, one, two)
        ]
        for worker in workers:
            worker.start()
        wait_until(lambda: acknowledged[0] > 50, timeout=TIMEOUT, what="load")
        redis_server.kill()
        wait_until(lambda: refused[0] > 0, timeout=TIMEOUT, what="refusals")
        redis_server.start()
        before = acknowledged[0]
        wait_until(lambda: acknowledged[0] > before + 50, timeout=TIMEOUT, what="recovery")
        stop.set()
        for worker in workers:
            worker.join(timeout=TIMEOUT)
        assert not errors, errors
        with Client(two.address, timeout=TIMEOUT) as client:
            found = dict(client.get_state(module, "s").maps["counts"].entries)
        count = int.from_bytes(found[u32(3)], "little")
        # Every acknowledged execution is there; a refused one may have committed
        # just before Redis went away, its answer lost with the connection.
        assert acknowledged[0] <= count <= acknowledged[0] + refused[0]


def test_a_server_killed_holding_a_state_leaves_it_as_if_its_request_never_ran(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    with two_servers(redis_server, tmp_path, "--state-lease-seconds", "1") as (one, two):
        with Client(one.address, timeout=TIMEOUT) as client:
            module = client.load(COUNTER.read_bytes(), "counter.o").id
            assert client.execute(module, "count", [5], state="s").return_value == 1
        ran, done = threading.Event(), threading.Event()

        def inputs() -> Iterator[list[int]]:  # one message of inputs, then a batch left open
            yield from [[5]] * 1500
            done.wait(TIMEOUT)

        def batch() -> None:  # runs on server one until it is killed
            with contextlib.suppress(Exception), Client(one.address, timeout=TIMEOUT) as client:
                for n, _ in enumerate(client.execute_batch(module, "count", inputs(), state="s")):
                    if n == 1000:
                        ran.set()  # the batch has counted on its copy of the state

        worker = threading.Thread(target=batch)
        worker.start()
        assert ran.wait(TIMEOUT)
        with Client(two.address, timeout=TIMEOUT) as client:
            with pytest.raises(DeadlineExceeded):  # held by the batch on server one
                client.execute(module, "count", [5], state="s", timeout=0.3)
            one.kill()
            start = time.monotonic()
            # Once the lease has expired: the count the batch never committed.
            assert client.execute(module, "count", [5], state="s").return_value == 2
            assert time.monotonic() - start < 5
        done.set()
        worker.join(timeout=TIMEOUT)
