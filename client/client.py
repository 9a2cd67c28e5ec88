"""`Client`: the Python client of a bpfexec server.

    with Client("localhost:50051") as bpf:
        module = bpf.load(Path("prog.o").read_bytes())
        result = bpf.execute(module, "foo", args=[7, b"buffer"])
        print(result.return_value, result.trap)

Blocking, thread-safe (one client can be shared by threads; calls run
concurrently over one HTTP/2 connection). `execute(..., helpers=...)` answers
helper calls of the program from this process over an `ExecuteStream`
(docs/remote-helpers.md); `execute_batch` runs one function over a stream of
inputs (docs/batch.md), `test_run` a packet program over a stream of packets
(docs/test-run.md); `bpfexec.client.aio.AsyncClient` is the asyncio twin.
Failures raise `bpfexec.client.errors` exceptions carrying the server's message; a
program that traps is a `Result` with `trap` set, not an exception. This
module depends only on the generated stubs in `bpfexec._pb`, never on the
server or the VM.
"""

from __future__ import annotations

import collections
import os
import queue
import sys
import threading
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc
from google.rpc import error_details_pb2

from bpfexec._pb.bpfexec.v1 import executor_pb2 as pb
from bpfexec._pb.bpfexec.v1 import executor_pb2_grpc as pb_grpc
from bpfexec.client.errors import (
    InvalidArgument,
    MemoryFault,
    NotFound,
    ProtocolError,
    from_rpc_error,
)
from bpfexec.client.types import (
    Event,
    Helper,
    MapDump,
    Module,
    PacketResult,
    Result,
    State,
    ordered_maps,
)

__all__ = [
    "BPF_ANY",
    "BPF_EXIST",
    "BPF_NOEXIST",
    "Client",
    "HelperCall",
    "TestRunResults",
    "channel_credentials",
]

MASK64 = (1 << 64) - 1
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20  # the server's default; gRPC's own is only 4 MiB
BATCH_INPUTS_PER_MESSAGE = 1024  # inputs an ExecuteBatch request message carries
PACKED_INPUT_WORDS = 5  # words of a packed input (proto PackedInputs): r1..r5
TEST_RUN_PACKETS_PER_MESSAGE = 1024  # packets a TestRun request message carries at most
TEST_RUN_MESSAGE_BYTES = 1 << 20  # about: the packets of one TestRun request message

Arg = int | bytes | bytearray | memoryview
T = TypeVar("T")
HelperKey = int | str
# What `helpers=` takes: {number or name: fn(call, r1, r2, r3, r4, r5) -> int}, or
# anything iterable whose items have `.fn`, `.number` and `.name`, such as a
# `bpfexec.vm.HelperRegistry` (not imported: the client does not depend on the VM).
Helpers = Mapping[HelperKey, Callable[..., Any]] | Iterable[Any]
PathLike = str | os.PathLike[str]
Metadata = tuple[tuple[str, str], ...]
# What `update_state` takes: {key: value} or (key, value) pairs, as bytes.
Entries = Mapping[bytes, bytes] | Iterable[tuple[bytes, bytes]]
BPF_ANY, BPF_NOEXIST, BPF_EXIST = 0, 1, 2  # update flags, as the kernel's
_INVALID = grpc.StatusCode.INVALID_ARGUMENT  # checked here, reported like the server would


