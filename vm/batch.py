"""One function over a stream of inputs: `run_batch`.

A batch is what `BPF_PROG_TEST_RUN`'s repeat is for one input, for many: the
program is linked and its engine chosen once, the maps are shared by every
input (as `--repeat` shares them), and each input gets its own fresh registers,
stack, argument buffers and fuel budget. An input that traps yields its trap
and the batch goes on with the next. The `Interrupt` is the batch's: a
deadline or a cancellation stops the input running (it yields that trap) and
no later input runs.

Inputs are consumed lazily and results yielded as each input finishes, so a
batch of a million inputs is never held in memory.

This first form runs each input as `bpfexec.vm.machine.run` does; a native
loop over packed inputs is the JIT's to add behind the same interface.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from bpfexec.vm.errors import RequestError
from bpfexec.vm.helpers import HelperResolver
from bpfexec.vm.limits import Limits
from bpfexec.vm.machine import Argument, Engine, Interrupt, Result, get_engine, prepare, run
from bpfexec.vm.maps import MapSet
from bpfexec.vm.program import Program


class BatchInputError(RequestError):
    """Input `index` (0-based) of a batch cannot run: its arguments are wrong."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(f"input {index + 1}: {message}")
        self.index = index
        self.reason = message


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
    helper) before the first input runs. `linux` is as `prepare` takes it."""
    limits = limits or Limits()
    interrupt = interrupt or Interrupt()
    runner = get_engine(engine) if isinstance(engine, str) else engine
    program.function(function)  # an unknown function is an error before any input
    if maps is None:
        maps = MapSet(program.maps, init=program.map_init)
    for index, args in enumerate(inputs):
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
