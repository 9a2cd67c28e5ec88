"""Helpers that run the program's own code (`bpfexec.vm.callbacks`): `bpf_loop`,
`bpf_for_each_map_elem`, `bpf_tail_call`, on the interpreter and both JIT tiers.

The programs are tests/fixtures/callbacks/*.c, libbpf-style; they are compiled
here when clang and libbpf-dev are installed, else the committed objects stand in.
"""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest
from conftest import CLANG, LIBBPF, CompileDirectory, libbpf_flags
from test_differential import TIERS, both

from bpfexec import vm
from bpfexec.vm.callbacks import BPF_MAX_LOOPS, MAX_TAIL_CALLS, function_handle
from bpfexec.vm.errors import LoadError, TrapKind
from bpfexec.vm.jit import compile_program
from bpfexec.vm.jit.runtime import best_compiled, runs_natively
from bpfexec.vm.loader import load
from bpfexec.vm.machine import prepare
from bpfexec.vm.maps import MapSet

FIXTURES = Path(__file__).parent / "fixtures" / "callbacks"
EINVAL, E2BIG, ENOENT = 22, 7, 2
MASK64 = (1 << 64) - 1


@pytest.fixture(scope="module")
def objects(libbpf_objects: CompileDirectory) -> Path:
    """The fixtures compiled here (clang and libbpf-dev), else the committed objects."""
    return libbpf_objects(FIXTURES)


def program(objects: Path, name: str, tier: str = "optimized") -> vm.Program:
    loaded = load((objects / f"{name}.o").read_bytes(), name=f"{name}.o")
    if tier == "quick":
        compile_program(loaded, quick=True)
    return loaded


def assert_native(loaded: vm.Program, function: str) -> None:
    """The JIT runs `function` natively: the agreement is not the interpreter's twice."""
    vm.execute(loaded, function, [0, 0], engine="jit")
    compiled = best_compiled(loaded)
    assert compiled is not None
    assert runs_natively(compiled, prepare(loaded, function, [0, 0]))


# -- bpf_loop ----------------------------------------------------------------------------


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize(
    ("n", "limit", "expected"),
    [
        (10, 20, 172 * 1000 + 7),  # stops after index 6 (sum 21): 7 loops, then 42, 85, 172
        (5, 1000, 84 * 1000 + 5),  # runs to the end: sum 10, then 20, 41, 84
        (0, 0, 4 * 1000 + 0),  # no call at all: sum 0, then 0, 1, 4
    ],
)
def test_bpf_loop_calls_back_and_stops_when_told(objects, tier, n, limit, expected):
    loaded = program(objects, "loop", tier)
    outcome = both(loaded, "loop_sum", [n, limit])
    assert outcome["trap"] is None
    assert outcome["r0"] == expected


@pytest.mark.parametrize(
    ("flags", "n", "expected"),
    [(1, 3, -EINVAL), (0, BPF_MAX_LOOPS + 1, -E2BIG), (0, BPF_MAX_LOOPS * 2, -E2BIG)],
)
def test_bpf_loop_refuses_what_the_kernel_refuses(objects, flags, n, expected):
    outcome = both(program(objects, "loop"), "loop_errors", [flags, n])
    assert outcome["r0"] == expected & MASK64


def test_bpf_loop_is_code_that_fuel_and_deadlines_stop(objects):
    """A million-iteration loop runs out of fuel like any loop, on both engines alike."""
    outcome = both(program(objects, "loop"), "loop_errors", [0, 1_000_000], fuel=50_000)
    assert outcome["trap"]["kind"] == "OUT_OF_FUEL"


def test_the_jit_runs_callback_programs_natively(objects):
    assert_native(program(objects, "loop"), "loop_sum")
    assert_native(program(objects, "foreach"), "walk_maps")