class Client:
    """A connection to one bpfexec server (or a load balancer in front of several).

    `target` is a gRPC target such as `"localhost:50051"` or `"dns:///bpf.internal:50051"`.
    `timeout` is the default deadline of every call in seconds (None: no deadline).
    `token` is sent as `authorization: Bearer <token>` with every call.
    `tls=True` connects over TLS trusting the system's CAs, `tls="ca.pem"`
    trusting that CA file; `tls_cert` and `tls_key` (PEM files) are the
    client certificate of mutual TLS (they imply TLS). `credentials` gives
    the channel credentials directly instead; `options` are extra gRPC
    channel options (such as `("grpc.ssl_target_name_override", "localhost")`).
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = None,
        token: str | None = None,
        tls: bool | PathLike = False,
        tls_cert: PathLike | None = None,
        tls_key: PathLike | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        options: Sequence[tuple[str, object]] = (),
    ) -> None:
        if credentials is None:
            credentials = channel_credentials(tls, tls_cert, tls_key)
        self._metadata = bearer_metadata(token)
        self._channel = open_channel(target, credentials, max_message_bytes, options)
        self._stub = pb_grpc.ExecutorStub(self._channel)
        self.target = target
        self.timeout = timeout

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def load(self, code: bytes, name: str | None = None) -> Module:
        """Upload a module (ELF object, raw bytecode or assembly text); cheap if already cached.

        Raises InvalidArgument naming the problem if the bytes are not a valid program.
        """
        request = pb.LoadModuleRequest(code=bytes(code), name=name or "")
        return Module.from_pb(self._call(self._stub.LoadModule, request), code=bytes(code))

    def get_module(self, module_id: str) -> Module:
        """Describe a cached module; NotFound if the server does not have it."""
        return Module.from_pb(self._call(self._stub.GetModule, pb.GetModuleRequest(id=module_id)))

    def list_modules(self) -> list[Module]:
        """The modules cached on the server, least recently used first."""
        response = self._call(self._stub.ListModules, pb.ListModulesRequest())
        return [Module.from_pb(module) for module in response.modules]

    def delete_module(self, module: str | Module) -> None:
        """Drop a module from the server's cache; NotFound if it was not cached."""
        self._call(self._stub.DeleteModule, pb.DeleteModuleRequest(id=module_id_of(module)))

    def list_helpers(self) -> list[Helper]:
        """The helpers the server answers in-process."""
        response = self._call(self._stub.ListHelpers, pb.ListHelpersRequest())
        return [Helper.from_pb(helper) for helper in response.helpers]

    def execute(
        self,
        module: str | Module,
        function: str | None = None,
        args: Sequence[Arg] = (),
        fuel: int | None = None,
        timeout: float | None = None,
        helpers: Helpers | None = None,
        *,
        state: str | None = None,
        dump_maps: bool = False,
    ) -> Result:
        """Run `function` (default: the first exported one) of a module.

        Each argument goes in r1..r5: an int is a register value (negative ints
        in two's complement), bytes are an argument buffer whose address goes in
        the register and whose final contents come back in `Result.buffers`.
        `fuel` caps the instructions run (None: the server's default);
        `timeout` (default: the client's) bounds the execution itself.

        If `module` is a Module from `load()` and the server no longer has it,
        it is uploaded again and the execution retried once.

        `helpers` are answered by this process: `{42: fn, "mul": fn}` (by the
        number or the name the program calls) or a `bpfexec.vm.HelperRegistry`. Each
        `fn(call, r1, r2, r3, r4, r5) -> int` runs on the calling thread; `call`
        is a `HelperCall` whose `read`, `write`, `read_cstring` and `log` work
        like an in-process helper's context, so the same functions serve both.
        An exception raised by `fn` ends the run with a HELPER_ERROR trap
        carrying its message. A helper the server answers in-process cannot be
        offered (InvalidArgument).

        `state` names a state on the server whose maps the program runs on
        (created on first use, shared with every execution naming it;
        docs/states.md); `dump_maps` returns the maps after the run in
        `Result.maps`. Ring buffer records are in `Result.events`.
        """
        request = execute_request(module, function, args, fuel, state, dump_maps)
        timeout = self.timeout if timeout is None else timeout
        table = helper_table(helpers) if helpers is not None else None
        try:
            response, events = self._execute_once(request, timeout, table)
        except NotFound as exc:
            if not can_reload(module, exc):
                raise
            self.load(module.code, module.name)  # type: ignore[union-attr]
            response, events = self._execute_once(request, timeout, table)
        return Result.from_pb(response, dump_maps=dump_maps, streamed=events)

    def _execute_once(
        self,
        request: pb.ExecuteRequest,
        timeout: float | None,
        table: dict[HelperKey, Callable[..., Any]] | None,
    ) -> tuple[pb.ExecuteResponse, list[Event]]:
        """The response, and the events a stream sent before it."""
        if table is None:
            response: pb.ExecuteResponse = self._call(self._stub.Execute, request, timeout)
            return response, []
        events: list[Event] = []
        outbox: queue.SimpleQueue[pb.ExecuteStreamRequest | None] = queue.SimpleQueue()
        outbox.put(start_message(request, table))
        responses = self._stub.ExecuteStream(
            _drain(outbox), timeout=timeout, metadata=self._metadata
        )
        try:
            for message in responses:
                kind = message.WhichOneof("message")
                if kind == "result":
                    outbox.put(None)  # half-close: nothing more to send
                    _read_to_end(responses)
                    result: pb.ExecuteResponse = message.result
                    return result, events
                if kind == "event":
                    events.append(Event(message.event.map, message.event.data))
                    continue
                if kind != "helper_call":
                    raise ProtocolError(f"unexpected {kind} from the server outside a helper call")
                call = HelperCall(message.helper_call, outbox, responses)
                outbox.put(helper_result(call, table))
            raise ProtocolError("the server ended ExecuteStream without a result")
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        finally:
            outbox.put(None)  # ends the request stream
            # Only on the way out of a failure: after a result the call has ended by
            # itself, and a cancel racing the server's status would make it CANCELLED.
            if responses.is_active():
                responses.cancel()

    def execute_batch(
        self,
        module: str | Module,
        function: str | None = None,
        inputs: Iterable[Sequence[Arg]] = (),
        fuel: int | None = None,
        *,
        state: str | None = None,
        timeout: float | None = None,
        helpers: Helpers | None = None,
    ) -> Iterator[Result]:
        """Run `function` of a module on each input (its arguments, as `execute` takes
        them) over one `ExecuteBatch` stream; the results in input order (docs/batch.md).

        Inputs are read lazily and sent `BATCH_INPUTS_PER_MESSAGE` a message, results
        yielded as they arrive: a generator of a million inputs is never held in
        memory. `fuel` is each input's; `timeout` (default: the client's) bounds
        the whole batch; `state` names the maps the batch shares. A trap is that
        input's Result. Arguments that cannot run raise InvalidArgument once the
        results before them are yielded (`batch_input_index` gives which input);
        an exception raised by `inputs` itself is raised at the same point.
        Stopping the iteration early (or `close()`) cancels the batch. `helpers`
        are answered by this client, as `execute` answers them: the inputs are then
        read on a thread of their own, at most `BATCH_WINDOW` ahead of the results.
        A `Module` (from `load`) the server no longer has is uploaded again before
        the batch starts (`GetModule` first: one round trip); one evicted in the
        instant between the two is NotFound, as a module id is.
        """
        if isinstance(module, Module) and module.code:
            try:
                self.get_module(module.id)
            except NotFound as exc:
                if not can_reload(module, exc):
                    raise
                self.load(module.code, module.name)
        header = batch_header(module, function, fuel, state)
        if helpers is not None:
            yield from self._batch_answering(header, inputs, helper_table(helpers), timeout)
            return
        stopped: list[BaseException] = []  # what ended `inputs` early, raised in order
        responses = self._stub.ExecuteBatch(
            batch_requests(header, inputs, stopped),
            timeout=self.timeout if timeout is None else timeout,
            metadata=self._metadata,
        )
        try:
            for message in responses:
                yield from batch_results(message)
                if message.done:
                    break
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        finally:
            if responses.is_active():
                responses.cancel()
        if stopped:
            raise stopped[0]

    def _batch_answering(
        self,
        header: pb.BatchHeader,
        inputs: Iterable[Sequence[Arg]],
        table: dict[HelperKey, Callable[..., Any]],
        timeout: float | None,
    ) -> Iterator[Result]:
        """`execute_batch` with helpers: a thread sends the inputs within the window,
        this one answers helper calls and yields results."""
        header.helper_numbers.extend(key for key in table if isinstance(key, int))
        header.helper_names.extend(key for key in table if isinstance(key, str))
        outbox: queue.SimpleQueue[pb.ExecuteBatchRequest | None] = queue.SimpleQueue()
        window = _Window()
        stopped: list[BaseException] = []
        sender = threading.Thread(
            target=_send_within_window, args=(header, inputs, outbox, window, stopped),
            name="bpfexec-batch-inputs", daemon=True,
        )  # fmt: skip
        responses = self._stub.ExecuteBatch(
            iter(outbox.get, None),
            timeout=self.timeout if timeout is None else timeout,
            metadata=self._metadata,
        )
        sender.start()
        answers = _BatchAnswers(responses)
        try:
            for message in answers:
                if message.WhichOneof("message") == "helper_call":
                    call = HelperCall(message.helper_call, _BatchOutbox(outbox), answers.calls())
                    outbox.put(batch_request(helper_result(call, table)))
                    continue
                results = list(batch_results(message))
                window.received(len(results))
                yield from results
                if message.done:
                    break
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        finally:
            window.close()
            outbox.put(None)  # ends the request stream
            if responses.is_active():
                responses.cancel()
        if stopped:
            raise stopped[0]

    def test_run(
        self,
        module: str | Module,
        program: str | None,
        packets: Iterable[bytes],
        *,
        fuel: int | None = None,
        state: str | None = None,
        repeat: int = 1,
        dump_maps: bool = False,
        timeout: float | None = None,
    ) -> TestRunResults:
        """Run the packet program `program` (a function or section name: `xdp`, `tc`,
        ...) of a module over `packets`, as the kernel's BPF_PROG_TEST_RUN runs it, over
        one `TestRun` stream (docs/test-run.md).

        Returns a `TestRunResults`: iterate it (once) for a `PacketResult` per packet, in
        order; `start()` (which iterating calls) waits for the server to accept the run
        and returns the program's type (`program_type`); after the last result, `maps`
        holds the maps' contents when `dump_maps` (else None). Nothing is sent before
        `start()` or the first `next()`. Packets are read lazily and sent as they are
        read, about 1 MiB a message: a generator of a million packets is never held in
        memory. `fuel` is each packet's run's; `repeat` runs each packet that many
        times (the last run reported); `state` names the maps the run shares with the
        server's other executions naming it; `timeout` (default: the client's) bounds
        the whole run. A trap is that packet's result. A packet the server refuses
        (shorter than an Ethernet header) raises InvalidArgument "packet N: ..." once the
        results before it are yielded (`packet_index` gives which packet); an exception
        raised by `packets` itself is raised at the same point. Stopping the iteration
        early, or `close()`, cancels the run. In-process helpers only, and no module
        re-upload: a module the server lacks is NotFound.
        """
        if isinstance(repeat, bool) or not 1 <= repeat < 1 << 32:
            raise InvalidArgument(f"repeat {repeat!r}: expected 1 to 2**32-1", _INVALID)
        header = packet_run_header(module, program, fuel, state, repeat, dump_maps)
        wait = self.timeout if timeout is None else timeout

        def open_call(stopped: list[BaseException]) -> Any:
            return self._stub.TestRun(
                packet_run_requests(header, packets, stopped), timeout=wait, metadata=self._metadata
            )

        return TestRunResults(open_call, dump_maps)

    # Named states (docs/states.md): the caller's own, per module.

    def list_states(self, module: str | Module | None = None) -> list[State]:
        """The caller's states on the server (of `module` only, if given)."""
        request = pb.ListStatesRequest(module_id=module_id_of(module) if module else "")
        response = self._call(self._stub.ListStates, request)
        return [State.from_pb(state) for state in response.states]

    def get_state(self, module: str | Module, state: str, map: str | None = None) -> State:
        """A state with the contents of its maps (or of `map` alone); NotFound if either
        does not exist."""
        request = pb.GetStateRequest(module_id=module_id_of(module), state=state, map=map or "")
        response = self._call(self._stub.GetState, request)
        return State.from_pb(response.state, response.maps)

    def update_state(
        self,
        module: str | Module,
        state: str,
        map: str,
        entries: Entries,
        flags: int = BPF_ANY,
    ) -> list[int]:
        """Set entries of a state's map, as `bpf_map_update_elem(map, key, value, flags)`;
        each entry's result: 0 or the kernel's negative errno (-EEXIST, -ENOENT, -E2BIG).

        A state that does not exist yet is created for the module (seeding: its
        first execution then starts from these entries). Keys and values must
        have the map's sizes (InvalidArgument otherwise, and nothing changes).
        """
        pairs = list(entries.items()) if isinstance(entries, Mapping) else list(entries)
        request = update_state_request(module, state, map, pairs, flags)
        try:
            response = self._call(self._stub.UpdateStateEntries, request)
        except NotFound as exc:
            if not can_reload(module, exc):
                raise
            self.load(module.code, module.name)  # type: ignore[union-attr]
            response = self._call(self._stub.UpdateStateEntries, request)
        return list(response.results)

    def delete_state_entries(
        self, module: str | Module, state: str, map: str, keys: Iterable[bytes]
    ) -> list[int]:
        """Delete keys of a state's map, as `bpf_map_delete_elem`; each key's result
        (0, -ENOENT for a missing key, -EINVAL for an array)."""
        request = pb.DeleteStateEntriesRequest(
            module_id=module_id_of(module), state=state, map=map, keys=[bytes(k) for k in keys]
        )
        return list(self._call(self._stub.DeleteStateEntries, request).results)

    def delete_state(self, module: str | Module, state: str) -> None:
        """Forget a state and its maps; NotFound if it does not exist."""
        request = pb.DeleteStateRequest(module_id=module_id_of(module), state=state)
        self._call(self._stub.DeleteState, request)

    def _call(self, method: Callable[..., T], request: object, timeout: float | None = None) -> T:
        try:
            return method(
                request,
                timeout=self.timeout if timeout is None else timeout,
                metadata=self._metadata,
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None


class TestRunResults:
    """The results of a test run as they arrive (`Client.test_run`).

        run = bpf.test_run(module, "xdp", packets, dump_maps=True)
        for result in run:  # a PacketResult per packet, in order
            print(result.verdict, len(result.data))
        print(run.program_type, run.maps)

    Iterate it once. `start()` opens the call (if iterating has not) and returns the
    program's type once the server accepted the run, raising its refusal (NotFound,
    InvalidArgument ...) otherwise; `program_type` is None before. `maps` is set
    after the last result when the run was asked to dump them. `close()` (or leaving
    a `with` block, or dropping an unfinished iteration) cancels the run.
    """

    __test__ = False  # not a pytest class

    def __init__(self, open_call: Callable[[list[BaseException]], Any], dump_maps: bool) -> None:
        self._open_call = open_call
        self._dump_maps = dump_maps
        self._responses: Any = None
        self._stopped: list[BaseException] = []  # what ended `packets` early, raised in order
        self.program_type: str | None = None
        self.maps: dict[str, MapDump] | None = None

    def start(self) -> str:
        """Open the call if it is not open, and wait for the server's acceptance: the
        program's type (`xdp`, `tc`, `socket`, `syscall`)."""
        if self.program_type is not None:
            return self.program_type
        if self._responses is None:
            self._responses = self._open_call(self._stopped)
        try:
            first = next(self._responses, None)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        if first is None or not first.program_type:
            self.close()
            raise ProtocolError("the server began a TestRun without the program's type")
        self.program_type = str(first.program_type)
        return self.program_type

    def __iter__(self) -> Iterator[PacketResult]:
        try:
            self.start()
            for message in self._responses:
                for result in message.results:
                    yield PacketResult.from_pb(result)
                if message.done:
                    if self._dump_maps:
                        self.maps = ordered_maps(message.maps, ())
                    break
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        finally:
            self.close()
        if self._stopped:
            raise self._stopped[0]

    def close(self) -> None:
        """Cancel the run if it is still going (nothing if it has ended)."""
        if self._responses is not None and self._responses.is_active():
            self._responses.cancel()

    def __enter__(self) -> TestRunResults:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class HelperCall:
    """One helper call of a running program, as `fn(call, r1, ..., r5)` sees it.

    `helper` is the number or name offered that the program called; `args` are
    r1..r5. The memory methods ask the server, which bounds-checks them like
    the program's own accesses; a bad address raises MemoryFault (if `fn` lets
    it propagate, the run ends with that MEMORY_FAULT trap, as in-process).
    """

    __slots__ = ("_outbox", "_responses", "args", "call_id", "helper")

    def __init__(
        self,
        message: pb.HelperCall,
        outbox: queue.SimpleQueue[pb.ExecuteStreamRequest | None] | _BatchOutbox,
        responses: Iterator[pb.ExecuteStreamResponse] | Iterator[pb.ExecuteBatchResponse],
    ) -> None:
        self.call_id: int = message.call_id
        self.helper: HelperKey = called_helper(message)
        self.args: tuple[int, ...] = tuple(message.args)
        self._outbox = outbox
        self._responses = responses

    def read(self, addr: int, size: int) -> bytes:
        """`size` bytes of the program's memory at virtual address `addr`."""
        return self._read(addr, size, until_nul=False)

    def read_cstring(self, addr: int, max_len: int = 4096) -> bytes:
        """The NUL-terminated string at `addr` (without the NUL), at most `max_len` bytes."""
        return self._read(addr, max_len, until_nul=True)

    def write(self, addr: int, data: bytes) -> None:
        """Store `data` in the program's memory at virtual address `addr`."""
        write = pb.MemoryWrite(call_id=self.call_id, address=addr & MASK64, data=bytes(data))
        self._outbox.put(pb.ExecuteStreamRequest(memory_write=write))
        answer = self._answer("memory_write_result").memory_write_result
        if answer.error:
            raise MemoryFault(answer.error, _INVALID)

    def log(self, text: str) -> None:
        """Append a line to the execution's log (dropped past the server's log limits)."""
        line = pb.HelperLog(call_id=self.call_id, text=text)
        self._outbox.put(pb.ExecuteStreamRequest(log=line))

    def _read(self, addr: int, size: int, until_nul: bool) -> bytes:
        read = pb.MemoryRead(
            call_id=self.call_id, address=addr & MASK64, size=size, until_nul=until_nul
        )
        self._outbox.put(pb.ExecuteStreamRequest(memory_read=read))
        answer: pb.MemoryReadResult = self._answer("memory_read_result").memory_read_result
        if answer.WhichOneof("outcome") == "error":
            raise MemoryFault(answer.error, _INVALID)
        return answer.data

    def _answer(self, kind: str) -> Any:
        message = next(self._responses, None)
        if message is None or message.WhichOneof("message") != kind:
            got = message.WhichOneof("message") if message is not None else "the end of the stream"
            raise ProtocolError(f"expected {kind} from the server, got {got}")
        return message

    def __repr__(self) -> str:
        return f"HelperCall(call_id={self.call_id}, helper={self.helper!r}, args={self.args})"


def channel_credentials(
    tls: bool | PathLike = False,
    tls_cert: PathLike | None = None,
    tls_key: PathLike | None = None,
) -> grpc.ChannelCredentials | None:
    """TLS channel credentials as `Client` describes them; None for plaintext."""
    if bool(tls_cert) != bool(tls_key):
        raise InvalidArgument("tls_cert and tls_key go together: give both or neither", _INVALID)
    if not tls and not tls_cert:
        return None
    root = None if isinstance(tls, bool) else _read(tls)
    return grpc.ssl_channel_credentials(
        root_certificates=root,
        private_key=_read(tls_key) if tls_key else None,
        certificate_chain=_read(tls_cert) if tls_cert else None,
    )


def open_channel(
    target: str,
    credentials: grpc.ChannelCredentials | None,
    max_message_bytes: int,
    options: Sequence[tuple[str, object]],
    *,
    aio: bool = False,
) -> Any:
    """A channel (a `grpc.aio` one with `aio=True`) with the clients' message limits.

    `target` is gRPC's: `HOST:PORT`, or a URI of a scheme gRPC knows (`dns:`,
    `unix:`, `ipv4:`...); an `http://` or `https://` URL is refused (InvalidArgument).
    """
    scheme = target.partition("://")[0].lower() if "://" in target else ""
    if scheme in ("http", "https"):
        host = target.split("://", 1)[1].rstrip("/")
        hint = " (and --tls / tls=True for TLS)" if scheme == "https" else ""
        raise InvalidArgument(
            f"the server address is HOST:PORT, not a URL: {host}, not {target}{hint}"
        )
    channel_options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        *options,
    ]
    api: Any = grpc.aio if aio else grpc
    if credentials is None:
        return api.insecure_channel(target, options=channel_options)
    return api.secure_channel(target, credentials, options=channel_options)


