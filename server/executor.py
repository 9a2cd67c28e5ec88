"""`ExecutionService`: what the gRPC methods do, without gRPC.

Load, look up, list and delete modules, and execute their functions. Every
method takes and returns `vm` and `server` types, so this class is tested
without a network and reused unchanged by every transport (the unary
`Execute`, and the streaming `ExecuteStream` that adds the client's helpers
through `execute(..., helpers=...)`). `start_batch` runs one function over a
stream of inputs (`ExecuteBatch`) on one pool thread and one slot, through the
bounded queues of `bpfexec.server.batches`; `start_test_run` runs a packet
program over a stream of packets (`TestRun`, `bpfexec.vm.packet_run`) the same way.

Executions run on a thread pool, not on the event loop, so one long run never
stalls other requests; the one exception is a first slice of at most
`INLINE_FUEL` instructions for programs that call no helper, which holds the
loop for less time than handing the run to a thread would. The pool has one
thread per allowed concurrent execution, and a request beyond that is refused
at once (`Overloaded`) rather than queued:
a client retrying elsewhere beats one waiting an unknown time behind a
program that may run until its fuel is gone.

With the JIT, an upload queues its module's quick tier, then its optimized
one, on a `bpfexec.vm.jit.worker.CompileQueue`: worker processes do LLVM's work, every
quick tier goes before any optimized one and smaller modules first, a tier over
its size limits (`bpfexec.vm.jit.limits`) is refused at once, and shutdown abandons
compiles instead of waiting for them.

A deadline becomes an interrupt of the running program; a cancelled request
(the client went away, the server is shutting down) interrupts it too, and its
thread is only given back once the program has actually stopped.

Modules belong to the tenants that uploaded them: every module method takes
the caller's `tenant`, and a module another tenant uploaded is, to this
caller, a module that does not exist (unless `shared_modules`). With a
module store (a directory, or Redis shared by replicas), every accepted module
is stored before the upload returns, and a module missing from the cache is
read back from the store.

An execution naming a state runs on that state's maps (`bpfexec.server.states`,
created on first use) and its change is written to the store, if any, before
it returns; deleting a module deletes the caller's states of it. The state
methods (`list_states`, `get_state`, `update_entries`, `delete_entries`,
`delete_state`) check the caller's tenant the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence, Sized
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from prometheus_client import Counter

from bpfexec.server.batches import RESULT_OVERHEAD, BatchPipe, PipeClosed
from bpfexec.server.cache import CachedModule, ModuleCache
from bpfexec.server.metrics import Metrics
from bpfexec.server.states import (
    MapContents,
    StateKey,
    StateRegistry,
    StateSummary,
    check_state_name,
    map_contents,
    new_map_set,
)
from bpfexec.server.store import ModuleStorage
from bpfexec.vm import (
    Helper,
    HelperChain,
    HelperContext,
    HelperRef,
    HelperRegistry,
    Interrupt,
    LimitError,
    Limits,
    LoadError,
    Program,
    RequestError,
    Result,
    TrapKind,
    execute,
)
from bpfexec.vm.batch import CHUNK, PackedInputs, PackedResults, run_chunks
from bpfexec.vm.callbacks import MAP_NEXT
from bpfexec.vm.context_access import context_type, with_context
from bpfexec.vm.helpers import Event, HelperFn, HelperResolver
from bpfexec.vm.interpreter import program_blocks
from bpfexec.vm.linux_helpers import linux_helpers
from bpfexec.vm.loader import load
from bpfexec.vm.machine import Argument, get_engine, link, prepare, run
from bpfexec.vm.maps import MapSet
from bpfexec.vm.packet_helpers import packet_helpers
from bpfexec.vm.packet_run import PacketChunk, PacketResult, run_packet_chunks
from bpfexec.vm.program_types import ProgramType

if TYPE_CHECKING:
    from bpfexec.vm.jit.limits import TierLimits
    from bpfexec.vm.jit.worker import CompileQueue, CompileWorker

log = logging.getLogger(__name__)

Chunk = TypeVar("Chunk", bound=Sized)
Out = TypeVar("Out")
# What an ExecuteBatch's pipe carries: chunks of arguments in, results out.
BatchChunk = list[Sequence[Argument]] | PackedInputs
BatchOut = Result | PackedResults

# Fuel of the slice a helper-free program first runs on the event loop (about
# 0.2 ms of interpretation: less than the hand-off to a pool thread costs).
INLINE_FUEL = 1000
# Set in the `compiled` of a packet program's rewritten code (what a test run runs,
# `bpfexec.vm.context_access`) once its JIT tiers are queued.
_COMPILE_QUEUED = "server:compile-queued"


class ServiceError(Exception):
    """A request the service refuses for a reason of its own (not a VM error)."""


class ModuleNotFound(ServiceError):
    def __init__(self, module_id: str) -> None:
        self.module_id = module_id
        shown = module_id.encode("unicode_escape").decode("ascii")  # one line, always
        super().__init__(
            f"module {shown} is not cached on this server (evicted, deleted or never "
            "loaded): upload it again with LoadModule and retry"
        )


class Overloaded(ServiceError):
    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(
            f"the server is already running its maximum of {limit} concurrent executions: "
            "retry later or on another replica"
        )


class TooManyRequests(ServiceError):
    """More calls in progress than `max_concurrent_requests` (`bpfexec.server.admission`)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(
            f"the server is already handling its maximum of {limit} concurrent requests "
            "(max_concurrent_requests): retry later or on another replica"
        )


