"""Inline hash lookups of the JIT (docs/jit.md "Inline hash lookups"):
`bpf_map_lookup_elem` on a `hash` or `percpu_hash` map probes the map's
`NativeIndex` (`bpfexec.vm.maps_hash`) in native code, and must stay
indistinguishable from the interpreter's helper call: r0, fuel, traps (kind,
pc, message), helper call limits and counts, map contents, on both tiers. Each
test attacks one condition of the written argument; one runs Python writers
against native readers on other threads.

The program is tests/fixtures/jit_maps/hashes.c, compiled here when clang and
libbpf-dev are installed (the committed object otherwise).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import pytest
from conftest import CompileDirectory

pytest.importorskip("llvmlite")

from test_differential import TIERS
from test_jit_maps import Counted, python_calls

from bpfexec import vm
from bpfexec.vm.interpreter import Interpreter
from bpfexec.vm.jit import Jit, compile_program
from bpfexec.vm.jit import maps as jit_maps
from bpfexec.vm.linux_helpers import bpf_map_lookup_elem
from bpfexec.vm.loader import load
from bpfexec.vm.machine import prepare
from bpfexec.vm.machine import run as run_machine
from bpfexec.vm.maps import MapSet, map_handle
from bpfexec.vm.maps_hash import TAG, TOMBSTONE, HashMap, NativeIndex, key_hash, key_words
from bpfexec.vm.memory import STACK_BASE, buffer_base, map_base
from bpfexec.vm.program import Program

FIXTURES = Path(__file__).parent / "fixtures" / "jit_maps"
HASHED, PCPU, SMALL, LRU, WIDE, HUGE = range(6)  # the fixture's maps, in handle order
STACK_TOP = STACK_BASE + vm.Limits().stack_size


def find_twins() -> tuple[int, int]:
    """Two u32 keys whose hashes agree in all 32 bits of the tag: the same first bucket
    in every table, told apart only by comparing the keys. The hash is seeded per
    process, so they are searched for (a birthday search: about 2**16 keys)."""
    seen: dict[int, int] = {}
    for key in range(1 << 24):
        tag = key_hash(key_words(u32(key))) & TAG
        if tag in seen:
            return seen[tag], key
        seen[tag] = key
    raise AssertionError("no two keys share a tag")


def u32(n: int) -> bytes:
    return n.to_bytes(4, "little")


def u64(n: int) -> bytes:
    return n.to_bytes(8, "little")


TWINS = find_twins()


def wide_key(*words: int) -> bytes:
    return b"".join(u32(w) for w in words)


@pytest.fixture(scope="module")
def source_object(libbpf_objects: CompileDirectory) -> bytes:
    """hashes.o: compiled here (clang and libbpf-dev), else the committed one."""
    return (libbpf_objects(FIXTURES) / "hashes.o").read_bytes()


def fresh(code: bytes, tier: str) -> Program:
    """A Program whose JIT runs use `tier` (the quick one once it is compiled)."""
    program = load(code, name="hashes.o")
    if tier == "quick":
        compile_program(program, quick=True)
    return program


# A map's contents before a run: (map, key, value) inserted, or (map, key, None) deleted.
Seed = tuple[tuple[int, bytes, bytes | None], ...]


def seeded(definitions, seed: Seed) -> MapSet:
    maps = MapSet(definitions)
    for n, key, value in seed:
        target = maps.maps[n]
        assert (target.update(key, value, 0) if value is not None else target.delete(key)) == 0
    return maps


def outcome(program: Program, engine: str, function: str, args, seed: Seed = (), **kw):
    """Everything observable of one run on freshly seeded maps, their contents included."""
    maps = seeded(kw.pop("definitions", program.maps), seed)
    result = vm.execute(program, function, args, engine=engine, maps=maps, **kw)
    return {
        "r0": result.return_value,
        "fuel_used": result.fuel_used,
        "trap": result.trap.to_dict() if result.trap else None,
        "maps": maps.dump(),
    }


def both(program: Program, function: str, args, seed: Seed = (), **kw) -> dict[str, object]:
    """The outcome of the interpreter, which the JIT must match exactly."""
    expected = outcome(program, "interpreter", function, args, seed, **kw)
    assert outcome(program, "jit", function, args, seed, **kw) == expected
    return expected


def natively(program: Program) -> None:
    """Assert the JIT runs `program` natively, with hash lookups it may inline."""
    compiled = program.compiled.get("jit") or program.compiled.get("jit.quick")
    assert compiled is not None and compiled.native, compiled and compiled.fallback
    assert compiled.fast is not None and compiled.fast.inline_lookups
    assert [h.index for h in compiled.fast.inline_hashes] == sorted([HASHED, PCPU, SMALL, WIDE])


ONE = u64(1)
TWIN_SEED: Seed = tuple((HASHED, u32(k), u64(k)) for k in TWINS)
CASES = [
    # (function, arguments, seed, what r0 is)
    ("get", [5], ((HASHED, u32(5), ONE),), map_base(HASHED)),
    ("get", [6], ((HASHED, u32(5), ONE),), 0),
    ("get", [(1 << 32) + 5], ((HASHED, u32(5), ONE),), map_base(HASHED)),  # the u32 key
    ("get", [9], tuple((HASHED, u32(k), ONE) for k in range(10)), map_base(HASHED) + 72),
    ("get", [TWINS[1]], TWIN_SEED, map_base(HASHED) + 8),  # past its twin's bucket
    ("get", [TWINS[0]], TWIN_SEED, map_base(HASHED)),
    ("get", [TWINS[1]], (*TWIN_SEED, (HASHED, u32(TWINS[0]), None)), map_base(HASHED) + 8),
    ("get", [TWINS[0]], (*TWIN_SEED, (HASHED, u32(TWINS[0]), None)), 0),  # a tombstone
    ("get", [TWINS[0]], ((HASHED, u32(TWINS[1]), ONE),), 0),  # the same tag, not the key
    (
        "get",
        [3],
        ((HASHED, u32(3), ONE), (HASHED, u32(3), None), (HASHED, u32(3), ONE)),
        map_base(HASHED),
    ),
    ("get", [60], tuple((HASHED, u32(k), ONE) for k in range(64)), map_base(HASHED) + 480),
    ("pick", [1, 7], ((PCPU, u32(2), bytes(12)), (PCPU, u32(7), bytes(12))), map_base(PCPU) + 16),
    ("pick", [1, 2], ((PCPU, u32(2), bytes(12)),), map_base(PCPU)),
    ("pick", [1, 3], ((PCPU, u32(2), bytes(12)),), 0),
    ("pick", [2, 3], tuple((SMALL, u32(k), ONE) for k in range(4)), map_base(SMALL) + 24),
    ("pick", [2, 4], tuple((SMALL, u32(k), ONE) for k in range(4)), 0),  # full, absent
    ("pick", [3, 1], ((LRU, u32(1), ONE),), map_base(LRU)),  # the helper: LRU
    ("pick", [map_handle(HASHED), 5], ((HASHED, u32(5), ONE),), map_base(HASHED)),
    ("pick", [map_handle(PCPU), 5], ((PCPU, u32(5), bytes(12)),), map_base(PCPU)),
    ("pick", [map_handle(6), 1], (), "HELPER_ERROR"),  # one past the maps
    ("pick", [map_handle(HASHED) + (1 << 32), 1], (), "HELPER_ERROR"),
    ("pick", [12345, 1], (), "HELPER_ERROR"),
    ("at", [u32(7)], ((HASHED, u32(7), ONE),), map_base(HASHED)),
    ("at", [u32(7)[:3]], ((HASHED, u32(7), ONE),), "MEMORY_FAULT"),  # one byte short
    ("at", [0], (), "MEMORY_FAULT"),
    ("at", [map_handle(HASHED)], (), "MEMORY_FAULT"),
    ("at", [STACK_TOP - 4], ((HASHED, u32(0), ONE),), map_base(HASHED)),
    ("at", [STACK_TOP - 2], (), "MEMORY_FAULT"),
    ("at", [map_base(HASHED) + 4], ((HASHED, u32(9), u64(9 << 32)),), map_base(HASHED)),
    ("at", [map_base(HASHED) + 510], ((HASHED, u32(9), ONE),), "MEMORY_FAULT"),  # 2 bytes left
    ("at", [buffer_base(0)], (), "MEMORY_FAULT"),  # no buffer given
    ("get_wide", [1, 2, 3, 4, 5], ((WIDE, wide_key(1, 2, 3, 4, 5), ONE),), map_base(WIDE)),
    ("get_wide", [1, 2, 3, 4, 6], ((WIDE, wide_key(1, 2, 3, 4, 5), ONE),), 0),  # last word
    ("get_wide", [0, 2, 3, 4, 5], ((WIDE, wide_key(1, 2, 3, 4, 5), ONE),), 0),  # first word
    (
        "get_wide",
        [1, 2, 3, 4, 5],
        ((WIDE, wide_key(0, 2, 3, 4, 5), ONE), (WIDE, wide_key(1, 2, 3, 4, 5), ONE)),
        map_base(WIDE) + 8,
    ),
    ("get_huge", [7], ((HUGE, u64(7) * 9, ONE),), map_base(HUGE)),  # the helper: 72 bytes
    ("get_huge", [8], ((HUGE, u64(7) * 9, ONE),), 0),
]


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize(("function", "args", "seed", "expected"), CASES)
def test_lookups_agree(source_object, tier, function, args, seed, expected):
    program = fresh(source_object, tier)
    result = both(program, function, args, seed)
    natively(program)
    if isinstance(expected, str):
        assert result["trap"] is not None and result["trap"]["kind"] == expected
    else:
        assert result["trap"] is None and result["r0"] == expected


def test_the_twins_share_a_tag():
    first, second = (key_hash(key_words(u32(k))) & TAG for k in TWINS)
    assert first == second


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize(("n", "span"), [(0, 1), (1, 1), (40, 7), (300, 50), (2000, 64)])
def test_lookups_while_the_program_inserts_and_deletes_agree(source_object, tier, n, span):
    # Inserts grow the index during the run, deletes leave tombstones and rebuild it,
    # `small` fills up: every lookup after a change of the index sees the change.
    result = both(fresh(source_object, tier), "churn", [n, span])
    assert result["trap"] is None


@pytest.mark.parametrize("tier", TIERS)
def test_fuel_runs_out_exactly_around_hash_lookups(source_object, tier):
    program = fresh(source_object, tier)
    needed = both(program, "churn", [5, 3])["fuel_used"]
    assert isinstance(needed, int)
    for fuel in range(1, needed + 2):
        both(program, "churn", [5, 3], fuel=fuel)


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("calls", [0, 1, 2, 3, 7, 12, 13])
def test_the_helper_call_limit_counts_hash_lookups(source_object, tier, calls):
    limits = vm.Limits(max_helper_calls=calls)
    both(fresh(source_object, tier), "churn", [4, 2], limits=limits)


PRESENT: Seed = tuple((HASHED, u32(k), u64(k * 3 + 1)) for k in range(32))


@pytest.mark.parametrize("tier", TIERS)
def test_hash_lookups_enter_no_python(source_object, tier, monkeypatch):
    program = fresh(source_object, tier)
    called = python_calls(monkeypatch)
    expected = outcome(program, "interpreter", "hammer", [300, 40], PRESENT)
    assert len(called) == 300
    called.clear()
    assert outcome(program, "jit", "hammer", [300, 40], PRESENT) == expected
    natively(program)
    assert expected["r0"] == 244 and called == []  # hits and misses alike


@pytest.mark.parametrize("tier", TIERS)
def test_hash_lookups_are_counted_for_a_counting_wrapper(source_object, tier, monkeypatch):
    program = fresh(source_object, tier)

    def counted_run(engine, counter):
        machine = prepare(program, "hammer", [50, 40], maps=seeded(program.maps, PRESENT))
        for pc, helper in machine.helpers.items():
            machine.helpers[pc] = dataclasses.replace(helper, fn=counter)
        return run_machine(machine, engine)

    interpreted, native = Counted(bpf_map_lookup_elem), Counted(bpf_map_lookup_elem)
    expected = counted_run(Interpreter(), interpreted)
    called = python_calls(monkeypatch)
    result = counted_run(Jit(), native)
    assert (result.return_value, result.fuel_used) == (expected.return_value, expected.fuel_used)
    assert native.calls == interpreted.calls == 50 and not called


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize(
    "change",
    [
        {"max_entries": 32},  # the index would be right, but the slots' bound is not
        {"type": 9},  # an LRU map: its lookups write
        {"value_size": 16},  # another slot size
    ],
)
def test_maps_unlike_the_compiled_ones_take_the_helper(source_object, tier, change, monkeypatch):
    program = fresh(source_object, tier)
    definitions = [dataclasses.replace(program.maps[HASHED], **change), *program.maps[1:]]
    seed = ((HASHED, u32(5), bytes(definitions[HASHED].value_size)),)
    called = python_calls(monkeypatch)
    for key, expected in ((5, map_base(HASHED)), (6, 0)):
        result = both(program, "get", [key], seed, definitions=definitions)
        assert result["r0"] == expected
    assert len(called) == 4  # two runs on each engine, each one call


def index_of(maps: MapSet, n: int = HASHED) -> NativeIndex:
    found = maps.maps[n]
    assert isinstance(found, HashMap) and found.native is not None
    return found.native


def jit_lookup(program: Program, maps: MapSet, key: int) -> int:
    result = vm.execute(program, "get", [key], engine="jit", maps=maps)
    assert result.trap is None
    return result.return_value


def bucket_of(index: NativeIndex, key: bytes) -> int:
    """The word at which `key`'s bucket starts."""
    words, size = key_words(key), index.bucket_words
    bucket = key_hash(words) & index.mask
    while index.words[1 + bucket * size + 1 : 1 + (bucket + 1) * size].tolist() != words:
        bucket = (bucket + 1) & index.mask
    return 1 + bucket * size