def bearer_metadata(token: str | None) -> Metadata | None:
    """The call metadata carrying `token`, or None without one."""
    if not token:
        return None
    if token != token.strip() or "\n" in token:
        raise InvalidArgument("the token must be one line without surrounding spaces", _INVALID)
    return (("authorization", f"Bearer {token}"),)


def _read(path: PathLike) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise InvalidArgument(f"cannot read {os.fspath(path)}: {exc.strerror}", _INVALID) from None


def helper_table(helpers: Helpers) -> dict[HelperKey, Callable[..., Any]]:
    """`helpers=` as {number or name: fn}, checked before anything is sent."""
    table: dict[HelperKey, Callable[..., Any]] = {}
    if isinstance(helpers, Mapping):
        for key, fn in helpers.items():
            if isinstance(key, bool) or not isinstance(key, (int, str)):
                raise InvalidArgument(f"helper key {key!r}: expected a number or a name", _INVALID)
            if isinstance(key, int) and not 0 <= key < 1 << 32:
                raise InvalidArgument(f"helper number {key} is outside 0..2**32-1", _INVALID)
            table[key] = fn
        return table
    entries: Iterable[Any] = helpers  # a bpfexec.vm.HelperRegistry: offer each by number and name
    for helper in entries:
        for key in (helper.number, helper.name):
            if key is not None:
                table[key] = helper.fn
    return table


