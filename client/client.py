"""`Client`: the Python client of a bpfexec server.

    with Client("localhost:50051") as bpf:
        module = bpf.load(Path("prog.o").read_bytes())
        result = bpf.execute(module, "foo", args=[7, b"buffer"])
        print(result.return_value, result.trap)

Blocking, thread-safe (one client can be shared by threads; calls run
concurrently over one HTTP/2 connection). Failures raise `client.errors`
exceptions carrying the server's message; a program that traps is a `Result`
with `trap` set, not an exception. This module depends only on the generated
stubs in `client._pb`, never on the server or the VM.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import TracebackType
from typing import TypeVar

import grpc

from client._pb.bpfexec.v1 import executor_pb2 as pb
from client._pb.bpfexec.v1 import executor_pb2_grpc as pb_grpc
from client.errors import InvalidArgument, NotFound, from_rpc_error
from client.types import Helper, Module, Result

__all__ = ["Client"]

MASK64 = (1 << 64) - 1
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20  # the server's default; gRPC's own is only 4 MiB

Arg = int | bytes | bytearray | memoryview
T = TypeVar("T")
_INVALID = grpc.StatusCode.INVALID_ARGUMENT  # checked here, reported like the server would


class Client:
    """A connection to one bpfexec server (or a load balancer in front of several).

    `target` is a gRPC target such as `"localhost:50051"` or `"dns:///bpf.internal:50051"`.
    `timeout` is the default deadline of every call in seconds (None: no deadline).
    `credentials` makes the channel secure; `options` are extra gRPC channel options.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        options: Sequence[tuple[str, object]] = (),
    ) -> None:
        channel_options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            *options,
        ]
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=channel_options)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=channel_options)
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
        self._call(self._stub.DeleteModule, pb.DeleteModuleRequest(id=_module_id(module)))

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
    ) -> Result:
        """Run `function` (default: the first exported one) of a module.

        Each argument goes in r1..r5: an int is a register value (negative ints
        in two's complement), bytes are an argument buffer whose address goes in
        the register and whose final contents come back in `Result.buffers`.
        `fuel` caps the instructions run (None: the server's default);
        `timeout` (default: the client's) bounds the execution itself.

        If `module` is a Module from `load()` and the server no longer has it,
        it is uploaded again and the execution retried once.
        """
        request = pb.ExecuteRequest(
            module_id=_module_id(module),
            function=function or "",
            args=[_argument(i, arg) for i, arg in enumerate(args, start=1)],
            fuel=fuel or 0,
        )
        try:
            response = self._call(self._stub.Execute, request, timeout)
        except NotFound:
            if not isinstance(module, Module) or not module.code:
                raise
            self.load(module.code, module.name)
            response = self._call(self._stub.Execute, request, timeout)
        return Result.from_pb(response)

    def _call(self, method: Callable[..., T], request: object, timeout: float | None = None) -> T:
        try:
            return method(request, timeout=self.timeout if timeout is None else timeout)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None


def _module_id(module: str | Module) -> str:
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