class DeadlineExceeded(ServiceError):
    def __init__(self, result: Result) -> None:
        self.result = result
        super().__init__(
            f"the deadline expired after {result.fuel_used} instructions "
            f"({result.duration_ns / 1e9:.3f} s); the execution was stopped"
        )


class BatchDeadlineExceeded(DeadlineExceeded):
    def __init__(self, results: int) -> None:
        ServiceError.__init__(
            self,
            f"the deadline expired after {results} results of the batch; the input running "
            "was stopped and no later one ran",
        )


class TestRunDeadlineExceeded(DeadlineExceeded):
    __test__ = False  # not a pytest class

    def __init__(self, results: int) -> None:
        ServiceError.__init__(
            self,
            f"the deadline expired after {results} packets of the test run; the packet "
            "running was stopped and no later one ran",
        )


@dataclass(frozen=True)
class _Run:
    """One execution as the pool thread runs it."""

    program: Program
    function: str | None
    args: Sequence[Argument]
    fuel: int
    resolver: HelperResolver
    interrupt: Interrupt
    state: StateKey | None  # the named state whose maps it runs on; None: fresh maps
    dump_maps: bool
    wait: float | None = None  # how long it may wait for its state (its deadline)


@dataclass(frozen=True)
class Execution:
    """What an execution did (`result`) and, if asked for, its maps after the run."""

    result: Result
    maps: dict[str, MapContents] | None = None


