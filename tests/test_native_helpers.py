"""Native helpers (`bpfexec.vm.native`): C functions of a shared library, built here
with the system C compiler, called directly by the JIT and through ctypes by the
interpreter, with the same results, faults, traps, fuel and logs.

The library is tests/fixtures/native/helpers.c (twins of the Python helpers of
tests/test_differential.py) and the shipped example, examples/native-helper/.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("llvmlite")
pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import free_port
from test_differential import BUFFER, EXAMPLES, TIERS, both, programs

import bpfexec
from bpfexec import vm
from bpfexec.client.client import Client
from bpfexec.server.app import serve_in_thread
from bpfexec.server.settings import Settings
from bpfexec.vm import HelperRegistry
from bpfexec.vm.jit import compile_program, runtime
from bpfexec.vm.loader import load
from bpfexec.vm.native import NativeHelper, native_registry

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "native-helper"
CC = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
CLANG = shutil.which("clang")
pytestmark = pytest.mark.skipif(CC is None, reason="needs a C compiler to build the helpers")


def build(source: Path, out: Path) -> Path:
    """`cc -O2 -shared -fPIC -I <bpfexec.include_dir()>`, as docs/native-helpers.md says."""
    assert CC is not None
    command = [CC, "-O2", "-Wall", "-Werror", "-shared", "-fPIC", "-I", bpfexec.include_dir()]
    subprocess.run([*command, str(source), "-o", str(out)], check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("native")
    return build(ROOT / "tests" / "fixtures" / "native" / "helpers.c", work / "libhelpers.so")


@pytest.fixture(scope="module")
def natives(library: Path) -> HelperRegistry:
    """The twins of test_differential's helpers, under the same numbers and names."""
    registry = HelperRegistry()
    registry.native(str(library), "mix", id=1)
    registry.native(str(library), "costly", id=2, cost=7)
    registry.native(str(library), "picky", id=3)
    registry.native(str(library), "poke", id=4)
    registry.native(str(library), "length", id=5)
    return registry


def load_asm(text: str, tier: str = "optimized") -> vm.Program:
    program = load(text.encode())
    if tier == "quick":
        compile_program(program, quick=True)
    return program


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(programs(), st.binary(min_size=BUFFER, max_size=BUFFER), st.sampled_from(TIERS))
def test_random_programs_agree_with_native_helpers(natives, generated, buffer, tier):
    """test_differential's random programs (helper calls, callx, local calls, faults,
    fuel running out, a helper with a cost, traps), their helpers native."""
    program, fuel, depth = generated
    if tier == "quick":
        compile_program(program, quick=True)
    limits = vm.Limits(max_call_depth=depth)
    both(program, "main", [buffer], fuel=fuel, helpers=natives, limits=limits)


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize(
    ("source", "args", "expected"),
    [
        # mix(1, 2, 3, 4, 5)
        ("r1 = 1\nr2 = 2\nr3 = 3\nr4 = 4\nr5 = 5\ncall 1\nexit\n", [],
         {"r0": (31 + 34 + 21 + 12 + 5) ^ 0x5DEECE66D, "fuel_used": 7}),
        # picky traps on b & 7 == 7; its return value is ignored
        ("r2 = 15\ncall 3\nexit\n", [],
         {"trap": "HELPER_ERROR", "message": "helper picky (#3) failed: odd input",
          "fuel_used": 3}),
        # poke writes, reads back and logs
        ("r2 = 0x1122334455667788 ll\ncall 4\nexit\n", [bytes(8)],
         {"r0": 0x55667788, "log": ("poke 0x400000000 8877665544332211",),
          "buffers": (bytes.fromhex("8877665544332211"),)}),
        # poke past the end of the buffer: a MEMORY_FAULT, nothing written
        ("r1 += 4\nr2 = -1\ncall 4\nexit\n", [bytes(8)],
         {"trap": "MEMORY_FAULT", "buffers": (bytes(8),),
          "message": "write of 8 bytes at 0x400000004 (buffer 0 region of 8 bytes)"}),
        # poke into read-only memory (the stack is writable; rodata is not mapped here)
        ("r1 = 0\ncall 4\nexit\n", [],
         {"trap": "MEMORY_FAULT", "message": "write of 8 bytes at 0x0 (unmapped address)"}),
        # length reads byte by byte until the NUL, or faults past the end
        ("call 5\nexit\n", [b"hello\0"], {"r0": 5}),
        ("call 5\nexit\n", [b"hello"],
         {"trap": "MEMORY_FAULT", "message": "read of 1 bytes at 0x400000005 (buffer 0 region "
          "of 5 bytes)"}),
        # costly costs 7 fuel on top of the call: 2 left after the block is too little
        ("r1 = 1\ncall 2\nexit\n", [],
         {"trap": "OUT_OF_FUEL", "fuel": 5,
          "message": "helper costly (#2) costs 7 fuel, 2 left"}),
    ],
)  # fmt: skip
def test_native_helper_outcomes(natives, tier, source, args, expected):
    program = load_asm(source, tier)
    fuel = expected.get("fuel", 1000)
    outcome = both(program, None, args, fuel=fuel, helpers=natives)
    if "trap" in expected:
        assert outcome["trap"]["kind"] == expected["trap"]
        assert expected["message"] in outcome["trap"]["message"], outcome["trap"]
    else:
        assert outcome["trap"] is None and outcome["r0"] == expected["r0"]
    for key in ("fuel_used", "log", "buffers"):
        if key in expected:
            assert outcome[key] == expected[key]


