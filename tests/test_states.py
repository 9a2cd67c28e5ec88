"""Named states end to end: a real server on a free localhost port, the real clients.

The programs are libbpf-style objects: tests/fixtures/maps/counter.o (a hash
map `counts` of u32 -> u64 and an array `totals`; `count(key)` adds one to
`counts[key]` and to `totals[0]` and returns the new count) and
tests/fixtures/states/atomic.o (`hit()` adds one to `hits[0]` atomically).
Each test says what it sends and what it expects back.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
import threading
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import grpc
import pytest
from server_process import ServerProcess
from support import free_port, wait_until

from bpfexec.client.aio import AsyncClient
from bpfexec.client.cli import main
from bpfexec.client.client import BPF_ANY, BPF_EXIST, BPF_NOEXIST, Client
from bpfexec.client.errors import InvalidArgument, NotFound, ResourceExhausted
from bpfexec.client.types import Event as ClientEvent
from bpfexec.client.types import Module
from bpfexec.server.app import RunningServer, serve_in_thread
from bpfexec.server.settings import Settings
from bpfexec.vm import HelperRegistry, load
from bpfexec.vm.helpers import Event, HelperContext
from bpfexec.vm.machine import execute
from bpfexec.vm.maps import MapSet

ROOT = Path(__file__).resolve().parent.parent
COUNTER = ROOT / "tests" / "fixtures" / "maps" / "counter.o"
ATOMIC = ROOT / "tests" / "fixtures" / "states" / "atomic.o"
TIMEOUT = 20.0
ENOENT, E2BIG, EEXIST, EINVAL = 2, 7, 17, 22
COUNTER_MAP_BYTES = 1024 * 8 + 4 * 8  # counts: 1024 u64 values, totals: 4


def u32(n: int) -> bytes:
    return n.to_bytes(4, "little")


def u64(n: int) -> bytes:
    return n.to_bytes(8, "little")


# A helper that submits r1 as an 8-byte ring buffer record of map "events", as the
# ring buffer helpers do (HelperContext.emit): the events path without a ring buffer.
def emit_u64(ctx: HelperContext, r1: int, *_: int) -> int:
    ctx.emit(Event("events", u64(r1)))
    return 0


EMITTING = HelperRegistry()
EMITTING.register(emit_u64, id=500, name="emit_u64")


EMIT_TWO = b"r1 = 7\ncall 500\nr1 = 8\ncall 500\nr0 = 0\nexit\n"
EMIT_THEN_CALL_600 = b"r1 = 7\ncall 500\ncall 600\nr1 = 9\ncall 500\nexit\n"


def settings(**changes: object) -> Settings:
    base = Settings(
        port=0,
        metrics_port=0,
        entry_point_helpers=False,
        engine="interpreter",
        helpers=("test_states:EMITTING",),
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    with serve_in_thread(settings()) as running:
        yield running


@pytest.fixture
def client(server: RunningServer) -> Iterator[Client]:
    with Client(server.address, timeout=TIMEOUT) as c:
        yield c


@pytest.fixture
def counter(client: Client) -> Iterator[Module]:
    """counter.o loaded; the states a test makes are deleted after it."""
    module = client.load(COUNTER.read_bytes(), "counter.o")
    yield module
    for state in client.list_states(module):
        client.delete_state(module, state.name)


# Executions on states


def test_executions_on_one_state_accumulate_and_states_are_independent(
    client: Client, counter: Module
) -> None:
    runs = [("a", 7), ("a", 7), ("b", 7), ("a", 7), ("b", 3), (None, 7), (None, 7)]
    returned = [
        client.execute(counter, "count", [key], state=state).return_value for state, key in runs
    ]
    # `a` counts key 7 three times, `b` once; without a state every run starts afresh.
    assert returned == [1, 2, 1, 3, 1, 1, 1]
    a = client.get_state(counter, "a")
    assert a.maps["counts"].entries == ((u32(7), u64(3)),)
    assert a.maps["totals"].entries == ((u32(0), u64(3)),)
    b = client.get_state(counter, "b", "counts")
    assert list(b.maps) == ["counts"]
    assert b.maps["counts"].entries == ((u32(7), u64(1)), (u32(3), u64(1)))


def test_dump_maps_has_the_local_shape(client: Client, counter: Module) -> None:
    program = load(COUNTER.read_bytes(), "counter.o")
    maps = MapSet(program.maps)
    for _ in range(2):
        local = execute(program, "count", [7], maps=maps).to_dict()
    local["maps"] = maps.dump()
    for _ in range(2):
        remote = client.execute(
            counter,
            "count",
            [7],
            state="dumped",
            dump_maps=True,
        ).to_dict()
    for shown in (local, remote):
        shown.pop("duration_ns")
    assert remote == local
    assert list(remote) == list(local)  # the same keys in the same order
    fresh = client.execute(counter, "count", [1], dump_maps=True)
    assert fresh.maps is not None and fresh.maps["counts"].entries == ((u32(1), u64(1)),)
    assert "maps" not in client.execute(counter, "count", [1]).to_dict()


# The state RPCs


def test_seeding_before_the_first_execution(client: Client, counter: Module) -> None:
    assert client.update_state(counter, "seeded", "counts", {u32(7): u64(40)}) == [0]
    assert client.execute(counter, "count", [7], state="seeded").return_value == 41
    [listed] = client.list_states(counter)
    assert (listed.name, listed.map_bytes, listed.map_names) == (
        "seeded",
        COUNTER_MAP_BYTES,
        ("counts", "totals"),
    )


# One state, these steps in order: (map, operation, keys or entries, flags, results).
ERRNO_STEPS: list[tuple[str, str, Any, int, list[int]]] = [
    ("counts", "update", [(u32(1), u64(5))], BPF_ANY, [0]),
    ("counts", "update", [(u32(1), u64(5))], BPF_NOEXIST, [-EEXIST]),
    ("counts", "update", [(u32(2), u64(5))], BPF_EXIST, [-ENOENT]),
    ("counts", "update", [(u32(1), u64(6))], BPF_EXIST, [0]),
    ("counts", "update", [(u32(1), u64(5))], 8, [-EINVAL]),
    ("counts", "delete", [u32(2)], 0, [-ENOENT]),
    ("counts", "delete", [u32(1), u32(1)], 0, [0, -ENOENT]),
    ("totals", "update", [(u32(3), u64(9)), (u32(4), u64(9))], BPF_ANY, [0, -E2BIG]),
    ("totals", "update", [(u32(0), u64(9))], BPF_NOEXIST, [-EEXIST]),
    ("totals", "delete", [u32(0)], 0, [-EINVAL]),
]


def test_entry_updates_and_deletes_answer_the_kernels_errno(
    client: Client, counter: Module
) -> None:
    module = counter.id
    for map_name, operation, items, flags, expected in ERRNO_STEPS:
        if operation == "update":
            got = client.update_state(module, "errno", map_name, items, flags)
        else:
            got = client.delete_state_entries(module, "errno", map_name, items)
        assert got == expected, (map_name, operation, items, flags)
    maps = client.get_state(module, "errno").maps
    assert maps["counts"].entries == ()
    assert maps["totals"].entries == ((u32(3), u64(9)),)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (
            lambda c, m: c.update_state(m, "s", "counts", [(u32(1)[:3], u64(1))]),
            InvalidArgument,
            "entry 0: key of 3 bytes, but map 'counts' of state 's' takes 4-byte keys",
        ),
        (
            lambda c, m: c.update_state(m, "s", "counts", [(u32(1), b"\1")]),
            InvalidArgument,
            "entry 0: value of 1 bytes, but map 'counts' of state 's' takes 8-byte values",
        ),
        (
            lambda c, m: c.update_state(m, "s", "nope", [(u32(1), u64(1))]),
            NotFound,
            "has no map 'nope' (its maps: counts, totals)",
        ),
        (
            lambda c, m: c.update_state("sha256:" + "0" * 64, "s", "counts", []),
            NotFound,
            "module sha256:0000",
        ),
        (lambda c, m: c.get_state(m, "never"), NotFound, "no state 'never' of module"),
        (lambda c, m: c.delete_state(m, "never"), NotFound, "no state 'never' of module"),
        (
            lambda c, m: c.delete_state_entries(m, "never", "counts", [u32(1)]),
            NotFound,
            "no state 'never'",
        ),
        (lambda c, m: c.update_state(m, "", "counts", []), InvalidArgument, "state name is empty"),
        (
            lambda c, m: c.execute(m, "count", [1], state="a\nb"),
            InvalidArgument,
            "state name 'a\\nb' has control characters",
        ),
        (
            lambda c, m: c.execute(m, "count", [1], state="s" * 257),
            InvalidArgument,
            "state name of 257 bytes exceeds the limit of 256 bytes (max_name_bytes)",
        ),
    ],
)
def test_bad_state_requests_are_one_line_errors(
    client: Client, counter: Module, call: object, error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as raised:
        call(client, counter.id)  # type: ignore[operator]
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_a_bad_entry_changes_nothing(client: Client, counter: Module) -> None:
    module = counter.id
    with pytest.raises(InvalidArgument):
        client.update_state(module, "s", "counts", [(u32(1), u64(1)), (u32(2), b"short")])
    assert client.get_state(module, "s").maps["counts"].entries == ()  # created, but empty


def test_deleting_a_state_or_its_module_forgets_its_maps(client: Client, counter: Module) -> None:
    client.execute(counter, "count", [5], state="doomed")
    client.delete_state(counter, "doomed")
    assert client.execute(counter, "count", [5], state="doomed").return_value == 1
    client.delete_module(counter)
    assert client.list_states(counter) == []
    client.load(COUNTER.read_bytes())
    assert client.execute(counter, "count", [5], state="doomed").return_value == 1


def test_async_client_has_the_same_state_methods(server: RunningServer, counter: Module) -> None:
    import asyncio

    module = counter.id

    async def scenario() -> tuple[list[int], int, list[str], list[int]]:
        async with AsyncClient(server.address, timeout=TIMEOUT) as bpf:
            seeded = await bpf.update_state(module, "aio", "counts", {u32(2): u64(10)})
            result = await bpf.execute(module, "count", [2], state="aio", dump_maps=True)
            names = [state.name for state in await bpf.list_states(module)]
            deleted = await bpf.delete_state_entries(module, "aio", "counts", [u32(2)])
            await bpf.delete_state(module, "aio")
            return seeded, result.return_value, names, deleted

    assert asyncio.run(scenario()) == ([0], 11, ["aio"], [0])


# Events


def test_events_come_back_in_the_response_and_over_a_stream(client: Client) -> None:
    module = client.load(EMIT_TWO)
    result = client.execute(module)
    assert result.events == (ClientEvent("events", u64(7)), ClientEvent("events", u64(8)))
    assert result.to_dict()["events"] == [
        {"map": "events", "data": u64(7).hex()},
        {"map": "events", "data": u64(8).hex()},
    ]
    # Over ExecuteStream each event arrives as it is submitted, before the result.
    streamed = client.load(EMIT_THEN_CALL_600)
    result = client.execute(streamed, helpers={600: lambda call, *_: 0})
    assert result.events == (ClientEvent("events", u64(7)), ClientEvent("events", u64(9)))
    assert client.execute(client.load(b"r0 = 0\nexit\n")).events is None  # no ring buffer


# Limits


@pytest.mark.parametrize(
    "limits, message",
    [
        (
            {"max_state_bytes": COUNTER_MAP_BYTES - 1},
            f"its maps take {COUNTER_MAP_BYTES} bytes, more than the limit of "
            f"{COUNTER_MAP_BYTES - 1} per state (max_state_bytes)",
        ),
        ({"max_states": 1}, "its maximum of 1 states (max_states)"),
        ({"max_states_bytes": COUNTER_MAP_BYTES + 1}, "(max_states_bytes)"),
    ],
)
def test_states_beyond_the_limits_are_resource_exhausted(
    limits: dict[str, int], message: str
) -> None:
    with (
        serve_in_thread(settings(**limits)) as running,
        Client(running.address, timeout=TIMEOUT) as client,
    ):
        module = client.load(COUNTER.read_bytes())
        if "max_state_bytes" not in limits:
            client.execute(module, "count", [1], state="first")
        with pytest.raises(ResourceExhausted, match=re.escape(message)) as raised:
            client.execute(module, "count", [1], state="second")
        assert raised.value.reason == "STATE_LIMIT"
        with pytest.raises(ResourceExhausted):
            client.update_state(module, "third", "counts", {u32(1): u64(1)})
        assert client.execute(module, "count", [1]).return_value == 1  # stateless runs go on
        assert running.metrics.state_refused._value.get() == 2


def test_metrics_count_states_and_their_memory(server: RunningServer, counter: Module) -> None:
    with Client(server.address, timeout=TIMEOUT) as client:
        before = server.metrics.states._value.get()
        client.execute(counter, "count", [1], state="metered")
        assert server.metrics.states._value.get() == before + 1
        assert server.metrics.state_map_bytes._value.get() >= COUNTER_MAP_BYTES
        client.update_state(counter, "metered", "counts", {u32(2): u64(2)})
        assert server.metrics.map_operations.labels("update")._value.get() >= 1


# Tenants


def test_tenants_never_see_each_others_states(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("alice:alice-token\nbob:bob-token\n")
    shared = settings(auth_tokens_file=str(tokens), shared_modules=True)
    with (
        serve_in_thread(shared) as running,
        Client(running.address, timeout=TIMEOUT, token="alice-token") as alice,
        Client(running.address, timeout=TIMEOUT, token="bob-token") as bob,
    ):
        module = alice.load(COUNTER.read_bytes())
        assert alice.execute(module, "count", [1], state="s").return_value == 1
        assert alice.execute(module, "count", [1], state="s").return_value == 2
        assert bob.execute(module, "count", [1], state="s").return_value == 1  # bob's own
        assert [s.name for s in bob.list_states()] == ["s"]
        bob.delete_state(module, "s")
        with pytest.raises(NotFound):
            bob.get_state(module, "s")
        assert alice.get_state(module, "s").maps["counts"].entries == ((u32(1), u64(2)),)


# Concurrency


@pytest.mark.parametrize("engine", ["interpreter", "jit"])
def test_concurrent_executions_on_one_state_lose_no_update(engine: str) -> None:
    threads, runs = 8, 50
    with (
        serve_in_thread(settings(engine=engine, metrics_port=free_port())) as running,
        Client(running.address, timeout=TIMEOUT) as client,
    ):
        module = client.load(ATOMIC.read_bytes())
        if engine == "jit":  # every run native: atomics of the two engines do not mix
            cached = running.service.cache.get(module.id)
            assert cached is not None
            wait_until(lambda: "jit" in cached.program.compiled, TIMEOUT, "the JIT")
        befores: list[int] = []

        def worker() -> None:
            for _ in range(runs):
                result = client.execute(module, "hit", state="shared")
                befores.append(result.return_value)

        pool = [threading.Thread(target=worker) for _ in range(threads)]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join(TIMEOUT * 3)
        total = threads * runs
        hits = client.get_state(module, "shared").maps["hits"].entries
        assert hits == ((u32(0), u64(total)),)
        assert sorted(befores) == list(range(total))  # each run saw a distinct value


# Persistence


def test_a_restarted_server_keeps_its_states(tmp_path: Path) -> None:
    store = tmp_path / "store"
    flags = ("--store", str(store), "--engine", "interpreter")
    first = ServerProcess(tmp_path / "first.log", *flags)
    try:
        with Client(first.address, timeout=TIMEOUT) as client:
            module = client.load(COUNTER.read_bytes())
            for key in (7, 7, 3):
                client.execute(module, "count", [key], state="kept")
            client.update_state(module, "seeded", "counts", {u32(1): u64(100)})
            client.execute(module, "count", [7], state="gone")
            client.delete_state(module, "gone")
    finally:
        first.kill()  # no graceful shutdown: every acknowledged change is already on disk
    second = ServerProcess(tmp_path / "second.log", *flags)
    try:
        with Client(second.address, timeout=TIMEOUT) as client:
            assert [s.name for s in client.list_states()] == ["kept", "seeded"]
            kept = client.get_state(module.id, "kept")
            assert kept.maps["counts"].entries == ((u32(7), u64(2)), (u32(3), u64(1)))
            assert kept.maps["totals"].entries == ((u32(0), u64(3)),)
            assert client.execute(module.id, "count", [7], state="kept").return_value == 3
            assert client.execute(module.id, "count", [1], state="seeded").return_value == 101
    finally:
        second.kill()
    files = sorted((store / "states").glob("*.json"))
    assert len(files) == 2
    saved = [json.loads(path.read_text()) for path in files]
    assert {state["name"] for state in saved} == {"kept", "seeded"}
    assert all(state["format"] == "bpfexec-state/1" for state in saved)


# The command line


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        status = main(list(argv))
    return status, out.getvalue(), err.getvalue()


def test_the_cli_runs_on_a_state_and_dumps_its_maps(server: RunningServer) -> None:
    address = server.address
    for expected in (1, 2):
        status, out, err = run_cli(
            "run", str(COUNTER), "--function", "count", "--arg", "7",
            "--state", "cli", "--server", address, "--dump-maps", "--json",
        )  # fmt: skip
        assert (status, err) == (0, "")
        shown = json.loads(out)
        assert shown["return_value"] == expected
    assert shown["maps"]["counts"] == {
        "type": "hash", "key_size": 4, "value_size": 8, "max_entries": 1024,
        "entries": [{"key": "07000000", "value": "0200000000000000"}],
    }  # fmt: skip
    status, out, _ = run_cli("state", "list", "--server", address, "--json")
    assert status == 0 and "cli" in [state["name"] for state in json.loads(out)]
    status, out, _ = run_cli(
        "state", "show", "cli", "--module", str(COUNTER), "--server", address, "--map", "counts"
    )
    assert (status, out) == (0, "map counts (hash, 1 entries):\n  07000000: 0200000000000000\n")
    delete = ("state", "delete", "cli", "--module", str(COUNTER), "--server", address)
    assert run_cli(*delete)[0] == 0
    status, _, err = run_cli(*delete)
    assert status == 2 and "no state 'cli' of module" in err


def test_state_without_server_is_a_usage_error() -> None:
    status, out, err = run_cli("run", str(COUNTER), "--function", "count", "--state", "s")
    assert (status, out) == (2, "")
    assert err == (
        "bpfexec run: error: --state needs --server (named states live on a server; "
        "locally, --repeat N runs N times on the same maps)\n"
    )


def test_grpc_status_of_a_missing_state_is_not_found(server: RunningServer) -> None:
    from bpfexec._pb.bpfexec.v1 import executor_pb2 as pb
    from bpfexec._pb.bpfexec.v1 import executor_pb2_grpc as pb_grpc

    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ExecutorStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.GetState(pb.GetStateRequest(module_id="sha256:x", state="s"), timeout=TIMEOUT)
    assert raised.value.code() is grpc.StatusCode.NOT_FOUND


def test_a_ring_buffer_programs_events_have_the_local_shape(client: Client) -> None:
    ringbuf = ROOT / "tests" / "fixtures" / "maps" / "ringbuf.o"
    program = load(ringbuf.read_bytes(), "ringbuf.o")
    module = client.load(ringbuf.read_bytes(), "ringbuf.o")
    for args in ([2], [0]):  # records, and none: "events" is there either way
        local = execute(program, "produce", args).to_dict()
        unary = client.execute(module, "produce", args).to_dict()
        # Over a stream the events arrive one by one before the result.
        streamed = client.execute(module, "produce", args, helpers={999: lambda call, *_: 0})
        for shown in (local, unary):
            shown.pop("duration_ns")
        assert unary == local
        assert streamed.to_dict()["events"] == local["events"]


def test_stored_entries_fill_a_map_back_in_order() -> None:
    """What the store keeps of a queue and a stack (`entries()`, in pop order) puts
    them back as they were: a stack is not reversed by being pushed again."""
    from bpfexec.server.states import fill_map
    from bpfexec.vm.loader import load
    from bpfexec.vm.maps import MapSet

    program = load((ROOT / "tests" / "fixtures" / "maps" / "queue.o").read_bytes(), name="queue.o")
    before, after = MapSet(program.maps), MapSet(program.maps)
    for bpf_map in before.maps:
        for n in (1, 2, 3):
            assert bpf_map.update(b"", n.to_bytes(bpf_map.spec.value_size, "little"), 0) == 0
    for old, new in zip(before.maps, after.maps, strict=True):
        fill_map(new, old.entries())
    assert after.dump() == before.dump()


def test_an_evicted_modules_state_is_still_read_and_updated() -> None:
    # A cache of one module: loading another evicts counter.o, not its state.
    with (
        serve_in_thread(settings(cache_max_modules=1)) as running,
        Client(running.address, timeout=TIMEOUT) as client,
    ):
        module = client.load(COUNTER.read_bytes(), "counter.o").id
        assert client.update_state(module, "kept", "counts", [(u32(1), u64(5))]) == [0]
        client.load(b"r0 = 1\nexit\n", "other.s")
        with pytest.raises(NotFound, match="not cached"):
            client.execute(module, "count", [1], state="kept")
        assert client.update_state(module, "kept", "counts", [(u32(2), u64(6))]) == [0]
        found = dict(client.get_state(module, "kept").maps["counts"].entries)
        assert found == {u32(1): u64(5), u32(2): u64(6)}
        with pytest.raises(NotFound, match="not cached"):  # a new state needs its module
            client.update_state(module, "new", "counts", [(u32(1), u64(1))])
