"""One function over a stream of inputs: `run_batch`, `run_chunks`, `run_packed`.

A batch is what `BPF_PROG_TEST_RUN`'s repeat is for one input, for many: the
program is linked and its engine chosen once, the maps are shared by every
input (as `--repeat` shares them), and each input gets its own fresh registers,
stack, argument buffers and fuel budget. An input that traps yields its trap
and the batch goes on with the next. The `Interrupt` is the batch's: a
deadline or a cancellation stops the input running (it yields that trap) and
no later input runs.

Inputs are consumed lazily and results yielded as each input finishes, so a
batch of a million inputs is never held in memory.

On the JIT, inputs run in chunks on a loop in native code
(`bpfexec.vm.jit.batch_loop`), which resets what a fresh run would have fresh
between two inputs without returning to Python; the results are the same as
input by input. Chunks are what the caller hands `run_chunks` (a server, one
per request message) or, for `run_batch`, up to `CHUNK` inputs read ahead.
Integer inputs may come packed (`PackedInputs`, `run_packed`: 64-bit words,
no Python object per input) and their results go out packed (`PackedResults`).
"""

from __future__ import annotations

import itertools
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from bpfexec.vm.errors import RequestError, Trap
from bpfexec.vm.helpers import HelperResolver
from bpfexec.vm.limits import Limits
from bpfexec.vm.machine import Argument, Engine, Interrupt, Result, get_engine, prepare, run
from bpfexec.vm.maps import MapSet
from bpfexec.vm.memory import MAX_BUFFERS
from bpfexec.vm.program import Program

if TYPE_CHECKING:
    from bpfexec.vm.jit.batch_loop import NativeBatch