def execute_request(
    module: str | Module,
    function: str | None,
    args: Sequence[Arg],
    fuel: int | None,
    state: str | None = None,
    dump_maps: bool = False,
) -> pb.ExecuteRequest:
    return pb.ExecuteRequest(
        module_id=module_id_of(module),
        function=function or "",
        args=[_argument(i, arg) for i, arg in enumerate(args, start=1)],
        fuel=fuel or 0,
        state=state or "",
        dump_maps=dump_maps,
    )


def batch_header(
    module: str | Module, function: str | None, fuel: int | None, state: str | None
) -> pb.BatchHeader:
    return pb.BatchHeader(
        module_id=module_id_of(module), function=function or "", fuel=fuel or 0, state=state or ""
    )


def batch_requests(
    header: pb.BatchHeader, inputs: Iterable[Sequence[Arg]], stopped: list[BaseException]
) -> Iterator[pb.ExecuteBatchRequest]:
    """The request stream of a batch: the header with the first inputs, then
    `BATCH_INPUTS_PER_MESSAGE` inputs a message, packed as they are read. Arguments
    that cannot be sent, or an exception of `inputs`, end the stream (the inputs
    before go) and are put in `stopped` for the caller to raise after their results."""
    messages = BatchMessages(header)
    try:
        for args in inputs:
            yield from messages.add(args)
    except Exception as exc:  # raised by the caller, in its thread, after the results before
        stopped.append(exc)
    yield from messages.end()


