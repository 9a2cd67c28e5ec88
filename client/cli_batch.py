"""`bpfexec run --inputs FILE.jsonl`: one function over many inputs.

Each line of the input file (`-`: standard input) is a JSON array of the
arguments of one run, as `--arg` takes them: strings (`"5"`, `"0x10"`,
`"hex:..."`, `"file:PATH"`) or JSON integers; blank lines are skipped. Each
result is printed as soon as it is known, one JSON object a line, in input
order: `return_value`, `fuel_used`, `trap`, and `buffers` when the program
changed one of its argument buffers. A trap is such a result, not an error;
a line that is not an argument list stops the batch with a one-line error
naming the file and line (exit status 2), after the results of the lines
before it.

Locally the inputs run as a `bpfexec.vm.batch.run_batch` (the maps shared,
as `--repeat` shares them); with `--server`, as executions of one uploaded
module (on `--state`'s maps, if given). When standard error is a terminal, a
progress line there counts the inputs done.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from bpfexec.client.cli import EXIT_OK, UsageError, parse_arg

Arguments = list[int | bytes]


def read_inputs(path: str, stream: IO[str]) -> Iterator[tuple[int, Arguments]]:
    """The line numbers and argument lists of the lines of `stream` (named `path`
    in errors)."""
    for number, line in enumerate(stream, start=1):
        if not line.strip():
            continue
        where = f"--inputs {path}:{number}"
        try:
            values = json.loads(line)
        except ValueError as exc:
            raise UsageError(f"{where}: not JSON ({exc})") from None
        if not isinstance(values, list):
            got = line.strip()[:40]
            raise UsageError(f"{where}: expected a JSON array of arguments, got {got}")
        arguments: Arguments = []
        for value in values:
            if isinstance(value, int) and not isinstance(value, bool):
                arguments.append(value)
            elif isinstance(value, str):
                try:
                    arguments.append(parse_arg(value))
                except UsageError as exc:
                    raise UsageError(f"{where}: {exc}") from None
            else:
                raise UsageError(f"{where}: argument {value!r} is not a string or an integer")
        yield number, arguments


def shown(result: dict[str, Any], arguments: Sequence[int | bytes]) -> dict[str, Any]:
    """A result as a batch prints it: buffers only when the program changed one."""
    line = {key: result[key] for key in ("return_value", "fuel_used", "trap")}
    given = [arg.hex() for arg in arguments if isinstance(arg, bytes)]
    if result["buffers"] != given:
        line["buffers"] = result["buffers"]
    return line


def run_inputs(args: argparse.Namespace) -> int:
    """`bpfexec run --inputs`: print one result a line; the exit status."""
    stream = sys.stdin if args.inputs == "-" else _open(args.inputs)
    try:
        inputs = read_inputs(args.inputs, stream)
        progress = Progress() if sys.stderr.isatty() else None
        results = _remote(args, inputs) if args.server else _local(args, inputs)
        for result in results:
            print(json.dumps(result), flush=progress is not None)
            if progress is not None:
                progress.step()
        if progress is not None:
            progress.done()
    finally:
        if stream is not sys.stdin:
            stream.close()
    return EXIT_OK


def _open(path: str) -> IO[str]:
    try:
        return Path(path).open(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"--inputs {path}: {exc.strerror or exc}") from None


Lines = Iterator[tuple[int, Arguments]]


def _local(args: argparse.Namespace, inputs: Lines) -> Iterator[dict[str, Any]]:
    from bpfexec.client.cli import _load, _local_limits, _standard_helpers
    from bpfexec.vm.batch import BatchInputError, run_batch

    limits = _local_limits(args)
    program = _load(args.file, limits)
    helpers = _standard_helpers(args.helpers, args.native_helpers)
    given: list[tuple[int, Arguments]] = []  # the lines read and not yet answered

    def remembered() -> Iterator[Arguments]:
        for line in inputs:
            given.append(line)
            yield line[1]

    batch = run_batch(
        program, args.function, remembered(), fuel=args.fuel, helpers=helpers, limits=limits,
        engine=args.engine or "interpreter",
    )  # fmt: skip
    try:
        for result in batch:
            yield shown(result.to_dict(), given.pop(0)[1])
    except BatchInputError as exc:
        raise UsageError(f"--inputs {args.inputs}:{given[0][0]}: {exc.reason}") from None


def _remote(args: argparse.Namespace, inputs: Lines) -> Iterator[dict[str, Any]]:
    from bpfexec.client.cli import _read_file
    from bpfexec.client.cli_remote import InputError, connection_options, remote_batch

    code = _read_file(args.file)
    options = connection_options(args)
    try:
        for _, arguments, result in remote_batch(
            code, Path(args.file).name, args.server, args.function, inputs, args.fuel,
            state=args.state, remote_helpers=args.remote_helpers or (), **options,
        ):  # fmt: skip
            yield shown(result, arguments)
    except InputError as exc:
        raise UsageError(f"--inputs {args.inputs}:{exc.line}: {exc}") from None


class Progress:
    """`N inputs, R/s` (or another noun) on standard error, rewritten at most every
    half second."""

    def __init__(self, noun: str = "inputs") -> None:
        self.noun = noun
        self.count = 0
        self.start = self.shown = time.monotonic()

    def step(self, count: int = 1) -> None:
        self.count += count
        now = time.monotonic()
        if now - self.shown >= 0.5:
            self.shown = now
            rate = self.count / max(now - self.start, 1e-9)
            print(f"\r{self.count} {self.noun}, {rate:,.0f}/s", end="", file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.shown != self.start:
            print(file=sys.stderr)
