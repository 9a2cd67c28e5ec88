"""The fuzzer aimed at the checks the optimized JIT tier elides, in the suite.

`fuzz/loops.py` generates programs built to defeat each elision of docs/jit.md
("Where a check is elided, and why that is sound"): loop nests whose groups are
entered from outside their body, steps whose multiples wrap around 2^64, aliases
of the frame and of the buffer, spills across calls, loads through loaded
pointers. `fuzz/isolated.py` runs them in a child process, because a wrong
elision is a native access at an address the program chose, which may end the
process: a crash there is a finding, not the end of the test run.

This runs a bounded, seeded search (`PROGRAMS` programs or `SECONDS`, whichever
comes first); docs/fuzzing.md has the long runs. The `tests/data/jit-attack-*`
cases (the committed findings) also run here, in a child process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("llvmlite")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `fuzz` lives next to the packages, not in them
    sys.path.insert(0, str(ROOT))

from test_instructions import BUDGET, parse_case  # noqa: E402

from bpfexec.vm.isa import MASK64  # noqa: E402
from fuzz import isolated, loops  # noqa: E402
from fuzz.targets import Finding  # noqa: E402

SEED = 1
PROGRAMS = 300
SECONDS = 60.0
ATTACKS = sorted((ROOT / "tests" / "data").glob("jit-attack-*.data"))


def test_generated_programs_agree_on_the_interpreter_and_both_tiers() -> None:
    report = isolated.run(SEED, count=PROGRAMS, seconds=SECONDS, minimize_findings=False)
    assert not report.findings, "\n".join(found.describe() for found in report.findings)
    assert report.programs >= 50, f"only {report.programs} programs in {report.seconds:.0f} s"
    assert report.invalid == 0
    # The generator's aim, counted by the compiler's own analyses: most programs have
    # an unrolled loop with strided accesses, many a group entered from an outer latch.
    reached = report.reached
    assert reached["programs-unrolled"] >= 0.9 * report.programs, reached
    assert reached["programs-strided"] >= 0.7 * report.programs, reached
    assert reached["programs-entered-from-outside"] >= 0.4 * report.programs, reached
    for shape in ("rotated", "nested", "tail", "call", "helper", "alias-frame", "warm-up"):
        assert report.shapes[shape] > 0, shape


@pytest.mark.parametrize("path", ATTACKS, ids=[p.stem for p in ATTACKS])
def test_committed_attacks_agree_in_a_child_process(path: Path) -> None:
    # tests/test_differential.py runs them in this process too; here a crash is a
    # failure with the case's name rather than the end of the run.
    case = parse_case(path.read_text(), path.name)
    assert case.mem is not None
    attack = loops.Case(case.asm, case.mem, case.args, (BUDGET, 3))
    worker = isolated.Worker()
    try:
        answer = worker.check(attack)
    finally:
        worker.stop()
    assert answer.status == "ok", answer.message


def test_a_crash_is_a_finding_and_the_next_case_runs() -> None:
    worker = isolated.Worker()
    case = loops.generate(isolated.case_data(SEED, 0))
    try:
        crashed = worker.check(case, segfault=True)
        assert crashed.status == "crash" and "exit status" in crashed.message
        assert worker.check(case).status == "ok"  # in a new child
        assert worker.spawned == 2
    finally:
        worker.stop()


def test_a_difference_between_the_engines_is_a_finding(monkeypatch) -> None:
    # The JIT made to use one more fuel than the interpreter, on a harmless program.
    real = loops.outcome

    def outcome(program, case, fuel, engine):
        found = real(program, case, fuel, engine)
        return {**found, "fuel_used": found["fuel_used"] + 1} if engine == "jit" else found

    monkeypatch.setattr(loops, "outcome", outcome)
    with pytest.raises(Finding, match=r"jit \(optimized\) disagree .*fuel_used"):
        loops.check(loops.Case("main:\n    r0 = 1\n    exit\n", bytes(8)))
    found = isolated.Answer("finding", "interpreter and jit (quick) disagree = {'r0': (1, 2)}")
    assert isolated.same_failure(found, found)
    assert not isolated.same_failure(found, isolated.Answer("crash"))


@pytest.mark.parametrize("k", range(1, 9))
def test_wrapping_steps_land_where_they_aim(k: int) -> None:
    for target in (1, 8, -8, 64, 3, 0):
        for twist in range(4):
            step = loops.wrapping_step(k, target, twist)
            landed = k * step & MASK64
            assert landed == target & MASK64 & ~((k & -k) - 1)  # rounded to 2^a for even k


def test_the_generator_is_deterministic_and_its_cases_load() -> None:
    for index in range(20):
        data = isolated.case_data(SEED, index)
        assert loops.generate(data) == loops.generate(data)
        loops.load_case(loops.generate(data))
    assert loops.generate(b"").asm  # no choices at all: the simplest program


def test_a_case_file_reads_back_as_the_case(tmp_path: Path) -> None:
    case = next(
        c for c in (loops.generate(isolated.case_data(SEED, i)) for i in range(50)) if not c.helpers
    )
    text = loops.case_file(case, "a generated case\nover two lines")
    parsed = parse_case(text, "generated.data")
    assert (parsed.asm, parsed.mem, parsed.args) == (case.asm, case.buffer, case.args)
    expected = loops.outcome(loops.load_case(case), case, BUDGET, "interpreter")
    assert parsed.fuel == expected["fuel_used"]
    if expected["trap"] is None:
        assert parsed.result == expected["return_value"]
    else:
        assert parsed.error == expected["trap"]["kind"]


def test_minimize_keeps_the_failure_and_drops_the_rest() -> None:
    case = loops.generate(isolated.case_data(SEED, 2))
    wanted = "*(u64 *)(r10 - 8) = r3"

    def fails(candidate: loops.Case) -> bool:
        return wanted in candidate.asm

    small = isolated.minimize(case, fails)
    assert wanted in small.asm
    assert [line.strip() for line in small.asm.splitlines() if line.startswith("    ")] == [
        wanted,
        *(["exit"] * small.asm.count("    exit")),
    ]
    assert small.args == () and small.fuels == (loops.BUDGET,)