class BatchMessages:
    """Inputs into ExecuteBatchRequest messages: the header in the first, then
    `BATCH_INPUTS_PER_MESSAGE` inputs a message; integer inputs packed (after a
    message's `inputs`, so one that is not comes in a message of its own after)."""

    def __init__(self, header: pb.BatchHeader) -> None:
        self._message = pb.ExecuteBatchRequest(header=header)
        self._words = array("Q")  # the message's packed inputs
        self._count = 0  # inputs in the message
        self._index = 0  # of the next input, from 0

    def add(self, args: Sequence[Arg]) -> list[pb.ExecuteBatchRequest]:
        """The messages complete once `args` is added (InvalidArgument naming the
        input if it cannot be sent)."""
        ready = []
        if not _pack(self._words, args):
            try:
                given = batch_input(args)
            except InvalidArgument as exc:
                raise batch_input_error(self._index, str(exc)) from None
            if self._words:
                ready.append(self._take())
            self._message.inputs.append(given)
        self._index += 1
        self._count += 1
        if self._count >= BATCH_INPUTS_PER_MESSAGE:
            ready.append(self._take())
        return ready

    def end(self) -> list[pb.ExecuteBatchRequest]:
        """The last message, if there is anything left to send."""
        if self._count or self._message.HasField("header"):
            return [self._take()]
        return []

    def _take(self) -> pb.ExecuteBatchRequest:
        message, words = self._message, self._words
        if words:
            if sys.byteorder != "little":
                words.byteswap()
            message.packed.words = words.tobytes()
        self._message, self._words, self._count = pb.ExecuteBatchRequest(), array("Q"), 0
        return message


