"""The map types beyond arrays and hashes (`bpfexec.vm.maps`): queue, stack,
ring buffer, LPM trie, program array and maps of maps, with the kernel's
semantics and errno results; unit tests of each, then libbpf-style programs on
both engines and from the command line.

The programs are tests/fixtures/maps/{queue,ringbuf,lpm,inner}.c; they are
compiled here when clang and libbpf-dev are installed, and the committed
objects stand in otherwise.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import CompileDirectory

from bpfexec import vm
from bpfexec.vm.errors import LoadError, TrapKind
from bpfexec.vm.helpers import Event
from bpfexec.vm.loader import load
from bpfexec.vm.maps import (
    BPF_ANY,
    BPF_EXIST,
    BPF_NOEXIST,
    E2BIG,
    EAGAIN,
    EEXIST,
    EINVAL,
    ENOENT,
    ENOSPC,
    MapSet,
    check_definitions,
    map_bytes,
    map_handle,
)

FIXTURES = Path(__file__).parent / "fixtures" / "maps"
MASK64 = (1 << 64) - 1
QUEUE, STACK, RINGBUF, LPM_TRIE = 22, 23, 27, 11
PROG_ARRAY, ARRAY_OF_MAPS, HASH_OF_MAPS, ARRAY, HASH = 3, 12, 13, 2, 1
NO_PREALLOC = 1


@pytest.fixture(scope="module")
def objects(libbpf_objects: CompileDirectory) -> Path:
    """The fixtures compiled here (clang and libbpf-dev), else the committed objects."""
    return libbpf_objects(FIXTURES)


def program(objects: Path, name: str) -> vm.Program:
    return load((objects / f"{name}.o").read_bytes(), name=f"{name}.o")


class Spec:
    def __init__(self, type: int, key_size: int, value_size: int, max_entries: int,
                 map_flags: int = 0, name: str = "", inner: Any = None) -> None:  # fmt: skip
        self.name = name or f"m{type}"
        self.type, self.key_size, self.value_size = type, key_size, value_size
        self.max_entries, self.map_flags, self.inner = max_entries, map_flags, inner


def u32(n: int) -> bytes:
    return n.to_bytes(4, "little")


def ipv4(text: str, prefixlen: int = 32) -> bytes:
    """An LPM key: prefixlen, then the address in network order."""
    return u32(prefixlen) + bytes(int(part) for part in text.split("."))


def ip(text: str) -> int:
    return int.from_bytes(ipv4(text)[4:], "big")


# -- definitions ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (Spec(QUEUE, 4, 4, 8), "a queue's key_size must be 0"),
        (Spec(STACK, 0, 0, 8), "value_size must be positive"),
        (Spec(RINGBUF, 0, 0, 6000), "must be a power of 2 and a multiple of 4096, got 6000"),
        (Spec(RINGBUF, 0, 0, 2048), "must be a power of 2 and a multiple of 4096, got 2048"),
        (Spec(RINGBUF, 4, 0, 4096), "a ring buffer's key_size and value_size must be 0"),
        (Spec(LPM_TRIE, 8, 4, 16), "needs map_flags BPF_F_NO_PREALLOC (1)"),
        (Spec(LPM_TRIE, 4, 4, 16, NO_PREALLOC), "key_size must be 4 (prefixlen) + 1 to 256"),
        (Spec(LPM_TRIE, 261, 4, 16, NO_PREALLOC), "data bytes, got 261"),
        (Spec(PROG_ARRAY, 4, 8, 4), "a prog_array's value_size must be 4 (an id)"),
        (Spec(ARRAY_OF_MAPS, 8, 4, 4), "an array's key_size must be 4"),
        (Spec(HASH_OF_MAPS, 4, 0, 4), "a hash_of_maps's value_size must be 4"),
        (Spec(30, 0, 4, 4), "type bloom_filter (30) is not supported"),
    ],
)
def test_bad_definitions_are_one_line_errors(spec: Spec, message: str) -> None:
    with pytest.raises(LoadError, match=re.escape(message)) as caught:
        check_definitions([spec], "x.o")
    assert str(caught.value).startswith(f"x.o: map {spec.name!r}: ")
    assert "\n" not in str(caught.value)


def test_map_bytes_counts_every_type() -> None:
    specs = [Spec(QUEUE, 0, 8, 10), Spec(RINGBUF, 0, 0, 8192), Spec(LPM_TRIE, 8, 4, 16, 1),
             Spec(PROG_ARRAY, 4, 4, 5), Spec(HASH_OF_MAPS, 4, 4, 3)]  # fmt: skip
    check_definitions(specs, "x.o")
    assert map_bytes(specs) == 80 + 8192 + 64 + 20 + 12


# -- queues and stacks ---------------------------------------------------------------------


@pytest.mark.parametrize(("type", "popped"), [(QUEUE, [2, 3, 4]), (STACK, [4, 3, 2])])
def test_queue_and_stack_semantics(type: int, popped: list[int]) -> None:
    (queue,) = MapSet([Spec(type, 0, 4, 3)]).maps
    assert queue.pop() is None and queue.peek() is None  # type: ignore[attr-defined]
    assert [queue.update(b"", u32(v), BPF_ANY) for v in (1, 2, 3)] == [0, 0, 0]  # a push
    assert queue.update(b"", u32(4), BPF_ANY) == -E2BIG  # full
    assert queue.update(b"", u32(4), BPF_NOEXIST) == -EINVAL
    assert queue.update(b"", u32(4), 3) == -EINVAL
    assert queue.update(b"", u32(4), BPF_EXIST) == 0  # drops the oldest, 1, for both
    assert queue.lookup(b"") is None and queue.find(b"") == 0
    assert queue.delete(b"") == -EINVAL
    assert queue.dump()["entries"] == [{"key": "", "value": u32(v).hex()} for v in popped]
    assert queue.peek() == u32(popped[0])  # type: ignore[attr-defined]
    assert [queue.pop() for _ in range(4)] == [*map(u32, popped), None]  # type: ignore[attr-defined]


# -- LPM tries --------------------------------------------------------------------------


def test_lpm_trie_semantics() -> None:
    (trie,) = MapSet([Spec(LPM_TRIE, 8, 1, 3, NO_PREALLOC)]).maps
    assert trie.update(ipv4("10.0.0.0", 8), b"\x01", BPF_ANY) == 0
    assert trie.update(ipv4("10.1.0.0", 16), b"\x02", BPF_NOEXIST) == 0
    assert trie.update(ipv4("10.1.255.255", 16), b"\x03", BPF_NOEXIST) == -EEXIST  # same /16
    assert trie.update(ipv4("10.2.0.0", 16), b"\x03", BPF_EXIST) == -ENOENT
    assert trie.update(ipv4("10.1.2.0", 33), b"\x03", BPF_ANY) == -EINVAL
    assert trie.update(ipv4("10.1.2.0", 24), b"\x03", 4) == -EINVAL
    assert trie.update(ipv4("10.1.2.0", 24), b"\x03", BPF_ANY) == 0
    assert trie.update(ipv4("0.0.0.0", 0), b"\x09", BPF_ANY) == -ENOSPC  # full
    assert trie.update(ipv4("10.1.0.0", 16), b"\x04", BPF_EXIST) == 0  # replacing fits

    def match(address: str, prefixlen: int = 32) -> bytes | None:
        slot = trie.lookup(ipv4(address, prefixlen))
        return None if slot is None else trie.value(slot)

    assert [match(a) for a in ("10.1.2.3", "10.1.3.4", "10.9.9.9", "11.0.0.1")] == [
        b"\x03", b"\x04", b"\x01", None
    ]  # fmt: skip
    assert match("10.1.2.3", 20) == b"\x04"  # the key's own prefixlen bounds the match
    assert trie.delete(ipv4("10.1.0.0", 24)) == -ENOENT  # exact prefixes only
    assert trie.delete(ipv4("10.1.0.0", 40)) == -EINVAL
    assert trie.delete(ipv4("10.1.9.9", 16)) == 0
    assert match("10.1.3.4") == b"\x01"
    assert [key for key, _ in trie.entries()] == [ipv4("10.0.0.0", 8), ipv4("10.1.2.0", 24)]


# -- program arrays and maps of maps ---------------------------------------------------------


def test_a_program_array_holds_opaque_ids() -> None:
    (programs,) = MapSet([Spec(PROG_ARRAY, 4, 4, 4)], init=[(0, 2, 77)]).maps
    assert [programs.id_at(i) for i in (0, 2, 4)] == [0, 77, 0]
    assert programs.update(u32(1), u32(5), BPF_ANY) == 0 and programs.id_at(1) == 5
    assert programs.update(u32(1), u32(5), BPF_EXIST) == -EINVAL  # only BPF_ANY
    assert programs.update(u32(4), u32(5), BPF_ANY) == -E2BIG
    assert programs.update(u32(1), u32(0), BPF_ANY) == -EINVAL
    assert programs.find(u32(1)) == 0  # not for programs
    assert programs.delete(u32(1)) == 0 and programs.delete(u32(1)) == -ENOENT
    assert programs.delete(u32(9)) == -E2BIG
    assert programs.entries() == [(u32(2), u32(77))]
    assert len(programs.values) == 0  # out of the programs' reach


def test_maps_of_maps_hold_matching_inner_maps() -> None:
    template = Spec(ARRAY, 4, 8, 4, name="template")
    maps = MapSet([
        Spec(ARRAY, 4, 8, 4, name="a"), Spec(ARRAY, 4, 8, 9, name="too_big"),
        Spec(HASH, 4, 8, 4, name="hash"),
        Spec(ARRAY_OF_MAPS, 4, 4, 2, name="outer", inner=template),
        Spec(HASH_OF_MAPS, 8, 4, 1, name="by_name"),
    ], init=[(3, 1, 1)]).maps  # fmt: skip
    outer, by_name = maps[3], maps[4]
    assert outer.find(u32(1)) == map_handle(0) and outer.find(u32(0)) == 0
    assert outer.id_at(1) == 1 and outer.lookup(u32(0)) is None
    assert outer.update(u32(0), u32(2), BPF_ANY) == -EINVAL  # max_entries differs
    assert outer.update(u32(0), u32(3), BPF_ANY) == -EINVAL  # not an array
    assert outer.update(u32(0), u32(4), BPF_ANY) == -EINVAL  # holds ids itself
    assert outer.update(u32(0), u32(9), BPF_ANY) == -EINVAL  # no such map
    assert outer.program_update(u32(0), u32(1), BPF_ANY) == -EINVAL
    assert outer.program_delete(u32(1)) == -EINVAL
    assert outer.update(u32(0), u32(1), BPF_ANY) == 0 and outer.find(u32(0)) == map_handle(0)
    assert outer.delete(u32(0)) == 0 and outer.delete(u32(0)) == -ENOENT
    # Without a template (a definition not from BTF), any map that holds no ids.
    assert by_name.update(b"interior", u32(3), BPF_NOEXIST) == 0
    assert by_name.update(b"interior", u32(2), BPF_NOEXIST) == -EEXIST
    assert by_name.update(b"exterior", u32(2), BPF_ANY) == -E2BIG  # full
    assert by_name.find(b"interior") == map_handle(2)
    assert by_name.dump()["entries"] == [{"key": b"interior".hex(), "value": u32(3).hex()}]


def test_initial_contents_that_do_not_fit_are_load_errors() -> None:
    with pytest.raises(LoadError, match=r"map 'outer': element 0 cannot hold id 1 \(errno 22\)"):
        outer = Spec(ARRAY_OF_MAPS, 4, 4, 1, name="outer", inner=Spec(ARRAY, 4, 4, 1))
        MapSet([Spec(HASH, 4, 4, 1), outer], init=[(1, 0, 1)])


# -- programs on both engines -----------------------------------------------------------


def events(*records: tuple[int, int]) -> list[dict[str, str]]:
    return [{"map": "events", "data": (u32(a) + u32(b)).hex()} for a, b in records]


def test_ring_buffer_records_are_the_runs_events_in_order(objects: Path, engine: str) -> None:
    prog = program(objects, "ringbuf")
    result = vm.execute(prog, "produce", [4], engine=engine, maps=MapSet(prog.maps))
    assert result.trap is None and result.return_value == 4
    assert result.to_dict()["events"] == events((0, 0), (1, 10), (2, 20), (3, 30))
    assert result.events == tuple(Event("events", u32(i) + u32(i * 10)) for i in range(4))
    assert MapSet(prog.maps).dump()["events"]["entries"] == []


def test_a_discarded_reservation_is_no_event_but_takes_room(objects: Path, engine: str) -> None:
    result = vm.execute(program(objects, "ringbuf"), "discard", engine=engine)
    assert result.trap is None
    assert result.return_value == 32 << 32 | 4096  # two records of 8 + 8 bytes; the size
    assert result.to_dict()["events"] == events((7, 70))


@pytest.mark.parametrize(
    ("size", "expected", "sent"),
    [
        (4072, 1 | 2 | EAGAIN << 8, 0),  # 8 + 4072 bytes leave 16: the kernel keeps 8 free
        (4056, 1 | EAGAIN << 8, 0),  # room for one more record of 16, then none
        (4088, 0, 1),  # a record as big as the ring never fits; the small ones then do
    ],
)
def test_a_full_ring_refuses_records(
    objects: Path, engine: str, size: int, expected: int, sent: int
) -> None:
    result = vm.execute(program(objects, "ringbuf"), "overflow", [size], engine=engine)
    assert result.trap is None and result.return_value == expected
    assert len(result.events or ()) == sent


def test_each_run_has_a_ring_of_its_own(objects: Path, engine: str) -> None:
    """255 records of 16 bytes fill a 4096-byte ring, in every run; concurrent runs
    sharing the maps neither see nor take each other's room."""
    prog = program(objects, "ringbuf")
    maps = MapSet(prog.maps)
    results: list[vm.Result] = []

    def run() -> None:
        for _ in range(5):
            results.append(vm.execute(prog, "produce", [300], engine=engine, maps=maps))

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 20
    for result in results:
        assert result.trap is None and result.return_value == 255
        assert [int.from_bytes(e.data[:4], "little") for e in result.events or ()] == list(
            range(255)
        )


