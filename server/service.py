"""The `bpfexec.v1.Executor` servicer: protobuf in, `ExecutionService` call, protobuf out.

Nothing is decided here. Each method converts its request to vm/server types,
calls the `ExecutionService`, and converts the answer back, or turns the
exception it raised into a gRPC status with rich error details
(`google.rpc.Status` in the `grpc-status-details-bin` trailer).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from client._pb.bpfexec.v1 import executor_pb2 as pb
from client._pb.bpfexec.v1 import executor_pb2_grpc as pb_grpc
from server.cache import CachedModule
from server.executor import (
    DeadlineExceeded,
    ExecutionService,
    ModuleNotFound,
    Overloaded,
    TooManyRequests,
)
from server.remote import HelperCall, ProtocolViolation, RemoteHelpers, ShadowedHelper
from vm import Helper, HelperRef, LimitError, LinkError, LoadError, RequestError, Result, Trap
from vm.machine import Argument

log = logging.getLogger(__name__)

ERROR_DOMAIN = "bpfexec"  # google.rpc.ErrorInfo.domain of every error this service raises


TenantOf = Callable[[grpc.aio.ServicerContext], str]


class ExecutorServicer(pb_grpc.ExecutorServicer):
    """`tenant_of(context)` names the caller's tenant (`server.auth`); default: one tenant."""

    def __init__(self, service: ExecutionService, tenant_of: TenantOf | None = None) -> None:
        self._service = service
        self._tenant = tenant_of or (lambda context: "")

    async def LoadModule(
        self, request: pb.LoadModuleRequest, context: grpc.aio.ServicerContext
    ) -> pb.Module:
        try:
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
            result = await self._service.execute(
                request.module_id,
                request.function or None,
                arguments(request.args),
                request.fuel or None,
                timeout=context.time_remaining(),
                tenant=self._tenant(context),
            )
        except Exception as exc:
            await _abort(context, exc)
        return response(result)

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
        first = await anext(aiter(requests), None)
        if first is None or first.WhichOneof("message") != "start":
            await _abort(context, ProtocolViolation(
                "the first message of ExecuteStream must be `start` (the execution and the "
                f"offered helpers), got {_kind(first)}"
            ))  # fmt: skip
        start = first.start
        outbox: asyncio.Queue[pb.ExecuteStreamResponse | Exception | None] = asyncio.Queue()
        try:
            session = RemoteHelpers(
                start.helper_numbers,
                start.helper_names,
                shadows=self._service.provides,
                timeout=self._service.remote_helper_timeout,
                metrics=self._service.metrics,
                send=lambda call: outbox.put_nowait(_helper_call(call)),
                loop=asyncio.get_running_loop(),
            )
            args = arguments(start.request.args)
        except Exception as exc:
            await _abort(context, exc)
        run = asyncio.ensure_future(
            self._service.execute(
                start.request.module_id,
                start.request.function or None,
                args,
                start.request.fuel or None,
                timeout=context.time_remaining(),
                helpers=session,
                tenant=self._tenant(context),
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
            yield pb.ExecuteStreamResponse(result=response(result))
        finally:
            # However the stream ends (result sent, client gone, violation),
            # a worker parked in a helper call wakes up and the program stops.
            session.cancel()
            run.cancel()
            reader.cancel()

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
    outbox: asyncio.Queue[pb.ExecuteStreamResponse | Exception | None],
) -> None:
    """Feed the client's messages to `session`; queue memory answers and violations."""
    try:
        async for message in requests:
            kind = message.WhichOneof("message")
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
                    result.error if outcome == "error" else None,
                )
            elif kind == "memory_read":
                read = message.memory_read
                answer = pb.MemoryReadResult(call_id=read.call_id)
                try:
                    answer.data = session.read(
                        read.call_id, read.address, read.size, read.until_nul
                    )
                except Trap as fault:
                    answer.error = fault.message
                outbox.put_nowait(pb.ExecuteStreamResponse(memory_read_result=answer))
            elif kind == "memory_write":
                write = message.memory_write
                done = pb.MemoryWriteResult(call_id=write.call_id)
                try:
                    session.write(write.call_id, write.address, write.data)
                except Trap as fault:
                    done.error = fault.message
                outbox.put_nowait(pb.ExecuteStreamResponse(memory_write_result=done))
            elif kind == "log":
                session.log(message.log.call_id, message.log.text)
            else:
                raise ProtocolViolation(
                    f"unexpected {_kind(message)}: an ExecuteStream has one `start`, first"
                )
        session.client_done()
    except ProtocolViolation as violation:
        outbox.put_nowait(violation)
    except (grpc.RpcError, asyncio.InvalidStateError):
        session.cancel()  # the stream broke under the reader: the generator is cancelled too


def _kind(message: pb.ExecuteStreamRequest | None) -> str:
    if message is None:
        return "no message (the client closed its side)"
    kind = message.WhichOneof("message")
    return f"a `{kind}` message" if kind else "an empty message"


def _helper_call(call: HelperCall) -> pb.ExecuteStreamResponse:
    message = pb.HelperCall(call_id=call.call_id, args=call.args)
    if isinstance(call.helper, str):
        message.name = call.helper
    else:
        message.number = call.helper
    return pb.ExecuteStreamResponse(helper_call=message)


def arguments(args: Sequence[pb.Argument]) -> list[Argument]:
    """Register values and buffers, in order; an empty Argument is a request error."""
    converted: list[Argument] = []
    for i, arg in enumerate(args, start=1):
        kind = arg.WhichOneof("kind")
        if kind is None:
            raise RequestError(f"argument {i} sets neither value nor buffer")
        converted.append(arg.value if kind == "value" else arg.buffer)
    return converted


def response(result: Result) -> pb.ExecuteResponse:
    return pb.ExecuteResponse(
        return_value=result.return_value,
        fuel_used=result.fuel_used,
        trap=_trap(result.trap) if result.trap else None,
        log=result.log,
        buffers=result.buffers,
        duration_ns=result.duration_ns,
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
    (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_EXECUTIONS"),
    (TooManyRequests, grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_REQUESTS"),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED"),
    (LimitError, grpc.StatusCode.RESOURCE_EXHAUSTED, "LIMIT_EXCEEDED"),
    (LinkError, grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_HELPER"),
    (ShadowedHelper, grpc.StatusCode.INVALID_ARGUMENT, "HELPER_SHADOWED"),
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
