"""Remote helpers: the helpers one client answers itself over its `ExecuteStream`.

`RemoteHelpers` is the state of one stream, shared by two threads:

- the execution's worker thread calls a remote helper like any other
  (`Helper.fn(ctx, r1..r5)`); the call hands a `HelperCall` to the event loop
  and blocks that worker thread (never the loop) until the client answers,
  the per-call timeout expires, or the stream goes away;
- the event loop feeds in what the client sends: `answer()` settles the call,
  `read()`/`write()`/`log()` touch the program's memory and log while the
  worker is parked inside the call, so nothing races the program itself.

A lock guards "which call is pending" so a memory access cannot slip in after
the worker gave up on its call. Nothing here knows gRPC: the servicer turns
messages into these calls and `HelperCall`s into messages, so this protocol
logic is tested without a network.

A round trip crosses threads twice (worker to loop, loop to worker), and each
crossing is a wake-up of a sleeping thread that then needs the GIL. Both are
kept to one wake-up each (docs/remote-helpers.md, "Cost"): the worker parks
on a bare lock right after scheduling its call, so the loop never wakes up
only to wait for the GIL the worker still holds; and the loop releases the
worker once it has armed the read of the client's next message and is about
to sleep (`call_soon`), not while it still has Python to run.

What one stream may cost the server is bounded:

- a `MemoryRead` asks for at most `max_read` bytes (`max_memory_read_bytes`,
  1 MiB by default); a larger one is answered with an error and changes
  nothing. Reads beyond `INLINE_READ_BYTES` run on a worker thread
  (`read_async`), never on the event loop that serves every other client, and
  a NUL is looked for with `bytes.find`, not byte by byte;
- `Outbox` holds the answers waiting to be written to the client, at most
  `max_stream_outbox_bytes` of them (and `OUTBOX_MAX_MESSAGES`). When it is
  full the servicer stops reading the client's requests until the client
  reads its answers: HTTP/2 flow control then holds the client back, and a
  client that never reads is left to the call's deadline, the remote helper
  timeout and `max_concurrent_requests`, with no more than that memory held.
"""

from __future__ import annotations

import asyncio
import threading
import time
from _thread import allocate_lock
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from bpfexec.server.executor import ServiceError
from bpfexec.server.metrics import Metrics
from bpfexec.vm import Helper, HelperContext, HelperRef, Trap, TrapKind

HelperKey = int | str  # the offered number or name a call site matched

DEFAULT_MAX_READ_BYTES = 1 << 20  # the default of Settings.max_memory_read_bytes
DEFAULT_OUTBOX_BYTES = 2 << 20  # the default of Settings.max_stream_outbox_bytes
OUTBOX_MAX_MESSAGES = 256  # answers queued per stream, whatever their size
# Reads up to this size run on the event loop: a copy this small (microseconds)
# costs less than the hand-off to a thread, which larger ones take.
INLINE_READ_BYTES = 64 << 10
MESSAGE_OVERHEAD = 64  # bytes counted for an answer besides its data


@dataclass(frozen=True)
class HelperCall:
    """A call the client must answer: which helper, with which r1..r5."""

    call_id: int
    helper: HelperKey
    args: tuple[int, ...]


class ProtocolViolation(ServiceError):
    """The client broke the ExecuteStream protocol (a bug in the client, not the program)."""


class ShadowedHelper(ServiceError):
    """The client offered a helper the server answers in-process."""

    def __init__(self, helpers: list[str]) -> None:
        self.helpers = helpers
        super().__init__(
            f"{', '.join(helpers)}: answered in-process by this server; a client may not "
            "shadow an in-process helper (ListHelpers lists them): stop offering "
            f"{'it' if len(helpers) == 1 else 'them'}"
        )


class _Pending:
    """The one helper call a stream is waiting for.

    The worker thread waits on `done`, a bare lock held from the start (a
    `concurrent.futures.Future` costs a Condition and an RLock per call).
    `settle` records the outcome, then `wake` releases the worker; both run
    under the session's lock, except a deferred `wake` (see `answer`).
    """

    __slots__ = ("call_id", "context", "done", "error", "fault", "helper", "settled", "value")

    def __init__(self, call_id: int, helper: Helper, context: HelperContext) -> None:
        self.call_id = call_id
        self.helper = helper
        self.context = context
        self.done = allocate_lock()
        self.done.acquire()
        self.settled = False
        self.value = 0
        self.error: Trap | None = None
        # The last memory access of this call that faulted: if the client then
        # fails the call, the run ends with this trap, as it would in-process.
        self.fault: Trap | None = None

    def settle(self, value: int = 0, error: Trap | None = None) -> bool:
        """Record the outcome unless there is one already; whether this one counts."""
        if self.settled:
            return False
        self.settled, self.value, self.error = True, value, error
        return True

    def wake(self) -> None:
        """Let the worker go on (once, after `settle`)."""
        self.done.release()

    def outcome(self) -> int:
        if self.error is not None:
            raise self.error
        return self.value