def test_submitting_what_was_not_reserved_traps(objects: Path, engine: str) -> None:
    trap = vm.execute(program(objects, "ringbuf"), "bad_submit", engine=engine).trap
    assert trap is not None and trap.kind == TrapKind.HELPER_ERROR
    assert "is not a ring buffer reservation open in this run" in trap.message


@pytest.mark.parametrize(
    ("function", "expected"),
    [
        # -E2BIG, the peek, three pops, -ENOENT: the oldest (1) was overwritten
        ("queue_order", [E2BIG, 2, 2, 3, 4, ENOENT]),
        ("stack_order", [E2BIG, 4, 4, 3, 2, ENOENT]),
    ],
)
def test_queue_and_stack_programs(
    objects: Path, engine: str, function: str, expected: list[int]
) -> None:
    result = vm.execute(program(objects, "queue"), function, engine=engine)
    assert result.trap is None
    assert list(result.return_value.to_bytes(6, "big")) == expected


def test_update_pushes_and_the_dump_is_in_pop_order(objects: Path, engine: str) -> None:
    prog = program(objects, "queue")
    maps = MapSet(prog.maps)
    assert [vm.execute(prog, "push", [v], engine=engine, maps=maps).return_value
            for v in (5, 6, 7, 8)] == [0, 0, 0, -E2BIG & MASK64]  # fmt: skip
    fifo, lifo = maps.maps
    assert fifo.entries() == [(b"", u32(v)) for v in (5, 6, 7)]
    assert lifo.entries() == [(b"", u32(v)) for v in (7, 6, 5)]


