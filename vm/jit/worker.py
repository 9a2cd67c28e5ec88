"""Compile workers: LLVM code generation in child processes, and a fair compile queue.

LLVM's work on one module cannot be interrupted, shares global state with every
other compile of the process (`runtime._LLVM_LOCK`), and may end the process on
an internal assertion. So the server runs it elsewhere:

- `CompileWorker` is one child process (`python -m bpfexec.vm.jit.worker`) that turns
  LLVM IR text into an object file (`runtime.emit_object`: parse, verify,
  passes, codegen) and sends it back; the server loads it into an engine of
  its own (`runtime._load_object`, about a millisecond), resolving the
  dispatcher by name. The child's address space is capped (RLIMIT_AS), it
  ignores SIGINT and SIGTERM and dies with the thread that started it
  (PR_SET_PDEATHSIG), and a compile that outlives its timeout, or is running
  when the server shuts down, is abandoned by killing the child (the next
  compile starts a new one). A child that dies (an LLVM assertion, the memory
  cap) is a compiler error for that module and nothing more.
- `CompileQueue` runs compiles on a few daemon threads, each with its own
  worker, in priority order: every quick tier before any optimized one, and
  smaller modules first within a tier, so a huge upload never holds back the
  others' first native code, and shutdown never waits for a compile.

IR generation (`bpfexec.vm.jit.compiler`, Python, linear in program size and bounded
by the tier limits of `bpfexec.vm.jit.limits`) stays in the server process, on the
compile thread.

Messages on the pipes are a 4-byte little-endian length and a pickle: the
request `(ir_text, quick)`, the answer `("object", bytes)` or
`("error", type name, message)`.
"""

from __future__ import annotations

import builtins
import contextlib
import heapq
import itertools
import logging
import os
import pickle
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import bpfexec
from bpfexec.vm.jit.runtime import CompileAbandoned, Emit

log = logging.getLogger(__name__)

_HEADER = 4
_PR_SET_PDEATHSIG = 1
# The directory holding the `bpfexec` package, for the child's import path. Not
# this file's grandparent: in a checkout `bpfexec.vm` is the folder vm/, beside
# bpfexec/ (pyproject.toml's package-dir), and is found through the install.
_ROOT = str(Path(bpfexec.__file__).resolve().parent.parent)


class WorkerError(Exception):
    """The worker failed in a way that is not an exception of the compile (it died)."""