class ExecutionService:
    """Modules, executions and named states of one server."""

    def __init__(
        self,
        *,
        helpers: HelperRegistry,
        limits: Limits,
        metrics: Metrics,
        engine: str = "interpreter",
        max_concurrent: int = 16,
        cache_max_modules: int = 1024,
        cache_max_bytes: int = 256 << 20,
        remote_helper_timeout: float = 10.0,
        store: ModuleStorage | None = None,
        shared_modules: bool = True,
        jit_compile_workers: int = 2,
        jit_compile_timeout: float = 60.0,
        jit_compile_memory_bytes: int = 2 << 30,
        # (instructions per function, instructions in all) of the quick and optimized tiers
        jit_quick_limits: tuple[int, int] = (65536, 131072),
        jit_optimized_limits: tuple[int, int] = (4096, 16384),
        states: StateRegistry | None = None,
    ) -> None:
        self.limits = limits
        self.states = states if states is not None else StateRegistry(metrics=metrics)
        self.remote_helper_timeout = remote_helper_timeout  # seconds per remote helper call
        self.engine = engine
        self.max_concurrent = max_concurrent
        self.metrics = metrics
        self.cache = ModuleCache(cache_max_modules, cache_max_bytes, metrics)
        self.store = store
        self.shared_modules = shared_modules  # False: a tenant sees only the modules it uploaded
        self._registry = helpers
        self._helpers = _counted(helpers, metrics)
        self._linux = _counted(linux_helpers(), metrics, map_operations=True)
        self._slots = threading.BoundedSemaphore(max_concurrent)
        self._closing = False
        self._pool = ThreadPoolExecutor(max_concurrent, thread_name_prefix="bpfexec-execute")
        # The JIT's lookup of a program's best native code; None on the interpreter.
        self._best_compiled: Callable[[Program], object] | None = None
        self._compiles: CompileQueue | None = None
        self._tier_limits: dict[bool, TierLimits] = {}
        self.jit_compile_timeout = jit_compile_timeout
        if engine == "jit":
            from bpfexec.vm.jit import best_compiled
            from bpfexec.vm.jit.limits import TierLimits
            from bpfexec.vm.jit.worker import CompileQueue

            self._best_compiled = best_compiled
            self._tier_limits = {
                True: TierLimits.of(*jit_quick_limits),
                False: TierLimits.of(*jit_optimized_limits),
            }
            # Compile workers (processes) in priority order; 0: LLVM in this process.
            self._compiles = CompileQueue(
                max(1, jit_compile_workers),
                processes=jit_compile_workers > 0,
                memory_bytes=jit_compile_memory_bytes,
            )

    # Modules

    async def load(self, code: bytes, name: str | None = None, tenant: str = "") -> CachedModule:
        """Parse, verify, cache and store `code` for `tenant`; raises LoadError and kin."""
        return await asyncio.to_thread(self._accept, code, name, tenant)

    def _accept(self, code: bytes, name: str | None, tenant: str) -> CachedModule:
        module = self._cache_load(code, name, self._namespace(tenant))
        added = tenant not in module.tenants
        module.tenants.add(tenant)
        if self.store is not None and (added or not self.store.has(module.id)):
            # On disk before the upload is answered: nothing accepted is lost by a restart.
            self.store.add_tenant(module.id, code, name, tenant)
        return module

    def _namespace(self, tenant: str) -> str:
        """The cache namespace of `tenant`'s modules: its own unless modules are shared, so
        an upload never hits, nor is faster for, another tenant's copy of the same bytes."""
        return "" if self.shared_modules else tenant

    def _cache_load(self, code: bytes, name: str | None, namespace: str) -> CachedModule:
        """The cached module for `code`, loaded if it is not cached; a module the cache
        took just now has its JIT tiers queued (one it refused is never compiled)."""
        loaded: list[Program] = []

        def loader(data: bytes) -> Program:
            loaded.append(self._load(data, name))
            return loaded[0]

        module = self.cache.load(code, loader, namespace)
        if self._compiles is not None and loaded and module.program is loaded[0]:
            # Compiling takes longer than loading; the interpreter serves until it is done.
            self._queue_compile(module.program, quick=True)
        return module

    def _load(self, code: bytes, name: str | None) -> Program:
        start = time.perf_counter()
        program = load(code, name or "<module>", self.limits)
        with contextlib.suppress(Exception):  # a program it fails on fails when it runs
            program_blocks(program)  # what every engine decodes first: now, not in a run
        self.metrics.load_seconds.observe(time.perf_counter() - start)
        return program

    def _queue_compile(self, program: Program, quick: bool) -> None:
        """Every quick tier before any optimized one, smaller modules first within a
        tier: a huge module never holds back the first native code of the others."""
        assert self._compiles is not None
        priority = (0 if quick else 1, len(program.instructions))
        self._compiles.submit(priority, lambda worker: self._compile(program, quick, worker))

    def _compile(
        self, program: Program, quick: bool = True, worker: CompileWorker | None = None
    ) -> None:
        """Compile one tier (in `worker`'s process, if any); after the quick tier,
        queue the optimized one. A tier over its size limits (`bpfexec.vm.jit.limits`) is
        refused at once, and the module keeps the tier below."""
        from bpfexec.vm.jit import compile_program

        start = time.perf_counter()
        emit = worker.emitter(self.jit_compile_timeout) if worker is not None else None
        compiled = compile_program(program, quick=quick, emit=emit, limits=self._tier_limits[quick])
        seconds = time.perf_counter() - start
        if compiled.refused == "abandoned" and self._closing:
            return  # shutting down: nothing to count
        if not compiled.native:
            tier = "quick" if quick else "optimized"
            self.metrics.jit_fallbacks.labels(tier, compiled.reason).inc()
            log.info("JIT %s tier of %s: %s", tier, program.name, compiled.fallback)
        self.cache.refresh()  # count the native code, and evict to make room for it
        if not quick:
            self.metrics.jit_compile_seconds.observe(seconds)
            return
        self.metrics.jit_quick_compile_seconds.observe(seconds)
        self._queue_compile(program, quick=False)

    def _engine_for(self, program: Program) -> str:
        """The JIT once a tier of the program's native code is ready, the interpreter before."""
        if self._best_compiled is None:
            return "interpreter"
        return "jit" if self._best_compiled(program) is not None else "interpreter"

    async def get(self, module_id: str, tenant: str = "") -> CachedModule:
        """The module if `tenant` may see it, from the cache or else the store."""
        module = self.cache.get(module_id, self._namespace(tenant))
        if module is None and self.store is not None:
            module = await asyncio.to_thread(self._restore, module_id, tenant)
        if module is None or not self._visible(module, tenant):
            raise ModuleNotFound(module_id)
        return module

    def modules(self, tenant: str = "") -> list[CachedModule]:
        """The cached modules `tenant` may see, least recently used first."""
        return [module for module in self.cache.modules() if self._visible(module, tenant)]

    async def delete(self, module_id: str, tenant: str = "") -> None:
        """Forget a module for `tenant`; it is gone once no tenant that uploaded it remains."""
        module = await self.get(module_id, tenant)
        await asyncio.to_thread(self.states.delete_module, module.id, tenant)
        module.tenants.discard(tenant)
        if self.shared_modules or not module.tenants:
            self.cache.delete(module_id, self._namespace(tenant))
        if self.store is not None and self.shared_modules:
            await asyncio.to_thread(self.store.delete, module_id)
        elif self.store is not None:  # other tenants' uploads of the same bytes stay
            await asyncio.to_thread(self.store.remove_tenant, module_id, tenant)

    def restore(self) -> int:
        """Load every stored module into the cache (oldest first); the count loaded."""
        if self.store is None:
            return 0
        return sum(self._restore(module_id) is not None for module_id in self.store.ids())

    def _restore(self, module_id: str, tenant: str | None = None) -> CachedModule | None:
        """Load a stored module into the cache for `tenant`, if it uploaded it, or (None, at
        start-up) for every tenant that did, each in its namespace; the last one loaded."""
        assert self.store is not None
        visible = self.shared_modules or tenant is None
        if not visible and tenant not in self.store.tenants(module_id):
            return None  # another tenant's bytes: not even read
        stored = self.store.read(module_id)  # None if absent or corrupt
        if stored is None:
            return None
        owners = [None] if self.shared_modules else [tenant] if tenant else sorted(stored.tenants)
        module = None
        for owner in owners:
            name = stored.name_for(owner)
            try:
                module = self._cache_load(stored.code, name, owner or "")
            except (LoadError, LimitError) as exc:  # stricter limits or verifier since stored
                log.warning("module store: %s no longer loads, not served: %s", module_id, exc)
                return None
            module.tenants.update(stored.tenants if owner is None else {owner})
        return module

    def _visible(self, module: CachedModule, tenant: str) -> bool:
        return self.shared_modules or tenant in module.tenants

    # Helpers

    def helpers(self) -> list[Helper]:
        """The in-process helpers, in registration order."""
        return list(self._registry)

    def provides(self, ref: HelperRef) -> bool:
        """Whether a call site's helper reference is answered in-process."""
        return ref in self._registry

    # Named states (`bpfexec.server.states`): every method is for the caller's tenant.

    async def list_states(self, tenant: str = "", module_id: str = "") -> list[StateSummary]:
        return await asyncio.to_thread(self.states.summaries, tenant, module_id)

    async def get_state(
        self, module_id: str, name: str, map_name: str = "", tenant: str = ""
    ) -> tuple[StateSummary, dict[str, MapContents]]:
        """A state and its maps' contents (every map, or `map_name`'s), as last committed."""
        key = StateKey(tenant, module_id, name)
        return await asyncio.to_thread(self.states.read, key, map_name or None)

    async def update_entries(
        self,
        module_id: str,
        name: str,
        map_name: str,
        entries: Sequence[tuple[bytes, bytes]],
        flags: int,
        tenant: str = "",
    ) -> tuple[list[int], bool]:
        """Set entries of a state's map (each one's errno result); a state that does not
        exist is created for the module first (seeding). (results, whether created)."""
        check_state_name(name)
        key = StateKey(tenant, module_id, name)
        try:
            module = await self.get(module_id, tenant)
            program, key = module.program, StateKey(tenant, module.id, name)
        except ModuleNotFound:
            if not self.states.kept_here(key):
                raise  # creating a state needs its module
            program = None  # an evicted module's state, kept in this process
        return await asyncio.to_thread(self.states.update, key, program, map_name, entries, flags)

    async def delete_entries(
        self, module_id: str, name: str, map_name: str, keys: Sequence[bytes], tenant: str = ""
    ) -> list[int]:
        try:
            program = (await self.get(module_id, tenant)).program
        except ModuleNotFound:
            program = None  # only a state kept here can be found
        key = StateKey(tenant, module_id, name)
        return await asyncio.to_thread(self.states.delete_entries, key, program, map_name, keys)

    async def delete_state(self, module_id: str, name: str, tenant: str = "") -> None:
        await asyncio.to_thread(self.states.delete, StateKey(tenant, module_id, name))

    def restore_states(self) -> int:
        """Load the stored states whose module the store still has for their tenant
        (after `restore`: the modules are cached by then)."""

        def definitions(key: StateKey) -> Sequence[object] | None:
            if self.store is None:
                return None
            module = self.cache.get(key.module_id, self._namespace(key.tenant))
            if module is None:
                module = self._restore(key.module_id, key.tenant)
            if module is None or not self._visible(module, key.tenant):
                return None
            return module.program.maps

        return self.states.restore(definitions)

    # Executions

    async def execute(
        self,
        module_id: str,
        function: str | None = None,
        args: Sequence[Argument] = (),
        fuel: int | None = None,
        *,
        timeout: float | None = None,
        helpers: HelperResolver | None = None,
        tenant: str = "",
        state: str | None = None,
        dump_maps: bool = False,
        on_event: Callable[[Event], None] | None = None,
    ) -> Execution:
        """Run `function` of a cached module on the pool.

        `timeout` (seconds, usually the rest of the client's deadline) stops the
        program and raises DeadlineExceeded. `helpers` adds helpers after the
        in-process ones (the caller's own, over a stream). `state` names the
        tenant's state whose maps the run uses (created if new; its change is
        stored before this returns); `dump_maps` returns the maps after the run;
        `on_event` hears of each ring buffer record as it is submitted, on the
        executing thread. Request problems raise vm's RequestError/LimitError/
        LinkError, ModuleNotFound, Overloaded or a StateError; what the program
        does, traps included, is the Execution's result.
        """
        module = await self.get(module_id, tenant)
        budget = self.limits.fuel(fuel)  # a LimitError before taking a slot
        if state is not None:
            check_state_name(state)
        if not self._slots.acquire(blocking=False):
            self.metrics.rejected.inc()
            raise Overloaded(self.max_concurrent)
        plain = state is None and not dump_maps and on_event is None
        if plain and helpers is None and not module.calls_helpers:
            # A program that calls no helper is pure computation, bounded by its
            # fuel. Try a short slice right here: most runs finish within it,
            # and doing so costs less than the two thread switches of the pool.
            # One that needs more fuel is run again, from scratch, on the pool.
            try:
                start = time.perf_counter()
                quick = execute(
                    module.program, function, args, fuel=min(budget, INLINE_FUEL),
                    helpers=self._helpers, limits=self.limits,
                    engine=self._engine_for(module.program), linux=self._linux,
                )  # fmt: skip
            except BaseException:
                self._slots.release()
                raise
            out_of_fuel = quick.trap is not None and quick.trap.kind is TrapKind.OUT_OF_FUEL
            if budget <= INLINE_FUEL or not out_of_fuel:
                self._slots.release()
                self._record(quick, time.perf_counter() - start)
                return Execution(quick)
        program = module.program
        key = StateKey(tenant, module.id, state) if state is not None else None
        try:
            if key is not None:
                self.states.open(key, program)  # StateLimit before the pool
        except BaseException:
            self._slots.release()
            raise
        resolver = self._helpers if helpers is None else HelperChain(self._helpers, helpers)
        interrupt = Interrupt()
        run_one = _Run(
            program, function, args, budget, resolver, interrupt, key, dump_maps, timeout
        )
        try:
            job = self._pool.submit(self._run, run_one, on_event)
        except BaseException:
            self._slots.release()
            raise
        # Released when the program has stopped, not when the caller stops waiting.
        job.add_done_callback(lambda _: self._slots.release())
        loop = asyncio.get_running_loop()
        deadline = None
        if timeout is not None:  # a loop timer, not Interrupt.after: no thread per request
            deadline = loop.call_later(timeout, interrupt.request, TrapKind.DEADLINE_EXCEEDED)
        try:
            done = await asyncio.wrap_future(job)
        except asyncio.CancelledError:
            interrupt.request(TrapKind.CANCELLED)
            raise
        finally:
            if deadline is not None:
                deadline.cancel()
        if done.result.trap is not None and done.result.trap.kind is TrapKind.DEADLINE_EXCEEDED:
            raise DeadlineExceeded(done.result)
        return done

    @contextlib.contextmanager
    def _maps(self, job: _Run, fresh: bool) -> Iterator[MapSet | None]:
        """The maps `job` runs on: its state's, held alone and committed at the end of
        the block (`StateRegistry.hold`); else fresh ones if `fresh`, or None."""
        if job.state is None:
            yield new_map_set(job.program) if fresh else None
            return
        with self.states.hold(
            job.state, job.program, wait=job.wait, interrupt=job.interrupt
        ) as state:
            yield state.maps
        self.metrics.state_executions.inc()

    def _run(self, job: _Run, on_event: Callable[[Event], None] | None) -> Execution:
        with self._maps(job, job.dump_maps) as maps:
            return self._run_on(job, maps, on_event)

    def _run_on(
        self, job: _Run, maps: MapSet | None, on_event: Callable[[Event], None] | None
    ) -> Execution:
        self.metrics.in_flight.inc()
        start = time.perf_counter()
        program = job.program
        try:
            machine = prepare(
                program, job.function, job.args, fuel=job.fuel, helpers=job.resolver,
                limits=self.limits, interrupt=job.interrupt, maps=maps, linux=self._linux,
            )  # fmt: skip
            machine.context.on_event = on_event
            result = run(machine, get_engine(self._engine_for(program)))
        finally:
            self.metrics.in_flight.dec()
        self._record(result, time.perf_counter() - start)
        dumped = None
        if job.dump_maps:
            run_maps = machine.context.maps
            dumped = {m.spec.name: map_contents(m) for m in run_maps.maps} if run_maps else {}
        return Execution(result, dumped)

    async def start_batch(
        self,
        module_id: str,
        function: str | None = None,
        fuel: int | None = None,
        *,
        timeout: float | None = None,
        tenant: str = "",
        state: str | None = None,
        helpers: HelperResolver | None = None,
    ) -> RunningBatch[BatchChunk, BatchOut]:
        """Start `function` of a cached module over inputs fed to the returned batch,
        on one pool thread and one execution slot (`bpfexec.vm.batch.run_chunks`).

        `fuel` is each input's; `timeout` bounds the whole batch; `state` names
        the maps the batch runs on (stored once the batch ends); `helpers` adds
        helpers after the in-process ones (a client's, `RemoteHelpers`). Request
        problems raise as for `execute`, before any input.
        """
        module = await self.get(module_id, tenant)
        program = module.program
        budget = self.limits.fuel(fuel)
        program.function(function)  # an unknown function: before any input
        resolver = self._helpers if helpers is None else HelperChain(self._helpers, helpers)
        # A missing helper: the same error as Execute's, before any input.
        link(program, HelperChain(self._linux, resolver) if program.kernel_helpers
             else resolver)  # fmt: skip
        if state is not None:
            check_state_name(state)
        pipe: BatchPipe[BatchChunk, BatchOut] = BatchPipe(asyncio.get_running_loop())
        batch = RunningBatch(pipe, Interrupt(), self.metrics)

        def submit(key: StateKey | None) -> Future[None]:
            job = _Run(
                program, function, (), budget, resolver, batch.interrupt, key, False, timeout
            )
            return self._pool.submit(self._run_batch, job, batch.pipe)

        self._start_worker(batch, module, tenant, state, timeout, submit)
        self.metrics.batches.inc()
        return batch

    def _run_batch(self, job: _Run, pipe: BatchPipe[BatchChunk, BatchOut]) -> None:
        self.metrics.in_flight.inc()
        error: Exception | None = None
        try:
            with self._maps(job, False) as maps:
                results = run_chunks(
                    job.program, job.function, pipe.chunks(), fuel=job.fuel,
                    helpers=job.resolver, limits=self.limits,
                    engine=self._engine_for(job.program), interrupt=job.interrupt, maps=maps,
                    linux=self._linux,
                )  # fmt: skip
                for result in results:
                    pipe.add(result)
        except Exception as exc:  # PipeClosed too: the state is committed all the same
            error = exc
        finally:
            self.metrics.in_flight.dec()
        self._end_worker(pipe, error)

    async def start_test_run(
        self,
        module_id: str,
        program: str | None = None,
        fuel: int | None = None,
        *,
        timeout: float | None = None,
        tenant: str = "",
        state: str | None = None,
        repeat: int = 1,
        dump_maps: bool = False,
    ) -> RunningTestRun:
        """Start the packet program `program` (a function or section name) of a cached
        module over packets fed to the returned run, as BPF_PROG_TEST_RUN runs it
        (`bpfexec.vm.packet_run.run_packets`), on one pool thread and one slot.

        `fuel` is each packet's run's; `timeout` bounds the whole run; `state` names
        the maps it runs on (stored once it ends); `dump_maps` keeps the maps' contents
        after the last packet in `RunningTestRun.maps`. In-process helpers only. Raises
        before any packet, as `execute` does: an unknown function, a missing helper, a
        context access the kernel's verifier refuses (VerifyError), limits, states.
        """
        module = await self.get(module_id, tenant)
        whole = module.program
        budget = self.limits.fuel(fuel)
        if repeat < 1:
            raise RequestError(f"repeat must be at least 1, got {repeat}")
        kind = context_type(whole, program)  # an unknown function: before any packet
        # The context accesses checked and rewritten (once per module and type, cached).
        rewritten = await asyncio.to_thread(with_context, whole, program)
        link(rewritten, self._test_run_helpers(kind, rewritten))  # a missing helper
        if state is not None:
            check_state_name(state)
        loop = asyncio.get_running_loop()
        pipe: BatchPipe[list[bytes], PacketResult] = BatchPipe(loop, size_of=_packet_result_size)
        running = RunningTestRun(pipe, Interrupt(), self.metrics, kind)

        def submit(key: StateKey | None) -> Future[None]:
            job = _Run(
                whole, program, (), budget, self._helpers, running.interrupt, key, dump_maps,
                timeout,
            )  # fmt: skip
            engine = self._test_run_engine(whole, rewritten)
            # On the interpreter until the native code is ready, then on the JIT.
            ready = (lambda: self._engine_for(rewritten) == "jit") if engine != "jit" else None
            return self._pool.submit(self._run_test_run, job, running, engine, repeat, ready)

        self._start_worker(running, module, tenant, state, timeout, submit)
        self.metrics.test_runs.inc()
        return running

    def _start_worker(
        self,
        running: RunningBatch[Any, Any],
        module: CachedModule,
        tenant: str,
        state: str | None,
        timeout: float | None,
        submit: Callable[[StateKey | None], Future[None]],
    ) -> None:
        """Start a batch's or test run's worker: take an execution slot (Overloaded when
        none is free), check `state` can be opened (StateLimit), `submit` the worker
        for it (the slot is given back when it ends), and stop it at `timeout`."""
        if not self._slots.acquire(blocking=False):
            self.metrics.rejected.inc()
            raise Overloaded(self.max_concurrent)
        try:
            key = StateKey(tenant, module.id, state) if state is not None else None
            if key is not None:
                self.states.open(key, module.program)
            work = submit(key)
        except BaseException:
            self._slots.release()
            raise
        work.add_done_callback(lambda _: self._slots.release())
        if timeout is not None:
            running.deadline = asyncio.get_running_loop().call_later(
                timeout, running.stop, TrapKind.DEADLINE_EXCEEDED
            )

    def _test_run_helpers(self, kind: ProgramType, program: Program) -> HelperResolver:
        """What `run_packets` resolves a program's helpers against, through `prepare`:
        the type's packet helpers and the Linux ones first (a packet program's numbered
        helpers are the kernel's), then the in-process registry."""
        if kind is not ProgramType.SYSCALL:
            return HelperChain(HelperChain(packet_helpers(kind), self._linux), self._helpers)
        return HelperChain(self._linux, self._helpers) if program.kernel_helpers else self._helpers

    def _test_run_engine(self, whole: Program, rewritten: Program) -> str:
        """The engine of a test run: the JIT once the rewritten program (the one that
        runs) has a native tier. Its compile is queued on its first test run, as an
        upload queues the module's; the interpreter serves until it is ready."""
        queued = _COMPILE_QUEUED in rewritten.compiled
        if self._compiles is not None and rewritten is not whole and not queued:
            rewritten.compiled[_COMPILE_QUEUED] = True  # on the loop: no race
            self._queue_compile(rewritten, quick=True)
        return self._engine_for(rewritten)

    def _run_test_run(
        self,
        job: _Run,
        running: RunningTestRun,
        engine: str,
        repeat: int,
        ready: Callable[[], bool] | None,
    ) -> None:
        pipe = running.pipe
        self.metrics.in_flight.inc()
        error: Exception | None = None
        try:
            with self._maps(job, True) as maps:
                assert maps is not None
                # A chunk a request message (up to CHUNK packets): run once it has come.
                chunks = (
                    chunk
                    for packets in pipe.chunks()
                    for chunk in PacketChunk.chunks(packets, CHUNK)
                )
                pieces = run_packet_chunks(
                    job.program, job.function, chunks, fuel=job.fuel, helpers=job.resolver,
                    limits=self.limits, engine=engine, interrupt=job.interrupt, maps=maps,
                    linux=self._linux, repeat=repeat, jit_ready=ready,
                )  # fmt: skip
                for runs in pieces:
                    for result in runs.results():
                        pipe.add(result)
                if job.dump_maps:  # read by the loop once the end below has reached it
                    running.maps = {m.spec.name: map_contents(m) for m in maps.maps}
        except Exception as exc:  # PipeClosed too: the state is committed all the same
            error = exc
        finally:
            self.metrics.in_flight.dec()
        self._end_worker(pipe, error)

    def _end_worker(self, pipe: BatchPipe[Any, Any], error: Exception | None) -> None:
        """A batch's or test run's worker is done (its state committed): end its results."""
        if not isinstance(error, PipeClosed):  # closed: the call is over, nobody to tell
            with contextlib.suppress(PipeClosed):
                pipe.finish(error)

    def _record(self, result: Result, seconds: float) -> None:
        outcome = result.trap.kind.value if result.trap else "OK"
        self.metrics.record_execution(outcome, seconds, result.fuel_used)

    def close(self, wait: bool = True) -> None:
        """Stop the pool; running executions finish unless interrupted first. Compiles
        never hold this up: queued ones are dropped, running ones abandoned (their
        worker processes killed; IR generation on a daemon thread is left behind)."""
        self._closing = True
        if self._compiles is not None:
            self._compiles.close()
        self._pool.shutdown(wait=wait, cancel_futures=True)
        if wait and self.states.shared is not None:
            self.states.shared.close()


