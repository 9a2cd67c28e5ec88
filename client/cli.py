"""The `bpfexec` command line.

Subcommands: `run` (locally, or on a server with `--server`, optionally on a
named state with `--state`), `disasm`, `asm`, `conformance-plugin`, and the
server-side ones registered by `bpfexec.client.cli_remote` (`serve`, `health`,
`state`).

Exit status: 0 on success, 3 when the program trapped (the result is still
printed), 2 on bad input or usage, with one line on stderr and no traceback.
Imports are deferred to the subcommand that needs them: `conformance-plugin`
is started once per test by conformance runners and must stay light.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import bpfexec

EXIT_OK = 0
EXIT_TRAP = 3
EXIT_USAGE = 2
EXIT_FAILED = 1


class UsageError(Exception):
    """Bad input or usage: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(EXIT_USAGE)


def parse_int(text: str) -> int:
    """A register value: decimal, 0x hex, 0o, 0b; negative means two's complement."""
    try:
        value = int(text, 0)
    except ValueError:
        raise UsageError(f"not an integer: {text!r}") from None
    if not -(1 << 63) <= value < 1 << 64:
        raise UsageError(f"{text} does not fit in 64 bits")
    return value & ((1 << 64) - 1)


def parse_fuel(text: str) -> int:
    """`--fuel`: a budget of instructions, never negative."""
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def parse_arg(text: str) -> int | bytes:
    """`--arg`: an integer for the next register, or `hex:BYTES` / `file:PATH` for a buffer."""
    if text.startswith("hex:"):
        digits = "".join(text[4:].split())
        try:
            return bytes.fromhex(digits)
        except ValueError:
            raise UsageError(f"--arg {text!r}: not hex bytes") from None
    if text.startswith("file:"):
        return _read_file(text[5:])
    return parse_int(text)


