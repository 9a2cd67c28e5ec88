"""Fuzz targets: one `TARGET(data: bytes) -> None` per surface that reads untrusted input.

A target returns for every input bpfexec handles as designed, rejections
included: a refused input must raise one of the project's documented errors
(`bpfexec.vm.LoadError` and its subclass `VerifyError`, `bpfexec.vm.LimitError`; on the
wire a gRPC status the service documents) with a message of one non-empty line.
Anything else is a finding: an exception of any other type escapes unchanged,
with the traceback a fuzzer reports, and a broken invariant raises `Finding`.

| target      | input                                      | what must hold                       |
|-------------|--------------------------------------------|--------------------------------------|
| `elf`       | an ELF object (its first 4 bytes are made  | `bpfexec.vm.load` refuses cleanly or |
|             | the ELF magic)                             | returns a program that disassembles  |
| `bytecode`  | any bytes, as `bpfexec run FILE` reads     | the same; a program that loads from  |
|             | them (raw bytecode, assembly text or ELF)  | bytecode or text round-trips through |
|             |                                            | the disassembler and assembler       |
| `assembler` | assembly text (bytes decoded as UTF-8,     | `assemble` raises only LoadError; a  |
|             | undecodable bytes replaced)                | verified result round-trips          |
| `engines`   | any bytes, loaded as above                 | the interpreter and both JIT tiers   |
|             |                                            | agree on r0, memory, fuel, log, trap |
| `protocol`  | framed protobuf requests (`encode_frames`) | a real server answers each with a    |
|             |                                            | response or an expected status       |
| `loops`     | choices for `fuzz.loops.generate`: loops,  | the interpreter and both JIT tiers   |
|             | strided accesses, aliases, spills, calls   | agree; the JIT compiler never faults |

Every target is deterministic and bounded (small fuel, small limits), so a
fuzzer's timeout means a real hang. `run(target, data)` is how drivers call
them: it lets the reported, unfixed findings of `KNOWN_FAILURES` pass.
"""

from __future__ import annotations

import contextlib
import re
import threading
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from bpfexec import vm
from bpfexec.vm import isa
from bpfexec.vm.assembler import Assembled, assemble
from bpfexec.vm.disassembler import disassemble
from bpfexec.vm.errors import LimitError, LinkError, LoadError, RequestError, Trap, TrapKind
from bpfexec.vm.helpers import Helper, HelperContext
from bpfexec.vm.loader import ELF_MAGIC
from bpfexec.vm.machine import available_engines
from bpfexec.vm.program import HelperRef, Program
from bpfexec.vm.verifier import verify

Target = Callable[[bytes], None]

# Limits of the local targets: small enough that no input takes long, large
# enough for every seed of the corpus.
LIMITS = vm.Limits(max_module_bytes=1 << 20, max_instructions=1 << 16, max_call_depth=8)
ENGINE_FUEL = 300
ENGINE_BUFFER = bytes(range(64))
MAX_FUNCTIONS_RUN = 3  # functions of one program the engines target runs


class Finding(AssertionError):
    """An invariant of a target does not hold for this input."""


def is_one_line(text: str) -> bool:
    """Non-empty, and no line break of any kind (`str.splitlines` knows them all)."""
    return bool(text.strip()) and text.splitlines() == [text]


def check_message(error: BaseException) -> str:
    """The error's message, which must be one non-empty line; else a `Finding`."""
    text = str(error)
    if not is_one_line(text):
        raise Finding(f"{type(error).__name__} message is not one non-empty line: {text!r}")
    return text


def _load(data: bytes, name: str) -> Program | None:
    """The program, or None when bpfexec refuses the bytes as documented."""
    try:
        program = vm.load(data, name, LIMITS)
    except (LoadError, LimitError) as error:
        check_message(error)
        return None
    check_names(program)
    return program


def check_names(program: Program) -> None:
    """Function and helper names go into messages and listings: non-empty and printable."""
    names = [fn.name for fn in program.functions]
    names += [ref.name for ref in program.helpers if ref.name is not None]
    for name in names:
        if not name or not name.isprintable():
            raise Finding(f"the loaded program has the name {name!r}")


# -- elf ------------------------------------------------------------------------------


def elf(data: bytes) -> None:
    """ELF loader and linker: every input is an ELF file, whatever its first bytes."""
    program = _load(ELF_MAGIC + data[len(ELF_MAGIC) :], "fuzz.o")
    if program is not None:
        disassemble(program)  # symbol names and all: printing never raises


