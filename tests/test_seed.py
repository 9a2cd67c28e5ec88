"""The seed document's five C listings, compiled by clang and run.

Each is run through the Python API on every engine and, once, through the
`bpfexec run` command line, the way a newcomer would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from seed_helpers import registry

from bpfexec import vm
from bpfexec.vm.loader import load

TESTS = Path(__file__).parent
MASK64 = (1 << 64) - 1


def run(compile_c, engine, name, function, args=(), **kw):
    program = load(compile_c(name).read_bytes(), name=f"{name}.o")
    return vm.execute(program, function, args, helpers=registry, engine=engine, **kw)


@pytest.mark.parametrize(
    ("args", "expected"),
    [((4, 9), 9), ((3, 9), 5), ((0, 1), 5), ((MASK64, 77), 77)],
)
def test_example(compile_c, engine, args, expected):
    result = run(compile_c, engine, "example", "example", args)
    assert (result.return_value, result.trap) == (expected, None)


def test_infinite_loop_runs_out_of_fuel(compile_c, engine):
    result = run(compile_c, engine, "infinite_loop", "infinite_loop", (3,), fuel=100_000)
    assert result.trap is not None and result.trap.kind == vm.TrapKind.OUT_OF_FUEL
    # Fuel is charged a whole block at a time: the run stops within one block of the budget.
    assert 100_000 - 8 < result.fuel_used <= 100_000
    assert result.trap.function == "infinite_loop"


@pytest.mark.parametrize(
    ("ctx", "expected"),
    [
        (None, 0),  # NULL context
        ((7, 3), 7),  # x == 7: max(x, y), a local call
        ((7, 30), 30),
        ((6, 5), 130),  # 100 + mul(x, y), a local call
    ],
)
def test_local_calls_with_struct_context(compile_c, engine, ctx, expected):
    args = (0,) if ctx is None else (ctx[0].to_bytes(4, "little") + ctx[1].to_bytes(4, "little"),)
    result = run(compile_c, engine, "local_calls", "foo", args)
    assert (result.return_value, result.trap) == (expected, None)


@pytest.mark.parametrize("name", ["helper_prototypes", "helper_pointers"])
@pytest.mark.parametrize(("args", "expected"), [((7, 3), 7), ((7, 9), 9), ((5, 6), 130)])
def test_helpers_by_name_and_by_number(compile_c, engine, name, args, expected):
    result = run(compile_c, engine, name, "foo", args)
    assert (result.return_value, result.trap) == (expected, None)


def test_helper_pointers_call_by_number(compile_c):
    program = load(compile_c("helper_pointers").read_bytes())
    assert {(ref.number, ref.name) for ref in program.helpers} == {(1, None), (42, None)}


def test_helper_prototypes_call_by_name(compile_c):
    program = load(compile_c("helper_prototypes").read_bytes())
    assert {(ref.number, ref.name) for ref in program.helpers} == {(None, "max"), (None, "mul")}


def bpfexec(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(TESTS))
    return subprocess.run(
        [sys.executable, "-m", "bpfexec.client.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("name", "function", "args", "expected"),
    [
        ("example", "example", ["4", "9"], 9),
        ("local_calls", "foo", ["hex:0700000003000000"], 7),
        ("helper_prototypes", "foo", ["5", "6"], 130),
        ("helper_pointers", "foo", ["7", "0x10"], 16),
    ],
)
def test_cli_runs_the_seed_programs(compile_c, name, function, args, expected):
    path = compile_c(name)
    argv = [
        "run",
        str(path),
        "--function",
        function,
        "--json",
        "--helpers",
        "seed_helpers:registry",
    ]
    for arg in args:
        argv += ["--arg", arg]
    proc = bpfexec(*argv)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["return_value"] == expected
    assert out["trap"] is None
    assert set(out) == {"return_value", "fuel_used", "trap", "log", "buffers", "duration_ns"}


def test_cli_infinite_loop_exits_3_with_the_trap(compile_c):
    proc = bpfexec("run", str(compile_c("infinite_loop")), "--arg", "1", "--fuel", "5000", "--json")
    assert proc.returncode == 3, proc.stderr
    out = json.loads(proc.stdout)
    assert out["trap"]["kind"] == "OUT_OF_FUEL"
    assert 5000 - 8 < out["fuel_used"] <= 5000
