"""The `bpfexec.v1.Executor` servicer: protobuf in, `ExecutionService` call, protobuf out.

Nothing is decided here. Each method converts its request to vm/server types,
calls the `ExecutionService`, and converts the answer back, or turns the
exception it raised into a gRPC status with rich error details
(`google.rpc.Status` in the `grpc-status-details-bin` trailer).

Two checks come before any method runs: `add_to_server` registers the
methods with deserializers that turn bytes which are not a valid message of
the method's type (a corrupt protobuf, a string field that is not UTF-8) into
INVALID_ARGUMENT (`MalformedMessage`) instead of an exception inside grpc; and
every name a request carries (module name and id, function, helper names) is
refused beyond `max_name_bytes`, before it is stored, logged or echoed.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from array import array
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from typing import Any, NoReturn

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from bpfexec._pb.bpfexec.v1 import executor_pb2 as pb
from bpfexec._pb.bpfexec.v1 import executor_pb2_grpc as pb_grpc
from bpfexec.server.cache import CachedModule
from bpfexec.server.executor import (
    BatchChunk,
    BatchOut,
    DeadlineExceeded,
    Execution,
    ExecutionService,
    ModuleNotFound,
    Overloaded,
    RunningBatch,
    RunningTestRun,
    TooManyRequests,
)
from bpfexec.server.remote import (
    DEFAULT_MAX_READ_BYTES,
    DEFAULT_OUTBOX_BYTES,
    MESSAGE_OVERHEAD,
    HelperCall,
    Outbox,
    ProtocolViolation,
    RemoteHelpers,
    ShadowedHelper,
)
from bpfexec.server.states import (
    InvalidEntry,
    MapContents,
    MapNotFound,
    StateBusy,
    StateLimit,
    StateNotFound,
    StateNotSaved,
    StateStoreUnavailable,
    StateSummary,
)
from bpfexec.server.store_redis import StoreUnavailable
from bpfexec.vm import (
    Helper,
    HelperRef,
    LimitError,
    LinkError,
    LoadError,
    RequestError,
    Result,
    Trap,
)
from bpfexec.vm.batch import (
    PACKED_INPUT_WORDS,
    PACKED_RESULT_WORDS,
    BatchInputError,
    PackedInputs,
    PackedResults,
)
from bpfexec.vm.helpers import Event
from bpfexec.vm.machine import Argument
from bpfexec.vm.packet_run import PacketError, PacketResult

log = logging.getLogger(__name__)

ERROR_DOMAIN = "bpfexec"  # google.rpc.ErrorInfo.domain of every error this service raises


TenantOf = Callable[[grpc.aio.ServicerContext], str]
SERVICE = pb.DESCRIPTOR.services_by_name["Executor"]
MAX_HELPER_ERROR_CHARS = 1024  # of a client's HelperResult.error kept in the trap message
MAX_BATCH_INPUTS_PER_MESSAGE = 4096  # inputs one ExecuteBatchRequest may carry
MAX_TEST_RUN_PACKETS_PER_MESSAGE = 4096  # packets one TestRunRequest may carry


class MalformedMessage(ProtocolViolation):
    """Bytes that do not parse as the message the method takes."""


class NameTooLong(RequestError):
    """A name in the request longer than `max_name_bytes`."""


class ExecutorServicer(pb_grpc.ExecutorServicer):
    """`tenant_of(context)` names the caller's tenant (`bpfexec.server.auth`); default: one tenant.

    `max_name_bytes` bounds every name a request carries, `max_offered_helpers`
    the helpers one ExecuteStream may offer, `max_memory_read_bytes` one
    MemoryRead and `max_stream_outbox_bytes` the answers a stream queues for its
    client (`bpfexec.server.settings`, `bpfexec.server.remote`).
    """

    def __init__(
        self,
        service: ExecutionService,
        tenant_of: TenantOf | None = None,
        *,
        max_name_bytes: int = 256,
        max_offered_helpers: int = 1024,
        max_memory_read_bytes: int = DEFAULT_MAX_READ_BYTES,
        max_stream_outbox_bytes: int = DEFAULT_OUTBOX_BYTES,
        max_batch_inputs_per_message: int = MAX_BATCH_INPUTS_PER_MESSAGE,
        max_test_run_packets_per_message: int = MAX_TEST_RUN_PACKETS_PER_MESSAGE,
    ) -> None:
        self._service = service
        self._tenant = tenant_of or (lambda context: "")
        self.max_name_bytes = max_name_bytes
        self.max_offered_helpers = max_offered_helpers
        self.max_memory_read_bytes = max_memory_read_bytes
        self.max_stream_outbox_bytes = max_stream_outbox_bytes
        self.max_batch_inputs_per_message = max_batch_inputs_per_message
        self.max_test_run_packets_per_message = max_test_run_packets_per_message

    def _check_names(self, **names: str) -> None:
        """NameTooLong for the first name beyond `max_name_bytes` (UTF-8 bytes)."""
        for what, text in names.items():
            # A str of n characters has at least n UTF-8 bytes: only short ones are encoded.
            if len(text) > self.max_name_bytes or len(text.encode()) > self.max_name_bytes:
                raise NameTooLong(
                    f"{what.replace('_', ' ')} of {len(text.encode())} bytes exceeds the limit "
                    f"of {self.max_name_bytes} bytes (max_name_bytes)"
                )

    def _check_start(self, start: pb.ExecuteStart) -> None:
        self._check_execute(start.request)
        offered = len(start.helper_numbers) + len(start.helper_names)
        if offered > self.max_offered_helpers:
            raise RequestError(
                f"{offered} helpers offered, more than the limit of {self.max_offered_helpers} "
                "(max_offered_helpers)"
            )
        for name in start.helper_names:
            self._check_names(helper_name=name)

    async def LoadModule(
        self, request: pb.LoadModuleRequest, context: grpc.aio.ServicerContext
    ) -> pb.Module:
        try:
            self._check_names(module_name=request.name)
            module = await self._service.load(
                request.code, request.name or None, self._tenant(context)
            )
        except Exception as exc:
            await _abort(context, exc)
        return self._module(module)

    async def GetModule(
        self, request: pb.GetModuleRequest, context: grpc.aio.ServicerContext
    ) -> pb.Module:
        try:
            self._check_names(module_id=request.id)
            return self._module(await self._service.get(request.id, self._tenant(context)))
        except Exception as exc:
            await _abort(context, exc)

    async def ListModules(
        self, request: pb.ListModulesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModulesResponse:
        return pb.ListModulesResponse(
            modules=[
                self._module(module) for module in self._service.modules(self._tenant(context))
            ]
        )

    async def DeleteModule(
        self, request: pb.DeleteModuleRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteModuleResponse:
        try:
            self._check_names(module_id=request.id)
            await self._service.delete(request.id, self._tenant(context))
        except Exception as exc:
            await _abort(context, exc)
        return pb.DeleteModuleResponse()

    async def ListHelpers(
        self, request: pb.ListHelpersRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListHelpersResponse:
        return pb.ListHelpersResponse(
            helpers=[_helper(helper) for helper in self._service.helpers()]
        )

    async def Execute(
        self, request: pb.ExecuteRequest, context: grpc.aio.ServicerContext
    ) -> pb.ExecuteResponse:
        try:
            self._check_execute(request)
            done = await self._service.execute(
                request.module_id,
                request.function or None,
                arguments(request.args),
                request.fuel or None,
                timeout=context.time_remaining(),
                tenant=self._tenant(context),
                state=request.state or None,
                dump_maps=request.dump_maps,
            )
        except Exception as exc:
            await _abort(context, exc)
        return response(done)

    def _check_execute(self, request: pb.ExecuteRequest) -> None:
        self._check_names(
            module_id=request.module_id, function=request.function, state_name=request.state
        )

    async def ExecuteStream(
        self,
        requests: AsyncIterator[pb.ExecuteStreamRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ExecuteStreamResponse]:
        """Execute with the client's helpers; the protocol is documented in the proto.

        Every message to the client goes through `outbox`, written by this
        generator alone, so helper calls (queued from the worker thread) and
        memory answers (queued by the reader task) never interleave a write.
        """
        # Bytes that did not parse arrive as `_Malformed` (see `_lenient`).
        first: pb.ExecuteStreamRequest | _Malformed | None = await anext(aiter(requests), None)
        if isinstance(first, _Malformed):
            await _abort(context, first.error)
        if first is None or first.WhichOneof("message") != "start":
            await _abort(context, ProtocolViolation(
                "the first message of ExecuteStream must be `start` (the execution and the "
                f"offered helpers), got {_kind(first)}"
            ))  # fmt: skip
        start = first.start
        # Bounded: when it is full, the reader stops taking the client's requests.
        outbox: Outbox[pb.ExecuteStreamResponse | Exception | None] = Outbox(
            self.max_stream_outbox_bytes
        )
        try:
            self._check_start(start)
            session = self._remote_helpers(
                start.helper_numbers,
                start.helper_names,
                lambda call: outbox.put_nowait(pb.ExecuteStreamResponse(helper_call=call)),
            )
            args = arguments(start.request.args)
        except Exception as exc:
            await _abort(context, exc)
        loop = asyncio.get_running_loop()

        def on_event(event: Event) -> None:  # on the executing thread, in submission order
            message = pb.ExecuteStreamResponse(event=pb.Event(map=event.map, data=event.data))
            loop.call_soon_threadsafe(
                outbox.put_nowait, message, len(event.data) + MESSAGE_OVERHEAD
            )

        run = asyncio.ensure_future(
            self._service.execute(
                start.request.module_id,
                start.request.function or None,
                args,
                start.request.fuel or None,
                timeout=context.time_remaining(),
                helpers=session,
                tenant=self._tenant(context),
                state=start.request.state or None,
                dump_maps=start.request.dump_maps,
                on_event=on_event,
            )
        )
        run.add_done_callback(lambda _: outbox.put_nowait(None))
        reader = asyncio.ensure_future(_serve_client(requests, session, outbox))
        try:
            while (message := await outbox.get()) is not None:
                if isinstance(message, Exception):
                    session.cancel()
                    run.cancel()
                    await _abort(context, message)
                yield message
            try:
                result = run.result()
            except Exception as exc:
                await _abort(context, exc)
            # The result is the call's outcome from here on: a client that goes away
            # once it has it (before the status) does not make the call CANCELLED.
            context.set_code(grpc.StatusCode.OK)
            # The events went out as `event` messages: the result does not repeat them.
            yield pb.ExecuteStreamResponse(result=response(result, with_events=False))
        finally:
            # However the stream ends (result sent, client gone, violation),
            # a worker parked in a helper call wakes up and the program stops.
            session.cancel()
            run.cancel()
            reader.cancel()

    async def ExecuteBatch(
        self,
        requests: AsyncIterator[pb.ExecuteBatchRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ExecuteBatchResponse]:
        """One function over the inputs of the request stream; the protocol is in the proto.

        A reader task feeds the inputs to the batch (reading the next request only
        when the batch has room for it); this generator sends its results. With
        helpers offered, the reader reads every message as it comes (an answer must
        never wait behind inputs) and every message out goes through one outbox.
        """
        first: pb.ExecuteBatchRequest | _Malformed | None = await anext(aiter(requests), None)
        if isinstance(first, _Malformed):
            await _abort(context, first.error)
        if first is None or not first.HasField("header"):
            await _abort(context, ProtocolViolation(
                "the first message of ExecuteBatch must carry the `header` (module, function, "
                "fuel, state)"
                + (", got none (the client closed its side)" if first is None else "")
            ))  # fmt: skip
        header = first.header
        outbox: Outbox[pb.ExecuteBatchResponse | Exception | None] = Outbox(
            self.max_stream_outbox_bytes
        )
        session: RemoteHelpers | None = None
        try:
            self._check_names(
                module_id=header.module_id, function=header.function, state_name=header.state
            )
            if header.helper_numbers or header.helper_names:
                session = self._remote_helpers(
                    header.helper_numbers,
                    header.helper_names,
                    lambda call: outbox.put_nowait(pb.ExecuteBatchResponse(helper_call=call)),
                )
            batch = await self._service.start_batch(
                header.module_id,
                header.function or None,
                header.fuel or None,
                timeout=context.time_remaining(),
                tenant=self._tenant(context),
                state=header.state or None,
                helpers=session,
            )
        except Exception as exc:
            await _abort(context, exc)
        if session is None:
            reader = asyncio.ensure_future(self._feed_batch(first, requests, batch))
            pump = None
        else:
            reader = asyncio.ensure_future(
                self._feed_answering(first, requests, batch, session, outbox)
            )
            pump = asyncio.ensure_future(_pump_results(batch, outbox))
        try:
            try:
                if pump is None:
                    async for chunk in batch.results():
                        for message in _batch_responses(chunk):
                            yield message
                else:
                    while (out := await outbox.get()) is not None:
                        if isinstance(out, Exception):
                            raise out
                        yield out
            except Exception as exc:
                await _abort(context, exc)
            yield pb.ExecuteBatchResponse(done=True)
        finally:
            # However the call ends (done, client gone, deadline, error), the worker stops.
            batch.stop()
            reader.cancel()
            if session is not None and pump is not None:
                session.cancel()
                pump.cancel()

    def _remote_helpers(
        self, numbers: Iterable[int], names: Iterable[str], send: Callable[[pb.HelperCall], None]
    ) -> RemoteHelpers:
        """The helpers a client offers on its stream; `send` writes each call to it."""
        return RemoteHelpers(
            numbers,
            names,
            shadows=self._service.provides,
            timeout=self._service.remote_helper_timeout,
            metrics=self._service.metrics,
            send=lambda call: send(_helper_call(call)),
            loop=asyncio.get_running_loop(),
            max_read=self.max_memory_read_bytes,
        )

    def _batch_chunks(
        self, message: pb.ExecuteBatchRequest, index: int
    ) -> tuple[list[BatchChunk], Exception | None]:
        """The chunks of inputs of one request message, whose first input is input
        `index`: those before a bad one, and its error (else None)."""
        words = message.packed.words
        count = len(message.inputs) + len(words) // (8 * PACKED_INPUT_WORDS)
        if count > self.max_batch_inputs_per_message:
            return [], LimitError(
                f"a message of {count} inputs, more than the limit of "
                f"{self.max_batch_inputs_per_message} (max_batch_inputs_per_message)"
            )
        chunks: list[BatchChunk] = []
        inputs: list[Sequence[Argument]] = []
        for given in message.inputs:
            try:
                inputs.append(arguments(given.args))
            except RequestError as exc:
                return [inputs] if inputs else [], BatchInputError(index, str(exc))
            index += 1
        if inputs:
            chunks.append(inputs)
        if words:
            try:
                chunks.append(_packed_inputs(words, index))
            except BatchInputError as exc:
                return chunks, exc
        return chunks, None

    async def _feed_batch(
        self,
        first: pb.ExecuteBatchRequest,
        requests: AsyncIterator[pb.ExecuteBatchRequest | _Malformed],
        batch: RunningBatch[BatchChunk, BatchOut],
    ) -> None:
        """Convert and feed the inputs of every request message; a bad message or input
        ends the inputs with its error, after the inputs before it."""
        index = 0  # of the next input, counted from 0 over the whole stream
        message: pb.ExecuteBatchRequest | _Malformed | None = first
        try:
            while message is not None:
                message = _checked_batch_message(message, first)
                if message.WhichOneof("message") is not None:
                    raise ProtocolViolation(
                        f"a {message.WhichOneof('message')} on a batch that offered no helpers"
                    )
                chunks, error = self._batch_chunks(message, index)
                for chunk in chunks:
                    await batch.feed(chunk)
                    index += len(chunk)
                if error is not None:
                    raise error
                if message.end_of_inputs:
                    break
                message = await anext(requests, None)
            await batch.end_inputs()
        except (RequestError, ProtocolViolation) as error:
            await batch.refuse(error)
        except (grpc.RpcError, asyncio.InvalidStateError):
            batch.stop()  # the stream broke under the reader

    async def _feed_answering(
        self,
        first: pb.ExecuteBatchRequest,
        requests: AsyncIterator[pb.ExecuteBatchRequest | _Malformed],
        batch: RunningBatch[BatchChunk, BatchOut],
        session: RemoteHelpers,
        outbox: Outbox[pb.ExecuteBatchResponse | Exception | None],
    ) -> None:
        """`_feed_batch` for a batch whose client answers helpers: every message is
        read as it comes, answers go to `session` at once, inputs to a queue a feeder
        task hands on to the batch; a client further ahead than its window is refused."""
        queued: asyncio.Queue[BatchChunk | Exception | None] = asyncio.Queue()
        feeder = asyncio.ensure_future(_feed_queued(queued, batch))
        index = 0  # of the next input
        ended = False  # the inputs are over (end_of_inputs, or an error)
        message: pb.ExecuteBatchRequest | _Malformed | None = first
        try:
            while message is not None:
                message = _checked_batch_message(message, first)
                kind = message.WhichOneof("message")
                if kind is not None:
                    if message.inputs or message.packed.words or message.end_of_inputs:
                        raise ProtocolViolation(f"a message with a {kind} carries no inputs")
                    await _serve_helper_message(
                        message, kind, session, outbox, pb.ExecuteBatchResponse
                    )
                elif not ended:
                    chunks, error = self._batch_chunks(message, index)
                    for chunk in chunks:
                        queued.put_nowait(chunk)
                        index += len(chunk)
                    ahead = index - batch.results_sent
                    if ahead > BATCH_WINDOW + self.max_batch_inputs_per_message:
                        # At once, not after the inputs before: the worker may be waiting
                        # for an answer the client will not send.
                        outbox.put_nowait(LimitError(
                            f"{ahead} inputs sent and not yet answered: a client that offers "
                            f"helpers keeps at most {BATCH_WINDOW} ahead"
                        ))  # fmt: skip
                        return
                    if error is not None or message.end_of_inputs:
                        queued.put_nowait(error)
                        ended = True
                elif message.inputs or message.packed.words:
                    raise ProtocolViolation("inputs after the end of the inputs")
                message = await anext(requests, None)
            if not ended:
                queued.put_nowait(None)
            session.client_done()
            await feeder
        except (RequestError, ProtocolViolation) as violation:  # at once: see the window
            outbox.put_nowait(violation)
        except (grpc.RpcError, asyncio.InvalidStateError):
            session.cancel()
            batch.stop()
        finally:
            feeder.cancel()

    async def TestRun(
        self,
        requests: AsyncIterator[pb.TestRunRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.TestRunResponse]:
        """A packet program over the packets of the request stream, as BPF_PROG_TEST_RUN
        runs it; the protocol is in the proto. As ExecuteBatch: a reader task feeds the
        packets, this generator sends the program's type, then the results."""
        first: pb.TestRunRequest | _Malformed | None = await anext(aiter(requests), None)
        if isinstance(first, _Malformed):
            await _abort(context, first.error)
        if first is None or not first.HasField("header"):
            await _abort(context, ProtocolViolation(
                "the first message of TestRun must carry the `header` (module, program, fuel, "
                "state, repeat, dump_maps)"
                + (", got none (the client closed its side)" if first is None else "")
            ))  # fmt: skip
        header = first.header
        try:
            self._check_names(
                module_id=header.module_id, program=header.program, state_name=header.state
            )
            run = await self._service.start_test_run(
                header.module_id,
                header.program or None,
                header.fuel or None,
                timeout=context.time_remaining(),
                tenant=self._tenant(context),
                state=header.state or None,
                repeat=header.repeat or 1,
                dump_maps=header.dump_maps,
            )
        except Exception as exc:
            await _abort(context, exc)
        reader = asyncio.ensure_future(self._feed_test_run(first, requests, run))
        try:
            yield pb.TestRunResponse(program_type=run.program_type.value)
            try:
                async for chunk in run.results():
                    yield pb.TestRunResponse(results=[_packet_result(r) for r in chunk])
            except Exception as exc:
                await _abort(context, exc)
            maps = _dumps(run.maps) if run.maps is not None else None
            yield pb.TestRunResponse(done=True, maps=maps)
        finally:
            # However the call ends (done, client gone, deadline, error), the worker stops.
            run.stop()
            reader.cancel()

    async def _feed_test_run(
        self,
        first: pb.TestRunRequest,
        requests: AsyncIterator[pb.TestRunRequest | _Malformed],
        run: RunningTestRun,
    ) -> None:
        """Feed the packets of every request message; a bad message ends the packets
        with its error, after the packets before it."""
        message: pb.TestRunRequest | _Malformed | None = first
        try:
            while message is not None:
                if isinstance(message, _Malformed):
                    raise message.error
                if message is not first and message.HasField("header"):
                    raise ProtocolViolation("only the first message of TestRun has a header")
                if len(message.packets) > self.max_test_run_packets_per_message:
                    raise LimitError(
                        f"a message of {len(message.packets)} packets, more than the limit of "
                        f"{self.max_test_run_packets_per_message} "
                        "(max_test_run_packets_per_message)"
                    )
                if message.packets:
                    await run.feed(list(message.packets))
                message = await anext(requests, None)
            await run.end_inputs()
        except (RequestError, ProtocolViolation) as error:
            await run.refuse(error)
        except (grpc.RpcError, asyncio.InvalidStateError):
            run.stop()  # the stream broke under the reader

    async def ListStates(
        self, request: pb.ListStatesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListStatesResponse:
        try:
            self._check_names(module_id=request.module_id)
            found = await self._service.list_states(self._tenant(context), request.module_id)
        except Exception as exc:
            await _abort(context, exc)
        return pb.ListStatesResponse(states=[_state(state) for state in found])

    async def GetState(
        self, request: pb.GetStateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetStateResponse:
        try:
            self._check_state(request)
            state, contents = await self._service.get_state(
                request.module_id, request.state, request.map, self._tenant(context)
            )
        except Exception as exc:
            await _abort(context, exc)
        return pb.GetStateResponse(state=_state(state), maps=_dumps(contents))

    async def UpdateStateEntries(
        self, request: pb.UpdateStateEntriesRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdateStateEntriesResponse:
        try:
            self._check_state(request)
            results, created = await self._service.update_entries(
                request.module_id,
                request.state,
                request.map,
                [(entry.key, entry.value) for entry in request.entries],
                request.flags,
                self._tenant(context),
            )
        except Exception as exc:
            await _abort(context, exc)
        return pb.UpdateStateEntriesResponse(results=results, created=created)

    async def DeleteStateEntries(
        self, request: pb.DeleteStateEntriesRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteStateEntriesResponse:
        try:
            self._check_state(request)
            results = await self._service.delete_entries(
                request.module_id, request.state, request.map, request.keys, self._tenant(context)
            )
        except Exception as exc:
            await _abort(context, exc)
        return pb.DeleteStateEntriesResponse(results=results)

    async def DeleteState(
        self, request: pb.DeleteStateRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteStateResponse:
        try:
            self._check_state(request)
            await self._service.delete_state(
                request.module_id, request.state, self._tenant(context)
            )
        except Exception as exc:
            await _abort(context, exc)
        return pb.DeleteStateResponse()

    def _check_state(self, request: Any) -> None:
        """The names of a state request: module id, state and (if it has one) map."""
        self._check_names(
            module_id=request.module_id,
            state_name=request.state,
            map_name=getattr(request, "map", ""),
        )

    def _module(self, module: CachedModule) -> pb.Module:
        program = module.program
        return pb.Module(
            id=module.id,
            name=program.name,
            size=module.size,
            instruction_count=len(program.instructions),
            functions=[
                pb.Function(name=fn.name, pc=fn.pc, size=fn.size, exported=fn.exported)
                for fn in program.functions
            ],
            helpers=[
                _helper_ref(ref, in_process=self._service.provides(ref)) for ref in program.helpers
            ],
        )


async def _serve_client(
    requests: AsyncIterator[pb.ExecuteStreamRequest],
    session: RemoteHelpers,
    outbox: Outbox[pb.ExecuteStreamResponse | Exception | None],
) -> None:
    """Feed the client's messages to `session`; queue memory answers and violations.

    A memory answer waits for room in the outbox before the next request is
    read: a client that does not read its answers stops being read (backpressure).
    """
    try:
        async for message in requests:
            if isinstance(message, _Malformed):  # bytes that did not parse (`_lenient`)
                raise message.error
            kind = message.WhichOneof("message")
            if kind is None or kind == "start":
                raise ProtocolViolation(
                    f"unexpected {_kind(message)}: an ExecuteStream has one `start`, first"
                )
            await _serve_helper_message(message, kind, session, outbox, pb.ExecuteStreamResponse)
        session.client_done()
    except ProtocolViolation as violation:
        outbox.put_nowait(violation)
    except (grpc.RpcError, asyncio.InvalidStateError):
        session.cancel()  # the stream broke under the reader: the generator is cancelled too


async def _serve_helper_message(
    message: pb.ExecuteStreamRequest | pb.ExecuteBatchRequest,
    kind: str,
    session: RemoteHelpers,
    outbox: Outbox[Any],
    respond: Callable[..., Message],
) -> None:
    """One message of a client answering a helper call (`kind`: helper_result,
    memory_read, memory_write or log); a memory answer goes to `outbox` as
    `respond(memory_..._result=...)`, once it has room."""
    if kind == "helper_result":
        result = message.helper_result
        outcome = result.WhichOneof("outcome")
        if outcome is None:
            raise ProtocolViolation(
                f"HelperResult for call_id {result.call_id} sets neither value nor error"
            )
        session.answer(
            result.call_id,
            result.value if outcome == "value" else None,
            _clipped(result.error) if outcome == "error" else None,
        )
    elif kind == "memory_read":
        read = message.memory_read
        answer = pb.MemoryReadResult(call_id=read.call_id)
        try:
            answer.data = await session.read_async(
                read.call_id, read.address, read.size, read.until_nul
            )
        except Trap as fault:
            answer.error = fault.message
        size = len(answer.data) + len(answer.error) + MESSAGE_OVERHEAD
        await outbox.put(respond(memory_read_result=answer), size)
    elif kind == "memory_write":
        write = message.memory_write
        done = pb.MemoryWriteResult(call_id=write.call_id)
        try:
            session.write(write.call_id, write.address, write.data)
        except Trap as fault:
            done.error = fault.message
        await outbox.put(respond(memory_write_result=done), len(done.error) + MESSAGE_OVERHEAD)
    elif kind == "log":
        session.log(message.log.call_id, message.log.text)


def _clipped(text: str, limit: int = MAX_HELPER_ERROR_CHARS) -> str:
    """`text`, cut to `limit` characters (saying how many more there were)."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text) - limit} more characters)"


def _kind(message: pb.ExecuteStreamRequest | None) -> str:
    if message is None:
        return "no message (the client closed its side)"
    kind = message.WhichOneof("message")
    return f"a `{kind}` message" if kind else "an empty message"


def _helper_call(call: HelperCall) -> pb.HelperCall:
    message = pb.HelperCall(call_id=call.call_id, args=call.args)
    if isinstance(call.helper, str):
        message.name = call.helper
    else:
        message.number = call.helper
    return message


def arguments(args: Sequence[pb.Argument]) -> list[Argument]:
    """Register values and buffers, in order; an empty Argument is a request error."""
    converted: list[Argument] = []
    for i, arg in enumerate(args, start=1):
        kind = arg.WhichOneof("kind")
        if kind is None:
            raise RequestError(f"argument {i} sets neither value nor buffer")
        converted.append(arg.value if kind == "value" else arg.buffer)
    return converted


def response(done: Execution | Result, *, with_events: bool = True) -> pb.ExecuteResponse:
    """The ExecuteResponse of an execution (its maps if they were dumped; its events
    unless they were streamed)."""
    result = done.result if isinstance(done, Execution) else done
    maps = done.maps if isinstance(done, Execution) else None
    return pb.ExecuteResponse(
        return_value=result.return_value,
        fuel_used=result.fuel_used,
        trap=_trap(result.trap) if result.trap else None,
        log=result.log,
        buffers=result.buffers,
        duration_ns=result.duration_ns,
        maps=_dumps(maps) if maps is not None else None,
        events=[pb.Event(map=e.map, data=e.data) for e in result.events or ()]
        if with_events
        else None,
        ring_buffer=result.events is not None,
    )


def _packed_inputs(words: bytes, index: int) -> PackedInputs:
    """The PackedInputs of a request message (its first input is input `index`)."""
    size = 8 * PACKED_INPUT_WORDS
    if len(words) % size:
        raise BatchInputError(
            index + len(words) // size,
            f"packed inputs of {len(words)} bytes: not a whole number of {size}-byte inputs",
        )
    unpacked = array("Q")
    unpacked.frombytes(words)
    if sys.byteorder != "little":
        unpacked.byteswap()
    return PackedInputs(unpacked)


BATCH_WINDOW = 8192  # inputs a client offering helpers may send beyond its results


def _checked_batch_message(
    message: pb.ExecuteBatchRequest | _Malformed, first: pb.ExecuteBatchRequest
) -> pb.ExecuteBatchRequest:
    """`message`, or raise what is wrong with it as a whole."""
    if isinstance(message, _Malformed):
        raise message.error
    if message is not first and message.HasField("header"):
        raise ProtocolViolation("only the first message of ExecuteBatch has a header")
    return message


async def _feed_queued(
    queued: asyncio.Queue[BatchChunk | Exception | None],
    batch: RunningBatch[BatchChunk, BatchOut],
) -> None:
    """Hand queued chunks on to the batch as it has room; None ends the inputs, an
    exception ends them with that error."""
    while True:
        item = await queued.get()
        if item is None:
            await batch.end_inputs()
            return
        if isinstance(item, Exception):
            await batch.refuse(item)
            return
        await batch.feed(item)


async def _pump_results(
    batch: RunningBatch[BatchChunk, BatchOut],
    outbox: Outbox[pb.ExecuteBatchResponse | Exception | None],
) -> None:
    """The batch's results into `outbox` (waiting for room), then None; or its error."""
    try:
        async for chunk in batch.results():
            for message in _batch_responses(chunk):
                await outbox.put(message, message.ByteSize())
        outbox.put_nowait(None)
    except Exception as exc:
        outbox.put_nowait(exc)


def _batch_responses(chunk: list[BatchOut]) -> Iterator[pb.ExecuteBatchResponse]:
    """The response messages of a chunk of results, in order: a run of Results in
    one message, each PackedResults in one of its own."""
    results: list[pb.BatchResult] = []
    for item in chunk:
        if not isinstance(item, PackedResults):
            results.append(_batch_result(item))
            continue
        if results:
            yield pb.ExecuteBatchResponse(results=results)
            results = []
        yield pb.ExecuteBatchResponse(packed=_packed_results(item))
    if results:
        yield pb.ExecuteBatchResponse(results=results)


def _packed_results(packed: PackedResults) -> pb.PackedResults:
    words = packed.words
    traps = []
    if packed.traps:
        words = array("Q", words)
        for position, (index, trap) in enumerate(sorted(packed.traps.items()), start=1):
            words[PACKED_RESULT_WORDS * index + 2] = position
            traps.append(_trap(trap))
    if sys.byteorder != "little":
        words = array("Q", words)
        words.byteswap()
    logs = [pb.PackedLog(index=i, lines=lines) for i, lines in sorted(packed.logs.items())]
    return pb.PackedResults(words=words.tobytes(), traps=traps, logs=logs)


def _batch_result(result: Result) -> pb.BatchResult:
    return pb.BatchResult(
        return_value=result.return_value,
        fuel_used=result.fuel_used,
        trap=_trap(result.trap) if result.trap else None,
        buffers=result.buffers,
        log=result.log,
    )


def _packet_result(result: PacketResult) -> pb.PacketResult:
    return pb.PacketResult(
        retval=result.retval,
        verdict=result.verdict,
        data=result.data,
        context=[_context_field(name, value) for name, value in result.context.items()],
        fuel_used=result.fuel_used,
        duration_ns=result.duration_ns,
        trap=_trap(result.trap) if result.trap else None,
        log=result.log,
        redirect=pb.Redirect(ifindex=result.redirect[0], ingress=result.redirect[1])
        if result.redirect is not None
        else None,
    )


def _context_field(name: str, value: int | list[int]) -> pb.ContextField:
    if isinstance(value, int):
        return pb.ContextField(name=name, scalar=value)
    return pb.ContextField(name=name, array=pb.ContextArray(elements=value))


def _dumps(contents: dict[str, MapContents]) -> dict[str, pb.MapDump]:
    return {
        name: pb.MapDump(
            type=found.type,
            key_size=found.key_size,
            value_size=found.value_size,
            max_entries=found.max_entries,
            entries=[pb.MapEntry(key=key, value=value) for key, value in found.entries],
        )
        for name, found in contents.items()
    }


def _state(state: StateSummary) -> pb.State:
    return pb.State(
        name=state.key.name,
        module_id=state.key.module_id,
        map_bytes=state.map_bytes,
        maps=state.map_names,
    )


def _trap(trap: Trap) -> pb.Trap:
    return pb.Trap(
        kind=trap.kind.value,
        pc=max(trap.pc, 0),
        instruction=trap.instruction,
        location=trap.location,
        message=trap.message,
        function=trap.function,
    )


def _helper_ref(ref: HelperRef, *, in_process: bool) -> pb.Helper:
    return pb.Helper(
        number=ref.number or 0,
        has_number=ref.number is not None,
        name=ref.name or "",
        in_process=in_process,
    )


def _helper(helper: Helper) -> pb.Helper:
    described = _helper_ref(helper.ref, in_process=True)
    doc = (getattr(helper.fn, "__doc__", None) or "").strip()
    described.description = doc.splitlines()[0] if doc else ""
    described.cost = helper.cost
    return described


# Errors -> statuses. Order matters: the first matching class wins, so
# subclasses (LimitError is a RequestError) come before their bases.
_STATUS: list[tuple[type[Exception], grpc.StatusCode, str]] = [
    (ModuleNotFound, grpc.StatusCode.NOT_FOUND, "MODULE_NOT_FOUND"),
    (StoreUnavailable, grpc.StatusCode.UNAVAILABLE, "STORE_UNAVAILABLE"),
    (StateNotFound, grpc.StatusCode.NOT_FOUND, "STATE_NOT_FOUND"),
    (MapNotFound, grpc.StatusCode.NOT_FOUND, "MAP_NOT_FOUND"),
    (StateLimit, grpc.StatusCode.RESOURCE_EXHAUSTED, "STATE_LIMIT"),
    (StateNotSaved, grpc.StatusCode.INTERNAL, "STATE_NOT_SAVED"),
    (StateStoreUnavailable, grpc.StatusCode.UNAVAILABLE, "STATE_STORE_UNAVAILABLE"),
    (StateBusy, grpc.StatusCode.DEADLINE_EXCEEDED, "STATE_BUSY"),
    (InvalidEntry, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_MAP_ENTRY"),
    (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_EXECUTIONS"),
    (TooManyRequests, grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_REQUESTS"),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED"),
    (BatchInputError, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_BATCH_INPUT"),
    (PacketError, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PACKET"),
    (LimitError, grpc.StatusCode.RESOURCE_EXHAUSTED, "LIMIT_EXCEEDED"),
    (LinkError, grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_HELPER"),
    (ShadowedHelper, grpc.StatusCode.INVALID_ARGUMENT, "HELPER_SHADOWED"),
    (MalformedMessage, grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_MESSAGE"),
    (NameTooLong, grpc.StatusCode.INVALID_ARGUMENT, "NAME_TOO_LONG"),
    (ProtocolViolation, grpc.StatusCode.INVALID_ARGUMENT, "PROTOCOL_VIOLATION"),
    (LoadError, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_MODULE"),
    (RequestError, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST"),
]


def status_of(exc: Exception) -> status_pb2.Status | None:
    """The google.rpc.Status for a known error; None for a bug (which grpc reports as UNKNOWN)."""
    found = next(((code, why) for kind, code, why in _STATUS if isinstance(exc, kind)), None)
    if found is None:
        return None
    code, reason = found
    details = [error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN)]
    if isinstance(exc, BatchInputError):  # counted from 0; the message counts from 1
        details[0].metadata["input_index"] = str(exc.index)
    if isinstance(exc, PacketError):  # the same
        details[0].metadata["packet_index"] = str(exc.index)
    if isinstance(exc, ModuleNotFound):
        details.append(
            error_details_pb2.ResourceInfo(
                resource_type="bpfexec.v1.Module",
                resource_name=exc.module_id,
                description="upload the module again with LoadModule",
            )
        )
    elif isinstance(exc, Overloaded):
        details.append(error_details_pb2.QuotaFailure(violations=[
            error_details_pb2.QuotaFailure.Violation(
                subject="executions", description=f"at most {exc.limit} concurrent executions"
            )
        ]))  # fmt: skip
    elif isinstance(exc, TooManyRequests):
        details.append(error_details_pb2.QuotaFailure(violations=[
            error_details_pb2.QuotaFailure.Violation(
                subject="requests", description=f"at most {exc.limit} concurrent requests"
            )
        ]))  # fmt: skip
    elif isinstance(exc, LinkError):
        details.append(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(
                field="module_id", description=f"unknown helper {helper}"
            )
            for helper in exc.missing
        ]))  # fmt: skip
    status = status_pb2.Status(code=code.value[0], message=str(exc))
    for detail in details:
        packed = any_pb2.Any()
        packed.Pack(detail)
        status.details.append(packed)
    return status


async def _abort(context: grpc.aio.ServicerContext, exc: Exception) -> NoReturn:
    status = status_of(exc)
    if status is None:
        log.exception("unexpected error in a request", exc_info=exc)
        raise exc
    await context.abort_with_status(rpc_status.to_status(status))
    raise AssertionError("abort_with_status returned")  # it raises to end the call


# Registration: the generated `add_ExecutorServicer_to_server`, with lenient
# deserializers. A request that does not parse would otherwise raise inside
# grpc, which logs a traceback and answers UNKNOWN.


class _Malformed:
    """What a lenient deserializer returns for bytes that do not parse: the error,
    and an empty message of the type for anything that reads fields (the request log)."""

    def __init__(self, message_class: type[Message], error: MalformedMessage) -> None:
        self._empty = message_class()
        self.error = error

    def __getattr__(self, name: str) -> Any:
        return getattr(self._empty, name)


def _lenient(message_class: type[Message]) -> Callable[[bytes], Any]:
    name = message_class.DESCRIPTOR.full_name

    def deserialize(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except DecodeError:
            return _Malformed(
                message_class,
                MalformedMessage(
                    f"malformed request: {len(data)} bytes that are not a valid {name} message "
                    "(corrupt protobuf, or a string field that is not UTF-8)"
                ),
            )

    return deserialize


def _checked_unary(behaviour: Callable[..., Any]) -> Callable[..., Any]:
    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, _Malformed):
            await _abort(context, request.error)
        return await behaviour(request, context)

    return unary


def _checked_stream(behaviour: Callable[..., Any]) -> Callable[..., Any]:
    """A bidi method as it is: it checks for `_Malformed` requests itself
    (`ExecuteStream` ends the stream with INVALID_ARGUMENT). A wrapping
    generator here would add two hops to every message of every stream, in
    and out, on the path of each remote helper round trip."""
    return behaviour


_HANDLERS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def add_to_server(servicer: ExecutorServicer, server: grpc.aio.Server) -> None:
    """Register the Executor methods of `servicer` on `server` (lenient deserializers)."""
    handlers = {}
    for method in SERVICE.methods:
        request_class = getattr(pb, method.input_type.name)
        response_class = getattr(pb, method.output_type.name)
        behaviour = getattr(servicer, method.name)
        if method.client_streaming != method.server_streaming:
            raise NotImplementedError(f"{method.name}: only unary and bidi methods are wrapped")
        checked = _checked_stream if method.client_streaming else _checked_unary
        make = _HANDLERS[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = make(
            checked(behaviour),
            request_deserializer=_lenient(request_class),
            response_serializer=response_class.SerializeToString,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),)
    )
    server.add_registered_method_handlers(SERVICE.full_name, handlers)