# -- bytecode -------------------------------------------------------------------------


def bytecode(data: bytes) -> None:
    """Loader and verifier on raw bytes, recognised by content as `bpfexec run` does."""
    program = _load(data, "fuzz.bin")
    if program is None:
        return
    if data.startswith(ELF_MAGIC):
        disassemble(program)  # ELF symbol names need not be assembler labels
    else:
        check_round_trip(program)


def check_round_trip(program: Program) -> None:
    """The listing of a verified program assembles back into the same instructions.

    Same up to the one encoding choice the listing does not keep: `callx` with
    its register in imm (clang 14) reads back with it in dst (RFC 9669).
    """
    listing = disassemble(program)
    try:
        again = assemble(listing, "listing")
    except LoadError as error:
        raise Finding(f"the listing of a verified program does not assemble: {error}") from None
    expected = [_canonical(insn) for insn in program.instructions]
    actual = [_canonical(insn) for insn in again.instructions]
    if actual != expected:
        pc = next(
            (pc for pc, (a, b) in enumerate(zip(actual, expected, strict=False)) if a != b),
            min(len(actual), len(expected)),
        )
        raise Finding(
            f"round trip changes the program at pc {pc}: "
            f"{_slot(expected, pc)} became {_slot(actual, pc)}"
        )
    if dict(again.helper_calls) != dict(program.helper_calls):
        raise Finding(
            f"round trip changes the helper calls: {dict(program.helper_calls)} "
            f"became {dict(again.helper_calls)}"
        )


def _canonical(insn: isa.Instruction) -> isa.Instruction:
    if insn.opcode == isa.OP_CALLX:
        return isa.Instruction(isa.OP_CALLX, isa.callx_register(insn))
    return insn


def _slot(code: Sequence[isa.Instruction], pc: int) -> str:
    return repr(code[pc]) if pc < len(code) else "nothing"


# -- assembler ------------------------------------------------------------------------


def assembler(data: bytes) -> None:
    """Assembler on arbitrary text; what assembles and verifies must round-trip."""
    text = data.decode("utf-8", "replace")
    try:
        assembled = assemble(text, "fuzz.s")
    except LoadError as error:
        check_message(error)
        return
    program = _program(assembled)
    try:
        verify(program)
    except LoadError as error:
        check_message(error)
        return
    check_round_trip(program)


def _program(assembled: Assembled) -> Program:
    return Program(
        instructions=assembled.instructions,
        functions=assembled.functions,
        helper_calls=dict(assembled.helper_calls),
        name="fuzz.s",
    )


# -- engines --------------------------------------------------------------------------


class AnyHelper:
    """Resolves every helper a program names, deterministically, so every program links.

    What a helper does depends on its number (or the CRC of its name): mix its
    arguments, read or write the program's memory through the context (which
    may trap), log, or fail, so that both engines' helper paths are exercised.
    """

    def resolve(self, ref: HelperRef) -> Helper | None:
        key = ref.number if ref.number is not None else zlib.crc32((ref.name or "").encode())
        return Helper(_HELPER_BEHAVIOURS[key % len(_HELPER_BEHAVIOURS)], ref.number, ref.name)


def _mix(ctx: HelperContext, a: int, b: int, c: int, d: int, e: int) -> int:
    return (a * 31 + b * 17 + c * 7 + d * 3 + e) ^ 0x5DEECE66D


def _peek(ctx: HelperContext, a: int, b: int, c: int, d: int, e: int) -> int:
    return int.from_bytes(ctx.read(a, 8), "little")


def _poke(ctx: HelperContext, a: int, b: int, c: int, d: int, e: int) -> int:
    ctx.write(a, b.to_bytes(8, "little"))
    ctx.log(f"poke {a:#x} {b:#x}")
    return 0


def _fail(ctx: HelperContext, a: int, b: int, c: int, d: int, e: int) -> int:
    if a & 1:
        raise ValueError(f"refused {a:#x}")
    if a & 2:
        raise Trap(TrapKind.MEMORY_FAULT, "fuzz helper refuses")
    return a >> 2


_HELPER_BEHAVIOURS = (_mix, _peek, _poke, _fail)


def run_outcome(program: Program, function: str | None, engine: str) -> dict[str, Any]:
    """Everything observable about one bounded run, or the request error it raised."""
    try:
        result = vm.execute(
            program,
            function,
            [ENGINE_BUFFER, len(ENGINE_BUFFER)],
            fuel=ENGINE_FUEL,
            helpers=AnyHelper(),
            limits=LIMITS,
            engine=engine,
        )
    except (RequestError, LinkError) as error:  # documented request problems
        return {"raised": type(error).__name__, "message": check_message(error)}
    outcome = result.to_dict()
    del outcome["duration_ns"]
    return outcome