def test_a_callback_that_is_not_a_function_traps(objects, engine):
    """loop_sum with its first callback handle changed into one past the last."""
    loaded = program(objects, "loop")
    fn = loaded.function("loop_sum")
    code = list(loaded.instructions)
    loads = [pc for pc in range(fn.pc, fn.pc + fn.size) if code[pc].opcode == vm.isa.LDDW]
    first = next(pc for pc in loads if code[pc].imm == function_handle(0))
    code[first] = dataclasses.replace(code[first], imm=function_handle(2))
    patched = dataclasses.replace(loaded, instructions=tuple(code), compiled={})
    result = vm.execute(patched, "loop_sum", [3, 100], engine=engine)
    assert result.trap is not None
    assert result.trap.kind == TrapKind.HELPER_ERROR
    assert f"callback {function_handle(2):#x} is not a function" in result.trap.message


def test_function_pointers_need_a_libbpf_style_object(tmp_path):
    """Without maps or a license, taking a function's address is still refused."""
    if CLANG is None:
        pytest.skip("needs clang")
    source = tmp_path / "plain.c"
    source.write_text(
        "static long cb(unsigned long i, void *c) { return 0; }\n"
        "long run(void) { return (long)(void *)cb; }\n"
    )
    subprocess.run(
        [CLANG, "-O2", "-target", "bpf", "-c", str(source), "-o", str(tmp_path / "plain.o")],
        check=True,
        capture_output=True,
    )
    with pytest.raises(LoadError, match=r"takes the address of .* callbacks of the kernel"):
        load((tmp_path / "plain.o").read_bytes(), name="plain.o")


# -- bpf_for_each_map_elem ---------------------------------------------------------------


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize(
    ("n", "stop_at", "expected"),
    [
        # counts 1..3 (10, 20, 30) all visited, then slots 0..7 (0..700): keys 6 + 28
        (3, MASK64, 3 * 1_000_000 + 34 * 1000 + 60 + 2800),
        # counts stops at key 2 (values 10 + 20 >= 25): 2 visited
        (3, 25, 2 * 1_000_000 + 31 * 1000 + 30 + 2800),
        (0, MASK64, 0 * 1_000_000 + 28 * 1000 + 2800),  # an empty hash map: no call
    ],
)
def test_for_each_visits_every_element(objects, tier, n, stop_at, expected):
    outcome = both(program(objects, "foreach", tier), "walk_maps", [n, stop_at])
    assert outcome["trap"] is None
    assert outcome["r0"] == expected


@pytest.mark.parametrize("engine_name", ["interpreter", "jit"])
def test_for_each_callbacks_change_values_in_place(objects, engine_name):
    loaded = program(objects, "foreach")
    maps = MapSet(loaded.maps)
    vm.execute(loaded, "walk_maps", [4, MASK64], engine=engine_name, maps=maps)
    counts = [vm.execute(loaded, "read_count", [k], engine=engine_name, maps=maps).return_value
              for k in (1, 2, 3, 4, 5)]  # fmt: skip
    assert counts == [11, 21, 31, 41, -1 & MASK64]


# -- bpf_tail_call -----------------------------------------------------------------------


def hops(loaded: vm.Program, function: str, engine_name: str) -> tuple[int, int]:
    """What `function` returns, and how many programs of the chain ran (hops[0])."""
    maps = MapSet(loaded.maps, init=loaded.map_init)
    result = vm.execute(loaded, function, [0], engine=engine_name, maps=maps)
    assert result.trap is None, result.trap
    (entry,) = maps.dump()["hops"]["entries"]
    return result.return_value, int.from_bytes(bytes.fromhex(entry["value"]), "little")


@pytest.mark.parametrize("engine_name", ["interpreter", "jit"])
def test_tail_calls_chain_and_never_return(objects, engine_name):
    loaded = program(objects, "tailcall")
    assert hops(loaded, "first", engine_name) == (300, 3)  # first -> middle -> last
    assert hops(loaded, "middle", engine_name) == (300, 2)


