"""One log line per request to the Executor service, as text or JSON.

Each line has the method, the module id, the function, the outcome (the gRPC
status, or for an execution that ran, `OK` or its trap kind), the fuel used,
the duration, the peer and the tenant. Fields go through the `logging`
module (logger `bpfexec.requests`, level INFO), so they follow whatever
logging the process set up; `configure_logging(format)` is what `bpfexec
serve` uses, `--log-format text|json`.

Health checks and reflection are not logged (probes would drown the rest).
Nothing here ever reads the authorization metadata: no secret reaches a line.
"""

from __future__ import annotations

import inspect
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from bpfexec.server.metrics import _code_name

log = logging.getLogger("bpfexec.requests")

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FIELDS = ("method", "module", "function", "outcome", "fuel", "duration_ms", "peer", "tenant")

TenantOf = Callable[[grpc.aio.ServicerContext], str]


def configure_logging(
    log_format: str, level: int = logging.INFO, *, text_format: str = TEXT_FORMAT
) -> None:
    """Send every log record of the process to stderr, as text lines or JSON objects.

    `text_format` is the `logging.Formatter` format of a text line (`--workers`
    adds the process id to tell its workers apart).
    """
    handler = logging.StreamHandler()
    formatter = JsonFormatter() if log_format == "json" else logging.Formatter(text_format)
    handler.setFormatter(formatter)
    logging.basicConfig(level=level, handlers=[handler], force=True)


class JsonFormatter(logging.Formatter):
    """A record as one JSON object: time, level, logger, message, and a request's fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(getattr(record, "request", {}))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


class RequestLogInterceptor(grpc.aio.ServerInterceptor):
    """Logs every call of `service` (a full service name) when it ends."""

    def __init__(self, service: str, tenant_of: TenantOf | None = None) -> None:
        self._prefix = f"/{service}/"
        self._tenant_of = tenant_of

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        path = handler_call_details.method
        if handler is None or not path.startswith(self._prefix):
            return handler
        method = path[len(self._prefix) :]
        if handler.request_streaming and handler.response_streaming:
            behaviour = handler.stream_stream
            if inspect.isasyncgenfunction(behaviour):
                return handler._replace(stream_stream=self._stream(behaviour, method))
            return handler  # a refusal from an outer interceptor: nothing ran to log
        if not handler.request_streaming and not handler.response_streaming:
            return handler._replace(unary_unary=self._unary(handler.unary_unary, method))
        return handler

    def _unary(self, behaviour: Callable[..., Any], method: str) -> Callable[..., Any]:
        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            caller = self._caller(context)
            response = None
            try:
                response = await behaviour(request, context)
                return response
            finally:
                self._emit(method, _status(context), start, caller, request, response)

        return unary

    def _stream(self, behaviour: Callable[..., Any], method: str) -> Callable[..., Any]:
        async def stream(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            start = time.perf_counter()
            caller = self._caller(context)
            seen: dict[str, Any] = {}

            async def first_kept() -> AsyncIterator[Any]:
                async for message in requests:
                    seen.setdefault("first", message)
                    yield message

            closed = False
            try:
                async for response in behaviour(first_kept(), context):
                    seen["last"] = response
                    yield response
            except GeneratorExit:
                # Closed after the call ended (the client went away mid-write): the
                # call object is gone, so nothing more may be asked of `context`.
                closed = True
                raise
            finally:
                last = seen.get("last")
                # A result handed to gRPC is the call's outcome, even if the client
                # went away before the status.
                gone = "CANCELLED" if closed else _status(context)
                status = "OK" if _is_result(last) else gone
                self._emit(method, status, start, caller, seen.get("first"), last)

        return stream

    def _caller(self, context: grpc.aio.ServicerContext) -> dict[str, Any]:
        """Peer and tenant, read while the call is surely alive."""
        if not log.isEnabledFor(logging.INFO):
            return {}
        caller = {"peer": context.peer()}
        if self._tenant_of is not None:
            caller["tenant"] = self._tenant_of(context)
        return caller

    def _emit(
        self,
        method: str,
        status: str,
        start: float,
        caller: dict[str, Any],
        request: Any,
        response: Any,
    ) -> None:
        """One line; `status` is the call's gRPC status code name."""
        if not log.isEnabledFor(logging.INFO):
            return
        fields = request_fields(request, response)
        if status != "OK" or "outcome" not in fields:
            fields["outcome"] = status
        fields.update(method=method, duration_ms=round((time.perf_counter() - start) * 1000, 3))
        fields.update(caller)
        line = {name: fields[name] for name in FIELDS if name in fields}
        text = " ".join(f"{name}={value}" for name, value in line.items() if name != "method")
        log.info("%s %s", method, text, extra={"request": line})


def _status(context: grpc.aio.ServicerContext) -> str:
    """The status of a call that has ended, while its context is still alive."""
    return _code_name(context, "CANCELLED" if context.cancelled() else "OK")


def _is_result(response: Any) -> bool:
    """Whether `response` is the result message of an ExecuteStream."""
    return (
        response is not None
        and response.DESCRIPTOR.name == "ExecuteStreamResponse"
        and response.WhichOneof("message") == "result"
    )


def request_fields(request: Any, response: Any) -> dict[str, Any]:
    """Module id, function, outcome and fuel, from whichever messages carry them."""
    fields: dict[str, Any] = {}
    if request is not None and request.DESCRIPTOR.name == "ExecuteStreamRequest":
        request = request.start.request if request.WhichOneof("message") == "start" else None
    if request is not None and request.DESCRIPTOR.name in ("ExecuteBatchRequest", "TestRunRequest"):
        request = request.header if request.HasField("header") else None
    if response is not None and response.DESCRIPTOR.name == "ExecuteStreamResponse":
        response = response.result if response.WhichOneof("message") == "result" else None
    for source, names in ((request, ("module_id", "id")), (response, ("id",))):
        for name in names:
            if source is not None and name in source.DESCRIPTOR.fields_by_name:
                fields["module"] = getattr(source, name) or fields.get("module", "")
    if request is not None and "function" in request.DESCRIPTOR.fields_by_name:
        fields["function"] = request.function
    if request is not None and request.DESCRIPTOR.name == "TestRunHeader":
        fields["function"] = request.program  # a function or section name
    if response is not None and response.DESCRIPTOR.name == "ExecuteResponse":
        fields["fuel"] = response.fuel_used
        fields["outcome"] = response.trap.kind if response.HasField("trap") else "OK"
    return {name: value for name, value in fields.items() if value != ""}