def engines(data: bytes) -> None:
    """Interpreter against both tiers of the JIT (when llvmlite is installed) on what loads."""
    program = _load(data, "fuzz.bin")
    if program is None:
        return
    tiers: dict[str, Program] = {}
    if "jit" in available_engines():
        from bpfexec.vm.jit import compile_program

        # A Program keeps its native code: the quick tier needs a copy compiled quick first.
        quick = vm.load(data, "fuzz.bin", LIMITS)
        compile_program(quick, quick=True)
        tiers = {"jit (optimized)": program, "jit (quick)": quick}
    names: list[str | None] = [None]
    names += [fn.name for fn in program.functions[:MAX_FUNCTIONS_RUN]]
    for function in dict.fromkeys(names):
        expected = run_outcome(program, function, "interpreter")
        for tier, compiled in tiers.items():
            actual = run_outcome(compiled, function, "jit")
            if actual != expected:
                differences = {
                    key: (expected.get(key), actual.get(key))
                    for key in sorted(expected.keys() | actual.keys())
                    if expected.get(key) != actual.get(key)
                }
                raise Finding(
                    f"interpreter and {tier} disagree on function {function or '(default)'}: "
                    f"(interpreter, jit) = {differences}"
                )


# -- protocol -------------------------------------------------------------------------

# Frame kinds of a protocol input: one request each, except that consecutive
# STREAM frames are the messages of one ExecuteStream call.
LOAD, EXECUTE, STREAM, GET, DELETE = range(5)
FRAME_KINDS = 5
MAX_FRAMES = 8
PROTOCOL_TIMEOUT = 10.0  # seconds per call; far above what the server's limits allow

_PROTOCOL_LIMITS = vm.Limits(
    default_fuel=20_000,
    max_fuel=200_000,
    max_module_bytes=1 << 20,
    max_instructions=1 << 16,
    max_buffer_bytes=1 << 16,
    max_call_depth=8,
)


def encode_frames(frames: Sequence[tuple[int, Any]]) -> bytes:
    """A protocol input from (kind, protobuf message or bytes) pairs."""
    out = bytearray()
    for kind, message in frames:
        payload = message if isinstance(message, bytes) else message.SerializeToString()
        payload = payload[:0xFFFF]
        out += bytes([kind]) + len(payload).to_bytes(2, "little") + payload
    return bytes(out)


