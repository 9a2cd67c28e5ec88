"""The server-facing parts of the `bpfexec` command line.

- `bpfexec serve [--host] [--port] [--metrics-port] [--workers N] [--helpers M:A]... [limits]`:
  every flag comes from `bpfexec.server.settings` and can also be set through its
  `BPFEXEC_*` environment variable; `--workers` above 1 runs `bpfexec.server.workers`.
- `bpfexec health --server HOST:PORT [--service NAME]`: exit 0 when the server
  answers SERVING, 1 otherwise, with one line on stdout or stderr; for probes.
- `add_connection_arguments(parser)`: `--token` (or `BPFEXEC_TOKEN`, which
  keeps the secret out of the process list), `--tls`, `--tls-ca`,
  `--tls-cert`, `--tls-key`, shared by `health` and `run --server`.
- `run_remote(...)`: what `bpfexec run FILE --server HOST:PORT [--state NAME]`
  does; it returns the same dict as a local run so `bpfexec.client.cli` prints
  both alike.
- `bpfexec state list|show|delete --server HOST:PORT [--module FILE|ID]`: the
  caller's named states on a server (docs/states.md).

`bpfexec.client.cli` owns the parser and registers these subcommands. The server is
imported only by `serve`, so the client side stays light.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bpfexec.client.client import (
    Client,
    PathLike,
    batch_input_index,
    bearer_metadata,
    channel_credentials,
)
from bpfexec.client.errors import InvalidArgument
from bpfexec.client.types import State

EXIT_OK = 0
EXIT_UNHEALTHY = 1
EXIT_USAGE = 2
_INVALID = grpc.StatusCode.INVALID_ARGUMENT


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """`bpfexec serve`: flags generated from `bpfexec.server.settings.Settings`."""
    from bpfexec.server.settings import add_arguments

    parser: argparse.ArgumentParser = subparsers.add_parser(
        "serve",
        help="run the bpfexec gRPC server",
        description="Run the bpfexec gRPC server. Every flag can also be set through the "
        "environment variable named after it (--max-fuel: BPFEXEC_MAX_FUEL); "
        "a flag wins over the environment.",
    )
    add_arguments(parser)
    parser.set_defaults(handler=serve_command)
    return parser


def serve_command(namespace: argparse.Namespace) -> int:
    """Run the server until SIGTERM or SIGINT."""
    from bpfexec.server.app import serve
    from bpfexec.server.registry import HelperConfigError
    from bpfexec.server.request_log import configure_logging
    from bpfexec.server.settings import Settings

    try:
        settings = Settings.from_args(namespace, os.environ)
        configure_logging(settings.log_format)
        if settings.workers > 1:
            from bpfexec.server.workers import serve_workers

            return serve_workers(settings)
        asyncio.run(serve(settings))
    except (ValueError, HelperConfigError, OSError) as exc:
        print(f"bpfexec serve: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def add_health_parser(subparsers: Any) -> argparse.ArgumentParser:
    """`bpfexec health`: a probe for container health checks and orchestrators."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "health", help="check that a bpfexec server is SERVING (exit 0) or not (exit 1)"
    )
    parser.add_argument(
        "--server",
        default=f"localhost:{os.environ.get('BPFEXEC_PORT', '50051')}",
        metavar="HOST:PORT",
        help="server to check (default: localhost and $BPFEXEC_PORT or 50051)",
    )
    parser.add_argument(
        "--service", default="", help="service to check (default: the whole server)"
    )
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait (default 5)")
    add_connection_arguments(parser)
    parser.set_defaults(handler=health_command)
    return parser


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """How to reach a server: bearer token and TLS (see `connection_options`)."""
    parser.add_argument(
        "--token", help="bearer token sent to the server (default: $BPFEXEC_TOKEN, safer)"
    )
    parser.add_argument("--tls", action="store_true", help="connect over TLS (system CAs)")
    parser.add_argument("--tls-ca", metavar="PEM", help="connect over TLS trusting this CA file")
    parser.add_argument("--tls-cert", metavar="PEM", help="client certificate for mutual TLS")
    parser.add_argument("--tls-key", metavar="PEM", help="client private key for mutual TLS")