@pytest.mark.parametrize("tier", TIERS)
def test_the_helper_call_limit_counts_native_calls(natives, tier):
    loop = "r6 = 0\nloop:\nr1 = r6\ncall 1\nr6 += 1\nif r6 < 100 goto loop\nr0 = r6\nexit\n"
    program = load_asm(loop, tier)
    outcome = both(program, None, [], helpers=natives, limits=vm.Limits(max_helper_calls=50))
    assert outcome["trap"]["message"].startswith("more than 50 helper calls")
    assert both(program, None, [], helpers=natives)["r0"] == 100


def python_calls_during(run) -> dict[str, int]:
    """How many times each Python function on a helper's route ran during `run()`."""
    counted = {"NativeHelper.__call__": 0, "_call": 0, "_dispatch": 0}
    watched = {
        NativeHelper.__call__.__code__: "NativeHelper.__call__",
        runtime._call.__code__: "_call",
        runtime._dispatch.__code__: "_dispatch",
    }

    def profile(frame, event, arg):
        if event == "call" and frame.f_code in watched:
            counted[watched[frame.f_code]] += 1

    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(None)
    return counted


@pytest.mark.parametrize("tier", TIERS)
def test_the_jit_calls_native_helpers_without_python(natives, tier):
    """1000 calls of a native helper: the JIT enters no Python for them, the
    interpreter calls each through ctypes."""
    program = load_asm(
        "r6 = 0\nloop:\nr1 = r6\ncall 1\nr6 += 1\nif r6 < 1000 goto loop\nexit\n", tier
    )
    jit = python_calls_during(lambda: vm.execute(program, helpers=natives, engine="jit"))
    assert jit == {"NativeHelper.__call__": 0, "_call": 0, "_dispatch": 0}
    interpreted = python_calls_during(
        lambda: vm.execute(program, helpers=natives, engine="interpreter")
    )
    assert interpreted["NativeHelper.__call__"] == 1000