@pytest.mark.parametrize("tier", TIERS)
def test_a_writer_in_progress_sends_readers_to_the_helper(source_object, tier, monkeypatch):
    # An odd version: a Python writer is changing the index (here, it has made key 5's
    # bucket name a slot it does not hold). The reader must not trust the table.
    program = fresh(source_object, tier)
    maps = seeded(program.maps, ((HASHED, u32(4), ONE), (HASHED, u32(5), ONE)))
    index = index_of(maps)
    at = bucket_of(index, u32(5))
    index.header.version += 1
    index.words[at] = index.words[at] & ~TOMBSTONE | 1  # slot 0, key 4's
    called = python_calls(monkeypatch)
    assert jit_lookup(program, maps, 5) == map_base(HASHED) + 8
    assert len(called) == 1


@pytest.mark.parametrize("tier", TIERS)
def test_a_slot_past_max_entries_is_never_an_address(source_object, tier, monkeypatch):
    # A consistent read (even version) that names a slot past the map's last: the probe
    # checks the bound and asks the helper, whose answer is the dict's.
    program = fresh(source_object, tier)
    maps = seeded(program.maps, ((HASHED, u32(5), ONE),))
    index = index_of(maps)
    at = bucket_of(index, u32(5))
    for slot in (64, 1000, TOMBSTONE - 2):
        index.words[at] = index.words[at] & ~TOMBSTONE | (slot + 1)
        called = python_calls(monkeypatch)
        assert jit_lookup(program, maps, 5) == map_base(HASHED)
        assert len(called) == 1