@pytest.mark.parametrize("engine_name", ["interpreter", "jit"])
def test_a_failed_tail_call_goes_on(objects, engine_name):
    loaded = program(objects, "tailcall")
    result = vm.execute(loaded, "missing", [0], engine=engine_name)
    assert (result.trap, result.return_value) == (None, 7)


@pytest.mark.parametrize("engine_name", ["interpreter", "jit"])
def test_at_most_33_tail_calls(objects, engine_name):
    loaded = program(objects, "tailcall")
    assert hops(loaded, "forever", engine_name) == (42, 1 + MAX_TAIL_CALLS)


@pytest.mark.parametrize("tier", TIERS)
def test_tail_calls_agree_on_both_engines(objects, tier):
    loaded = program(objects, "tailcall", tier)
    for function in ("first", "middle", "last", "missing", "forever"):
        outcome = both(loaded, function, [0])
        assert outcome["trap"] is None


def test_tail_calls_share_the_fuel(objects):
    """The budget covers the whole chain: 34 runs of forever run out of it part way."""
    loaded = program(objects, "tailcall")
    full = vm.execute(loaded, "forever", [0]).fuel_used
    outcome = both(loaded, "forever", [0], fuel=full // 2)
    assert outcome["trap"]["kind"] == "OUT_OF_FUEL"


def test_a_tail_call_from_a_called_function_is_refused(tmp_path):
    if CLANG is None or not LIBBPF:
        pytest.skip("needs clang and libbpf-dev")
    source = tmp_path / "sub.c"
    source.write_text(
        "#include <linux/bpf.h>\n#include <bpf/bpf_helpers.h>\n"
        "struct { __uint(type, BPF_MAP_TYPE_PROG_ARRAY); __uint(max_entries, 1);\n"
        '  __type(key, __u32); __type(value, __u32); } jumps SEC(".maps");\n'
        "static __attribute__((noinline)) long jump(void *ctx)\n"
        "{ bpf_tail_call(ctx, &jumps, 0); return 1; }\n"
        'SEC("syscall") long run(void *ctx) { return jump(ctx) + 1; }\n'
        'char LICENSE[] SEC("license") = "GPL";\n'
    )
    subprocess.run(
        [CLANG, *libbpf_flags(), "-c", str(source), "-o", str(tmp_path / "sub.o")],
        check=True, capture_output=True,
    )  # fmt: skip
    with pytest.raises(LoadError, match=r"bpf_tail_call at pc \d+ in 'jump', which is called"):
        load((tmp_path / "sub.o").read_bytes(), name="sub.o")


def test_the_cli_runs_a_tail_call_chain(objects):
    import json
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "bpfexec", "run", str(objects / "tailcall.o"), "--function",
         "first", "--arg", "0", "--dump-maps", "--json"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    shown = json.loads(out)
    assert shown["return_value"] == 300
    assert shown["maps"]["hops"]["entries"] == [{"key": "00000000", "value": "03" + "00" * 7}]


@pytest.mark.parametrize("engine_name", ["interpreter", "jit"])
@pytest.mark.parametrize("bad", [2, 10**6, 0xFFFF_FFFF])
def test_a_program_array_id_that_is_no_entry_traps(objects, engine_name, bad):
    """A client may seed a program array with any id (a named state): a tail call
    runs only from a function's entry, anything else is a trap, never a jump."""
    loaded = program(objects, "tailcall")
    maps = MapSet(loaded.maps, init=loaded.map_init)
    jumps = next(m for m in maps.maps if m.spec.name == "jumps")
    assert jumps.update((2).to_bytes(4, "little"), bad.to_bytes(4, "little"), 0) == 0
    result = vm.execute(loaded, "first", [0], engine=engine_name, maps=maps)
    assert result.trap is not None and result.trap.kind == TrapKind.HELPER_ERROR
    assert f"program id {bad} is no function of the program" in result.trap.message
    assert result.trap.function == "first"
