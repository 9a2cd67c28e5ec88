"""`bpfexec serve --workers N`: N server processes sharing one port.

A Python process does its Python work on one core (the GIL), so to use more
cores of one machine the parent starts N worker processes, each a complete
server (`bpfexec.server.app.serve`) with its own module cache, all bound to the same
port with SO_REUSEPORT: the kernel hands each new connection to one of them.
This is the pattern of grpcio's multiprocessing example. Workers are started
with the "spawn" method, so no gRPC state crosses a fork. Any worker may answer
any request: a client whose module is not cached by the worker it reached gets
NOT_FOUND and uploads it again, as with replicas. Named states
(`bpfexec.server.states`) are one per name across the workers: they share a
directory (`bpfexec.server.states_directory`), `DIR/states/workers/` with
`--store DIR`, else a temporary one the parent makes and removes; with
`--state-store redis://` they are in Redis instead (docs/state.md).

Metrics: before starting the workers the parent points prometheus_client's
multiprocess mode (`PROMETHEUS_MULTIPROC_DIR`) at a fresh directory, where the
workers write their values; the parent alone serves /metrics, summing them with
`MultiProcessCollector` (gauges over the live workers only).

Lifetime: SIGTERM or SIGINT to the parent is passed on to every worker, each of
which shuts down gracefully (`Settings.grace_period`), then the parent exits.
If a worker exits on its own, the parent stops the others and exits non-zero,
so that a supervisor (systemd, Kubernetes) restarts the whole. SIGHUP to the
parent is passed on too: each worker reads its tokens file again. Workers start
with SIGHUP ignored (a disposition that survives exec), so one that arrives
while a worker is still importing does not kill it; the worker reads the file
after that anyway.

Logging: each worker sets up the parent's `--log-format` and level.

This module starts, watches and stops processes; it serves no RPC itself.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from bpfexec.server.request_log import configure_logging
from bpfexec.server.settings import Settings, is_redis_url

log = logging.getLogger(__name__)

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
EXIT_OK = 0
EXIT_WORKER_FAILED = 1
EXIT_WORKER_CONFIG = 2  # what a worker exits with when its settings cannot be used
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"


def serve_workers(settings: Settings) -> int:
    """Run `settings.workers` server processes until SIGTERM or SIGINT; the exit status."""
    if not hasattr(socket, "SO_REUSEPORT"):
        raise ValueError("--workers above 1 needs SO_REUSEPORT, which this platform lacks")
    stopping = threading.Event()
    handlers = {sig: signal.signal(sig, lambda *_: stopping.set()) for sig in _STOP_SIGNALS}
    reloading = threading.Event()
    handlers[signal.SIGHUP] = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # inherited: see above
    metrics_dir = tempfile.mkdtemp(prefix="bpfexec-metrics-")
    os.environ[MULTIPROC_DIR_ENV] = metrics_dir
    states_dir, temporary_states = _worker_states(settings)
    try:
        with _reserve_port(settings.host, settings.port) as port:
            worker_settings = dataclasses.replace(settings, port=port, metrics_port=0)
            context = multiprocessing.get_context("spawn")
            level = logging.getLogger().getEffectiveLevel()
            workers = [
                context.Process(
                    target=_run_worker,
                    args=(worker_settings, level, states_dir),
                    name=f"bpfexec-worker-{n}",
                )
                for n in range(settings.workers)
            ]
            for worker in workers:
                worker.start()
                log.info("started %s (pid %d)", worker.name, worker.pid)
            signal.signal(signal.SIGHUP, lambda *_: reloading.set())
            metrics_http = _serve_metrics(settings, metrics_dir) if settings.metrics_port else None
            log.info(
                "serving on port %d with %d worker processes (metrics: %s)",
                port,
                settings.workers,
                f"port {settings.metrics_port}" if metrics_http else "off",
            )
            try:
                failed = _wait_for_stop_or_failure(workers, stopping, reloading)
            finally:
                _stop(workers, settings.grace_period, metrics_dir)
                if metrics_http is not None:
                    metrics_http.shutdown()
                    metrics_http.server_close()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        os.environ.pop(MULTIPROC_DIR_ENV, None)
        shutil.rmtree(metrics_dir, ignore_errors=True)
        if temporary_states and states_dir is not None:
            shutil.rmtree(states_dir, ignore_errors=True)
    codes = [worker.exitcode for worker in workers]
    log.info("stopped (worker exit codes %s)", codes)
    if failed:
        return EXIT_WORKER_CONFIG if EXIT_WORKER_CONFIG in codes else EXIT_WORKER_FAILED
    # A worker that already stopped gracefully may still get the parent's SIGTERM
    # on its way out (a terminal's Ctrl-C reaches every process of the group).
    clean = (0, -signal.SIGTERM)
    return EXIT_OK if all(code in clean for code in codes) else EXIT_WORKER_FAILED


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _worker_states(settings: Settings) -> tuple[str | None, bool]:
    """The directory the workers share their named states in; whether it is temporary
    (removed when they stop). None with `--state-store` (states in Redis)."""
    if settings.state_store:
        return None, False
    if settings.store and not is_redis_url(settings.store):
        return os.path.join(settings.store, "states", "workers"), False
    return tempfile.mkdtemp(prefix="bpfexec-states-"), True


def _run_worker(
    settings: Settings, level: int = logging.INFO, states_dir: str | None = None
) -> None:
    """The body of a worker: a complete server until SIGTERM or SIGINT."""
    from bpfexec.server.app import serve
    from bpfexec.server.registry import HelperConfigError

    configure_logging(settings.log_format, level, text_format=LOG_FORMAT)
    try:
        asyncio.run(serve(settings, states_dir))
    except (ValueError, HelperConfigError, OSError) as exc:
        log.error("cannot serve: %s", exc)
        sys.exit(EXIT_WORKER_CONFIG)


@contextmanager
def _reserve_port(host: str, port: int) -> Iterator[int]:
    """Hold `host:port` (a free port if 0) with SO_REUSEPORT while the workers bind it.

    The socket never listens, so it receives no connection; it only fixes the
    port every worker binds, and fails early when another program holds it.
    """
    address = host.strip("[]")
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((address, port))
        yield int(sock.getsockname()[1])


def _serve_metrics(settings: Settings, metrics_dir: str) -> WSGIServer:
    """/metrics on `settings.metrics_port`: the sum of every worker's values."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=metrics_dir)
    server, _ = start_http_server(settings.metrics_port, settings.host, registry=registry)
    return server