def _read_file(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None


def _load(path: str, limits: Any = None) -> Any:
    from bpfexec.vm.loader import load

    return load(_read_file(path), name=Path(path).name, limits=limits)


def _registry(specs: Sequence[str]) -> Any:
    from bpfexec.vm.helpers import HelperRegistry, import_registry

    registry = HelperRegistry()
    for spec in specs:
        try:
            registry.update(import_registry(spec))
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    return registry


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive count")
    return value


def print_result(result: dict[str, Any], as_json: bool) -> int:
    """Print a result (the dict form shared by local and remote runs); return the exit status."""
    if as_json:
        print(json.dumps(result))
    else:
        value = result["return_value"]
        print(
            "return_value: none (trapped)"
            if value is None
            else f"return_value: {value} ({value:#x})"
        )
        print(f"fuel_used: {result['fuel_used']}")
        for line in result["log"]:
            print(f"log: {line}")
        for n, buf in enumerate(result["buffers"]):
            print(f"buffer {n}: {buf}")
        if result["trap"]:
            trap = result["trap"]
            where = f"pc {trap['pc']} ({trap['instruction']})"
            if trap.get("function"):
                where += f" in {trap['function']}"
            if trap.get("location"):
                where += f", {trap['location']}"
            print(f"trap: {trap['kind']} at {where}: {trap['message']}")
        for name, contents in result.get("maps", {}).items():
            print(f"map {name} ({contents['type']}, {len(contents['entries'])} entries):")
            for entry in contents["entries"]:
                print(f"  {entry['key']}: {entry['value']}")
    return EXIT_TRAP if result["trap"] else EXIT_OK


_CONNECTION_FLAGS = ("token", "tls", "tls_ca", "tls_cert", "tls_key")  # of cli_remote


def _check_mode(args: argparse.Namespace) -> None:
    """Flags that do not apply to where the program runs are an error, not ignored."""
    if args.server:
        local = [flag for flag, given in (
            ("--helpers", args.helpers),
            ("--native-helpers", args.native_helpers),
            ("--trace", args.trace),
            ("--repeat", args.repeat != 1),
            ("--engine", args.engine is not None),
        ) if given]  # fmt: skip
        local += [_flag(name) for name in _limit_names() if getattr(args, name, None) is not None]
        if local:
            verb = "applies" if len(local) == 1 else "apply"
            raise UsageError(
                f"{', '.join(local)} {verb} only to a local run, not with --server (the "
                "server has its own helpers, engine and limits; offer helpers with "
                "--remote-helpers)"
            )
    elif args.state is not None:
        raise UsageError(
            "--state needs --server (named states live on a server; locally, --repeat N "
            "runs N times on the same maps)"
        )
    elif args.remote_helpers:
        raise UsageError("--remote-helpers needs --server (locally, use --helpers)")
    elif any(getattr(args, flag, None) for flag in _CONNECTION_FLAGS):
        raise UsageError("--token and --tls* need --server")


def _limit_names() -> list[str]:
    from dataclasses import fields

    from bpfexec.vm.limits import Limits

    return [knob.name for knob in fields(Limits)]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _local_limits(args: argparse.Namespace) -> Any:
    """The limits of a local run: `serve`'s flags and BPFEXEC_* variables."""
    from bpfexec.server.settings import limits_from_args

    try:
        return limits_from_args(args, os.environ)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def cmd_run(args: argparse.Namespace) -> int:
    _check_mode(args)
    if args.inputs is not None:
        given = [flag for flag, on in (
            ("--arg", args.arg), ("--repeat", args.repeat != 1), ("--dump-maps", args.dump_maps),
            ("--trace", args.trace),
        ) if on]  # fmt: skip
        if given:
            raise UsageError(f"--inputs takes the arguments from its file, not with {given[0]}")
        from bpfexec.client.cli_batch import run_inputs

        return run_inputs(args)
    run_args = [parse_arg(text) for text in args.arg]
    if args.server:
        from bpfexec.client.cli_remote import connection_options, run_remote

        code = _read_file(args.file)
        _warn_unset_arguments(args.file, args.function, len(run_args))
        remote = run_remote(
            code,
            Path(args.file).name,
            args.server,
            args.function,
            run_args,
            args.fuel,
            remote_helpers=args.remote_helpers,
            state=args.state,
            dump_maps=args.dump_maps,
            **connection_options(args),
        )
        return print_result(remote, args.json)
    from bpfexec.vm.machine import execute
    from bpfexec.vm.maps import MapSet

    limits = _local_limits(args)
    program = _load(args.file, limits)
    _warn_unset_arguments(program, args.function, len(run_args))
    trace = (lambda line: print(line, file=sys.stderr)) if args.trace else None
    helpers = _standard_helpers(args.helpers, args.native_helpers)
    # Shared by the --repeat runs, as BPF_PROG_TEST_RUN's.
    maps = MapSet(program.maps, init=program.map_init)
    for _ in range(args.repeat):
        result = execute(
            program,
            args.function,
            run_args,
            fuel=args.fuel,
            helpers=helpers,
            limits=limits,
            engine=args.engine or "interpreter",
            trace=trace,
            maps=maps,
        )
    shown = result.to_dict()
    if args.dump_maps:
        shown["maps"] = maps.dump()
    return print_result(shown, args.json)


def _warn_unset_arguments(program: Any, function: str | None, given: int) -> None:
    """Say on stderr when the function may read an argument register that no `--arg`
    sets (it would silently be 0). `program` is a loaded Program, or a path to load
    for the check alone: a file that does not load is left to the server to report."""
    from bpfexec.vm.errors import VmError
    from bpfexec.vm.interpreter import program_blocks
    from bpfexec.vm.liveness import arguments_read

    try:
        if isinstance(program, str):
            program = _load(program)
        fn = program.function(function)
        read = arguments_read(program, program_blocks(program), fn.pc)
    except (VmError, ValueError):
        return  # the run itself reports what is wrong
    unset = [f"r{n}" for n in sorted(read) if n > given]
    if not unset:
        return
    args = {0: "no --arg was", 1: "only 1 --arg was"}.get(given, f"only {given} --args were")
    it, is_ = ("it", "it is") if len(unset) == 1 else ("them", "they are")
    print(
        f"warning: {fn.name} may read {', '.join(unset)} before writing {it}, "
        f"but {args} given, so {is_} 0",
        file=sys.stderr,
    )


def _standard_helpers(specs: Sequence[str], native: Sequence[str] = ()) -> Any:
    """The user's helpers first, then the built-in standard set (if installed)."""
    from bpfexec.vm.helpers import HelperChain
    from bpfexec.vm.native import native_registry

    user = _registry(specs)
    for spec in native:
        try:
            user.update(native_registry(spec))
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    try:
        from bpfexec.vm.builtin_helpers import standard_helpers
    except ImportError:
        return user
    return HelperChain(user, standard_helpers())


def cmd_disasm(args: argparse.Namespace) -> int:
    from bpfexec.vm.disassembler import disassemble

    print(disassemble(_load(args.file)), end="")
    return EXIT_OK


def cmd_asm(args: argparse.Namespace) -> int:
    from bpfexec.vm.assembler import assemble
    from bpfexec.vm.isa import encode

    source = _read_file(args.file)
    try:
        text = source.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{args.file}: not UTF-8 text") from None
    assembled = assemble(text, name=Path(args.file).name)
    if assembled.helper_calls and any(ref.name for ref in assembled.helper_calls.values()):
        names = sorted({ref.name for ref in assembled.helper_calls.values() if ref.name})
        raise UsageError(
            f"{args.file}: raw bytecode cannot name helpers ({', '.join(names)}); "
            "call them by number"
        )
    out = args.output or str(Path(args.file).with_suffix(".bin"))
    try:
        Path(out).write_bytes(encode(assembled.instructions))
    except OSError as exc:
        raise UsageError(f"cannot write {out}: {exc.strerror or exc}") from None
    return EXIT_OK


def cmd_conformance_plugin(args: argparse.Namespace) -> int:
    """The plugin protocol of the shared BPF conformance runner.

    The program arrives hex-encoded on stdin; the optional argument is the
    initial memory in hex: r1 = its address, r2 = its length. r0 is printed in
    hex. The host functions are the ones the suite's tests call: helper 5
    returns its first argument, runtime function 0x2a (`call` with src 2)
    returns 0.
    """
    from bpfexec.vm.helpers import HelperRegistry
    from bpfexec.vm.loader import ELF_MAGIC, load
    from bpfexec.vm.machine import execute

    text = "".join(sys.stdin.read().split())
    try:
        code = bytes.fromhex(text)
        memory = bytes.fromhex("".join(args.memory.split())) if args.memory else b""
    except ValueError:
        raise UsageError("program and memory must be hex") from None
    helpers = HelperRegistry()
    helpers.register(lambda ctx, a, b, c, d, e: a, id=5, name="conformance_identity")
    helpers.register(lambda ctx, a, b, c, d, e: 0, id=0x2A, name="conformance_runtime")
    is_elf = code[:4] == ELF_MAGIC
    if is_elf != args.elf:
        raise UsageError("an ELF object needs --elf" if is_elf else "--elf given, but no ELF")
    program = load(code, name="<stdin>")
    result = execute(program, None, [memory, len(memory)], helpers=helpers, engine=args.engine)
    if result.trap:
        print(str(result.trap), file=sys.stderr)
        return EXIT_FAILED
    print(f"{result.return_value:x}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bpfexec", description="Run eBPF programs, locally or on a server.")
    parser.add_argument("--version", action="version", version=f"bpfexec {bpfexec.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run a function of an eBPF object, assembly or bytecode")
    run.add_argument("file", help="ELF object, assembly text or raw bytecode")
    run.add_argument("--function", help="function to run (default: the first exported one)")
    run.add_argument(
        "--arg",
        action="append",
        default=[],
        metavar="V",
        help="next argument register: an integer, or hex:BYTES / file:PATH for a buffer",
    )
    run.add_argument("--fuel", type=parse_fuel, help="fuel budget (instructions)")
    run.add_argument(
        "--engine",
        choices=["interpreter", "jit"],
        help="local runs: the engine (default: interpreter)",
    )
    run.add_argument(
        "--helpers",
        action="append",
        default=[],
        metavar="MODULE:ATTR",
        help="import a HelperRegistry (repeatable)",
    )
    run.add_argument(
        "--native-helpers",
        action="append",
        default=[],
        metavar="LIBRARY:SYMBOL[=NUMBER]",
        help="a C function of a shared library as a helper (repeatable; docs/native-helpers.md)",
    )
    run.add_argument("--json", action="store_true", help="print the result as one JSON object")
    run.add_argument(
        "--repeat", type=_positive, default=1, metavar="N",
        help="run N times with the same maps; print the last run",
    )  # fmt: skip
    run.add_argument(
        "--dump-maps", action="store_true", help="add the maps' contents to the result"
    )
    run.add_argument(
        "--inputs", metavar="FILE.jsonl",
        help="run once per line, each a JSON array of arguments as --arg takes them "
        "('-': standard input); print one JSON result a line, in order",
    )  # fmt: skip
    run.add_argument("--trace", action="store_true", help="trace every instruction on stderr")
    run.add_argument("--server", metavar="HOST:PORT", help="run on a bpfexec server")
    run.add_argument(
        "--state", metavar="NAME",
        help="with --server: run on the maps of this named state, kept by the server "
        "between runs (docs/states.md)",
    )  # fmt: skip
    run.add_argument(
        "--remote-helpers",
        action="append",
        default=[],
        metavar="MODULE:ATTR",
        help="with --server: answer these helpers from this process (repeatable)",
    )
    from bpfexec.server.settings import add_limit_arguments

    add_limit_arguments(run.add_argument_group("limits of a local run (as for serve)"))
    run.set_defaults(handler=cmd_run)

    disasm = sub.add_parser("disasm", help="print the disassembly of a program")
    disasm.add_argument("file")
    disasm.set_defaults(handler=cmd_disasm)

    asm = sub.add_parser("asm", help="assemble text into raw bytecode")
    asm.add_argument("file")
    asm.add_argument("-o", "--output", help="output file (default: FILE with .bin)")
    asm.set_defaults(handler=cmd_asm)

    _add_plugin_parser(sub)
    from bpfexec.client.cli_test_run import add_test_run_parser

    add_test_run_parser(sub)

    try:
        from bpfexec.client.cli_remote import (
            add_connection_arguments,
            add_health_parser,
            add_serve_parser,
            add_state_parser,
        )
    except ImportError:
        pass
    else:
        add_connection_arguments(run)  # with --server
        add_serve_parser(sub)
        add_health_parser(sub)
        add_state_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "conformance-plugin" in argv[1:]:
        # The conformance runner puts the memory argument before the plugin
        # options (`bpfexec MEMORY conformance-plugin --engine jit`).
        argv.remove("conformance-plugin")
        argv.insert(0, "conformance-plugin")
    # conformance-plugin: parse and run without building the server parsers.
    parser = build_parser() if argv[:1] != ["conformance-plugin"] else _plugin_parser()
    args = parser.parse_args(argv)
    from bpfexec.vm.errors import VmError

    try:
        return int(args.handler(args))
    except (UsageError, VmError) as exc:
        _error(args.command, "error", str(exc))
        return EXIT_FAILED if args.command == "conformance-plugin" else EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Whoever read the output stopped (`| head`): stop too, quietly, and keep the
        # interpreter's last flush of stdout from failing again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except Exception as exc:
        remote = sys.modules.get("bpfexec.client.errors")  # loaded only if a server was asked
        if remote is not None and isinstance(exc, remote.BpfexecError):
            _error(args.command, "error", str(exc))
            # A module or request beyond a server limit is bad input, as it is locally;
            # a server at its concurrency limit is not.
            bad_input = isinstance(exc, (remote.InvalidArgument, remote.NotFound)) or (
                isinstance(exc, remote.ResourceExhausted) and exc.reason == "LIMIT_EXCEEDED"
            )
            return EXIT_USAGE if bad_input else EXIT_FAILED
        # A bug of ours: still one line, never a traceback.
        if os.environ.get("BPFEXEC_DEBUG"):
            raise
        _error(args.command, "internal error", f"{type(exc).__name__}: {exc}")
        return EXIT_FAILED


def _error(command: str, kind: str, message: str) -> None:
    """One line on stderr, whatever the message holds (names from a file or a server)."""
    from bpfexec.vm.loader import printable

    print(f"bpfexec {command}: {kind}: {printable(message)}", file=sys.stderr)


def _plugin_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bpfexec")
    _add_plugin_parser(parser.add_subparsers(dest="command", required=True, parser_class=_Parser))
    return parser


def _add_plugin_parser(sub: Any) -> None:
    plugin = sub.add_parser(
        "conformance-plugin", help="plugin for the BPF conformance runner (program hex on stdin)"
    )
    plugin.add_argument("memory", nargs="?", default="", help="initial memory, hex")
    plugin.add_argument("--engine", default="interpreter", choices=["interpreter", "jit"])
    plugin.add_argument("--elf", action="store_true", help="stdin holds an ELF object")
    plugin.set_defaults(handler=cmd_conformance_plugin)


if __name__ == "__main__":
    # Run as `python -m`: through the package's module, the one the subcommands' modules
    # import (and raise UsageError from), not this `__main__` copy of it.
    from bpfexec.client.cli import main as package_main

    sys.exit(package_main())
