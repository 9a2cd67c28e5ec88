"""The client's exceptions: one per gRPC status the server answers, rooted in `BpfexecError`.

Every exception carries the server's one-line message, the gRPC status code,
and the `google.rpc` error details the server attached (`ErrorInfo`,
`BadRequest`, `ResourceInfo`, `QuotaFailure`), already unpacked.

A program that traps is not an exception: it is a `Result` whose `trap` is set.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


class BpfexecError(Exception):
    """A request the server (or the transport) refused. `str(e)` is the server's message."""

    def __init__(
        self,
        message: str,
        code: grpc.StatusCode = grpc.StatusCode.UNKNOWN,
        details: tuple[Any, ...] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.details = details

    @property
    def reason(self) -> str:
        """The `google.rpc.ErrorInfo` reason (e.g. `MODULE_NOT_FOUND`), or ''."""
        for detail in self.details:
            if isinstance(detail, error_details_pb2.ErrorInfo):
                return str(detail.reason)
        return ""


class InvalidArgument(BpfexecError):
    """The module cannot be loaded, the function does not exist, a helper is missing,
    or the arguments are wrong. Retrying the same request will fail again."""


class NotFound(BpfexecError):
    """The module is not cached on the server: upload it again."""


class ResourceExhausted(BpfexecError):
    """A server limit was exceeded, or the server is at its concurrency limit."""


class DeadlineExceeded(BpfexecError):
    """The deadline expired before the execution finished; the server stopped it."""


class Unavailable(BpfexecError):
    """The server cannot be reached or is shutting down; retrying may succeed."""


class Cancelled(BpfexecError):
    """The call was cancelled."""


class Unauthenticated(BpfexecError):
    """The server requires credentials the client did not present."""


class MemoryFault(BpfexecError):
    """A remote helper's memory access was out of bounds (raised by `HelperCall.read` and kin).

    Letting it propagate out of the helper ends the run with that MEMORY_FAULT trap.
    """


class ProtocolError(BpfexecError):
    """The server sent something the ExecuteStream protocol does not allow (a bug)."""


_BY_CODE: dict[grpc.StatusCode, type[BpfexecError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
}

_DETAIL_TYPES = (
    error_details_pb2.ErrorInfo,
    error_details_pb2.BadRequest,
    error_details_pb2.ResourceInfo,
    error_details_pb2.QuotaFailure,
    error_details_pb2.RetryInfo,
)


def from_rpc_error(error: grpc.RpcError) -> BpfexecError:
    """The exception for a failed call, with the server's message and unpacked details."""
    # A blocking call's error is a grpc.Call; an asyncio call's (grpc.aio.AioRpcError) is
    # not, but has the same accessors.
    call = isinstance(error, (grpc.Call, grpc.aio.AioRpcError))
    code = error.code() if call else grpc.StatusCode.UNKNOWN
    message = (error.details() if call else None) or str(code)
    details: list[Any] = []
    try:
        status = rpc_status.from_call(error) if call else None
    except ValueError:  # details that contradict the status (a proxy rewrote it): ignore them
        status = None
    for packed in status.details if status is not None else ():
        for kind in _DETAIL_TYPES:
            if packed.Is(kind.DESCRIPTOR):
                detail = kind()
                packed.Unpack(detail)
                details.append(detail)
    if code == grpc.StatusCode.UNAVAILABLE:
        message = _transport_message(message)
    return _BY_CODE.get(code, BpfexecError)(message, code, tuple(details))


def _transport_message(message: str) -> str:
    """gRPC's text for a server it cannot reach, in one short sentence:
    `failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1:
    Failed to connect to remote host: Connection refused` becomes
    `cannot connect to 127.0.0.1:1: Connection refused`."""
    _, found, last = message.partition("last error: ")
    if not message.startswith("failed to connect to all addresses") or not found:
        return message
    parts = [part.strip() for part in last.split(": ")]
    address = next((p for p in parts if p.startswith(("ipv4:", "ipv6:", "unix:"))), None)
    reason = parts[-1] if parts else last
    where = address.split(":", 1)[1] if address else "the server"
    return f"cannot connect to {where}: {reason} (is a bpfexec server listening there?)"