_PADDING = [(0,) * (PACKED_INPUT_WORDS - n) for n in range(PACKED_INPUT_WORDS + 1)]


def _pack(words: array[int], args: Sequence[Arg]) -> bool:
    """Append `args` to packed inputs if they are all integers of 0..2^64-1 (at most
    5): the common case, sent without a message per input. False: send it as a
    BatchInput (buffers, negative numbers, and anything wrong, for its error)."""
    if len(args) > PACKED_INPUT_WORDS:
        return False
    for arg in args:
        if type(arg) is not int or not 0 <= arg <= MASK64:
            return False
    words.extend(args)  # type: ignore[arg-type]
    words.extend(_PADDING[len(args)])
    return True


BATCH_WINDOW = 8192  # inputs sent beyond the results received, when helpers are offered


class _Window:
    """How far the inputs may run ahead of the results (`BATCH_WINDOW`)."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._sent = 0
        self._received = 0
        self._closed = False

    def wait_for_room(self, count: int) -> bool:
        """Wait until `count` more inputs fit; False once the batch is over."""
        with self._condition:
            self._condition.wait_for(
                lambda: self._closed or self._sent + count - self._received <= BATCH_WINDOW
            )
            self._sent += count
            return not self._closed

    def received(self, count: int) -> None:
        with self._condition:
            self._received += count
            self._condition.notify_all()

    def close(self) -> None:
        with self._condition:
            self._closed = True
            self._condition.notify_all()


def _send_within_window(
    header: pb.BatchHeader,
    inputs: Iterable[Sequence[Arg]],
    outbox: queue.SimpleQueue[pb.ExecuteBatchRequest | None],
    window: _Window,
    stopped: list[BaseException],
) -> None:
    """The sender thread of a batch with helpers: messages of inputs, each once the
    window has room for it, then `end_of_inputs` (the stream stays open for answers)."""
    messages = batch_requests(header, inputs, stopped)
    for message in messages:
        count = len(message.inputs) + len(message.packed.words) // (8 * PACKED_INPUT_WORDS)
        if not window.wait_for_room(count):
            return
        outbox.put(message)
    outbox.put(pb.ExecuteBatchRequest(end_of_inputs=True))


class _BatchAnswers:
    """A batch's responses, for the caller's loop and for a HelperCall waiting for the
    answer to a memory access: results that come meanwhile wait for the loop."""

    def __init__(self, responses: Iterator[pb.ExecuteBatchResponse]) -> None:
        self._responses = responses
        self._waiting: collections.deque[pb.ExecuteBatchResponse] = collections.deque()

    def __iter__(self) -> Iterator[pb.ExecuteBatchResponse]:
        while True:
            if self._waiting:
                yield self._waiting.popleft()
                continue
            message = next(self._responses, None)
            if message is None:
                return
            yield message

    def calls(self) -> Iterator[pb.ExecuteBatchResponse]:
        """The responses a helper call reads: helper messages, the results set aside."""
        for message in self._responses:
            if message.WhichOneof("message") is None:
                self._waiting.append(message)
                continue
            yield message


class _BatchOutbox:
    """A HelperCall's outbox on a batch: its ExecuteStream requests, as batch requests."""

    def __init__(self, outbox: queue.SimpleQueue[pb.ExecuteBatchRequest | None]) -> None:
        self._outbox = outbox

    def put(self, request: pb.ExecuteStreamRequest) -> None:
        self._outbox.put(batch_request(request))