class CompileWorker:
    """One compile child process, started on first use; one compile at a time."""

    def __init__(self, memory_bytes: int = 0, name: str = "bpfexec-jit-worker") -> None:
        self.memory_bytes = memory_bytes  # RLIMIT_AS of the child (0: none)
        self.name = name
        self._process: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()  # one compile at a time
        self._closed = False
        self.started = 0  # children started so far

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    def emitter(self, timeout: float | None) -> Emit:
        """An `Emit` for `runtime.compile_program` that compiles in this worker."""
        return lambda text, quick: self.emit(text, quick, timeout)

    def emit(self, text: str, quick: bool, timeout: float | None = None) -> bytes:
        """Object code for IR `text`; raises the compile's exception (RuntimeError for
        an LLVM parse error), WorkerError if the child died, CompileAbandoned on timeout
        or when `kill()` was called meanwhile."""
        with self._lock:
            deadline = None if timeout is None else time.monotonic() + timeout
            process = self._start()
            assert process.stdin is not None and process.stdout is not None
            try:
                _write(process.stdin, (text, quick))
                answer = _read(process.stdout, deadline)
            except TimeoutError:
                self._kill(process)
                raise CompileAbandoned(f"no object code after {timeout:g} s") from None
            except (OSError, EOFError, pickle.UnpicklingError) as exc:
                self._kill(process)
                if self._closed:
                    raise CompileAbandoned("the compile workers were shut down") from None
                status = process.poll()
                raise WorkerError(
                    f"the compile worker died (exit status {status}): {type(exc).__name__}"
                ) from None
        if answer[0] == "object":
            return answer[1]  # type: ignore[no-any-return]
        _, name, message = answer
        kind = getattr(builtins, name, None)
        if isinstance(kind, type) and issubclass(kind, Exception):
            raise kind(message)
        raise WorkerError(f"{name}: {message}")

    def _start(self) -> subprocess.Popen[bytes]:
        if self._closed:
            raise CompileAbandoned("the compile workers were shut down")
        process = self._process
        if process is not None and process.poll() is None:
            return process
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([_ROOT, *filter(None, [env.get("PYTHONPATH")])])
        command = [
            sys.executable,
            "-m",
            "bpfexec.vm.jit.worker",
            str(self.memory_bytes),
            str(os.getpid()),
        ]
        self._process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True
        )
        self.started += 1
        return self._process

    def _kill(self, process: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(OSError):
            process.kill()
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            process.wait(5)
        for pipe in (process.stdin, process.stdout):
            with contextlib.suppress(OSError):
                pipe.close()  # type: ignore[union-attr]

    def kill(self) -> None:
        """Stop the child now (abandoning its compile); a later compile starts another."""
        process = self._process
        if process is not None:
            with contextlib.suppress(OSError):
                process.kill()

    def close(self) -> None:
        """Kill the child and refuse further compiles."""
        self._closed = True
        self.kill()


def _write(pipe: IO[bytes], message: object) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    pipe.write(len(data).to_bytes(_HEADER, "little") + data)
    pipe.flush()


def _read(pipe: IO[bytes], deadline: float | None) -> Any:
    """One message from `pipe`; TimeoutError after `deadline`, EOFError if it closed."""
    fd = pipe.fileno()

    def exactly(size: int) -> bytes:
        chunks: list[bytes] = []
        while size:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([fd], [], [], left)[0]:
                    raise TimeoutError
            chunk = os.read(fd, min(size, 1 << 20))
            if not chunk:
                raise EOFError
            chunks.append(chunk)
            size -= len(chunk)
        return b"".join(chunks)

    size = int.from_bytes(exactly(_HEADER), "little")
    return pickle.loads(exactly(size))


class CompileQueue:
    """Compiles by priority on `threads` daemon threads, each with a `CompileWorker`
    (none with `processes=False`: LLVM then runs in this process).

    `submit(priority, job)` queues `job(worker)`; lower priorities go first, equal
    ones in submission order. `close()` drops what is queued, kills the workers
    (abandoning running compiles) and returns at once.
    """

    def __init__(self, threads: int = 2, *, processes: bool = True, memory_bytes: int = 0) -> None:
        self._heap: list[tuple[tuple[int, ...], int, Callable[[CompileWorker | None], None]]] = []
        self._order = itertools.count()
        self._ready = threading.Condition()
        self._closed = False
        self.workers: list[CompileWorker | None] = [
            CompileWorker(memory_bytes, f"bpfexec-jit-{n}") if processes else None
            for n in range(max(1, threads))
        ]
        self._threads = [
            threading.Thread(target=self._serve, args=(w,), name=f"bpfexec-jit-{n}", daemon=True)
            for n, w in enumerate(self.workers)
        ]
        for thread in self._threads:
            thread.start()

    def submit(
        self, priority: tuple[int, ...], job: Callable[[CompileWorker | None], None]
    ) -> bool:
        """Queue `job`; False (not queued) once closed."""
        with self._ready:
            if self._closed:
                return False
            heapq.heappush(self._heap, (priority, next(self._order), job))
            self._ready.notify()
        return True

    def pending(self) -> int:
        with self._ready:
            return len(self._heap)

    def _serve(self, worker: CompileWorker | None) -> None:
        while True:
            with self._ready:
                while not self._heap and not self._closed:
                    self._ready.wait()
                if self._closed:
                    return
                _, _, job = heapq.heappop(self._heap)
            try:
                job(worker)
            except Exception:  # a job must not end its thread
                log.exception("compile job failed")

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._heap.clear()
            self._ready.notify_all()
        for worker in self.workers:
            if worker is not None:
                worker.close()


def _child(memory_bytes: int, parent: int) -> None:
    """The body of a worker process: IR in on stdin, object code out on stdout."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server decides when we stop
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the server died before prctl
            os._exit(0)
    if memory_bytes > 0:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    from bpfexec.vm.jit.runtime import emit_object

    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing else may write on the answer pipe
    while True:
        try:
            text, quick = _read(stdin, None)
        except EOFError:
            return
        try:
            answer: tuple[object, ...] = ("object", emit_object(text, quick))
        except BaseException as exc:  # MemoryError included: the server carries on
            answer = ("error", type(exc).__name__, str(exc))
        del text
        _write(stdout, answer)


if __name__ == "__main__":
    _child(int(sys.argv[1]), int(sys.argv[2]))
