"""Native helpers: helper functions in a shared library, called without Python.

    registry.native("./libmath.so", "sqrti", id=200)   # HelperRegistry.native

A native helper is `uint64_t fn(uint64_t r1, ..., uint64_t r5, bpfexec_call *call)`
(`call` last, like uBPF's helper cookie, so a uBPF helper works unchanged),
declared in `bpfexec_helper.h` (`bpfexec.include_dir()`). The JIT calls it
directly from native code; the interpreter calls `NativeHelper.__call__`,
which calls it through ctypes: both with the same `call`, whose `api` table
(`API` here) gives the helper the program's memory by virtual address,
checked by `bpfexec.vm.memory.Memory` exactly as a Python helper's
`HelperContext` is, the execution's log, and a way to trap. Those four entry
points are Python callbacks: a helper that only computes never enters Python.

Which execution a `call` belongs to: every call struct is registered in
`CALLS` by its address for the duration of the call (the interpreter's) or of
the run (the JIT's context, whose first field is the `api` pointer), with a
`CallSink` that knows the execution's `HelperContext` and where a trap goes.

Native helpers are the operator's code, loaded at start-up (`--native-helpers`);
they run in the server's process with its rights. A client can never upload one.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from typing import Protocol

from bpfexec.vm.errors import Trap, TrapKind
from bpfexec.vm.helpers import HelperContext, HelperRegistry

ABI_VERSION = 1
MASK64 = (1 << 64) - 1

# uint64_t fn(uint64_t r1, ..., uint64_t r5, bpfexec_call *call)
NATIVE_HELPER_TYPE = ctypes.CFUNCTYPE(ctypes.c_uint64, *([ctypes.c_uint64] * 5), ctypes.c_void_p)
_READ_TYPE = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_uint64
)
_WRITE_TYPE = _READ_TYPE
_LOG_TYPE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64)
_TRAP_TYPE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_char_p)

MAX_TRAP_MESSAGE = 1024  # bytes of a helper's trap message kept


class CallSink(Protocol):
    """Where a native call's requests go: the execution's context and its trap."""

    def helper_context(self) -> HelperContext:
        """The execution's HelperContext, its `helper` set to the helper being called."""
        ...

    def trap(self, trap: Trap) -> None:
        """Record `trap`: the run ends with it once the helper returns (first one wins)."""
        ...


# Call struct address -> its sink, while a call (or a JIT run) is in progress.
CALLS: dict[int, CallSink] = {}


def _sink(call: int | None) -> CallSink:
    sink = CALLS.get(call or 0)
    if sink is None:  # a helper that kept its call pointer past the call
        raise Trap(TrapKind.HELPER_ERROR, "a native helper used a call that has ended")
    return sink


def _guarded(sink_call: int | None, action: str, work: Callable[[], int]) -> int:
    """Run `work()` for a callback; any failure becomes the call's trap and -1."""
    try:
        return work()
    except Trap as trap:
        sink = CALLS.get(sink_call or 0)
        if sink is not None:
            sink.trap(trap)
        return -1
    except Exception as exc:  # never let an exception cross the C frames
        sink = CALLS.get(sink_call or 0)
        if sink is not None:
            sink.trap(Trap(TrapKind.HELPER_ERROR, f"native {action} failed: {exc}"))
        return -1


_EMPTY = ctypes.create_string_buffer(1)  # what a 0-byte access points at, whatever it was given


def _pointer(address: int | None, size: int, name: str) -> int:
    """A host pointer a helper passed; a NULL one for a non-empty access is its error."""
    if not size:
        return ctypes.addressof(_EMPTY)
    if not address:
        raise ValueError(f"{name} is NULL")
    return address


def _read(call: int | None, addr: int, dst: int | None, size: int) -> int:
    def work() -> int:
        data = _sink(call).helper_context().read(addr, size)
        ctypes.memmove(_pointer(dst, size, "dst"), data, len(data))
        return 0

    return _guarded(call, "read", work)


def _write(call: int | None, addr: int, src: int | None, size: int) -> int:
    def work() -> int:
        context = _sink(call).helper_context()
        context.view(addr, size, write=True)  # checks the whole range before reading src
        context.write(addr, ctypes.string_at(_pointer(src, size, "src"), size))
        return 0

    return _guarded(call, "write", work)