def connection_options(namespace: argparse.Namespace) -> dict[str, Any]:
    """`Client` keyword arguments from the flags of `add_connection_arguments`."""
    return {
        "token": namespace.token or os.environ.get("BPFEXEC_TOKEN") or None,
        "tls": namespace.tls_ca or namespace.tls,
        "tls_cert": namespace.tls_cert,
        "tls_key": namespace.tls_key,
    }


def health_command(namespace: argparse.Namespace) -> int:
    try:
        options = connection_options(namespace)
        status = check_health(namespace.server, namespace.service, namespace.timeout, **options)
    except InvalidArgument as exc:
        print(f"bpfexec health: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if status == "SERVING":
        print(f"{namespace.server}: SERVING")
        return EXIT_OK
    print(f"{namespace.server}: {status}", file=sys.stderr)
    return EXIT_UNHEALTHY


def check_health(
    target: str,
    service: str = "",
    timeout: float = 5.0,
    *,
    token: str | None = None,
    tls: bool | PathLike = False,
    tls_cert: PathLike | None = None,
    tls_key: PathLike | None = None,
) -> str:
    """The server's serving status name (`SERVING`, `NOT_SERVING`...), or why it has none.

    Health needs no token; one given is sent anyway (a proxy in front may want it).
    """
    credentials = channel_credentials(tls, tls_cert, tls_key)
    channel = (
        grpc.insecure_channel(target)
        if credentials is None
        else grpc.secure_channel(target, credentials)
    )
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(
                health_pb2.HealthCheckRequest(service=service),
                timeout=timeout,
                metadata=bearer_metadata(token),
            )
        except grpc.RpcError as error:
            code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
            return f"unhealthy ({code.name})"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


def run_remote(
    code: bytes,
    name: str,
    server: str,
    function: str | None,
    args: Sequence[int | bytes],
    fuel: int | None,
    *,
    timeout: float | None = None,
    remote_helpers: Sequence[str] = (),
    state: str | None = None,
    dump_maps: bool = False,
    token: str | None = None,
    tls: bool | PathLike = False,
    tls_cert: PathLike | None = None,
    tls_key: PathLike | None = None,
) -> dict[str, Any]:
    """Upload `code` to `server`, run `function`, return the result as a local run's dict.

    `remote_helpers` are `MODULE:ATTR` specs of `bpfexec.vm.HelperRegistry`s whose
    helpers this process answers over an ExecuteStream (by number and name);
    `state` names the server's state to run on, `dump_maps` adds the maps after
    the run; `token` and the TLS arguments are those of `Client`.
    Raises `bpfexec.client.errors.BpfexecError` subclasses with the server's message.
    """
    helpers = _remote_registry(remote_helpers) if remote_helpers else None
    with Client(
        server, timeout=timeout, token=token, tls=tls, tls_cert=tls_cert, tls_key=tls_key
    ) as client:
        module = client.load(code, name)
        result = client.execute(
            module, function, args, fuel, helpers=helpers, state=state, dump_maps=dump_maps
        )
        return result.to_dict()


def remote_batch(
    code: bytes,
    name: str,
    server: str,
    function: str | None,
    inputs: Iterable[tuple[int, Sequence[int | bytes]]],
    fuel: int | None,
    *,
    state: str | None = None,
    remote_helpers: Sequence[str] = (),
    token: str | None = None,
    tls: bool | PathLike = False,
    tls_cert: PathLike | None = None,
    tls_key: PathLike | None = None,
) -> Iterator[tuple[int, Sequence[int | bytes], dict[str, Any]]]:
    """Upload `code` once and run `function` on each (line, arguments) of `inputs`,
    in order, over one ExecuteBatch stream: (line, arguments, the result as a local
    run's dict), this process answering the helpers of `remote_helpers` (MODULE:ATTR
    registries). Arguments the server refuses raise `InputError` naming their line."""
    helpers = _remote_registry(remote_helpers) if remote_helpers else None
    given: deque[tuple[int, Sequence[int | bytes]]] = deque()  # sent, not yet answered
    answered = 0

    def arguments() -> Iterator[Sequence[int | bytes]]:  # on gRPC's sending thread
        for line, args in inputs:
            given.append((line, args))
            yield args

    with Client(server, token=token, tls=tls, tls_cert=tls_cert, tls_key=tls_key) as client:
        module = client.load(code, name)
        try:
            batch = client.execute_batch(
                module, function, arguments(), fuel, state=state, helpers=helpers
            )
            for result in batch:
                line, args = given.popleft()
                answered += 1
                yield line, args, result.to_dict()
        except InvalidArgument as exc:
            index = batch_input_index(exc)
            if index is None:
                raise
            line = given[index - answered][0]
            raise InputError(line, str(exc).removeprefix(f"input {index + 1}: ")) from None


class InputError(Exception):
    """The server refused the arguments of input line `line`."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line


def add_state_parser(subparsers: Any) -> argparse.ArgumentParser:
    """`bpfexec state list|show|delete`: the named states of a server (docs/states.md)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "state", help="list, show or delete the named states of a bpfexec server"
    )
    actions = parser.add_subparsers(dest="action", required=True, parser_class=type(parser))
    listing = actions.add_parser("list", help="the caller's states (NAME MODULE BYTES MAPS)")
    show = actions.add_parser("show", help="a state's maps and their entries")
    delete = actions.add_parser("delete", help="forget a state and its maps")
    for action in (show, delete):
        action.add_argument("name", help="the state's name")
    for action in (listing, show, delete):
        action.add_argument(
            "--module",
            metavar="FILE|ID",
            required=action is not listing,
            help="the state's module: its file (uploaded to learn its id) or its sha256: id"
            + (" (list: only this module's states)" if action is listing else ""),
        )
        action.add_argument("--server", required=True, metavar="HOST:PORT", help="the server")
        action.add_argument("--json", action="store_true", help="print JSON")
        action.add_argument("--timeout", type=float, default=30.0, help="seconds (default 30)")
        add_connection_arguments(action)
        action.set_defaults(handler=state_command)
    show.add_argument("--map", help="only this map")
    return parser