class RunningBatch(Generic[Chunk, Out]):
    """A batch started by `ExecutionService.start_batch`: feed it inputs, take its results."""

    def __init__(self, pipe: BatchPipe[Chunk, Out], interrupt: Interrupt, metrics: Metrics) -> None:
        self.pipe = pipe
        self.interrupt = interrupt
        self.deadline: asyncio.TimerHandle | None = None
        self._inputs_counted: Counter = metrics.batch_inputs
        self._results_counted: Counter | None = metrics.batch_results
        self._results = 0

    @property
    def results_sent(self) -> int:
        """Results handed to the stream so far."""
        return self._results

    async def feed(self, inputs: Chunk) -> None:
        """Queue inputs; waits while the worker is far enough behind."""
        self._inputs_counted.inc(len(inputs))
        await self.pipe.feed(inputs)

    async def refuse(self, error: Exception) -> None:
        """End the inputs with `error`: raised from `results` after the results before it."""
        await self.pipe.feed(error)

    async def end_inputs(self) -> None:
        await self.pipe.end_inputs()

    async def results(self) -> AsyncIterator[list[Out]]:
        """The results in input order, in chunks; raises the batch's error (an input that
        cannot run, BatchDeadlineExceeded, PipeClosed once `stop`ped)."""
        try:
            async for chunk in self.pipe.results():
                count = sum(len(r) if isinstance(r, PackedResults) else 1 for r in chunk)
                self._results += count
                if self._results_counted is not None:
                    self._results_counted.inc(count)
                yield chunk
        except PipeClosed:
            if self.interrupt.reason is TrapKind.DEADLINE_EXCEEDED:
                raise self._deadline_exceeded() from None
            raise

    def _deadline_exceeded(self) -> DeadlineExceeded:
        return BatchDeadlineExceeded(self._results)

    def stop(self, reason: TrapKind = TrapKind.CANCELLED) -> None:
        """Interrupt the input running, run no later one, and close the pipe."""
        if self.deadline is not None:
            self.deadline.cancel()
        self.interrupt.request(reason)
        self.pipe.close()