@pytest.mark.parametrize("tier", TIERS)
def test_a_probe_that_meets_no_empty_bucket_ends(source_object, tier, monkeypatch):
    # What a reader racing a writer might see: no empty bucket at all. It gives up
    # after as many probes as there are buckets and asks the helper.
    program = fresh(source_object, tier)
    maps = seeded(program.maps, ((HASHED, u32(5), ONE),))
    index = index_of(maps)
    for at in range(1, len(index.words), index.bucket_words):
        if index.words[at] & TOMBSTONE == 0:
            index.words[at] = TOMBSTONE
    called = python_calls(monkeypatch)
    assert jit_lookup(program, maps, 6) == 0
    assert jit_lookup(program, maps, 5) == map_base(HASHED)  # found before giving up
    assert len(called) == 1


@pytest.mark.parametrize("tier", TIERS)
def test_an_outgrown_table_stays_readable(source_object, tier):
    # Growth swaps in a new table; a reader still probing the old one reads memory that
    # is alive (the version tells it the table changed).
    program = fresh(source_object, tier)
    maps = seeded(program.maps, ((HASHED, u32(1), ONE),))
    index = index_of(maps)
    first = index.table
    for k in range(2, 40):
        maps.maps[HASHED].update(u32(k), ONE, 0)
    assert index.table is not first and first in index.retired
    assert jit_lookup(program, maps, 39) == map_base(HASHED) + 38 * 8


