"""`RequestLimit`: at most `max_concurrent_requests` Executor calls in progress at once.

`ExecutionService` refuses an execution beyond `max_concurrent_executions`,
but nothing else bounds the calls a server holds: uploads queue for a thread,
a stream waits for its first message as long as its client likes, and each
held call keeps its request in memory. This interceptor counts the calls of
one service (health checks and reflection stay outside, so probes answer
during an overload) from the moment their handler starts until gRPC reports
them done, and refuses one beyond the limit at once with RESOURCE_EXHAUSTED
(`TOO_MANY_REQUESTS`) rather than letting the backlog grow.

A call is released by `context.add_done_callback`, not by the handler's own
`finally`: when a client vanishes while gRPC is writing to it, gRPC leaves a
streaming handler suspended and asyncio closes it later, whereas the done
callback runs as soon as the call ends.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc_status import rpc_status

from bpfexec.server.executor import TooManyRequests
from bpfexec.server.metrics import Metrics
from bpfexec.server.service import status_of

Behaviour = Callable[[Any, grpc.aio.ServicerContext], Any]


class RequestLimit(grpc.aio.ServerInterceptor):
    """Refuses calls of `service` (a full service name) beyond `limit` in progress.

    Place it after (inside) the interceptors that may refuse a call on their
    own, so that only admitted calls are counted; the metrics and request log
    interceptors then count and log its refusals like any other status.
    """

    def __init__(self, service: str, limit: int, metrics: Metrics) -> None:
        if limit < 1:
            raise ValueError(f"the request limit must be at least 1, got {limit}")
        self.limit = limit
        self.in_progress = 0  # only touched on the event loop
        self._prefix = f"/{service}/"
        self._gauge = metrics.requests_in_progress
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        path = handler_call_details.method
        if path in self._wrapped:
            return self._wrapped[path]
        handler = await continuation(handler_call_details)
        if handler is None or not path.startswith(self._prefix):
            return handler
        attr = _HANDLER_ATTRS[(handler.request_streaming, handler.response_streaming)]
        behaviour = getattr(handler, attr)
        # A streaming handler is an async generator or a coroutine that calls
        # context.write(); the wrapper must be of the same kind.
        wrap = self._generator if inspect.isasyncgenfunction(behaviour) else self._coroutine
        self._wrapped[path] = handler._replace(**{attr: wrap(behaviour)})
        return self._wrapped[path]

    def _admit(self, context: grpc.aio.ServicerContext) -> bool:
        """Count the call in, to be released when it is done; False if over the limit."""
        if self.in_progress >= self.limit:
            return False
        self.in_progress += 1
        self._gauge.inc()
        context.add_done_callback(self._release)
        return True

    def _release(self, context: grpc.aio.ServicerContext) -> None:
        self.in_progress -= 1
        self._gauge.dec()

    async def _refuse(self, context: grpc.aio.ServicerContext) -> None:
        status = status_of(TooManyRequests(self.limit))
        assert status is not None
        await context.abort_with_status(rpc_status.to_status(status))

    def _coroutine(self, behaviour: Behaviour) -> Behaviour:
        async def coroutine(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if not self._admit(context):
                await self._refuse(context)
            return await behaviour(request, context)

        return coroutine

    def _generator(self, behaviour: Behaviour) -> Behaviour:
        async def generator(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if not self._admit(context):
                await self._refuse(context)
            async for response in behaviour(requests, context):
                yield response

        return generator


_HANDLER_ATTRS = {
    (False, False): "unary_unary",
    (False, True): "unary_stream",
    (True, False): "stream_unary",
    (True, True): "stream_stream",
}