class RunningTestRun(RunningBatch[list[bytes], PacketResult]):
    """A test run started by `ExecutionService.start_test_run`: feed it packets, take
    its results; `program_type` is the program's, `maps` (with `dump_maps`) its maps
    after the last packet, set once `results` has ended without an error."""

    __test__ = False  # not a pytest class

    def __init__(
        self,
        pipe: BatchPipe[list[bytes], PacketResult],
        interrupt: Interrupt,
        metrics: Metrics,
        program_type: ProgramType,
    ) -> None:
        super().__init__(pipe, interrupt, metrics)
        self._inputs_counted = metrics.test_run_packets
        self._results_counted = None
        self.program_type = program_type
        self.maps: dict[str, MapContents] | None = None

    def _deadline_exceeded(self) -> DeadlineExceeded:
        return TestRunDeadlineExceeded(self._results)


def _packet_result_size(result: PacketResult) -> int:
    """About the bytes a packet's result takes in its response: its data and log."""
    return RESULT_OVERHEAD * 2 + len(result.data) + sum(map(len, result.log))


# The Linux helpers that operate on a map, and the operation each counts as in
# `bpfexec_map_operations_total` (bpf_for_each_map_elem: one per element visited).
MAP_OPERATIONS = {
    "bpf_map_lookup_elem": "lookup", "bpf_map_update_elem": "update",
    "bpf_map_delete_elem": "delete", "bpf_map_push_elem": "push", "bpf_map_pop_elem": "pop",
    "bpf_map_peek_elem": "peek", "bpf_ringbuf_output": "output", "bpf_ringbuf_reserve": "reserve",
    "bpf_ringbuf_submit": "submit", "bpf_ringbuf_discard": "discard",
    "bpf_ringbuf_query": "query", MAP_NEXT: "for_each",
}  # fmt: skip