def test_one_compiled_program_serves_native_and_python_helpers(natives):
    """The table of native helpers belongs to a run, not to the compiled code."""
    python = HelperRegistry()
    python.register(lambda ctx, a, *_: a + 1000, id=1, name="mix")
    program = load_asm("r1 = 1\ncall 1\nexit\n")
    mixed = (31 + 0) ^ 0x5DEECE66D
    for helpers, expected in ((natives, mixed), (python, 1001), (natives, mixed), (python, 1001)):
        assert vm.execute(program, helpers=helpers, engine="jit").return_value == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nowhere/libx.so:f=1", "cannot load native helper library nowhere/libx.so: "),
        ("{lib}:no_such_symbol=1", "no symbol 'no_such_symbol' in native helper library"),
        ("{lib}", "expected LIBRARY:SYMBOL[=NUMBER]"),
        ("{lib}:mix=one", "helper number 'one' is not an integer"),
        ("{lib}:1mix", "expected LIBRARY:SYMBOL[=NUMBER]"),
    ],
)
def test_a_bad_spec_is_a_one_line_error(library, spec, message):
    with pytest.raises(ValueError) as raised:
        native_registry(spec.format(lib=library))
    assert message in str(raised.value) and "\n" not in str(raised.value)


def bpfexec_command(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BPFEXEC_")}
    return subprocess.run(
        [sys.executable, "-m", "bpfexec", *args],
        cwd=cwd, capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples/native-helper built as its comments say, in a scratch directory."""
    work = tmp_path_factory.mktemp("example")
    build(EXAMPLE / "sqrti.c", work / "libsqrti.so")
    if CLANG is not None:
        subprocess.run(
            [CLANG, "-O2", "-target", "bpf", "-c", str(EXAMPLE / "sqrt_sum.c"), "-o",
             str(work / "sqrt_sum.o")], check=True, capture_output=True,
        )  # fmt: skip
    else:
        shutil.copy(EXAMPLE / "sqrt_sum.o", work / "sqrt_sum.o")
    return work


NATIVE_FLAGS = ["--native-helpers", "./libsqrti.so:sqrti=200",
                "--native-helpers", "./libsqrti.so:buffer_sum=201"]  # fmt: skip


@pytest.mark.parametrize("engine", ["interpreter", "jit"])
def test_the_example_runs_locally(example, engine):
    proc = bpfexec_command(
        "run", "sqrt_sum.o", "--function", "sqrt_sum", "--arg", "1000", "--engine", engine,
        *NATIVE_FLAGS, "--json", cwd=example,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["return_value"] == sum(math.isqrt(i * 7919) for i in range(1000))
    proc = bpfexec_command(
        "run", "sqrt_sum.o", "--function", "checksum", "--arg", "hex:01020304", "--arg", "40",
        "--engine", engine, *NATIVE_FLAGS, cwd=example,
    )  # fmt: skip
    assert proc.returncode == 3
    assert "MEMORY_FAULT at pc 14 (call 201) in checksum: read of 40 bytes" in proc.stdout


def test_a_missing_library_stops_the_command_with_one_line(example):
    proc = bpfexec_command(
        "run", "sqrt_sum.o", "--arg", "1", "--native-helpers", "./libnone.so:sqrti=200",
        cwd=example,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "bpfexec run: error: native helpers './libnone.so:sqrti=200': cannot load native "
        "helper library ./libnone.so: cannot open shared object file: No such file or directory"
    ]
    proc = bpfexec_command("serve", "--port", "0", "--metrics-port", "0",
                           "--native-helpers", "./libnone.so:sqrti=200", cwd=example)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "cannot load native helper library ./libnone.so" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.fixture
def server(example: Path) -> Iterator[str]:
    settings = Settings(
        port=0,
        metrics_port=free_port(),
        entry_point_helpers=False,
        native_helpers=(
            f"{example}/libsqrti.so:sqrti=200",
            f"{example}/libsqrti.so:buffer_sum=201",
        ),
    )
    with serve_in_thread(settings) as running:
        yield running.address


def test_a_server_serves_native_helpers(server, example):
    with Client(server, timeout=30) as client:
        module = client.load((example / "sqrt_sum.o").read_bytes(), "sqrt_sum.o")
        result = client.execute(module, "sqrt_sum", [500])
        assert result.return_value == sum(math.isqrt(i * 7919) for i in range(500))
        result = client.execute(module, "checksum", [b"\x05\x06", 2])
        assert (result.return_value, list(result.log)) == (11, ["summed"])


# The built-in memory and time helpers run as native twins on the JIT
# (`bpfexec.vm.jit.builtins`): the same results, fuel and traps as in Python.

BUILTIN_CALLS = {  # r1 = buffer 0 (64 bytes), r2 = buffer 1 (64 bytes); r7, r8, r3 below
    "memcpy": "r6 = r1\nr1 = r2\nr2 = r6\nr2 += r7\nr1 += r8\ncall 0x10000\nexit\n",
    "memcpy within one buffer": "r2 = r1\nr1 += r7\nr2 += r8\ncall 0x10000\nexit\n",
    "memcmp": "r1 += r7\nr2 += r8\ncall 0x10001\nexit\n",
    "memset": "r1 += r7\nr2 = r8\ncall 0x10002\nexit\n",
    "strnlen": "r1 += r7\nr2 = r3\ncall 0x10003\nexit\n",
}
OFFSETS = st.one_of(st.integers(0, 64), st.sampled_from([65, -1, 1 << 32, -(1 << 33)]))
LENGTHS = st.one_of(st.integers(0, 64), st.sampled_from([65, 128, 1 << 31, -1]))


@st.composite
def builtin_calls(draw) -> tuple[vm.Program, list[bytes], int]:
    name = draw(st.sampled_from(sorted(BUILTIN_CALLS)))
    a, b, n = draw(OFFSETS), draw(OFFSETS), draw(LENGTHS)
    values = "".join(f"r{reg} = {value & (1 << 64) - 1:#x} ll\n" for reg, value in
                     ((7, a), (8, b & 0xFF if name == "memset" else b), (3, n)))  # fmt: skip
    source = values + BUILTIN_CALLS[name]
    buffers = [draw(st.binary(min_size=64, max_size=64)) for _ in range(2)]
    if draw(st.booleans()):  # strings: NULs here and there, or none
        buffers = [bytes(x if x % 5 else 0 for x in buf) for buf in buffers]
    fuel = draw(st.one_of(st.just(10**6), st.integers(8, 20)))  # the block before costs 8
    return load(source.encode()), buffers, fuel


@settings(max_examples=EXAMPLES * 2, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(builtin_calls(), st.sampled_from(TIERS))
def test_builtin_twins_agree_with_python(call, tier):
    from bpfexec.vm.builtin_helpers import standard_helpers

    program, buffers, fuel = call
    if tier == "quick":
        compile_program(program, quick=True)
    both(program, None, buffers, fuel=fuel, helpers=standard_helpers())


class CountingWrapper:
    """Wraps a helper function as the server's metrics do."""

    def __init__(self, fn):
        self.__wrapped__ = fn
        self.calls = 0

    def __call__(self, ctx, *registers):
        self.calls += 1
        return self.__wrapped__(ctx, *registers)

    def count_calls(self, n):
        self.calls += n


@pytest.mark.parametrize("tier", TIERS)
def test_builtin_twins_run_without_python_and_report_their_calls(tier):
    from bpfexec.vm import builtin_helpers

    registry = HelperRegistry()
    for fn, number in ((builtin_helpers.memset, 0x10002), (builtin_helpers.strnlen, 0x10003),
                       (builtin_helpers.bpf_ktime_get_ns, 5)):  # fmt: skip
        registry.register(CountingWrapper(fn), id=number, name=fn.__name__)
    source = """
        r6 = r1
        r7 = 0
    loop:
        r1 = r6
        r2 = 0x41
        r3 = 15
        call 0x10002
        r1 = r6
        r2 = 64
        call 0x10003
        call 5
        r7 += 1
        if r7 < 100 goto loop
        r1 = r6
        r2 = 64
        call 0x10003
        exit
    """
    program = load_asm(source, tier)
    seen = python_calls_during(
        lambda: vm.execute(program, args=[bytes(64)], helpers=registry, engine="jit")
    )
    result = vm.execute(program, args=[bytes(64)], helpers=registry, engine="jit")
    assert result.return_value == 15 and result.buffers == (b"A" * 15 + bytes(49),)
    assert seen == {"NativeHelper.__call__": 0, "_call": 0, "_dispatch": 0}
    assert [helper.fn.calls for helper in registry] == [200, 202, 200]
