"""Start-up and shutdown of the server: everything wired together in `start()`.

`serve(settings)` is what `bpfexec serve` runs: start, wait for SIGTERM or
SIGINT, then shut down gracefully (health turns NOT_SERVING, no new RPCs are
accepted, in-flight ones get `grace_period` seconds to finish, then the rest
are cancelled, which interrupts their programs). `serve_in_thread(settings)`
runs the same server on a background event loop, for tests and benchmarks.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from bpfexec._pb.bpfexec.v1 import executor_pb2
from bpfexec.server.admission import RequestLimit
from bpfexec.server.auth import Authenticator, server_credentials
from bpfexec.server.executor import ExecutionService
from bpfexec.server.metrics import Metrics
from bpfexec.server.registry import build_registry
from bpfexec.server.request_log import RequestLogInterceptor
from bpfexec.server.service import ExecutorServicer, add_to_server
from bpfexec.server.settings import Settings, is_redis_url
from bpfexec.server.state_files import StateFiles
from bpfexec.server.states import SharedStates, StateRegistry, StateStoreUnavailable
from bpfexec.server.states_directory import DirectoryStates
from bpfexec.server.states_redis import RedisStates
from bpfexec.server.store import ModuleStorage, ModuleStore
from bpfexec.server.store_redis import RedisModuleStore, StoreUnavailable, redacted

log = logging.getLogger(__name__)

SERVICE_NAME = executor_pb2.DESCRIPTOR.services_by_name["Executor"].full_name
# Seconds a thread holding the GIL keeps it while another waits (Python's default
# is 5 ms). Programs on the interpreter hold it in the pool threads; a shorter
# interval lets the event loop in sooner, so refusals and health checks stay
# prompt under load (docs/hardening.md, "Load and fault tests").
SWITCH_INTERVAL = 0.001


@dataclass
class RunningServer:
    """A started server: where it listens and the pieces tests may inspect."""

    settings: Settings
    server: grpc.aio.Server
    service: ExecutionService
    health: HealthServicer
    metrics: Metrics
    port: int
    metrics_http: WSGIServer | None
    authenticator: Authenticator | None = None

    @property
    def address(self) -> str:
        return _host_port(self.settings.host, self.port)

    @property
    def metrics_port(self) -> int:
        return self.metrics_http.server_port if self.metrics_http else 0

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new RPCs, give in-flight ones `grace` seconds, then cancel them."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.settings.grace_period if grace is None else grace)
        # Cancelled executions were interrupted; wait for their threads to notice.
        await asyncio.to_thread(self.service.close)
        if self.metrics_http is not None:
            self.metrics_http.shutdown()
            self.metrics_http.server_close()


async def start(settings: Settings, worker_states: str | None = None) -> RunningServer:
    """Build and start the gRPC server (and the metrics HTTP server) for `settings`;
    `worker_states` is the directory the processes of `--workers N` share their
    named states in (`bpfexec.server.states_directory`)."""
    metrics = Metrics()
    shared = open_state_store(settings, worker_states)
    authenticator = (
        Authenticator.from_file(settings.auth_tokens_file, settings.auth_reload_interval)
        if settings.auth_tokens_file
        else None
    )
    service = ExecutionService(
        helpers=build_registry(
            settings.helpers,
            use_entry_points=settings.entry_point_helpers,
            native=settings.native_helpers,
        ),
        limits=settings.limits,
        metrics=metrics,
        engine=settings.engine,
        max_concurrent=settings.max_concurrent_executions,
        cache_max_modules=settings.cache_max_modules,
        cache_max_bytes=settings.cache_max_bytes,
        remote_helper_timeout=settings.remote_helper_timeout,
        store=open_module_store(settings.store, metrics),
        # Without authentication every caller is the same tenant.
        shared_modules=settings.shared_modules or authenticator is None,
        jit_compile_workers=settings.jit_compile_workers,
        jit_compile_timeout=settings.jit_compile_timeout,
        jit_compile_memory_bytes=settings.jit_compile_memory_bytes,
        jit_quick_limits=(
            settings.jit_quick_max_function_instructions,
            settings.jit_quick_max_instructions,
        ),
        jit_optimized_limits=(
            settings.jit_optimized_max_function_instructions,
            settings.jit_optimized_max_instructions,
        ),
        states=StateRegistry(
            metrics=metrics,
            max_state_bytes=settings.max_state_bytes,
            max_states_bytes=settings.max_states_bytes,
            max_states=settings.max_states,
            files=StateFiles(state_directory(settings.store))
            if settings.store and not is_redis_url(settings.store) and not shared
            else None,
            shared=shared,
        ),
    )
    if service.store is not None:
        try:
            restored = await asyncio.to_thread(service.restore)
            states = await asyncio.to_thread(service.restore_states)
        except StoreUnavailable as exc:  # modules are read from it on demand once it is back
            log.warning("%s; starting with no module restored", exc)
        else:
            log.info("store %s: %d modules and %d named states restored",
                     _redacted_store(settings.store), restored, states)  # fmt: skip
    tenant_of = authenticator.tenant_of if authenticator is not None else None
    # Order matters: the metrics interceptor caches handlers by method, so it
    # must come after (inside) the one that may refuse a call. The request
    # limit decides per call inside the handler it wraps, so it may come last:
    # its refusals are logged and counted, and refused calls are never counted in.
    interceptors: list[grpc.aio.ServerInterceptor] = [
        RequestLogInterceptor(SERVICE_NAME, tenant_of)
    ]
    if authenticator is not None:
        interceptors.append(authenticator.interceptor(metrics))
    interceptors.append(metrics.interceptor())
    interceptors.append(RequestLimit(SERVICE_NAME, settings.max_concurrent_requests, metrics))
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            # Workers of `--workers N` bind the same port; the kernel spreads connections.
            # Otherwise never (gRPC's default on Linux): a second server on a busy port
            # would silently take half of the first one's connections.
            ("grpc.so_reuseport", 1 if settings.workers > 1 else 0),
        ],
    )
    # Not the generated add_ExecutorServicer_to_server: the same handlers, with
    # deserializers that answer INVALID_ARGUMENT for bytes that do not parse.
    servicer = ExecutorServicer(
        service,
        tenant_of,
        max_name_bytes=settings.max_name_bytes,
        max_offered_helpers=settings.max_offered_helpers,
        max_memory_read_bytes=settings.max_memory_read_bytes,
        max_stream_outbox_bytes=settings.max_stream_outbox_bytes,
    )
    add_to_server(servicer, server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    for name in ("", SERVICE_NAME):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME],
        server,
    )  # fmt: skip
    address = _host_port(settings.host, settings.port)
    credentials = server_credentials(settings)
    try:
        if settings.port and settings.workers <= 1:
            _check_free(settings.host, settings.port, "gRPC")  # before gRPC logs its own lines
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError:  # gRPC says only "Failed to bind to address"
        await server.stop(None)
        service.close(wait=False)
        raise OSError(f"cannot listen on {address} for gRPC{_BUSY}") from None
    except OSError:
        await server.stop(None)
        service.close(wait=False)
        raise
    await server.start()
    metrics_http = None
    if settings.metrics_port:
        try:
            metrics_http, _ = start_http_server(
                settings.metrics_port, settings.host, registry=metrics.registry
            )
        except OSError:
            await server.stop(None)
            service.close(wait=False)
            metrics_address = _host_port(settings.host, settings.metrics_port)
            raise OSError(f"cannot listen on {metrics_address} for metrics{_BUSY}") from None
    return RunningServer(
        settings, server, service, health, metrics, port, metrics_http, authenticator
    )


def open_module_store(location: str, metrics: Metrics) -> ModuleStorage | None:
    """The module store of `--store`: a directory, or Redis (`redis://`, `rediss://`,
    `unix://`); None when empty. An unreachable Redis is logged, not fatal: requests
    that need the store are UNAVAILABLE until it is back."""
    if not location:
        return None
    if not is_redis_url(location):
        return ModuleStore(location, metrics)
    store = RedisModuleStore(location, metrics)
    try:
        store.check()
    except StoreUnavailable as exc:
        log.warning("%s", exc)
    return store


def open_state_store(settings: Settings, worker_states: str | None) -> SharedStates | None:
    """The states this process shares: on Redis with `--state-store` (an unreachable
    Redis is logged, not fatal: requests naming a state are UNAVAILABLE until it is
    back), else in `worker_states` under `--workers N`; None: its own."""
    if not settings.state_store:
        if worker_states is None:
            return None
        durable = bool(settings.store) and not is_redis_url(settings.store)
        return DirectoryStates(worker_states, durable=durable)
    states = RedisStates(settings.state_store, lease_seconds=settings.state_lease_seconds)
    try:
        states.check()
    except StateStoreUnavailable as exc:
        log.warning("%s", exc)
    return states


def _redacted_store(location: str) -> str:
    return redacted(location) if is_redis_url(location) else location


def state_directory(store: str) -> Path:
    """Where one process keeps the named states of `--store DIR`: `DIR/states` (the
    processes of `--workers N` share `DIR/states/workers`: `bpfexec.server.workers`)."""
    return Path(store) / "states"


async def serve(settings: Settings, worker_states: str | None = None) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully; SIGHUP reloads the tokens.
    `worker_states`: as for `start`."""
    sys.setswitchinterval(SWITCH_INTERVAL)
    running = await start(settings, worker_states)
    log.info(
        "serving %s on %s with the %s engine (metrics: %s)",
        SERVICE_NAME,
        running.address,
        running.service.engine,
        f"http://{_host_port(settings.host, running.metrics_port)}/metrics"
        if running.metrics_port
        else "off",
    )
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    if running.authenticator is not None:  # `kill -HUP`: read the tokens file again
        loop.add_signal_handler(signal.SIGHUP, running.authenticator.reload)
        running.authenticator.reload_if_changed()  # changed before the handler was in place
    await stopping.wait()
    log.info("shutting down: in-flight requests have %.1f s to finish", settings.grace_period)
    await running.stop()
    log.info("stopped")


@contextmanager
def serve_in_thread(settings: Settings, *, timeout: float = 10.0) -> Iterator[RunningServer]:
    """Run a server on its own event loop in a daemon thread for the `with` block."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="bpfexec-server", daemon=True)
    thread.start()
    try:
        running = asyncio.run_coroutine_threadsafe(start(settings), loop).result(timeout)
        try:
            yield running
        finally:
            asyncio.run_coroutine_threadsafe(running.stop(0), loop).result(timeout)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        loop.close()


_BUSY = (
    ": the port is in use, or the address is not this host's"
    " (another server? port 0 picks a free one)"
)


def _check_free(host: str, port: int, what: str) -> None:
    """OSError naming `host:port` if something listens there (a bind, as gRPC's, fails)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host.strip("[]"), port))
        except OSError:
            raise OSError(f"cannot listen on {_host_port(host, port)} for {what}{_BUSY}") from None


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