def _wait_for_stop_or_failure(
    workers: Sequence[BaseProcess], stopping: threading.Event, reloading: threading.Event
) -> bool:
    """Block until a stop signal (False) or until a worker exits on its own (True).

    Meanwhile pass each SIGHUP (`reloading`) on to the workers.
    """
    while not stopping.is_set():
        if reloading.is_set():
            reloading.clear()
            _forward(workers, signal.SIGHUP)
        exited = wait([worker.sentinel for worker in workers], timeout=0.2)
        if exited:
            gone = [w for w in workers if w.sentinel in exited]
            for worker in gone:
                log.error("%s exited with status %s: stopping", worker.name, worker.exitcode)
            return True
    log.info("shutting down %d workers: in-flight requests get their grace period", len(workers))
    return False


def _forward(workers: Sequence[BaseProcess], sig: signal.Signals) -> None:
    """Send `sig` to every live worker (not yet reaped, so its pid is still its own)."""
    sent = 0
    for worker in workers:
        if worker.pid is not None and worker.is_alive():
            os.kill(worker.pid, sig)
            sent += 1
    log.info("passed %s on to %d workers", sig.name, sent)


def _stop(workers: Sequence[BaseProcess], grace_period: float, metrics_dir: str) -> None:
    """SIGTERM every live worker, wait out its grace period, then kill what is left."""
    for worker in workers:
        if worker.is_alive():
            worker.terminate()
    for worker in workers:
        worker.join(grace_period + 10)
        if worker.is_alive():
            log.error("%s did not stop in time: killing it", worker.name)
            worker.kill()
            worker.join()
        if worker.pid is not None:
            mark_process_dead(worker.pid, metrics_dir)