class RemoteHelpers:
    """The helpers offered on one stream: a `HelperResolver` for the execution.

    `send(call)` is run on `loop` for every helper call; the servicer writes it
    to the stream. `shadows(ref)` says whether the server answers `ref`
    in-process, which a client may not override.
    """

    def __init__(
        self,
        numbers: Iterable[int],
        names: Iterable[str],
        *,
        shadows: Callable[[HelperRef], bool],
        timeout: float,
        metrics: Metrics,
        send: Callable[[HelperCall], object],
        loop: asyncio.AbstractEventLoop,
        max_read: int = DEFAULT_MAX_READ_BYTES,
    ) -> None:
        refs = [HelperRef(number=n) for n in numbers] + [HelperRef(name=n) for n in names]
        shadowed = [str(ref) for ref in refs if shadows(ref)]
        if shadowed:
            raise ShadowedHelper(shadowed)
        self._helpers: dict[HelperKey, Helper] = {}
        for ref in refs:
            key: HelperKey = ref.name if ref.name is not None else ref.number  # type: ignore[assignment]
            count = metrics.remote_helper_counter(str(ref))
            self._helpers[key] = Helper(_RemoteFn(self, key, count), ref.number, ref.name)
        self._timeout = timeout
        self.max_read = max_read  # bytes per MemoryRead
        self._seconds = metrics.remote_helper_seconds
        self._send = send
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: _Pending | None = None
        self._last_id = 0
        self._expired: set[int] = set()  # calls the worker gave up on (timed out)
        self._closed: tuple[TrapKind, str] | None = None

    def resolve(self, ref: HelperRef) -> Helper | None:
        """The offered helper a call site names: by name if it has one, else by number."""
        if ref.name is not None:
            return self._helpers.get(ref.name)
        return self._helpers.get(ref.number) if ref.number is not None else None

    # The worker thread

    def call(self, key: HelperKey, context: HelperContext, registers: tuple[int, ...]) -> int:
        """Send a helper call to the client and wait for its answer (worker thread)."""
        helper = self._helpers[key]
        with self._lock:
            if self._closed is not None:
                kind, why = self._closed
                raise Trap(kind, f"remote helper {helper} cannot be answered: {why}")
            self._last_id += 1
            pending = _Pending(self._last_id, helper, context)
            self._pending = pending
        start = time.perf_counter()
        # The last thing before parking: the loop wakes up to a free GIL.
        self._loop.call_soon_threadsafe(self._send, HelperCall(pending.call_id, key, registers))
        try:
            if not pending.done.acquire(True, self._timeout):
                with self._lock:
                    if pending.settle(error=self._expired_trap(pending)):  # else the answer won
                        self._expired.add(pending.call_id)
                        if self._pending is pending:
                            self._pending = None
            return pending.outcome()
        finally:
            self._seconds.observe(time.perf_counter() - start)

    def _expired_trap(self, pending: _Pending) -> Trap:
        return Trap(
            TrapKind.HELPER_ERROR,
            f"remote helper {pending.helper} did not answer call {pending.call_id} "
            f"within {self._timeout:g} s (the server's remote_helper_timeout)",
        )

    # The event loop: what the client sends

    def answer(self, call_id: int, value: int | None, error: str | None) -> None:
        """The client's HelperResult: a value for r0, or an error that ends the run.

        The outcome is settled at once (a second answer is a violation from
        now on), but the worker is woken by a callback queued on the loop: the
        reader first goes back to the stream and arms the read of the next
        message, so the woken worker finds the GIL free instead of waking up
        to wait for it.
        """
        with self._lock:
            pending = self._current("HelperResult", call_id)
            if pending is None:
                return  # the call timed out; its late answer changes nothing
            self._pending = None  # a second answer for the same call is a violation
            if error is None:
                settled = pending.settle(value or 0)
            elif pending.fault is not None:
                settled = pending.settle(error=pending.fault)
            else:
                failed = f"remote helper {pending.helper} failed: {error}"
                settled = pending.settle(error=Trap(TrapKind.HELPER_ERROR, failed))
        if settled:
            self._loop.call_soon(pending.wake)

    def read(self, call_id: int, address: int, size: int, until_nul: bool = False) -> bytes:
        """Read memory for the pending call; a fault raises Trap (the run goes on).

        `size` (with `until_nul`, the longest string) may not exceed `max_read`:
        a larger read raises Trap too, but is no fault of the program's: the
        client may read in pieces, and failing the call then is a HELPER_ERROR.
        """
        with self._lock:
            pending = self._accessible("MemoryRead", call_id)
            if size > self.max_read:
                raise Trap(
                    TrapKind.HELPER_ERROR,
                    f"MemoryRead of {size} bytes exceeds the server's limit of {self.max_read} "
                    "bytes per read (max_memory_read_bytes): read in smaller pieces",
                )
            try:
                if until_nul:
                    return pending.context.read_cstring(address, size)
                return pending.context.read(address, size)
            except Trap as fault:
                pending.fault = fault
                raise

    async def read_async(
        self, call_id: int, address: int, size: int, until_nul: bool = False
    ) -> bytes:
        """`read`, off the event loop unless it is small (at most `INLINE_READ_BYTES`).

        The reader awaits it before taking the client's next message, so a
        stream has one read in flight at most.
        """
        if size <= INLINE_READ_BYTES or size > self.max_read:
            return self.read(call_id, address, size, until_nul)
        return await asyncio.to_thread(self.read, call_id, address, size, until_nul)

    def write(self, call_id: int, address: int, data: bytes) -> None:
        """Write memory for the pending call; a fault raises Trap (the run goes on)."""
        with self._lock:
            pending = self._accessible("MemoryWrite", call_id)
            try:
                pending.context.write(address, data)
            except Trap as fault:
                pending.fault = fault
                raise

    def log(self, call_id: int, text: str) -> None:
        """Append a line to the execution's log for the pending call."""
        with self._lock:
            pending = self._current("HelperLog", call_id)
            if pending is not None:
                pending.context.log(text)

    def client_done(self) -> None:
        """The client closed its side: calls from now on cannot be answered."""
        self._close(TrapKind.HELPER_ERROR, "the client closed its side of the stream")

    def cancel(self) -> None:
        """The stream is gone (client cancelled, disconnected or broke the protocol)."""
        self._close(TrapKind.CANCELLED, "the stream was cancelled")

    def _close(self, kind: TrapKind, why: str) -> None:
        with self._lock:
            if self._closed is None:
                self._closed = (kind, why)
            pending, self._pending = self._pending, None
            if pending is not None and pending.settle(
                error=Trap(kind, f"remote helper {pending.helper} cannot be answered: {why}")
            ):
                pending.wake()

    def _current(self, what: str, call_id: int) -> _Pending | None:
        """The pending call `call_id` names; None if it timed out. Caller holds the lock."""
        pending = self._pending
        if pending is not None and pending.call_id == call_id:
            return pending
        if call_id in self._expired:
            return None
        if pending is None:
            raise ProtocolViolation(
                f"{what} for call_id {call_id}, but no helper call is pending "
                f"({self._last_id} helper call(s) sent so far, each answered once)"
            )
        raise ProtocolViolation(
            f"{what} for call_id {call_id}, but the pending helper call is {pending.call_id}"
        )

    def _accessible(self, what: str, call_id: int) -> _Pending:
        pending = self._current(what, call_id)
        if pending is None:
            raise Trap(
                TrapKind.HELPER_ERROR,
                f"helper call {call_id} timed out: its memory is no longer accessible",
            )
        return pending