def decode_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(kind, payload) pairs: one kind byte, a little-endian u16 length, the payload."""
    frames = []
    at = 0
    while at + 3 <= len(data) and len(frames) < MAX_FRAMES:
        size = int.from_bytes(data[at + 1 : at + 3], "little")
        frames.append((data[at] % FRAME_KINDS, data[at + 3 : at + 3 + size]))
        at += 3 + size
    return frames


class ProtocolHarness:
    """A real bpfexec server on a free localhost port and a channel to it.

    Started on first use, stopped by `stop()` (a daemon thread: a fuzzer that
    just exits needs not); requests go over the network exactly as a
    client's would, through every interceptor.
    """

    _instance: ProtocolHarness | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        import grpc

        from bpfexec._pb.bpfexec.v1 import executor_pb2 as pb
        from bpfexec._pb.bpfexec.v1 import executor_pb2_grpc as pb_grpc
        from bpfexec.server.app import serve_in_thread
        from bpfexec.server.settings import Settings

        self.grpc = grpc
        self.pb = pb
        settings = Settings(
            host="127.0.0.1",
            port=0,
            metrics_port=0,
            entry_point_helpers=False,
            engine="interpreter",
            max_concurrent_executions=4,
            cache_max_modules=64,
            remote_helper_timeout=0.2,
            grace_period=0,
            limits=_PROTOCOL_LIMITS,
        )
        self._stack = contextlib.ExitStack()
        self.server = self._stack.enter_context(serve_in_thread(settings))
        self.channel = self._stack.enter_context(grpc.insecure_channel(self.server.address))
        self.stub = pb_grpc.ExecutorStub(self.channel)
        # Statuses the service documents for bad requests; UNKNOWN (an exception
        # the service did not expect) and INTERNAL are findings.
        self.expected = {
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.NOT_FOUND,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.StatusCode.DEADLINE_EXCEEDED,
        }

    @classmethod
    def get(cls) -> ProtocolHarness:
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    @classmethod
    def stop(cls) -> None:
        with cls._lock:
            if cls._instance is not None:
                cls._instance._stack.close()
                cls._instance = None

    def run(self, data: bytes) -> None:
        pb = self.pb
        parsers: dict[int, Any] = {
            LOAD: pb.LoadModuleRequest,
            EXECUTE: pb.ExecuteRequest,
            STREAM: pb.ExecuteStreamRequest,
            GET: pb.GetModuleRequest,
            DELETE: pb.DeleteModuleRequest,
        }
        self.loaded = ""  # the id of the last module loaded by this input
        stream: list[Any] = []
        for kind, payload in decode_frames(data):
            try:
                request = parsers[kind].FromString(payload)
            except Exception:  # not a message: protobuf's parser is not under test
                continue
            if kind == STREAM:
                stream.append(request)
                continue
            if stream:
                self._stream(stream)
                stream = []
            self._unary(kind, request)
        if stream:
            self._stream(stream)

    def _unary(self, kind: int, request: Any) -> None:
        stub = self.stub
        if kind == LOAD:
            module = self._call(stub.LoadModule, request)
            if module is not None:
                self.loaded = module.id
        elif kind == EXECUTE:
            request.module_id = request.module_id or self.loaded
            self._call(stub.Execute, request)
        elif kind == GET:
            request.id = request.id or self.loaded
            self._call(stub.GetModule, request)
        else:
            request.id = request.id or self.loaded
            self._call(stub.DeleteModule, request)

    def _stream(self, messages: list[Any]) -> None:
        for message in messages:
            if message.WhichOneof("message") == "start":
                start = message.start.request
                start.module_id = start.module_id or self.loaded
        responses = self.stub.ExecuteStream(iter(messages), timeout=PROTOCOL_TIMEOUT)
        last = None
        try:
            for response in responses:
                last = response
        except self.grpc.RpcError as error:
            self._check_status(error)
            return
        if last is None or last.WhichOneof("message") != "result":
            raise Finding(f"ExecuteStream ended without a result or an error status: {last}")

    def _call(self, method: Callable[..., Any], request: Any) -> Any:
        try:
            return method(request, timeout=PROTOCOL_TIMEOUT)
        except self.grpc.RpcError as error:
            self._check_status(error)
            return None

    def _check_status(self, error: Any) -> None:
        code, details = error.code(), error.details() or ""
        if code not in self.expected:
            raise Finding(f"the server answered {code.name}: {details}")
        if not is_one_line(details):
            raise Finding(f"{code.name} message is not one non-empty line: {details!r}")


def protocol(data: bytes) -> None:
    """The gRPC service, end to end, on framed requests (see `decode_frames`)."""
    ProtocolHarness.get().run(data)


# -- loops ----------------------------------------------------------------------------------


def loops(data: bytes) -> None:
    """Programs aimed at the checks the optimized tier elides (`fuzz/loops.py`): loop
    nests entered from outside, wrapping steps, aliases, spills across calls. A wrong
    elision may crash this process; `fuzz/isolated.py` runs them in a child instead."""
    from fuzz import loops as generated

    generated.target(data)


TARGETS: dict[str, Target] = {
    "elf": elf,
    "bytecode": bytecode,
    "assembler": assembler,
    "engines": engines,
    "protocol": protocol,
    "loops": loops,
}


# -- known failures ---------------------------------------------------------------------


@dataclass(frozen=True)
class KnownFailure:
    """A finding reported, but not fixed yet, in code outside the fuzzed surface's owners.

    `reproducer` is its file in `fuzz/corpus/<target>/`; `pattern` matches the
    `Finding` message, so that a long run is not stopped by it again and again.
    """

    target: str
    reproducer: str
    pattern: str
    reason: str

    def matches(self, target: str, error: BaseException) -> bool:
        return (
            target == self.target
            and isinstance(error, Finding)
            and re.search(self.pattern, str(error)) is not None
        )


# Findings not fixed yet: (target, reproducer file, message pattern, reason).
KNOWN_FAILURES: tuple[KnownFailure, ...] = ()


def run(target: str, data: bytes, *, ignore_known: bool = True) -> None:
    """Run `target` on `data`; a finding in `KNOWN_FAILURES` passes unless `ignore_known` is off."""
    try:
        TARGETS[target](data)
    except Finding as finding:
        if not ignore_known or not any(known.matches(target, finding) for known in KNOWN_FAILURES):
            raise