def batch_request(request: pb.ExecuteStreamRequest) -> pb.ExecuteBatchRequest:
    """A helper answer of ExecuteStream's as the same answer on an ExecuteBatch."""
    kind = request.WhichOneof("message")
    assert kind is not None
    return pb.ExecuteBatchRequest(**{kind: getattr(request, kind)})


def batch_results(message: pb.ExecuteBatchResponse) -> Iterator[Result]:
    """The results an ExecuteBatch response message carries, in order."""
    if message.HasField("packed"):
        return Result.from_packed_pb(message.packed)
    return map(Result.from_batch_pb, message.results)


def batch_input(args: Sequence[Arg]) -> pb.BatchInput:
    return pb.BatchInput(args=[_argument(i, arg) for i, arg in enumerate(args, start=1)])


def batch_input_error(index: int, message: str) -> InvalidArgument:
    """InvalidArgument for input `index` (from 0), as the server reports one."""
    info = error_details_pb2.ErrorInfo(
        reason="INVALID_BATCH_INPUT", domain="bpfexec", metadata={"input_index": str(index)}
    )
    return InvalidArgument(f"input {index + 1}: {message}", _INVALID, (info,))


def batch_input_index(error: InvalidArgument) -> int | None:
    """Which input of a batch (counted from 0) an InvalidArgument is about, if any."""
    for detail in error.details:
        if isinstance(detail, error_details_pb2.ErrorInfo) and "input_index" in detail.metadata:
            return int(detail.metadata["input_index"])
    return None


def packet_run_header(
    module: str | Module,
    program: str | None,
    fuel: int | None,
    state: str | None,
    repeat: int,
    dump_maps: bool,
) -> pb.TestRunHeader:
    return pb.TestRunHeader(
        module_id=module_id_of(module),
        program=program or "",
        fuel=fuel or 0,
        state=state or "",
        repeat=repeat,
        dump_maps=dump_maps,
    )


def packet_run_requests(
    header: pb.TestRunHeader, packets: Iterable[bytes], stopped: list[BaseException]
) -> Iterator[pb.TestRunRequest]:
    """The request stream of a test run: the header alone (the server answers it with
    the program's type before it needs a packet), then the packets as they are read,
    up to `TEST_RUN_PACKETS_PER_MESSAGE` or about `TEST_RUN_MESSAGE_BYTES` a message. A
    packet that is not bytes, or an exception of `packets`, ends the stream (the
    packets before go) and is put in `stopped` for the caller to raise after their
    results."""
    yield pb.TestRunRequest(header=header)
    message, size = pb.TestRunRequest(), 0
    try:
        for index, packet in enumerate(packets):
            data = packet_bytes(index, packet)
            message.packets.append(data)
            size += len(data)
            if len(message.packets) >= TEST_RUN_PACKETS_PER_MESSAGE or (
                size >= TEST_RUN_MESSAGE_BYTES
            ):
                yield message
                message, size = pb.TestRunRequest(), 0
    except Exception as exc:  # raised by the caller, in its thread, after the results before
        stopped.append(exc)
    if message.packets:
        yield message