def _counted(
    registry: HelperRegistry, metrics: Metrics, map_operations: bool = False
) -> HelperRegistry:
    """A copy of `registry` whose helpers count their calls as `inprocess`; with
    `map_operations` (the Linux set), map helpers count as map operations too."""
    counted = HelperRegistry()
    for helper in registry:
        inc = metrics.helper_counter(helper.name or f"#{helper.number}", "inprocess")
        operation = MAP_OPERATIONS.get(helper.name or "") if map_operations else None
        if operation is not None:
            inc = _both(inc, metrics.map_operations.labels(operation).inc)
        counted.register(_Counted(helper.fn, inc), helper.number, helper.name, helper.cost)
    return counted


def _both(first: Callable[..., None], second: Callable[..., None]) -> Callable[[int], None]:
    def inc(n: int = 1) -> None:
        first(n)
        second(n)

    return inc


class _Counted:
    """A helper function that counts its calls (a class, not a closure, so it has
    no `__name__` the registry could mistake for the helper's name). Native code
    that calls the function it wraps directly (`__wrapped__`: a built-in helper's
    native twin) reports its calls at the end of the run (`count_calls`)."""

    __slots__ = ("fn", "inc")

    def __init__(self, fn: HelperFn, inc: Callable[..., None]) -> None:
        self.fn = fn
        self.inc = inc

    def __call__(self, ctx: HelperContext, *registers: int) -> int:
        self.inc(1)
        return self.fn(ctx, *registers)

    @property
    def __wrapped__(self) -> HelperFn:
        return self.fn

    def count_calls(self, n: int) -> None:
        self.inc(n)