def state_command(namespace: argparse.Namespace) -> int:
    """Raises `bpfexec.client.errors.BpfexecError` with the server's message (the CLI
    prints it as one line)."""
    with Client(
        namespace.server, timeout=namespace.timeout, **connection_options(namespace)
    ) as client:
        module = _module_id(client, namespace.module) if namespace.module else None
        if namespace.action == "list":
            states = client.list_states(module)
            if namespace.json:
                print(json.dumps([_state_dict(state) for state in states]))
            for state in states if not namespace.json else ():
                maps = ",".join(state.map_names) or "-"
                print(f"{state.name}\t{state.module_id}\t{state.map_bytes}\t{maps}")
        elif namespace.action == "show":
            assert module is not None  # --module is required
            state = client.get_state(module, namespace.name, namespace.map)
            if namespace.json:
                print(json.dumps(_state_dict(state)))
            for name, dump in state.maps.items() if not namespace.json else ():
                print(f"map {name} ({dump.type}, {len(dump.entries)} entries):")
                for key, value in dump.entries:
                    print(f"  {key.hex()}: {value.hex()}")
        else:
            assert module is not None
            client.delete_state(module, namespace.name)
    return EXIT_OK


def _module_id(client: Client, module: str) -> str:
    """A module id as given, or the id of the file `module` names (uploaded once)."""
    if module.startswith("sha256:"):
        return module
    try:
        code = Path(module).read_bytes()
    except OSError as exc:
        raise InvalidArgument(
            f"--module {module}: cannot read it ({exc.strerror or exc}); give a file or a "
            "sha256: module id",
            _INVALID,
        ) from None
    return client.load(code, Path(module).name).id


def _state_dict(state: State) -> dict[str, Any]:
    return {
        "name": state.name,
        "module_id": state.module_id,
        "map_bytes": state.map_bytes,
        "map_names": list(state.map_names),
        "maps": {name: dump.to_dict() for name, dump in state.maps.items()},
    }


def _remote_registry(specs: Sequence[str]) -> Any:
    """One `bpfexec.vm.HelperRegistry` merging the registries `specs` name (a clash is an error)."""
    from bpfexec.vm.helpers import HelperRegistry, import_registry

    merged = HelperRegistry()
    try:
        for spec in specs:
            merged.update(import_registry(spec))
    except ValueError as exc:
        raise InvalidArgument(
            f"--remote-helpers: {exc}", grpc.StatusCode.INVALID_ARGUMENT
        ) from None
    return merged
