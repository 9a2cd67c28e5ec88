"""One function over many inputs: `bpfexec.vm.batch.run_batch` and `bpfexec run
--inputs FILE.jsonl`, locally on both engines and through a real server."""

from __future__ import annotations

import io
import itertools
import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from support import SPIN

from bpfexec import vm
from bpfexec.client.cli import main
from bpfexec.server.app import RunningServer, serve_in_thread
from bpfexec.server.settings import Settings
from bpfexec.vm.batch import CHUNK, BatchInputError, run_batch
from bpfexec.vm.errors import TrapKind
from bpfexec.vm.loader import load
from bpfexec.vm.machine import Interrupt

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "tests" / "fixtures" / "obj" / "example-O2.o"  # example(a, b): a > 3 ? b : 5
COUNTER = ROOT / "tests" / "fixtures" / "maps" / "counter.o"
# r0 = the byte at r1: a buffer's first byte, or a MEMORY_FAULT for an integer.
LOAD = b"r0 = *(u8 *)(r1 + 0)\nexit\n"


def example_expected(a: int, b: int) -> int:
    return b if a > 3 else 5


@pytest.mark.parametrize("engine_name", ["interpreter", "jit"])
def test_results_come_in_input_order(engine_name: str) -> None:
    program = load(EXAMPLE.read_bytes(), name="example.o")
    inputs = [(n % 8, n) for n in range(500)]
    results = list(run_batch(program, "example", inputs, engine=engine_name))
    assert [r.return_value for r in results] == [example_expected(a, b) for a, b in inputs]
    alone = [vm.execute(program, "example", list(args), engine=engine_name) for args in inputs]
    assert [(r.fuel_used, r.trap) for r in results] == [(r.fuel_used, r.trap) for r in alone]


@pytest.mark.parametrize("engine_name", ["interpreter", "jit"])
def test_a_trap_in_the_middle_does_not_stop_the_others(engine_name: str) -> None:
    program = load(LOAD)
    results = list(run_batch(program, None, [[b"\x07"], [0], [b"\x09"]], engine=engine_name))
    assert results[0].return_value == 7 and results[2].return_value == 9
    assert results[1].trap is not None and results[1].trap.kind == TrapKind.MEMORY_FAULT


def test_fuel_is_per_input() -> None:
    program = load(SPIN.encode())
    results = list(itertools.islice(run_batch(program, None, itertools.repeat([]), fuel=100), 3))
    assert [r.trap.kind for r in results if r.trap] == [TrapKind.OUT_OF_FUEL] * 3
    assert [r.fuel_used for r in results] == [results[0].fuel_used] * 3


def test_inputs_are_consumed_as_results_are_taken() -> None:
    """An endless generator of inputs: the batch takes one input per result."""
    program = load(EXAMPLE.read_bytes(), name="example.o")
    taken = []

    def endless() -> Iterator[list[int]]:
        for n in itertools.count():
            taken.append(n)
            yield [4, n]

    results = run_batch(program, "example", endless())
    assert [next(results).return_value for _ in range(3)] == [0, 1, 2]
    assert taken == [0, 1, 2]
    # The JIT's native loop reads a chunk ahead, no more.
    taken.clear()
    results = run_batch(program, "example", endless(), engine="jit")
    assert [next(results).return_value for _ in range(3)] == [0, 1, 2]
    assert taken == list(range(CHUNK))


def test_an_interrupt_stops_the_batch() -> None:
    program = load(SPIN.encode())
    interrupt = Interrupt()
    batch = run_batch(program, None, itertools.repeat([]), interrupt=interrupt)
    interrupt.after(0.05, TrapKind.DEADLINE_EXCEEDED)
    first = next(batch)
    assert first.trap is not None and first.trap.kind == TrapKind.DEADLINE_EXCEEDED
    assert list(batch) == []


def test_an_input_that_cannot_run_names_its_place() -> None:
    program = load(EXAMPLE.read_bytes(), name="example.o")
    batch = run_batch(program, "example", [[1, 2], [1 << 64, 2]])
    assert next(batch).return_value == 5
    with pytest.raises(BatchInputError, match=r"^input 2: argument 1: .* does not fit in 64 bits"):
        next(batch)


def test_the_inputs_share_the_maps() -> None:
    program = load(COUNTER.read_bytes(), name="counter.o")
    results = list(run_batch(program, "count", [[7], [7], [3], [7]]))
    assert [r.return_value for r in results] == [1, 2, 1, 3]


# -- the command line ----------------------------------------------------------------------


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        status = main(list(argv))
    return status, out.getvalue(), err.getvalue()


def write_inputs(path: Path, inputs: list[list[object]]) -> Path:
    path.write_text("".join(json.dumps(args) + "\n" for args in inputs))
    return path


INPUTS = [["5", "0x10"], [2, 9], ["7", "hex:ff"], ["4", 1 << 63]]


