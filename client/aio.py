"""`AsyncClient`: the asyncio twin of `bpfexec.client.Client`, for asyncio applications.

    async with AsyncClient("localhost:50051") as bpf:
        module = await bpf.load(code)
        result = await bpf.execute(module, "foo", [2, 3], helpers={"mul": mul})

Same methods, arguments, results and exceptions as `Client`; every call is a
coroutine, except the streams: `execute_batch` is an async iterator and `test_run`
returns an `AsyncTestRunResults` to iterate with `async for`. Remote helpers may
be plain or `async def` functions `fn(call, r1, ..., r5)`; here `call.read`,
`call.write` and `call.read_cstring` are coroutines (`await call.read(addr, 8)`),
`call.log` is not. Helpers run on the event loop, one call at a time per
execution, as the protocol requires.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from types import TracebackType
from typing import Any

import grpc

from bpfexec._pb.bpfexec.v1 import executor_pb2 as pb
from bpfexec._pb.bpfexec.v1 import executor_pb2_grpc as pb_grpc
from bpfexec.client.client import (
    BATCH_WINDOW,
    BPF_ANY,
    DEFAULT_MAX_MESSAGE_BYTES,
    MASK64,
    PACKED_INPUT_WORDS,
    TEST_RUN_MESSAGE_BYTES,
    TEST_RUN_PACKETS_PER_MESSAGE,
    Arg,
    BatchMessages,
    Entries,
    HelperKey,
    Helpers,
    PathLike,
    batch_header,
    batch_request,
    batch_requests,
    batch_results,
    bearer_metadata,
    called_helper,
    can_reload,
    channel_credentials,
    describe,
    execute_request,
    helper_table,
    module_id_of,
    open_channel,
    packet_bytes,
    packet_run_header,
    packet_run_requests,
    result_message,
    start_message,
    update_state_request,
)
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

__all__ = ["AsyncClient", "AsyncHelperCall", "AsyncTestRunResults"]

_INVALID = grpc.StatusCode.INVALID_ARGUMENT


class AsyncClient:
    """An asyncio connection to one bpfexec server; arguments as `bpfexec.client.Client`."""

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
        self._channel = open_channel(target, credentials, max_message_bytes, options, aio=True)
        self._stub = pb_grpc.ExecutorStub(self._channel)
        self.target = target
        self.timeout = timeout

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def load(self, code: bytes, name: str | None = None) -> Module:
        """Upload a module; see `Client.load`."""
        request = pb.LoadModuleRequest(code=bytes(code), name=name or "")
        return Module.from_pb(await self._call(self._stub.LoadModule, request), code=bytes(code))

    async def get_module(self, module_id: str) -> Module:
        response = await self._call(self._stub.GetModule, pb.GetModuleRequest(id=module_id))
        return Module.from_pb(response)

    async def list_modules(self) -> list[Module]:
        response = await self._call(self._stub.ListModules, pb.ListModulesRequest())
        return [Module.from_pb(module) for module in response.modules]

    async def delete_module(self, module: str | Module) -> None:
        await self._call(self._stub.DeleteModule, pb.DeleteModuleRequest(id=module_id_of(module)))

    async def list_helpers(self) -> list[Helper]:
        response = await self._call(self._stub.ListHelpers, pb.ListHelpersRequest())
        return [Helper.from_pb(helper) for helper in response.helpers]

    async def execute(
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
        """Run a function; see `Client.execute`. Helper fns may be `async def`."""
        request = execute_request(module, function, args, fuel, state, dump_maps)
        timeout = self.timeout if timeout is None else timeout
        table = helper_table(helpers) if helpers is not None else None
        try:
            response, events = await self._execute_once(request, timeout, table)
        except NotFound as exc:
            if not can_reload(module, exc):
                raise
            await self.load(module.code, module.name)  # type: ignore[union-attr]
            response, events = await self._execute_once(request, timeout, table)
        return Result.from_pb(response, dump_maps=dump_maps, streamed=events)

    async def _execute_once(
        self,
        request: pb.ExecuteRequest,
        timeout: float | None,
        table: dict[HelperKey, Callable[..., Any]] | None,
    ) -> tuple[pb.ExecuteResponse, list[Event]]:
        """The response, and the events a stream sent before it."""
        if table is None:
            response: pb.ExecuteResponse = await self._call(self._stub.Execute, request, timeout)
            return response, []
        events: list[Event] = []
        stream = self._stub.ExecuteStream(timeout=timeout, metadata=self._metadata)
        try:
            await stream.write(start_message(request, table))
            while True:
                message = await stream.read()
                if message is grpc.aio.EOF:
                    raise ProtocolError("the server ended ExecuteStream without a result")
                kind = message.WhichOneof("message")
                if kind == "result":
                    await stream.done_writing()  # half-close: nothing more to send
                    await _read_to_end(stream)
                    outcome: pb.ExecuteResponse = message.result
                    return outcome, events
                if kind == "event":
                    events.append(Event(message.event.map, message.event.data))
                    continue
                if kind != "helper_call":
                    raise ProtocolError(f"unexpected {kind} from the server outside a helper call")
                call = AsyncHelperCall(message.helper_call, stream)
                result = await _answer(call, table)
                for line in call.lines:
                    log = pb.HelperLog(call_id=call.call_id, text=line)
                    await stream.write(pb.ExecuteStreamRequest(log=log))
                await stream.write(result)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        finally:
            # Only on the way out of a failure: after a result the call has ended by
            # itself, and a cancel racing the server's status would make it CANCELLED.
            if not stream.done():
                stream.cancel()

    async def execute_batch(
        self,
        module: str | Module,
        function: str | None = None,
        inputs: Iterable[Sequence[Arg]] | AsyncIterable[Sequence[Arg]] = (),
        fuel: int | None = None,
        *,
        state: str | None = None,
        timeout: float | None = None,
        helpers: Helpers | None = None,
    ) -> AsyncIterator[Result]:
        """The results of `function` on each input, in order; see `Client.execute_batch`.
        `inputs` may be a plain or an async iterable; they are sent by a task of their own
        while the results are read. Helper fns may be `async def`."""
        if isinstance(module, Module) and module.code:  # uploaded again if evicted
            try:
                await self.get_module(module.id)
            except NotFound as exc:
                if not can_reload(module, exc):
                    raise
                await self.load(module.code, module.name)
        header = batch_header(module, function, fuel, state)
        stream = self._stub.ExecuteBatch(
            timeout=self.timeout if timeout is None else timeout, metadata=self._metadata
        )
        if helpers is not None:
            answering = _answering_batch(stream, header, inputs, helper_table(helpers))
            try:
                async for result in answering:
                    yield result
            finally:  # stopped early too: its stream and sending task end now
                await answering.aclose()
            return
        stopped: list[BaseException] = []
        writer = asyncio.ensure_future(_write_batch(stream, header, inputs, stopped))
        try:
            while (message := await stream.read()) is not grpc.aio.EOF:
                for result in batch_results(message):
                    yield result
                if message.done:
                    break
            await writer
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        finally:
            writer.cancel()
            if not stream.done():
                stream.cancel()
        if stopped:
            raise stopped[0]

    def test_run(
        self,
        module: str | Module,
        program: str | None,
        packets: Iterable[bytes] | AsyncIterable[bytes],
        *,
        fuel: int | None = None,
        state: str | None = None,
        repeat: int = 1,
        dump_maps: bool = False,
        timeout: float | None = None,
    ) -> AsyncTestRunResults:
        """A packet program over packets; see `Client.test_run`. Not a coroutine: it
        returns an `AsyncTestRunResults` to iterate with `async for` (`await run.start()`
        for the program's type first). `packets` may be a plain or an async iterable;
        they are sent by a task of their own while the results are read."""
        if isinstance(repeat, bool) or not 1 <= repeat < 1 << 32:
            raise InvalidArgument(f"repeat {repeat!r}: expected 1 to 2**32-1", _INVALID)
        header = packet_run_header(module, program, fuel, state, repeat, dump_maps)
        wait = self.timeout if timeout is None else timeout

        def open_call() -> Any:
            return self._stub.TestRun(timeout=wait, metadata=self._metadata)

        return AsyncTestRunResults(open_call, header, packets, dump_maps)

    # Named states: see `Client.list_states` and the methods after it.

    async def list_states(self, module: str | Module | None = None) -> list[State]:
        request = pb.ListStatesRequest(module_id=module_id_of(module) if module else "")
        response = await self._call(self._stub.ListStates, request)
        return [State.from_pb(state) for state in response.states]

    async def get_state(self, module: str | Module, state: str, map: str | None = None) -> State:
        request = pb.GetStateRequest(module_id=module_id_of(module), state=state, map=map or "")
        response = await self._call(self._stub.GetState, request)
        return State.from_pb(response.state, response.maps)

    async def update_state(
        self, module: str | Module, state: str, map: str, entries: Entries, flags: int = BPF_ANY
    ) -> list[int]:
        pairs = list(entries.items()) if isinstance(entries, Mapping) else list(entries)
        request = update_state_request(module, state, map, pairs, flags)
        try:
            response = await self._call(self._stub.UpdateStateEntries, request)
        except NotFound as exc:
            if not can_reload(module, exc):
                raise
            await self.load(module.code, module.name)  # type: ignore[union-attr]
            response = await self._call(self._stub.UpdateStateEntries, request)
        return list(response.results)

    async def delete_state_entries(
        self, module: str | Module, state: str, map: str, keys: Iterable[bytes]
    ) -> list[int]:
        request = pb.DeleteStateEntriesRequest(
            module_id=module_id_of(module), state=state, map=map, keys=[bytes(k) for k in keys]
        )
        return list((await self._call(self._stub.DeleteStateEntries, request)).results)

    async def delete_state(self, module: str | Module, state: str) -> None:
        request = pb.DeleteStateRequest(module_id=module_id_of(module), state=state)
        await self._call(self._stub.DeleteState, request)

    async def _call(self, method: Any, request: object, timeout: float | None = None) -> Any:
        try:
            return await method(
                request,
                timeout=self.timeout if timeout is None else timeout,
                metadata=self._metadata,
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None


class AsyncTestRunResults:
    """The results of a test run as they arrive (`AsyncClient.test_run`): `TestRunResults`
    for asyncio.

        run = bpf.test_run(module, "xdp", packets, dump_maps=True)
        async for result in run:
            ...
        print(run.program_type, run.maps)
    """

    __test__ = False  # not a pytest class

    def __init__(
        self,
        open_call: Callable[[], Any],
        header: pb.TestRunHeader,
        packets: Iterable[bytes] | AsyncIterable[bytes],
        dump_maps: bool,
    ) -> None:
        self._open_call = open_call
        self._header = header
        self._packets = packets
        self._dump_maps = dump_maps
        self._stream: Any = None
        self._writer: asyncio.Future[None] | None = None
        self._stopped: list[BaseException] = []
        self.program_type: str | None = None
        self.maps: dict[str, MapDump] | None = None

    async def start(self) -> str:
        """Open the call if it is not open, and wait for the server's acceptance: the
        program's type."""
        if self.program_type is not None:
            return self.program_type
        if self._stream is None:
            self._stream = self._open_call()
            self._writer = asyncio.ensure_future(
                _write_packets(self._stream, self._header, self._packets, self._stopped)
            )
        try:
            first = await self._stream.read()
        except grpc.RpcError as error:
            self.close()
            raise from_rpc_error(error) from None
        if first is grpc.aio.EOF or not first.program_type:
            self.close()
            raise ProtocolError("the server began a TestRun without the program's type")
        self.program_type = str(first.program_type)
        return self.program_type

    def __aiter__(self) -> AsyncIterator[PacketResult]:
        return self._results()

    async def _results(self) -> AsyncIterator[PacketResult]:
        try:
            await self.start()
            while (message := await self._stream.read()) is not grpc.aio.EOF:
                for result in message.results:
                    yield PacketResult.from_pb(result)
                if message.done:
                    if self._dump_maps:
                        self.maps = ordered_maps(message.maps, ())
                    break
            if self._writer is not None:
                await self._writer
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        finally:
            self.close()
        if self._stopped:
            raise self._stopped[0]

    def close(self) -> None:
        """Cancel the run if it is still going (nothing if it has ended)."""
        if self._writer is not None:
            self._writer.cancel()
        if self._stream is not None and not self._stream.done():
            self._stream.cancel()

    async def __aenter__(self) -> AsyncTestRunResults:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()


async def _write_packets(
    stream: Any,
    header: pb.TestRunHeader,
    packets: Iterable[bytes] | AsyncIterable[bytes],
    stopped: list[BaseException],
) -> None:
    """Send the packets as `packet_run_requests` packs them, then half-close."""
    if isinstance(packets, AsyncIterable):
        await stream.write(pb.TestRunRequest(header=header))
        message, size, index = pb.TestRunRequest(), 0, 0
        try:
            async for packet in packets:
                data = packet_bytes(index, packet)
                message.packets.append(data)
                size += len(data)
                index += 1
                if len(message.packets) >= TEST_RUN_PACKETS_PER_MESSAGE or (
                    size >= TEST_RUN_MESSAGE_BYTES
                ):
                    await stream.write(message)
                    message, size = pb.TestRunRequest(), 0
        except Exception as exc:  # raised by the caller after the results before it
            stopped.append(exc)
        if message.packets:
            await stream.write(message)
    else:
        for request in packet_run_requests(header, packets, stopped):
            await stream.write(request)
    await stream.done_writing()


class AsyncHelperCall:
    """One helper call of a running program: `bpfexec.client.HelperCall`, coroutine accessors."""

    __slots__ = ("_stream", "args", "call_id", "helper", "lines")

    def __init__(self, message: pb.HelperCall, stream: Any) -> None:
        self.call_id: int = message.call_id
        self.helper: HelperKey = called_helper(message)
        self.args: tuple[int, ...] = tuple(message.args)
        self.lines: list[str] = []  # logged by the helper, sent before its result
        self._stream = stream

    async def read(self, addr: int, size: int) -> bytes:
        """`size` bytes of the program's memory at virtual address `addr`."""
        return await self._read(addr, size, until_nul=False)

    async def read_cstring(self, addr: int, max_len: int = 4096) -> bytes:
        """The NUL-terminated string at `addr` (without the NUL), at most `max_len` bytes."""
        return await self._read(addr, max_len, until_nul=True)

    async def write(self, addr: int, data: bytes) -> None:
        """Store `data` in the program's memory at virtual address `addr`."""
        write = pb.MemoryWrite(call_id=self.call_id, address=addr & MASK64, data=bytes(data))
        await self._stream.write(pb.ExecuteStreamRequest(memory_write=write))
        answer = (await self._answer("memory_write_result")).memory_write_result
        if answer.error:
            raise MemoryFault(answer.error, _INVALID)

    def log(self, text: str) -> None:
        """Append a line to the execution's log (sent just before the call's result, so
        this stays a plain method and sync helper functions can log too)."""
        self.lines.append(text)

    async def _read(self, addr: int, size: int, until_nul: bool) -> bytes:
        read = pb.MemoryRead(
            call_id=self.call_id, address=addr & MASK64, size=size, until_nul=until_nul
        )
        await self._stream.write(pb.ExecuteStreamRequest(memory_read=read))
        answer = (await self._answer("memory_read_result")).memory_read_result
        if answer.WhichOneof("outcome") == "error":
            raise MemoryFault(answer.error, _INVALID)
        return bytes(answer.data)

    async def _answer(self, kind: str) -> pb.ExecuteStreamResponse:
        message: pb.ExecuteStreamResponse = await self._stream.read()
        if message is grpc.aio.EOF or message.WhichOneof("message") != kind:
            got = "the end" if message is grpc.aio.EOF else message.WhichOneof("message")
            raise ProtocolError(f"expected {kind} from the server, got {got}")
        return message

    def __repr__(self) -> str:
        return f"AsyncHelperCall(call_id={self.call_id}, helper={self.helper!r}, args={self.args})"


async def _write_batch(
    stream: Any,
    header: pb.BatchHeader,
    inputs: Iterable[Sequence[Arg]] | AsyncIterable[Sequence[Arg]],
    stopped: list[BaseException],
) -> None:
    """Send the inputs as `batch_requests` packs them, then half-close."""
    if isinstance(inputs, AsyncIterable):
        messages = BatchMessages(header)
        try:
            async for args in inputs:
                for message in messages.add(args):
                    await stream.write(message)
        except Exception as exc:  # raised by the caller after the results before it
            stopped.append(exc)
        for message in messages.end():
            await stream.write(message)
    else:
        for message in batch_requests(header, inputs, stopped):
            await stream.write(message)
    await stream.done_writing()


class _AsyncWindow:
    """`bpfexec.client.client._Window` for a task: inputs at most `BATCH_WINDOW` ahead."""

    def __init__(self) -> None:
        self._condition = asyncio.Condition()
        self._sent = 0
        self._received = 0

    async def wait_for_room(self, count: int) -> None:
        async with self._condition:
            await self._condition.wait_for(
                lambda: self._sent + count - self._received <= BATCH_WINDOW
            )
            self._sent += count

    async def received(self, count: int) -> None:
        async with self._condition:
            self._received += count
            self._condition.notify_all()


class _BatchStream:
    """A batch's stream as an AsyncHelperCall uses it: writes (ExecuteStream requests,
    turned into batch requests) one at a time, reads of helper messages only (the
    results that come meanwhile are kept for the batch's loop)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.lock = asyncio.Lock()  # one write at a time: the inputs' task and the answers
        self.waiting: collections.deque[pb.ExecuteBatchResponse] = collections.deque()

    async def send(self, request: pb.ExecuteBatchRequest) -> None:
        async with self.lock:
            await self.stream.write(request)

    async def write(self, request: pb.ExecuteStreamRequest) -> None:
        await self.send(batch_request(request))

    async def read(self) -> Any:
        while True:
            message = await self.stream.read()
            if message is grpc.aio.EOF or message.WhichOneof("message") is not None:
                return message
            self.waiting.append(message)

    async def next(self) -> Any:
        """The next message for the batch's loop."""
        return self.waiting.popleft() if self.waiting else await self.stream.read()


async def _answering_batch(
    stream: Any,
    header: pb.BatchHeader,
    inputs: Iterable[Sequence[Arg]] | AsyncIterable[Sequence[Arg]],
    table: dict[HelperKey, Callable[..., Any]],
) -> AsyncGenerator[Result, None]:
    """`execute_batch` with helpers: a task sends the inputs within the window, this
    generator answers helper calls and yields results."""
    header.helper_numbers.extend(key for key in table if isinstance(key, int))
    header.helper_names.extend(key for key in table if isinstance(key, str))
    batch = _BatchStream(stream)
    window = _AsyncWindow()
    stopped: list[BaseException] = []

    async def send_inputs() -> None:
        messages = BatchMessages(header)

        async def send(ready: list[pb.ExecuteBatchRequest]) -> None:
            for message in ready:
                count = len(message.inputs) + len(message.packed.words) // (8 * PACKED_INPUT_WORDS)
                await window.wait_for_room(count)
                await batch.send(message)

        try:
            if isinstance(inputs, AsyncIterable):
                async for args in inputs:
                    await send(messages.add(args))
            else:
                for args in inputs:
                    await send(messages.add(args))
        except Exception as exc:  # raised by the caller after the results before it
            stopped.append(exc)
        await send(messages.end())
        await batch.send(pb.ExecuteBatchRequest(end_of_inputs=True))

    writer = asyncio.ensure_future(send_inputs())
    try:
        while (message := await batch.next()) is not grpc.aio.EOF:
            if message.WhichOneof("message") == "helper_call":
                call = AsyncHelperCall(message.helper_call, batch)
                answer = await _answer(call, table)
                for line in call.lines:
                    log = pb.HelperLog(call_id=call.call_id, text=line)
                    await batch.send(pb.ExecuteBatchRequest(log=log))
                await batch.write(answer)
                continue
            results = list(batch_results(message))
            await window.received(len(results))
            for result in results:
                yield result
            if message.done:
                break
        await writer
        async with batch.lock:
            await stream.done_writing()
    except grpc.RpcError as error:
        raise from_rpc_error(error) from None
    finally:
        writer.cancel()
        if not stream.done():
            stream.cancel()
    if stopped:
        raise stopped[0]


async def _read_to_end(stream: Any) -> None:
    """Wait for the server's status after the result, so the call ends as it does.

    The result is the last message and the outcome: a late failure of the call
    (its deadline passing meanwhile, say) changes nothing about it.
    """
    try:
        message = await stream.read()
        if message is not grpc.aio.EOF:
            raise ProtocolError(f"unexpected {message.WhichOneof('message')} after the result")
        await stream.code()  # the status has arrived: the call is over
    except grpc.RpcError:
        pass


async def _answer(
    call: AsyncHelperCall, table: Mapping[HelperKey, Callable[..., Any]]
) -> pb.ExecuteStreamRequest:
    """Run the helper (awaiting it if it is async) and wrap its value or exception."""
    try:
        value = table[call.helper](call, *call.args)
        if type(value) is not int and inspect.isawaitable(value):  # an int is the usual answer
            value = await value
    except (ProtocolError, grpc.RpcError):
        raise
    except Exception as exc:  # the helper's failure is the program's outcome, not ours
        return result_message(call.call_id, error=describe(exc))
    return result_message(call.call_id, value=value)