@pytest.mark.parametrize("tier", TIERS)
def test_without_ordered_stores_hash_lookups_call_the_helper(source_object, monkeypatch, tier):
    monkeypatch.setattr(jit_maps, "ORDERED_STORES", False)
    program = fresh(source_object, tier)
    called = python_calls(monkeypatch)
    assert both(program, "hammer", [20, 40], PRESENT)["r0"] == 20
    assert len(called) == 40
    compiled = program.compiled.get("jit") or program.compiled.get("jit.quick")
    assert compiled is not None and compiled.fast is not None
    assert not compiled.fast.inline_hashes


@pytest.mark.parametrize("tier", TIERS)
def test_python_writers_on_other_threads_never_mislead_native_readers(source_object, tier):
    # Two threads run `hammer` natively (the GIL released) on shared maps while a
    # third deletes and re-inserts the keys it looks up (each keeps its slot: the
    # writer alone frees and takes slots, last freed first taken) and inserts and
    # deletes others, growing and rebuilding the index. Every lookup must return the
    # address of its key's value (which holds the key's marker) or 0, never another
    # key's slot or an address outside the map, and no run may trap.
    program = fresh(source_object, tier)
    compile_program(program, quick=tier == "quick")
    maps = seeded(program.maps, PRESENT)
    hashed = maps.maps[HASHED]
    done = threading.Event()
    results: list[int] = []
    errors: list[BaseException] = []

    def write() -> None:
        round_ = 0
        while not done.is_set():
            key = round_ % 32
            assert hashed.delete(u32(key)) == 0
            assert hashed.update(u32(key), u64(key * 3 + 1), 0) == 0
            extra = 1000 + round_ % 24
            if hashed.delete(u32(extra)):
                assert hashed.update(u32(extra), u64(extra * 3 + 1), 0) == 0
            round_ += 1
            time.sleep(0.00005)  # the readers' fallbacks need the GIL now and then

    def read() -> None:
        try:
            for _ in range(15):
                result = vm.execute(program, "hammer", [20_000, 32], engine="jit", maps=maps)
                assert result.trap is None, result.trap
                results.append(result.return_value)
        except BaseException as exc:
            errors.append(exc)

    writer = threading.Thread(target=write)
    readers = [threading.Thread(target=read) for _ in range(2)]
    writer.start()
    for thread in readers:
        thread.start()
    for thread in readers:
        thread.join()
    done.set()
    writer.join()
    assert not errors, errors
    assert len(results) == 30
    assert all(r < 1 << 32 and r <= 20_000 for r in results), results  # no wrong marker
    assert index_of(maps).live == len(hashed.slots)