@pytest.mark.parametrize("engine_name", ["interpreter", "jit"])
def test_the_cli_prints_a_result_a_line(tmp_path: Path, engine_name: str) -> None:
    inputs = write_inputs(tmp_path / "in.jsonl", INPUTS)
    status, out, err = run_cli(
        "run", str(EXAMPLE), "--function", "example", "--inputs", str(inputs),
        "--engine", engine_name,
    )  # fmt: skip
    assert (status, err) == (0, "")
    lines = [json.loads(line) for line in out.splitlines()]
    assert [set(line) for line in lines] == [{"return_value", "fuel_used", "trap"}] * 4
    values = [line["return_value"] for line in lines]
    assert values[:2] + values[3:] == [16, 5, 1 << 63]
    assert values[2] >> 32 == 0x4  # the address of argument buffer 0


def test_buffers_are_shown_when_the_program_wrote_them(tmp_path: Path) -> None:
    program = tmp_path / "poke.s"
    program.write_text("r2 = 0x7a\n*(u8 *)(r1 + 0) = r2\nr0 = 0\nexit\n")
    inputs = write_inputs(tmp_path / "in.jsonl", [["hex:00"], ["hex:7a"]])
    status, out, _ = run_cli("run", str(program), "--inputs", str(inputs))
    assert status == 0
    assert [json.loads(line).get("buffers") for line in out.splitlines()] == [["7a"], None]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('["1", "2"]\n{"a": 1}\n', "--inputs IN:2: expected a JSON array of arguments"),
        ('["1"]\n\n[1, \n', "--inputs IN:3: not JSON"),
        ('["1", "2"]\n["x"]\n', "--inputs IN:2: not an integer: 'x'"),
        ("[1]\n[true]\n", "--inputs IN:2: argument True is not a string or an integer"),
        ("[1, 2]\n[1, 2, 3, 4, 5, 6]\n", "--inputs IN:2: at most 5 arguments"),
    ],
)
def test_a_malformed_line_is_a_one_line_error_naming_it(
    tmp_path: Path, text: str, message: str
) -> None:
    inputs = tmp_path / "in.jsonl"
    inputs.write_text(text)
    status, out, err = run_cli(
        "run", str(EXAMPLE), "--function", "example", "--inputs", str(inputs)
    )
    assert status == 2
    assert len(err.splitlines()) == 1
    assert message.replace("IN", str(inputs)) in err
    assert len(out.splitlines()) == 1  # the line before it was answered


def test_inputs_from_standard_input() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bpfexec", "run", str(EXAMPLE), "--function", "example",
         "--inputs", "-"],
        input='["4", "8"]\n["1", "1"]\n', capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert [json.loads(line)["return_value"] for line in done.stdout.splitlines()] == [8, 5]


def test_inputs_exclude_arguments_on_the_command_line(tmp_path: Path) -> None:
    inputs = write_inputs(tmp_path / "in.jsonl", [[1]])
    status, _, err = run_cli("run", str(EXAMPLE), "--inputs", str(inputs), "--arg", "1")
    assert status == 2 and "--inputs takes the arguments from its file, not with --arg" in err


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    with serve_in_thread(Settings(port=0, metrics_port=0, entry_point_helpers=False)) as running:
        yield running


def test_the_cli_runs_inputs_through_a_server(server: RunningServer, tmp_path: Path) -> None:
    inputs = write_inputs(tmp_path / "in.jsonl", [[n % 8, n] for n in range(200)])
    argv = ("run", str(EXAMPLE), "--function", "example", "--inputs", str(inputs))
    local = run_cli(*argv)
    remote = run_cli(*argv, "--server", server.address)
    assert remote == local
    assert local[0] == 0 and len(local[1].splitlines()) == 200


def test_a_server_batch_on_a_state_shares_its_maps(server: RunningServer, tmp_path: Path) -> None:
    inputs = write_inputs(tmp_path / "in.jsonl", [[7], [7], [3]])
    argv = ("run", str(COUNTER), "--function", "count", "--inputs", str(inputs))
    status, out, _ = run_cli(*argv, "--server", server.address, "--state", "batch")
    assert status == 0
    assert [json.loads(line)["return_value"] for line in out.splitlines()] == [1, 2, 1]


def test_the_cli_answers_remote_helpers_of_a_server_batch(
    server: RunningServer, tmp_path: Path
) -> None:
    program = tmp_path / "mul.s"
    program.write_text("call 42\nexit\n")  # mul(r1, r2), helper 42 of seed_helpers
    inputs = write_inputs(tmp_path / "in.jsonl", [[n, 3] for n in range(50)])
    argv = ("run", str(program), "--inputs", str(inputs))
    local = run_cli(*argv, "--helpers", "seed_helpers:registry")
    remote = run_cli(*argv, "--server", server.address, "--remote-helpers", "seed_helpers:registry")
    assert remote == local
    assert [json.loads(line)["return_value"] for line in local[1].splitlines()] == [
        3 * n for n in range(50)
    ]