def test_an_lpm_routing_table(objects: Path, engine: str) -> None:
    prog = program(objects, "lpm")
    maps = MapSet(prog.maps)

    def call(function: str, *args: int) -> int:
        result = vm.execute(prog, function, list(args), engine=engine, maps=maps)
        assert result.trap is None
        value = result.return_value
        return value - (1 << 64) if value >> 63 else value

    routes = [("10.0.0.0", 8, 1), ("10.1.0.0", 16, 2), ("10.1.2.0", 24, 3)]
    assert [call("add_route", ip(a), length, hop) for a, length, hop in routes] == [0, 0, 0]
    assert call("add_route", ip("10.0.0.0"), 33, 9) == -EINVAL
    lookups = ["10.1.2.3", "10.1.3.4", "10.200.0.1", "11.0.0.1"]
    assert [call("route", ip(a)) for a in lookups] == [3, 2, 1, -1]
    assert call("del_route", ip("10.1.0.0"), 16) == 0
    assert call("del_route", ip("10.1.0.0"), 16) == -ENOENT
    assert [call("route", ip(a)) for a in lookups] == [3, 1, 1, -1]


def test_an_array_of_maps_finds_and_updates_inner_maps(objects: Path, engine: str) -> None:
    prog = program(objects, "inner")
    assert prog.map_init == ((2, 0, 1), (2, 1, 2))  # sides[0] = left, sides[1] = right
    maps = MapSet(prog.maps, init=prog.map_init)
    bumps = [(0, 1, 5), (0, 1, 5), (1, 3, 7), (2, 0, 1), (0, 4, 1)]
    assert [vm.execute(prog, "bump", list(args), engine=engine, maps=maps).return_value
            for args in bumps] == [5, 10, 7, MASK64, MASK64 - 1]  # fmt: skip
    assert (
        vm.execute(prog, "rewire", [0], engine=engine, maps=maps).return_value
        == (-EINVAL * 100 - EINVAL) & MASK64
    )
    dump = maps.dump()
    assert dump["left"]["entries"] == [
        {"key": u32(1).hex(), "value": (10).to_bytes(8, "little").hex()}
    ]
    assert dump["right"]["entries"] == [
        {"key": u32(3).hex(), "value": (7).to_bytes(8, "little").hex()}
    ]
    assert dump["sides"]["entries"] == [
        {"key": u32(0).hex(), "value": u32(1).hex()}, {"key": u32(1).hex(), "value": u32(2).hex()}
    ]  # fmt: skip


# -- the command line -----------------------------------------------------------------


def bpfexec(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BPFEXEC_")}
    return subprocess.run([sys.executable, "-m", "bpfexec", *args], capture_output=True,
                          text=True, timeout=60, env=env)  # fmt: skip


@pytest.mark.parametrize("engine", ["interpreter", "jit"])
def test_run_prints_events_and_maps(objects: Path, engine: str) -> None:
    proc = bpfexec("run", str(objects / "ringbuf.o"), "--function", "produce", "--arg", "2",
                   "--dump-maps", "--engine", engine, "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["return_value"] == 2
    assert out["events"] == events((0, 0), (1, 10))
    assert out["maps"]["events"] == {
        "type": "ringbuf", "key_size": 0, "value_size": 0, "max_entries": 4096, "entries": [],
    }  # fmt: skip
    proc = bpfexec("run", str(objects / "queue.o"), "--function", "push", "--arg", "9",
                   "--dump-maps", "--engine", engine, "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert "events" not in out  # no ring buffer
    assert out["maps"]["fifo"]["entries"] == [{"key": "", "value": "09000000"}]
