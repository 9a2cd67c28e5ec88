"""Who may call the server: TLS credentials and bearer tokens, and the caller's tenant.

- `server_credentials(settings)`: TLS (`--tls-cert`, `--tls-key`), mutual TLS
  when `--tls-client-ca` is set; None for a plaintext port.
- `Authenticator`: the tokens of `--auth-tokens-file`, one per line, either
  `TOKEN` (tenant `default`) or `TENANT:TOKEN` (the tenant name cannot contain
  `:`, the token can). Blank lines and lines starting with `#` are skipped.
  A presented token is compared with every accepted one, each through a
  sha256 digest and `hmac.compare_digest`, so the time taken says nothing
  about how close a guess was, nor which token it resembled.
- `AuthInterceptor`: `UNAUTHENTICATED` for a call without a valid
  `authorization: Bearer <token>` metadata entry; health checks and
  reflection stay open so probes and tools need no secret.

Tokens never leave this module: not in a message, a log line or a metric.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc

from server.metrics import Metrics
from server.settings import Settings

DEFAULT_TENANT = "default"
OPEN_SERVICES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
_SCHEME = "bearer "


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials for the gRPC port as `settings` asks; None: plaintext."""
    if not settings.tls_cert:
        return None
    key = Path(settings.tls_key).read_bytes()
    chain = Path(settings.tls_cert).read_bytes()
    client_ca = Path(settings.tls_client_ca).read_bytes() if settings.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


class Authenticator:
    """The accepted tokens and their tenants."""

    def __init__(self, entries: Sequence[tuple[str, str]]) -> None:
        if not entries:
            raise ValueError("no tokens given: authentication would refuse every call")
        self._digests = [(tenant, _digest(token)) for tenant, token in entries]

    @classmethod
    def from_file(cls, path: str | Path) -> Authenticator:
        """Tokens from a file (see the module docstring); ValueError names the bad line."""
        entries = []
        text = Path(path).read_text()
        for number, line in enumerate(text.splitlines(), start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            tenant, colon, token = line.partition(":")
            if not colon:
                tenant, token = DEFAULT_TENANT, line
            if not tenant.strip() or not token.strip():
                raise ValueError(f"{path}:{number}: expected TOKEN or TENANT:TOKEN")
            entries.append((tenant.strip(), token.strip()))
        if not entries:
            raise ValueError(f"{path}: no tokens (one per line, TOKEN or TENANT:TOKEN)")
        return cls(entries)

    def tenant(self, metadata: Sequence[tuple[str, Any]] | None) -> str | None:
        """The tenant of the call's bearer token; None if it has no valid one."""
        presented = bearer_token(metadata)
        if presented is None:
            return None
        digest = _digest(presented)
        found = None
        for tenant, accepted in self._digests:  # every entry, match or not: constant time
            if hmac.compare_digest(digest, accepted) and found is None:
                found = tenant
        return found

    def tenant_of(self, context: grpc.aio.ServicerContext) -> str:
        """The caller's tenant, for the servicer (the interceptor has let only valid calls in)."""
        return self.tenant(context.invocation_metadata()) or ""

    def interceptor(self, metrics: Metrics) -> grpc.aio.ServerInterceptor:
        return AuthInterceptor(self, metrics)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without a valid bearer token, except to `OPEN_SERVICES`."""

    def __init__(self, authenticator: Authenticator, metrics: Metrics) -> None:
        self._authenticator = authenticator
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_SERVICES):
            return handler
        metadata = handler_call_details.invocation_metadata
        if self._authenticator.tenant(metadata) is not None:
            return handler
        self._metrics.auth_failures.inc()
        reason = (
            "missing `authorization: Bearer <token>` metadata"
            if bearer_token(metadata) is None
            else "the bearer token is not accepted by this server"
        )
        return _refusal(handler, reason)


def bearer_token(metadata: Sequence[tuple[str, Any]] | None) -> str | None:
    """The token of the `authorization: Bearer <token>` entry, if any."""
    for key, value in metadata or ():
        if key.lower() == "authorization":
            text = value.decode() if isinstance(value, bytes) else str(value)
            if text[: len(_SCHEME)].lower() == _SCHEME and text[len(_SCHEME) :].strip():
                return text[len(_SCHEME) :].strip()
    return None


def _digest(token: str) -> bytes:
    # Equal-length digests: compare_digest then leaks not even the token's length.
    return hashlib.sha256(token.encode()).digest()


def _refusal(handler: grpc.RpcMethodHandler, reason: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that answers UNAUTHENTICATED."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"unauthenticated: {reason}")

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(  # type: ignore[no-any-return]
        refuse,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