def packet_bytes(index: int, packet: object) -> bytes:
    if not isinstance(packet, (bytes, bytearray, memoryview)):
        raise packet_error(index, f"expected bytes, got {type(packet).__name__}")
    return bytes(packet)


def packet_error(index: int, message: str) -> InvalidArgument:
    """InvalidArgument for packet `index` (from 0) of a test run, as the server reports one."""
    info = error_details_pb2.ErrorInfo(
        reason="INVALID_PACKET", domain="bpfexec", metadata={"packet_index": str(index)}
    )
    return InvalidArgument(f"packet {index + 1}: {message}", _INVALID, (info,))


def packet_index(error: InvalidArgument) -> int | None:
    """Which packet of a test run (counted from 0) an InvalidArgument is about, if any."""
    for detail in error.details:
        if isinstance(detail, error_details_pb2.ErrorInfo) and "packet_index" in detail.metadata:
            return int(detail.metadata["packet_index"])
    return None


def update_state_request(
    module: str | Module, state: str, map: str, entries: Sequence[tuple[bytes, bytes]], flags: int
) -> pb.UpdateStateEntriesRequest:
    if isinstance(flags, bool) or not 0 <= flags <= MASK64:
        raise InvalidArgument(f"flags {flags!r}: expected BPF_ANY, NOEXIST or EXIST", _INVALID)
    return pb.UpdateStateEntriesRequest(
        module_id=module_id_of(module),
        state=state,
        map=map,
        entries=[pb.MapEntry(key=bytes(k), value=bytes(v)) for k, v in entries],
        flags=flags,
    )


def can_reload(module: str | Module, error: NotFound) -> bool:
    """Whether `error` says the server lacks a module this client can upload again."""
    reloadable = isinstance(module, Module) and bool(module.code)
    return reloadable and error.reason in ("MODULE_NOT_FOUND", "")


def start_message(
    request: pb.ExecuteRequest, table: Mapping[HelperKey, object]
) -> pb.ExecuteStreamRequest:
    """The first message of an ExecuteStream: the execution and the offered helpers."""
    start = pb.ExecuteStart(
        request=request,
        helper_numbers=[key for key in table if isinstance(key, int)],
        helper_names=[key for key in table if isinstance(key, str)],
    )
    return pb.ExecuteStreamRequest(start=start)


def called_helper(message: pb.HelperCall) -> HelperKey:
    return message.name if message.WhichOneof("helper") == "name" else message.number


def helper_result(
    call: HelperCall, table: Mapping[HelperKey, Callable[..., Any]]
) -> pb.ExecuteStreamRequest:
    """Run the helper for `call` and wrap its value, or its exception, as a HelperResult."""
    try:
        value = table[call.helper](call, *call.args)
    except (ProtocolError, grpc.RpcError):
        raise  # the stream itself failed: not something to report as the helper's error
    except Exception as exc:  # the helper's failure is the program's outcome, not ours
        return result_message(call.call_id, error=describe(exc))
    return result_message(call.call_id, value=value)


def result_message(
    call_id: int, *, value: object = None, error: str | None = None
) -> pb.ExecuteStreamRequest:
    """A HelperResult; a value that is not an int becomes an error naming its type."""
    if error is None and (isinstance(value, bool) or not isinstance(value, int)):
        error = f"returned {type(value).__name__}, expected int"
    if error is not None:
        return pb.ExecuteStreamRequest(helper_result=pb.HelperResult(call_id=call_id, error=error))
    return pb.ExecuteStreamRequest(
        helper_result=pb.HelperResult(call_id=call_id, value=value & MASK64)  # type: ignore[operator]
    )


def describe(exc: BaseException) -> str:
    """`Type: first line` of an exception, the form in-process helper errors take."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _read_to_end(responses: Iterator[pb.ExecuteStreamResponse]) -> None:
    """Wait for the server's status after the result, so the call ends as it does.

    The result is the last message and the outcome: a late failure of the call
    (its deadline passing meanwhile, say) changes nothing about it.
    """
    try:
        for message in responses:
            raise ProtocolError(f"unexpected {message.WhichOneof('message')} after the result")
    except grpc.RpcError:
        pass


def _drain(outbox: queue.SimpleQueue[pb.ExecuteStreamRequest | None]) -> Iterator[Any]:
    """The request stream: whatever the helpers queue, until None (a C-level
    iterator: gRPC's sending thread resumes no Python frame per message)."""
    return iter(outbox.get, None)


def module_id_of(module: str | Module) -> str:
    return module.id if isinstance(module, Module) else module


def _argument(position: int, arg: Arg) -> pb.Argument:
    if isinstance(arg, (bytes, bytearray, memoryview)):
        return pb.Argument(buffer=bytes(arg))
    if isinstance(arg, int) and not isinstance(arg, bool):
        if not -(1 << 63) <= arg <= MASK64:
            raise InvalidArgument(f"argument {position}: {arg} does not fit in 64 bits", _INVALID)
        return pb.Argument(value=arg & MASK64)
    raise InvalidArgument(
        f"argument {position}: expected int or bytes, got {type(arg).__name__}", _INVALID
    )
