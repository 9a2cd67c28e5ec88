"""`BatchPipe`: the bounded queues between a streaming call's requests and its worker.

The event loop feeds chunks of inputs in (`feed`, waiting for room: the
servicer reads the next request message only then) and takes chunks of results
out (`results`); the pool thread running the work (`bpfexec.vm.batch.run_chunks`
for an ExecuteBatch, `bpfexec.vm.packet_run.run_packets` for a TestRun) takes
the chunks of inputs (`chunks`) and hands the results over (`add`, `finish`), blocking
while the results queue is full, so a client that stops reading stops the
worker instead of growing the server's memory. `close` (the call ended, was
cancelled or its deadline passed) wakes both sides for good.

A pipe is generic in its chunks of inputs and its results (`BatchPipe[Chunk, Out]`); `size_of`
says how many bytes a result takes in its response message (default: a
`Result`'s buffers and log), which bounds a chunk together with its count.

This module moves values between threads and nothing else: it does not run
programs, convert protobuf or decide statuses.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sized
from typing import Any, Generic, TypeVar, cast

from bpfexec.vm import Result
from bpfexec.vm.batch import PackedResults

T = TypeVar("T")
# A chunk of inputs, as one request message brings them: an ExecuteBatch's list of
# arguments or its PackedInputs, a TestRun's list of packets.
Chunk = TypeVar("Chunk", bound=Sized)
Out = TypeVar("Out")  # one result: a Result, a PacketResult

MAX_RESULTS_PER_CHUNK = 1024  # results in one chunk (one response message)
MAX_CHUNK_BYTES = 1 << 20  # about: buffers and log lines of the results of one chunk
QUEUED_INPUT_CHUNKS = 2  # request messages read ahead of the worker
QUEUED_RESULT_CHUNKS = 4  # response chunks the worker may be ahead of the client
RESULT_OVERHEAD = 32  # bytes a result takes besides its buffers and log


def result_size(result: Result | PackedResults) -> int:
    """About the bytes a batch's result takes in its response: buffers and log lines
    (PackedResults: its words, and its log lines)."""
    if isinstance(result, PackedResults):
        lines = sum(len(line) for log in result.logs.values() for line in log)
        return RESULT_OVERHEAD + 8 * len(result.words) + lines
    return RESULT_OVERHEAD + sum(map(len, result.buffers)) + sum(map(len, result.log))


class PipeClosed(Exception):
    """The batch's call is over: the worker stops."""


class _End:
    """The end of the inputs, or of the results."""


_END = _End()
_CLOSED = PipeClosed()


class BatchPipe(Generic[Chunk, Out]):
    """Inputs in and results out of one batch (or test run), across the loop and the
    worker thread. `size_of(result)`: its bytes in a response (default: `result_size`,
    for `Result`s)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        max_results: int = MAX_RESULTS_PER_CHUNK,
        max_bytes: int = MAX_CHUNK_BYTES,
        size_of: Callable[[Out], int] | None = None,
    ) -> None:
        self._loop = loop
        self._max_results = max_results
        self._max_bytes = max_bytes
        self._size_of = size_of or cast(Callable[[Out], int], result_size)
        # Unbounded queues whose room the semaphores count: `close` can always add its
        # marker, however full they are.
        self._inputs: asyncio.Queue[Chunk | Exception | _End] = asyncio.Queue()
        self._input_room = asyncio.Semaphore(QUEUED_INPUT_CHUNKS)
        self._results: asyncio.Queue[list[Out] | Exception | _End] = asyncio.Queue()
        self._result_room = asyncio.Semaphore(QUEUED_RESULT_CHUNKS)
        self._ready: list[Out] = []  # the worker's results not yet handed over
        self._ready_bytes = 0
        self._waiting: concurrent.futures.Future[Any] | None = None
        self.closed = False
        self.results_queued = 0  # results handed over and not yet taken (for tests)

    # The event loop's side.

    async def feed(self, chunk: Chunk | Exception) -> None:
        """Queue inputs (or the error that ends them, raised in the worker when it
        gets there); waits while `QUEUED_INPUT_CHUNKS` chunks are queued."""
        await self._input_room.acquire()
        self._inputs.put_nowait(chunk)

    async def end_inputs(self) -> None:
        await self._input_room.acquire()
        self._inputs.put_nowait(_END)

    async def results(self) -> AsyncIterator[list[Out]]:
        """The chunks of results, until the worker finishes; raises its error, or
        PipeClosed if the pipe was closed first."""
        while True:
            chunk = await self._results.get()
            if isinstance(chunk, _End):
                return
            if isinstance(chunk, Exception):
                raise chunk
            self._result_room.release()
            self.results_queued -= len(chunk)
            yield chunk

    def close(self) -> None:
        """End the pipe: a worker waiting on it raises PipeClosed, `results` ends so."""
        if self.closed:
            return
        self.closed = True
        self._results.put_nowait(_CLOSED)
        waiting = self._waiting
        if waiting is not None:
            waiting.cancel()

    # The worker's side.

    def chunks(self) -> Iterator[Chunk]:
        """The inputs as they arrive, in the chunks they were fed in. Before waiting
        for more, the results so far go out: the client gets them while it sends the rest."""
        while True:
            if self._ready and self._inputs.empty():
                self._hand_over()
            chunk = self._wait(self._take_inputs())
            if isinstance(chunk, _End):
                return
            if isinstance(chunk, Exception):
                raise chunk
            yield chunk

    def add(self, result: Out) -> None:
        self._ready.append(result)
        self._ready_bytes += self._size_of(result)
        if len(self._ready) >= self._max_results or self._ready_bytes >= self._max_bytes:
            self._hand_over()

    def finish(self, error: Exception | None = None) -> None:
        """The results so far, then the end (or `error`)."""
        if self._ready:
            self._hand_over()
        self._wait(self._put(error if error is not None else _END))

    def _hand_over(self) -> None:
        chunk, self._ready, self._ready_bytes = self._ready, [], 0
        self._wait(self._put(chunk))

    async def _put(self, chunk: list[Out] | Exception | _End) -> None:
        if isinstance(chunk, list):
            await self._result_room.acquire()
            self.results_queued += len(chunk)
        self._results.put_nowait(chunk)

    async def _take_inputs(self) -> Chunk | Exception | _End:
        chunk = await self._inputs.get()
        self._input_room.release()
        return chunk

    def _wait(self, step: Coroutine[Any, Any, T]) -> T:
        """Run `step` on the loop and wait for it; PipeClosed once the pipe is closed."""
        waiting = asyncio.run_coroutine_threadsafe(step, self._loop)
        self._waiting = waiting
        if self.closed:  # closed before `_waiting` was set: `close` missed it
            waiting.cancel()
        try:
            return waiting.result()
        except concurrent.futures.CancelledError:
            raise PipeClosed from None
        finally:
            self._waiting = None