class BatchInputError(RequestError):
    """Input `index` (0-based) of a batch cannot run: its arguments are wrong."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(f"input {index + 1}: {message}")
        self.index = index
        self.reason = message


CHUNK = 256  # inputs `run_batch` reads ahead for the native loop


def run_batch(
    program: Program,
    function: str | None,
    inputs: Iterable[Sequence[Argument]],
    *,
    fuel: int | None = None,
    helpers: HelperResolver | None = None,
    limits: Limits | None = None,
    engine: str | Engine = "interpreter",
    interrupt: Interrupt | None = None,
    maps: MapSet | None = None,
    linux: HelperResolver | None = None,
) -> Iterator[Result]:
    """Run `function` on each input (its arguments, as `execute` takes them), in
    order, yielding each Result. Raises `BatchInputError` for an input whose
    arguments cannot run (the results before it were yielded), and what
    `execute` raises for the request itself (an unknown function, a missing
    helper) before the first input runs. `linux` is as `prepare` takes it.
    On the JIT, up to `CHUNK` inputs are read before the first of them runs."""
    runner = get_engine(engine) if isinstance(engine, str) else engine
    size = CHUNK if runner.name == "jit" else 1
    source = iter(inputs)
    chunks = iter(lambda: list(itertools.islice(source, size)), [])
    results = run_chunks(
        program, function, chunks, fuel=fuel, helpers=helpers, limits=limits, engine=runner,
        interrupt=interrupt, maps=maps, linux=linux,
    )  # fmt: skip
    return cast(Iterator[Result], results)  # lists of inputs: Results only


def run_chunks(
    program: Program,
    function: str | None,
    chunks: Iterable[Sequence[Sequence[Argument]] | PackedInputs],
    *,
    fuel: int | None = None,
    helpers: HelperResolver | None = None,
    limits: Limits | None = None,
    engine: str | Engine = "interpreter",
    interrupt: Interrupt | None = None,
    maps: MapSet | None = None,
    linux: HelperResolver | None = None,
) -> Iterator[Result | PackedResults]:
    """`run_batch` over inputs that come in chunks: each chunk runs once it is read
    (on the JIT, in one native loop), its results yielded before the next is read:
    a Result per input of a list, one PackedResults for PackedInputs (fewer results
    than inputs when interrupted)."""
    limits = limits or Limits()
    interrupt = interrupt or Interrupt()
    runner = get_engine(engine) if isinstance(engine, str) else engine
    program.function(function)  # an unknown function is an error before any input
    if maps is None:
        maps = MapSet(program.maps, init=program.map_init)
    native = start_native(
        program, function, runner, fuel=fuel, helpers=helpers, limits=limits,
        interrupt=interrupt, maps=maps, linux=linux,
    )  # fmt: skip
    index = 0  # of the first input of the chunk
    try:
        for chunk in chunks:
            if isinstance(chunk, PackedInputs):
                if interrupt.reason is not None:
                    return
                if native is not None:
                    yield native.packed_results(chunk.words)
                else:
                    yield _packed_results(
                        program, function, chunk, runner, fuel=fuel, helpers=helpers,
                        limits=limits, interrupt=interrupt, maps=maps, linux=linux,
                    )  # fmt: skip
                index += len(chunk)
                continue
            if native is not None:
                if interrupt.reason is not None:
                    return
                encoded, error = native.encode(chunk)
                yield from native.results(encoded)
                if error is not None and interrupt.reason is None:
                    raise BatchInputError(index + encoded.count, str(error))
                index += len(chunk)
                continue
            for args in chunk:
                if interrupt.reason is not None:
                    return
                try:
                    machine = prepare(
                        program, function, args, fuel=fuel, helpers=helpers, limits=limits,
                        interrupt=interrupt, maps=maps, linux=linux,
                    )  # fmt: skip
                except RequestError as exc:  # not LinkError (a missing helper): the request's
                    raise BatchInputError(index, str(exc)) from None
                yield run(machine, runner)
                index += 1
    finally:
        if native is not None:
            native.close()


PACKED_INPUT_WORDS = 5  # r1..r5 of each input of `run_packed`
BUFFER_WORDS = 2 * MAX_BUFFERS  # the native loop's buffer table: (address, length) a buffer
PACKED_RESULT_WORDS = 3  # r0, fuel used, and the trap's `TrapKind.code` (0: none)


@dataclass(frozen=True)
class PackedInputs:
    """A chunk of integer inputs for `run_chunks`: PACKED_INPUT_WORDS words an input."""

    words: array[int]

    def __len__(self) -> int:
        return len(self.words) // PACKED_INPUT_WORDS


@dataclass(frozen=True)
class PackedResults:
    """The results of PackedInputs: PACKED_RESULT_WORDS words a result (r0, fuel used,
    `TrapKind.code` or 0), and by position in the chunk the traps and the logs."""

    words: array[int]
    traps: dict[int, Trap]
    logs: dict[int, tuple[str, ...]]

    def __len__(self) -> int:
        return len(self.words) // PACKED_RESULT_WORDS


def run_packed(
    program: Program,
    function: str | None,
    inputs: array[int],
    *,
    fuel: int | None = None,
    helpers: HelperResolver | None = None,
    limits: Limits | None = None,
    engine: str | Engine = "jit",
    interrupt: Interrupt | None = None,
    maps: MapSet | None = None,
    linux: HelperResolver | None = None,
) -> array[int]:
    """Integer inputs packed, results packed: `inputs` holds PACKED_INPUT_WORDS
    unsigned 64-bit words an input (r1..r5; 0 where the function takes fewer
    arguments), the array returned PACKED_RESULT_WORDS an input, in order: r0 (0
    after a trap), the fuel used, and 0 or the trap's `TrapKind.code`. No Python
    object is made per input on the JIT, whose native loop runs them all; logs
    and trap messages are not kept (`run_batch` has them). An interrupt ends
    the results early: the input it stopped is the last, with its trap."""
    if inputs.typecode != "Q" or len(inputs) % PACKED_INPUT_WORDS:
        raise RequestError(
            f"packed inputs are an array('Q') of {PACKED_INPUT_WORDS} words an input, "
            f"got array({inputs.typecode!r}) of {len(inputs)}"
        )
    limits = limits or Limits()
    interrupt = interrupt or Interrupt()
    runner = get_engine(engine) if isinstance(engine, str) else engine
    program.function(function)
    if maps is None:
        maps = MapSet(program.maps, init=program.map_init)
    options: dict[str, Any] = dict(
        fuel=fuel, helpers=helpers, limits=limits, interrupt=interrupt, maps=maps, linux=linux
    )
    native = start_native(program, function, runner, **options)
    if native is None:
        return _packed_results(program, function, PackedInputs(inputs), runner, **options).words
    count = len(inputs) // PACKED_INPUT_WORDS
    out = array("Q", bytes(8 * PACKED_RESULT_WORDS * count))
    try:
        done = native.packed(inputs, out)
    finally:
        native.close()
    del out[PACKED_RESULT_WORDS * done :]
    return out


def _packed_results(
    program: Program, function: str | None, inputs: PackedInputs, runner: Engine, **options: Any
) -> PackedResults:
    """PackedInputs run one by one (`prepare` and `run`), their results packed."""
    interrupt: Interrupt = options["interrupt"]
    words = inputs.words
    out = array("Q")
    traps: dict[int, Trap] = {}
    logs: dict[int, tuple[str, ...]] = {}
    for index in range(len(inputs)):
        if interrupt.reason is not None:
            break
        args = words[PACKED_INPUT_WORDS * index : PACKED_INPUT_WORDS * (index + 1)].tolist()
        result = run(prepare(program, function, args, **options), runner)
        out.extend(
            (result.return_value, result.fuel_used, result.trap.kind.code if result.trap else 0)
        )
        if result.trap is not None:
            traps[index] = result.trap
        if result.log:
            logs[index] = result.log
    return PackedResults(out, traps, logs)


def start_native(
    program: Program,
    function: str | None,
    runner: Engine,
    context: bool = False,
    **options: Any,
) -> NativeBatch | None:
    """The native loop for a batch (close it when done), when the engine is the JIT
    and its code runs the program natively; else None. A missing helper raises
    here, before any input. `options` are `prepare`'s; `context` says every input's
    r1 will be a packet context (`bpfexec.vm.packet_run`)."""
    machine = prepare(program, function, (), **options)
    if runner.name != "jit":
        return None
    from bpfexec.vm.jit import best_compiled, compile_best
    from bpfexec.vm.jit.batch_loop import native_batch

    compiled = best_compiled(program) or compile_best(program)
    return native_batch(compiled, machine, context)
