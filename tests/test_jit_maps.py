"""Inline array lookups of the JIT (`bpfexec.vm.jit.maps`, docs/jit.md "Inline array
lookups"): `bpf_map_lookup_elem` on an array or per-CPU array runs as native
arithmetic, and must stay indistinguishable from the interpreter's helper call:
r0, fuel, traps (kind, pc, message), helper call limits and counts, map
contents, on both tiers. Each test attacks one condition the inlining rests on.

The program is tests/fixtures/jit_maps/lookups.c, compiled here when clang and
libbpf-dev are installed (the committed object otherwise); a few cases are
assembly, given the fixture's maps.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from conftest import CompileDirectory

pytest.importorskip("llvmlite")

from test_differential import TIERS

from bpfexec import vm
from bpfexec.vm.helpers import Helper, HelperRegistry
from bpfexec.vm.interpreter import Interpreter
from bpfexec.vm.jit import Jit, compile_program
from bpfexec.vm.linux_helpers import bpf_map_lookup_elem
from bpfexec.vm.loader import load
from bpfexec.vm.machine import Machine, prepare
from bpfexec.vm.machine import run as run_machine
from bpfexec.vm.maps import MapSet, map_handle
from bpfexec.vm.memory import STACK_BASE, buffer_base, map_base
from bpfexec.vm.program import Program

FIXTURES = Path(__file__).parent / "fixtures" / "jit_maps"
ARR, PCPU, HASHED = 0, 1, 2  # the fixture's maps, in handle order
STACK_TOP = STACK_BASE + vm.Limits().stack_size


@pytest.fixture(scope="module")
def source_object(libbpf_objects: CompileDirectory) -> bytes:
    """lookups.o: compiled here (clang and libbpf-dev), else the committed one."""
    return (libbpf_objects(FIXTURES) / "lookups.o").read_bytes()


def fresh(code: bytes, tier: str) -> Program:
    """A Program whose JIT runs use `tier` (the quick one once it is compiled)."""
    program = load(code, name="lookups.o")
    if tier == "quick":
        compile_program(program, quick=True)
    return program


def assembled(text: str, like: Program, tier: str, kernel: bool = True) -> Program:
    """An assembly program with `like`'s maps (and the kernel's helper numbers)."""
    program = dataclasses.replace(load(text.encode()), maps=like.maps, kernel_helpers=kernel)
    if tier == "quick":
        compile_program(program, quick=True)
    return program


def outcome(
    program: Program, engine: str, function: str | None, args, definitions=None, **kw
) -> dict[str, object]:
    """Everything observable of one run on fresh maps (of `definitions`, default the
    program's), the maps' contents included."""
    maps = MapSet(program.maps if definitions is None else definitions)
    result = vm.execute(program, function, args, engine=engine, maps=maps, **kw)
    return {
        "r0": result.return_value,
        "fuel_used": result.fuel_used,
        "trap": result.trap.to_dict() if result.trap else None,
        "buffers": result.buffers,
        "maps": maps.dump(),
    }


def both(program: Program, function: str | None, args, **kw) -> dict[str, object]:
    """The outcome of the interpreter, which the JIT must match exactly."""
    expected = outcome(program, "interpreter", function, args, **kw)
    assert outcome(program, "jit", function, args, **kw) == expected
    return expected


def natively(program: Program) -> None:
    """Assert the JIT runs `program` natively, with lookups it may inline."""
    compiled = program.compiled.get("jit") or program.compiled.get("jit.quick")
    assert compiled is not None and compiled.native, compiled and compiled.fallback
    assert compiled.fast is not None and compiled.fast.inline_lookups


# (function, arguments, what r0 is): in range, out of range, keys that do not fit
# u32 arguments, per-CPU slots, a map chosen at run time (a handle, a hash map's
# handle, values that are no handle), and key pointers anywhere.
CASES = [
    ("get", [0], map_base(ARR)),
    ("get", [7], map_base(ARR) + 56),
    ("get", [8], 0),
    ("get", [0xFFFF_FFFF], 0),
    ("get", [(1 << 32) + 3], map_base(ARR) + 24),  # the u32 key is 3
    ("get_percpu", [0], map_base(PCPU)),
    ("get_percpu", [4], map_base(PCPU) + 64),  # 12-byte values, 16-byte slots
    ("get_percpu", [5], 0),
    ("pick", [0, 3], map_base(ARR) + 24),
    ("pick", [1, 4], map_base(PCPU) + 64),
    ("pick", [1, 5], 0),
    ("pick", [2, 0], 0),  # the hash map: its index, which finds nothing
    ("pick", [map_handle(ARR), 6], map_base(ARR) + 48),  # a handle, not a constant
    ("pick", [map_handle(PCPU), 1], map_base(PCPU) + 16),
    ("pick", [map_handle(HASHED), 1], 0),
    ("pick", [map_handle(3), 1], "HELPER_ERROR"),  # one past the maps
    ("pick", [map_handle(ARR) + (1 << 32), 1], "HELPER_ERROR"),  # equal in the low half
    ("pick", [12345, 1], "HELPER_ERROR"),
    ("at", [b"\x05\x00\x00\x00"], map_base(ARR) + 40),
    ("at", [b"\x05\x00\x00\x01"], 0),
    ("at", [b"\x05\x00\x00"], "MEMORY_FAULT"),  # one byte short
    ("at", [0], "MEMORY_FAULT"),
    ("at", [map_handle(ARR)], "MEMORY_FAULT"),
    ("at", [STACK_TOP - 4], map_base(ARR)),  # the stack's top bytes: key 0
    ("at", [STACK_TOP - 2], "MEMORY_FAULT"),
    ("at", [map_base(ARR) + 60], map_base(ARR)),  # a key read from the map's own values
    ("at", [map_base(ARR) + 62], "MEMORY_FAULT"),
    ("at", [map_base(HASHED) + 124], map_base(ARR)),  # the hash map's last value bytes
    ("at", [map_base(3)], "MEMORY_FAULT"),  # no map 3
    ("at", [buffer_base(0)], "MEMORY_FAULT"),  # no buffer given
]


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize(("function", "args", "expected"), CASES)
def test_lookups_agree(source_object, tier, function, args, expected):
    program = fresh(source_object, tier)
    result = both(program, function, args)
    natively(program)
    if isinstance(expected, str):
        assert result["trap"] is not None and result["trap"]["kind"] == expected
    else:
        assert result["trap"] is None and result["r0"] == expected


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("n", [0, 1, 9, 100])
def test_a_histogram_of_lookups_agrees(source_object, tier, n):
    result = both(fresh(source_object, tier), "histogram", [n])
    assert result["trap"] is None


@pytest.mark.parametrize("tier", TIERS)
def test_fuel_runs_out_exactly_around_lookups(source_object, tier):
    program = fresh(source_object, tier)
    needed = both(program, "histogram", [4])["fuel_used"]
    assert isinstance(needed, int)
    for fuel in range(1, needed + 2):
        both(program, "histogram", [4], fuel=fuel)


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("calls", [0, 1, 5, 9, 10, 11])
def test_the_helper_call_limit_counts_inline_lookups(source_object, tier, calls):
    # histogram(10) makes 10 array lookups and one hash lookup.
    limits = vm.Limits(max_helper_calls=calls)
    result = both(fresh(source_object, tier), "histogram", [10], limits=limits)
    if calls < 11:
        assert result["trap"] is not None and result["trap"]["kind"] == "HELPER_ERROR"
    else:
        assert result["trap"] is None


def python_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the helpers run through Python from now on (both engines)."""
    called: list[str] = []
    original = Machine.helper_value

    def counted(self: Machine, helper: Helper, *registers: int) -> int:
        called.append(helper.name or "")
        return original(self, helper, *registers)

    monkeypatch.setattr(Machine, "helper_value", counted)
    return called


@pytest.mark.parametrize("tier", TIERS)
def test_inline_lookups_enter_no_python(source_object, tier, monkeypatch):
    program = fresh(source_object, tier)
    called = python_calls(monkeypatch)
    vm.execute(program, "histogram", [200], engine="interpreter")
    assert len(called) == 201
    called.clear()
    jit = vm.execute(program, "histogram", [200], engine="jit")
    natively(program)
    assert jit.trap is None and called == []  # the hash map's too (tests/test_jit_hash.py)


class Counted:
    """A counting wrapper as the server's (`__wrapped__`, `count_calls`)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, ctx, *registers):
        self.calls += 1
        return self.fn(ctx, *registers)

    @property
    def __wrapped__(self):
        return self.fn

    def count_calls(self, n):
        self.calls += n


def machine_with(program: Program, fn, n: int) -> Machine:
    """A machine for histogram(n) whose lookup sites call `fn`."""
    machine = prepare(program, "histogram", [n])
    for pc, helper in machine.helpers.items():
        machine.helpers[pc] = dataclasses.replace(helper, fn=fn)
    return machine


@pytest.mark.parametrize("tier", TIERS)
def test_inline_lookups_are_counted_for_a_counting_wrapper(source_object, tier, monkeypatch):
    program = fresh(source_object, tier)
    interpreted = Counted(bpf_map_lookup_elem)
    expected = run_machine(machine_with(program, interpreted, 50), Interpreter())
    counter = Counted(bpf_map_lookup_elem)
    called = python_calls(monkeypatch)
    result = run_machine(machine_with(program, counter, 50), Jit())
    natively(program)
    assert (result.return_value, result.fuel_used) == (expected.return_value, expected.fuel_used)
    assert counter.calls == interpreted.calls == 51 and not called


@pytest.mark.parametrize("tier", TIERS)
def test_another_function_at_the_lookup_number_is_called(source_object, tier, monkeypatch):
    # Not the lookup itself (nothing to look through): every call goes to Python.
    program = fresh(source_object, tier)

    def lookalike(ctx, *registers):
        return bpf_map_lookup_elem(ctx, *registers)

    expected = run_machine(machine_with(program, lookalike, 30), Interpreter())
    called = python_calls(monkeypatch)
    result = run_machine(machine_with(program, lookalike, 30), Jit())
    assert (result.return_value, result.fuel_used) == (expected.return_value, expected.fuel_used)
    assert len(called) == 31


@pytest.mark.parametrize("tier", TIERS)
def test_maps_unlike_the_compiled_ones_take_the_helper(source_object, tier, monkeypatch):
    # The same number of maps, but the array is smaller than the compiler saw: the run
    # looks up through the helper, which knows the real size.
    program = fresh(source_object, tier)
    small = [dataclasses.replace(program.maps[ARR], max_entries=4), *program.maps[1:]]
    called = python_calls(monkeypatch)
    for index in (3, 5):
        result = both(program, "get", [index], definitions=small)
        assert result["r0"] == (map_base(ARR) + 24 if index == 3 else 0)
    assert len(called) == 4  # two runs on each engine, each one call


# A key stored as a u64 in a frame slot is read by its low four bytes; a key whose
# first byte is stored again after it is read from memory.
WIDE_KEY = f"""
    r6 = {(1 << 32) + 6} ll
    *(u64 *)(r10 - 8) = r6
    r2 = r10
    r2 += -8
    r1 = {map_handle(ARR)} ll
    call 1
    exit
"""
PATCHED_KEY = f"""
    r6 = 0x01000006
    *(u32 *)(r10 - 4) = r6
    r3 = r10
    *(u8 *)(r3 - 1) = 0
    r2 = r10
    r2 += -4
    r1 = {map_handle(ARR)} ll
    call 1
    exit
"""
# The key pointer in a register the function never writes (r2 is its argument).
PARAMETER_KEY = f"""
    r1 = {map_handle(PCPU)} ll
    call 1
    exit
"""


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize(
    ("text", "args", "expected"),
    [
        (WIDE_KEY, [], map_base(ARR) + 48),
        (PATCHED_KEY, [], map_base(ARR) + 48),
        (PARAMETER_KEY, [0, b"\x02\x00\x00\x00"], map_base(PCPU) + 32),
        (PARAMETER_KEY, [0, b"\x02\x00"], None),
    ],
)
def test_keys_in_frame_slots_and_parameters(source_object, tier, text, args, expected):
    like = load(source_object, name="lookups.o")
    result = both(assembled(text, like, tier), None, args)
    assert result["r0"] == expected if expected else result["trap"]["kind"] == "MEMORY_FAULT"


@pytest.mark.parametrize("tier", TIERS)
def test_call_1_without_kernel_helpers_is_the_callers_helper(source_object, tier):
    like = load(source_object, name="lookups.o")
    program = assembled(f"r1 = {map_handle(ARR)} ll\ncall 1\nexit\n", like, tier, kernel=False)
    registry = HelperRegistry()
    registry.register(lambda ctx, *_: 42, id=1, name="custom")
    assert both(program, None, [], helpers=registry)["r0"] == 42
    compiled = program.compiled.get("jit") or program.compiled.get("jit.quick")
    assert compiled is not None and compiled.fast is not None
    assert not compiled.fast.inline_lookups