T = TypeVar("T")


class Outbox(Generic[T]):
    """The messages one stream has for its client, in order, bounded in bytes and count.

    `put_nowait` never waits: it is for what is bounded by the protocol itself
    (the one pending helper call, the end of the run, a violation). `put`
    waits until the messages queued before it leave room for `size` more bytes
    and one more message; a message alone in the outbox always fits, so one
    answer larger than the limit still goes out. Room is made when `get` takes
    a message to write it. One task puts with `put`, one task gets.
    """

    def __init__(self, max_bytes: int, max_messages: int = OUTBOX_MAX_MESSAGES) -> None:
        self.max_bytes = max_bytes
        self.max_messages = max_messages
        self._items: deque[tuple[T, int]] = deque()
        self._bytes = 0
        self._ready = asyncio.Event()  # set while _items is not empty
        self._room = asyncio.Event()  # set when a message left

    @property
    def queued_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def put_nowait(self, item: T, size: int = MESSAGE_OVERHEAD) -> None:
        self._items.append((item, size))
        self._bytes += size
        self._ready.set()

    async def put(self, item: T, size: int = MESSAGE_OVERHEAD) -> None:
        """Queue `item` once there is room for it (backpressure on the caller)."""
        while self._items and (
            len(self._items) >= self.max_messages or self._bytes + size > self.max_bytes
        ):
            self._room.clear()
            await self._room.wait()
        self.put_nowait(item, size)

    async def get(self) -> T:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        item, size = self._items.popleft()
        self._bytes -= size
        self._room.set()
        return item


class _RemoteFn:
    """`Helper.fn` of one offered helper: counts the call and forwards it to the client."""

    __slots__ = ("count", "key", "session")

    def __init__(self, session: RemoteHelpers, key: HelperKey, count: Callable[[], None]) -> None:
        self.session = session
        self.key = key
        self.count = count

    def __call__(self, ctx: HelperContext, *registers: int) -> int:
        self.count()
        return self.session.call(self.key, ctx, registers)
