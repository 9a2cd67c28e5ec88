"""Prometheus metrics of one server instance, and the gRPC interceptor that feeds some.

Every metric lives in the `CollectorRegistry` of a `Metrics` object, one per
server, so several servers (tests, benchmarks) can run in one process without
clashing in prometheus_client's global registry. Label values stay bounded: an
outcome is `OK` or a trap kind, a helper is its name (or `#number`), a gRPC
method is one of the service's; module ids never become labels.

Under `bpfexec serve --workers N` (`bpfexec.server.workers`) prometheus_client runs in
multiprocess mode: each worker writes its values to files in a shared
directory, and the parent process serves their sum.

This module only counts; it never decides anything.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
MAX_REMOTE_HELPER_LABELS = 256
FUEL_BUCKETS = tuple(float(10**n) for n in range(1, 11))
# With `--workers N` each process has its own cache and executions: a gauge's
# value for the server is the sum over the live worker processes.
GAUGE_MODE: Final = "livesum"


class Metrics:
    """The server's metrics, registered in `self.registry`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.executions = Counter(
            "bpfexec_executions", "Executions by outcome: OK or the trap kind.", ["outcome"],
            registry=r,
        )  # fmt: skip
        self.execution_seconds = Histogram(
            "bpfexec_execution_seconds", "Wall-clock time of one execution in the VM.",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.fuel_used = Histogram(
            "bpfexec_fuel_used", "Fuel used by one execution.", buckets=FUEL_BUCKETS, registry=r
        )
        self.helper_calls = Counter(
            "bpfexec_helper_calls", "Helper calls by helper and where they were answered.",
            ["helper", "location"], registry=r,
        )  # fmt: skip
        self.remote_helper_seconds = Histogram(
            "bpfexec_remote_helper_seconds",
            "Round trip of one remote helper call: from sending HelperCall to the client's "
            "HelperResult (memory accesses of the call included).",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self._remote_labels: set[str] = set()
        self.in_flight = Gauge(
            "bpfexec_executions_in_flight", "Executions running right now.",
            multiprocess_mode=GAUGE_MODE, registry=r,
        )  # fmt: skip
        self.requests_in_progress = Gauge(
            "bpfexec_requests_in_progress",
            "Executor calls admitted and not yet finished (bounded by max_concurrent_requests).",
            multiprocess_mode=GAUGE_MODE, registry=r,
        )  # fmt: skip
        self.rejected = Counter(
            "bpfexec_executions_rejected",
            "Executions refused before running because the concurrency limit was reached.",
            registry=r,
        )
        self.cache_hits = Counter(
            "bpfexec_module_cache_hits", "Module lookups and loads served from the cache.",
            registry=r,
        )  # fmt: skip
        self.cache_misses = Counter(
            "bpfexec_module_cache_misses", "Module lookups and loads not found in the cache.",
            registry=r,
        )  # fmt: skip
        self.cache_evictions = Counter(
            "bpfexec_module_cache_evictions", "Modules evicted to stay within the cache bounds.",
            registry=r,
        )  # fmt: skip
        self.modules_cached = Gauge(
            "bpfexec_modules_cached", "Modules in the cache.", multiprocess_mode=GAUGE_MODE,
            registry=r,
        )  # fmt: skip
        self.cache_bytes = Gauge(
            "bpfexec_module_cache_bytes", "Total size of the modules in the cache.",
            multiprocess_mode=GAUGE_MODE, registry=r,
        )  # fmt: skip
        self.jit_compile_seconds = Histogram(
            "bpfexec_jit_compile_seconds",
            "Time to compile a module to optimized native code (the JIT's second tier).",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.jit_quick_compile_seconds = Histogram(
            "bpfexec_jit_quick_compile_seconds",
            "Time to compile a module to the JIT's quick tier, which serves first.",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.jit_fallbacks = Counter(
            "bpfexec_jit_fallbacks",
            "Modules a JIT tier left to the interpreter (or to the quick tier), by tier and "
            "reason: `unsupported` (a construct the JIT does not reproduce exactly), "
            "`compiler_error` (a fault of the compiler or a dead compile worker, logged with "
            "its traceback), `limit` (over the tier's size limits) or `abandoned` (a compile "
            "past its timeout).",
            ["tier", "reason"], registry=r,
        )  # fmt: skip
        self.load_seconds = Histogram(
            "bpfexec_module_load_seconds", "Time to parse and verify a module not yet cached.",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.store_corrupt = Counter(
            "bpfexec_store_corrupt_modules",
            "Module files of the store whose content did not match their hash (discarded).",
            registry=r,
        )
        self.states = Gauge(
            "bpfexec_states", "Named states kept (docs/states.md).",
            multiprocess_mode=GAUGE_MODE, registry=r,
        )  # fmt: skip
        self.state_map_bytes = Gauge(
            "bpfexec_state_map_bytes",
            "Memory the maps of the named states take (their values, preallocated as the "
            "kernel does): what --max-states-bytes bounds.",
            multiprocess_mode=GAUGE_MODE, registry=r,
        )  # fmt: skip
        self.state_executions = Counter(
            "bpfexec_state_executions", "Executions that ran on a named state's maps.",
            registry=r,
        )  # fmt: skip
        self.batches = Counter(
            "bpfexec_batches", "ExecuteBatch calls started (each on one execution slot).",
            registry=r,
        )  # fmt: skip
        self.batch_inputs = Counter(
            "bpfexec_batch_inputs", "Inputs received by ExecuteBatch calls.", registry=r
        )
        self.batch_results = Counter(
            "bpfexec_batch_results", "Results of ExecuteBatch inputs handed to their stream.",
            registry=r,
        )  # fmt: skip
        self.test_runs = Counter(
            "bpfexec_test_runs",
            "TestRun calls started (each on one execution slot; docs/test-run.md).",
            registry=r,
        )  # fmt: skip
        self.test_run_packets = Counter(
            "bpfexec_test_run_packets", "Packets received by TestRun calls.", registry=r
        )
        self.map_operations = Counter(
            "bpfexec_map_operations",
            "Map operations by operation: programs' map helper calls (`lookup`, `update`, "
            "`delete`, `push`, `pop`, `peek`, `output`, `reserve`, `submit`, `discard`, "
            "`query`, `for_each` per element) and the state RPCs' entries (`read`, `update`, "
            "`delete`).",
            ["operation"], registry=r,
        )  # fmt: skip
        self.state_refused = Counter(
            "bpfexec_states_refused",
            "Named states not created because a limit was reached (max_state_bytes, "
            "max_states_bytes, max_states).",
            registry=r,
        )  # fmt: skip
        self.state_save_seconds = Histogram(
            "bpfexec_state_save_seconds",
            "Time to write one named state to the store (serialize, write, fsync, rename).",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.auth_failures = Counter(
            "bpfexec_auth_failures", "RPCs refused as UNAUTHENTICATED.", registry=r
        )
        self.grpc_started = Counter(
            "grpc_server_started", "RPCs started on the server.",
            ["grpc_type", "grpc_service", "grpc_method"], registry=r,
        )  # fmt: skip
        self.grpc_handled = Counter(
            "grpc_server_handled", "RPCs completed on the server, by status code.",
            ["grpc_type", "grpc_service", "grpc_method", "grpc_code"], registry=r,
        )  # fmt: skip
        self.grpc_seconds = Histogram(
            "grpc_server_handling_seconds", "Time from receiving an RPC to its status.",
            ["grpc_type", "grpc_service", "grpc_method"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip

    def record_execution(self, outcome: str, seconds: float, fuel_used: int) -> None:
        self.executions.labels(outcome).inc()
        self.execution_seconds.observe(seconds)
        self.fuel_used.observe(fuel_used)

    def helper_counter(self, helper: str, location: str) -> Callable[..., None]:
        """A cheap `inc(n)` for one helper, bound once so each call skips the label lookup."""
        return self.helper_calls.labels(helper, location).inc

    def remote_helper_counter(self, helper: str) -> Callable[[], None]:
        """`inc()` for a helper a client answers (`location="remote"`).

        Clients choose remote helper names, so past `MAX_REMOTE_HELPER_LABELS`
        distinct ones the rest are counted together as `other`: a stream of
        made-up names must not grow the metrics without bound.
        """
        if helper not in self._remote_labels:
            if len(self._remote_labels) >= MAX_REMOTE_HELPER_LABELS:
                helper = "other"
            else:
                self._remote_labels.add(helper)
        return self.helper_counter(helper, "remote")

    def interceptor(self) -> grpc.aio.ServerInterceptor:
        return _GrpcMetricsInterceptor(self)


Behaviour = Callable[[Any, grpc.aio.ServicerContext], Any]
Finish = Callable[[float, str], None]


class _GrpcMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts every RPC by service, method and final status code, and times it."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        # Wrapped handlers by method path: the handler of a method never changes,
        # so it is wrapped once instead of on every call.
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        path = handler_call_details.method
        if path in self._wrapped:
            return self._wrapped[path]
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: grpc answers UNIMPLEMENTED itself
            return handler
        service, _, method = path.lstrip("/").partition("/")
        kind = _TYPES[(handler.request_streaming, handler.response_streaming)]
        labels = (kind, service, method)
        attr = _HANDLER_ATTRS[(handler.request_streaming, handler.response_streaming)]
        behaviour = getattr(handler, attr)
        # Streaming handlers are either async generators or coroutines that
        # call context.write(); the wrapper must be of the same kind.
        wrap = self._wrap_stream if inspect.isasyncgenfunction(behaviour) else self._wrap_unary
        self._wrapped[path] = handler._replace(**{attr: wrap(behaviour, labels)})
        return self._wrapped[path]

    def _counters(self, labels: tuple[str, str, str]) -> tuple[Callable[[], None], Finish]:
        """`started()` and `finish(start, code)` for one method, label lookups done once."""
        started = self._metrics.grpc_started.labels(*labels).inc
        seconds = self._metrics.grpc_seconds.labels(*labels).observe
        handled = self._metrics.grpc_handled

        def finish(start: float, code: str) -> None:
            handled.labels(*labels, code).inc()
            seconds(time.perf_counter() - start)

        return started, finish

    def _wrap_unary(self, behaviour: Behaviour, labels: tuple[str, str, str]) -> Behaviour:
        started, finish = self._counters(labels)

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started()
            start = time.perf_counter()
            code = "UNKNOWN"
            try:
                response = await behaviour(request, context)
                code = _code_name(context, "OK")
                return response
            except BaseException as exc:
                code = _failed_code(context, exc)
                raise
            finally:
                finish(start, code)

        return unary

    def _wrap_stream(self, behaviour: Behaviour, labels: tuple[str, str, str]) -> Behaviour:
        started, finish = self._counters(labels)

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            started()
            start = time.perf_counter()
            code = "UNKNOWN"
            try:
                async for response in behaviour(request, context):
                    yield response
                code = _code_name(context, "OK")
            except BaseException as exc:
                code = _failed_code(context, exc)
                raise
            finally:
                finish(start, code)

        return stream


_TYPES = {
    (False, False): "unary",
    (False, True): "server_stream",
    (True, False): "client_stream",
    (True, True): "bidi_stream",
}
_HANDLER_ATTRS = {
    (False, False): "unary_unary",
    (False, True): "unary_stream",
    (True, False): "stream_unary",
    (True, True): "stream_stream",
}


def _failed_code(context: grpc.aio.ServicerContext, exc: BaseException) -> str:
    """The status of a handler that raised: the one it set, else CANCELLED or UNKNOWN.

    A client that goes away surfaces as CancelledError, or as GeneratorExit when
    gRPC leaves a streaming handler suspended and asyncio closes it later; by
    then `context.cancelled()` may still be False, so the exception decides.
    """
    gone = isinstance(exc, (asyncio.CancelledError, GeneratorExit)) or context.cancelled()
    return _code_name(context, "CANCELLED" if gone else "UNKNOWN")


def _code_name(context: grpc.aio.ServicerContext, default: str) -> str:
    """The status the handler set (by `abort` or `set_code`), else `default`."""
    code = context.code()
    if code is None:
        return default
    if isinstance(code, grpc.StatusCode):
        name: str = code.name
        return name
    # grpc.aio reports codes set through abort() as the raw integer.
    return next((c.name for c in grpc.StatusCode if c.value[0] == code), default)