def _log(call: int | None, text: int | None, size: int) -> int:
    def work() -> int:
        context = _sink(call).helper_context()
        if not context.would_log(size):  # never read more than could be kept
            return -1
        context.log(ctypes.string_at(_pointer(text, size, "text"), size).decode("utf-8", "replace"))
        return 0

    return _guarded(call, "log", work)


def _trap(call: int | None, message: bytes | None) -> None:
    def work() -> int:
        sink = _sink(call)
        helper = sink.helper_context().helper
        text = (message or b"")[:MAX_TRAP_MESSAGE].decode("utf-8", "replace")
        sink.trap(Trap(TrapKind.HELPER_ERROR, f"helper {helper} failed: {text}"))
        return 0

    _guarded(call, "trap", work)


class Api(ctypes.Structure):
    """`struct bpfexec_api` of bpfexec_helper.h."""

    _fields_ = [
        ("abi", ctypes.c_uint64),
        ("read", _READ_TYPE),
        ("write", _WRITE_TYPE),
        ("log", _LOG_TYPE),
        ("trap", _TRAP_TYPE),
    ]


# One table for every call (module globals: the callbacks must stay alive).
API = Api(ABI_VERSION, _READ_TYPE(_read), _WRITE_TYPE(_write), _LOG_TYPE(_log), _TRAP_TYPE(_trap))
API_ADDRESS = ctypes.addressof(API)


class _Call(ctypes.Structure):
    """`struct bpfexec_call` as the interpreter passes it: the api pointer first."""

    _fields_ = [("api", ctypes.c_void_p)]


class _InterpreterSink:
    __slots__ = ("context", "pending")

    def __init__(self, context: HelperContext) -> None:
        self.context = context
        self.pending: Trap | None = None

    def helper_context(self) -> HelperContext:
        return self.context

    def trap(self, trap: Trap) -> None:
        if self.pending is None:
            self.pending = trap


class NativeHelper:
    """A helper function in a shared library: `Helper.fn` of a native helper.

    Called as any helper, `fn(ctx, r1, ..., r5)` (the interpreter's way, through
    ctypes); the JIT sees `address` and calls the function itself.
    """

    __slots__ = ("_function", "_library", "address", "library", "symbol")

    def __init__(self, library: str, symbol: str) -> None:
        self.library = library
        self.symbol = symbol
        path = os.path.abspath(library)
        try:
            # RTLD_LOCAL: two libraries may define the same symbol names.
            self._library = ctypes.CDLL(path, mode=os.RTLD_NOW)
        except OSError as exc:
            reason = str(exc).removeprefix(f"{path}: ")  # dlerror() names the file first
            raise ValueError(f"cannot load native helper library {library}: {reason}") from None
        try:
            function = getattr(self._library, symbol)
        except AttributeError:
            raise ValueError(f"no symbol {symbol!r} in native helper library {library}") from None
        self.address: int = ctypes.cast(function, ctypes.c_void_p).value or 0
        self._function = NATIVE_HELPER_TYPE(self.address)

    def __call__(self, ctx: HelperContext, r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
        call = _Call(API_ADDRESS)
        address = ctypes.addressof(call)
        sink = _InterpreterSink(ctx)
        CALLS[address] = sink
        try:
            value: int = self._function(r1, r2, r3, r4, r5, address)
        finally:
            del CALLS[address]
        if sink.pending is not None:
            raise sink.pending
        return value

    def __repr__(self) -> str:
        return f"NativeHelper({self.library!r}, {self.symbol!r})"


def native_registry(spec: str) -> HelperRegistry:
    """The native helper named by `LIBRARY:SYMBOL[=NUMBER]` (`--native-helpers`), in a
    registry of its own: named SYMBOL, with NUMBER if given (kernel-style programs
    call helpers by number). ValueError with a one-line message if the spec is
    malformed or the library or the symbol is missing."""
    library, sep, rest = spec.rpartition(":")
    symbol, eq, number_text = rest.partition("=")
    symbol = symbol.strip()
    if not sep or not library or not symbol.isidentifier():
        raise ValueError(f"native helpers {spec!r}: expected LIBRARY:SYMBOL[=NUMBER]")
    number = None
    if eq:
        try:
            number = int(number_text, 0)
        except ValueError:
            raise ValueError(
                f"native helpers {spec!r}: helper number {number_text!r} is not an integer"
            ) from None
    registry = HelperRegistry()
    try:
        registry.native(library, symbol, id=number)
    except ValueError as exc:
        raise ValueError(f"native helpers {spec!r}: {exc}") from None
    return registry
