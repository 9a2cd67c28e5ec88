"""Run the `loops` fuzz target where a crash of native code cannot take the runner down.

A check the JIT wrongly elides is a native access at an address the program
chose: a segfault ends the process that ran it. So cases run in a child process
(`python -m fuzz.isolated --worker`), one request and one answer per case over
pipes; when the child dies, the case it was running is known, and is run again
alone in a fresh child to confirm it (else every case that child ran is run again,
one child each, to isolate the culprit). A child that does not answer in
`CASE_TIMEOUT` seconds is killed: a hang is a finding too.

    python -m fuzz.isolated [--seed N] [--count N] [--seconds S] [--out DIR]
                            [--no-minimize] [--index I]

runs generated programs `seed-0`, `seed-1`, ... (each program is `random.Random
(f"{seed}-{index}")`'s bytes through `fuzz.loops.generate`, so `--index I` runs one
again), until `--count` programs or `--seconds` have passed. Each finding is
minimized (instructions removed one at a time while the same failure remains,
arguments and buffer bytes zeroed) and, with `--out`, written there as
`jit-attack-<kind>-<seed>-<index>.data` (the expected result from the
interpreter: the format of `tests/data`) and as a `.json` case.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from fuzz.loops import BUDGET, Case, case_file, generate

ROOT = Path(__file__).resolve().parents[1]
CASE_TIMEOUT = 60.0  # seconds for one case (two compiles, a few runs): far above need
DATA_BYTES = 512  # choices per generated program; past them every choice is 0


def case_data(seed: int, index: int) -> bytes:
    return random.Random(f"{seed}-{index}").randbytes(DATA_BYTES)


@dataclass
class Answer:
    status: str  # ok, invalid (does not load), finding, crash, hang
    message: str = ""
    reached: dict[str, int] = field(default_factory=dict)


class Worker:
    """A child process that checks cases; started on first use and after each death."""

    def __init__(self, timeout: float = CASE_TIMEOUT) -> None:
        self.timeout = timeout
        self.proc: subprocess.Popen[str] | None = None
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (lives with the worker)
        self.ran: list[Case] = []  # the cases the current child has run
        self.spawned = 0

    def _start(self) -> subprocess.Popen[str]:
        self.lines = queue.Queue()
        self.stderr.seek(0)
        self.stderr.truncate()
        proc = subprocess.Popen(
            [sys.executable, "-m", "fuzz.isolated", "--worker"],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            bufsize=1,
        )
        lines = self.lines

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.put(line)
            lines.put(None)  # the child is gone

        threading.Thread(target=read, daemon=True).start()
        self.proc = proc
        self.ran = []
        self.spawned += 1
        return proc

    def check(self, case: Case, *, segfault: bool = False) -> Answer:
        """Check `case` in the child; `segfault` makes the child crash (a self-test)."""
        proc = self.proc if self.proc is not None and self.proc.poll() is None else self._start()
        self.ran.append(case)
        request = {"case": case.to_json(), "segfault": segfault}
        try:
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(request) + "\n")
            proc.stdin.flush()
        except OSError:
            return self._died()
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                self.stop()
                return Answer("hang", f"no answer in {self.timeout:.0f} s")
            if line is None:
                return self._died()
            if line.startswith("{"):
                answer = json.loads(line)
                return Answer(
                    answer["status"], answer.get("message", ""), answer.get("reached", {})
                )

    def _died(self) -> Answer:
        assert self.proc is not None
        code = self.proc.wait()
        self.proc = None
        self.stderr.seek(0)
        lines = self.stderr.read().strip().splitlines()
        ran = [line for line in lines if line.startswith("running the ")]
        fatal = [line for line in lines if line.startswith("Fatal Python error")]
        said = "; ".join([*ran[-1:], *fatal[:1]]) or " | ".join(lines[-3:])
        return Answer("crash", f"the worker died with exit status {code} ({said})")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def isolate(worker: Worker, case: Case, ran: list[Case]) -> tuple[Case, Answer] | None:
    """The case that crashes alone: `case`, else one of `ran` (run one per child)."""
    for candidate in [case, *(c for c in ran if c is not case)]:
        worker.stop()
        answer = worker.check(candidate)
        if answer.status in ("crash", "hang"):
            return candidate, answer
    worker.stop()
    return None


def same_failure(first: Answer, again: Answer) -> bool:
    """The same kind of failure, and for a mismatch the same tier and fields."""
    if first.status != again.status:
        return False
    if first.status == "finding":
        return _signature(first.message) == _signature(again.message)
    return True


def _signature(message: str) -> str:
    """The tier and the fields that differ (not their values, nor the fuel)."""
    head = message.split(" with fuel")[0]
    return head + str(sorted(set(re.findall(r"'(\w+)': \(", message))))


def minimize(case: Case, fails: Callable[[Case], bool], budget: int = 600) -> Case:
    """A smaller case on which `fails` still holds: the full budget of fuel alone (as a
    .data case runs), each instruction removed, arguments and buffer bytes zeroed."""
    tries = 0

    def attempt(candidate: Case) -> bool:
        nonlocal tries
        tries += 1
        return tries <= budget and fails(candidate)

    if case.fuels != (BUDGET,) and attempt(replace(case, fuels=(BUDGET,))):
        case = replace(case, fuels=(BUDGET,))
    changed = True
    while changed and tries < budget:
        changed = False
        lines = case.asm.splitlines()
        at = len(lines) - 1
        while at >= 0 and tries < budget:  # from the end: later code depends on earlier
            line = lines[at]
            if line.startswith("    "):  # an exit too: the verifier refuses what falls off
                candidate = replace(case, asm="\n".join(lines[:at] + lines[at + 1 :]) + "\n")
                if attempt(candidate):
                    case, lines, changed = candidate, lines[:at] + lines[at + 1 :], True
            at -= 1
        lines = case.asm.splitlines()
        unused = [
            i
            for i, line in enumerate(lines)
            if line.endswith(":") and i > 0 and not _used(line[:-1], lines)
        ]
        if unused:
            kept = [line for i, line in enumerate(lines) if i not in unused]
            candidate = replace(case, asm="\n".join(kept) + "\n")
            if attempt(candidate):
                case = candidate
    if case.args and attempt(replace(case, args=())):
        case = replace(case, args=())
    for i, value in enumerate(case.args):
        zeroed = replace(case, args=(*case.args[:i], 0, *case.args[i + 1 :]))
        if value and attempt(zeroed):
            case = zeroed
    if case.helpers and not re.search(r"call \d", case.asm):  # none left: a .data case
        case = replace(case, helpers=False)
    while case.args and case.args[-1] == 0 and attempt(replace(case, args=case.args[:-1])):
        case = replace(case, args=case.args[:-1])
    if any(case.buffer) and attempt(replace(case, buffer=bytes(len(case.buffer)))):
        case = replace(case, buffer=bytes(len(case.buffer)))
    return case


def _used(label: str, lines: list[str]) -> bool:
    return any(line.split()[-1] == label for line in lines if not line.endswith(":"))


@dataclass
class Found:
    seed: int
    index: int
    answer: Answer
    case: Case
    minimized: Case | None = None
    files: list[str] = field(default_factory=list)

    def describe(self) -> str:
        where = f"seed {self.seed} program {self.index}"
        again = f"python -m fuzz.isolated --seed {self.seed} --index {self.index}"
        return f"{self.answer.status} at {where} ({again}): {self.answer.message}"


@dataclass
class Report:
    programs: int = 0
    invalid: int = 0
    seconds: float = 0.0
    workers: int = 0
    findings: list[Found] = field(default_factory=list)
    reached: Counter[str] = field(default_factory=Counter)
    shapes: Counter[str] = field(default_factory=Counter)


def run(
    seed: int,
    *,
    count: int,
    seconds: float,
    out: Path | None = None,
    minimize_findings: bool = True,
    indices: Iterable[int] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Report:
    """Generate and check programs `seed-0`, `seed-1`, ... in a child process, until
    `count` programs or `seconds` have passed (or the programs of `indices`)."""
    worker = Worker()
    report = Report()
    start = time.monotonic()
    try:
        for index in indices if indices is not None else range(count):
            if indices is None and time.monotonic() - start > seconds:
                break
            case = generate(case_data(seed, index))
            answer = worker.check(case)
            report.programs += 1
            report.shapes.update(case.shapes)
            report.reached.update(answer.reached)
            report.reached.update({f"programs-{k}": 1 for k, v in answer.reached.items() if v})
            if answer.status == "invalid":
                report.invalid += 1
            elif answer.status != "ok":
                ran = list(worker.ran)
                if answer.status in ("crash", "hang"):
                    isolated = isolate(worker, case, ran)
                    if isolated is None:
                        answer.message += " (not reproduced alone: a crash of an earlier case?)"
                    else:
                        case, answer = isolated
                found = Found(seed, index, answer, case)
                if progress:
                    progress(found.describe())
                if minimize_findings:
                    found.minimized = minimize(
                        case, lambda c, a=answer: same_failure(a, worker.check(c))
                    )
                    worker.stop()
                if out is not None:
                    found.files = write_finding(found, out)
                report.findings.append(found)
            if progress and report.programs % 100 == 0:
                progress(
                    f"{report.programs} programs, {len(report.findings)} findings, "
                    f"{time.monotonic() - start:.0f} s"
                )
    finally:
        worker.stop()
        report.seconds = time.monotonic() - start
        report.workers = worker.spawned
    return report


def write_finding(found: Found, out: Path) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    case = found.minimized or found.case
    stem = f"jit-attack-{found.answer.status}-{found.seed}-{found.index}"
    (out / f"{stem}.json").write_text(case.to_json() + "\n")
    files = [f"{stem}.json"]
    comment = f"found by python -m fuzz.isolated --seed {found.seed} --index {found.index}: "
    comment += found.answer.message.replace("\n", " ")[:300]
    try:
        (out / f"{stem}.data").write_text(case_file(case, comment))
        files.append(f"{stem}.data")
    except ValueError:  # helper calls: a .data case has none
        pass
    return files


# -- the child --------------------------------------------------------------------------


def worker_main() -> int:
    """Answer one JSON line per request: check the case, say how it went."""
    import ctypes
    import faulthandler

    from fuzz.loops import check, reached
    from fuzz.targets import Finding

    faulthandler.enable()
    out = sys.stdout
    sys.stdout = sys.stderr  # nothing else may write to the answers

    def announce(what: str) -> None:  # the last of these precedes a crash's traceback
        print(what, file=sys.stderr, flush=True)

    for line in sys.stdin:
        request = json.loads(line)
        if request.get("segfault"):
            ctypes.string_at(0)
        case = Case.from_json(request["case"])
        try:
            status = "ok" if check(case, announce=announce) is not None else "invalid"
            message = ""
        except Finding as finding:
            status, message = "finding", str(finding)
        except Exception as exc:  # the check itself failed: a finding as well
            status, message = "finding", f"{type(exc).__name__}: {exc}"
        answer = {"status": status, "message": message, "reached": reached(case)}
        out.write(json.dumps(answer) + "\n")
        out.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuzz.isolated", description=__doc__)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--index", type=int, action="append", help="run these programs only")
    parser.add_argument("--out", type=Path, help="write findings here")
    parser.add_argument("--no-minimize", action="store_true")
    parser.add_argument("--show", action="store_true", help="print the programs of --index")
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main()
    if args.show:
        for index in args.index or [0]:
            case = generate(case_data(args.seed, index))
            print(f"; seed {args.seed} program {index}: args {[hex(a) for a in case.args]}")
            print(case.asm)
        return 0

    def say(text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    say(f"seed {args.seed}, pid {os.getpid()}")
    report = run(
        args.seed,
        count=args.count,
        seconds=args.seconds,
        out=args.out,
        minimize_findings=not args.no_minimize,
        indices=args.index,
        progress=say,
    )
    say(
        f"done: {report.programs} programs ({report.invalid} did not load) in "
        f"{report.seconds:.0f} s, {report.workers} worker processes, "
        f"{len(report.findings)} findings"
    )
    say(f"reached: {dict(sorted(report.reached.items()))}")
    say(f"shapes: {dict(sorted(report.shapes.items()))}")
    for found in report.findings:
        say(found.describe())
        if found.minimized is not None:
            print(found.minimized.asm, f"; args {[hex(a) for a in found.minimized.args]}")
        if found.files:
            say(f"written: {', '.join(found.files)}")
    return 1 if report.findings else 0


if __name__ == "__main__":
    sys.exit(main())
