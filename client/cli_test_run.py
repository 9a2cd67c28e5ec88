"""`bpfexec test-run`: a packet program over the packets of a capture, with no kernel.

    bpfexec test-run FILE --program NAME --pcap IN.pcap [--out OUT.pcap]
        [--per-packet] [--dump-maps] [--repeat N] [--engine E] [--json]
        [--server HOST:PORT [--state NAME] [--token T] [--tls...]]

`NAME` is a function or a section name (`xdp`, `tc`, ...); the section gives
the program's type (`bpfexec.vm.program_types`), and each packet runs as the
kernel's BPF_PROG_TEST_RUN would run it (`bpfexec.vm.packet_run`), the maps
shared by the whole capture. `--json` prints one object: `program_type`,
`packets`, `verdicts` (counts by the kernel's names), `duration_ns` (the
runs' total), `maps` with `--dump-maps`, and with `--per-packet` `results`,
one object a packet in capture order (`retval`, `verdict`, `ctx_out`,
`len`, `fuel_used`; `trap`, `redirect`, `log` when there are). Without it, a
table. `--out` writes each packet's data after its run, with its timestamp,
one record per input packet: pcapng if the name ends in `.pcapng`, else pcap.

With `--server`, the object is uploaded and the packets streamed to the server's
`TestRun` RPC as they are read (`bpfexec.client.Client.test_run`); the output is
the same (`duration_ns` sums the server's durations). The server chooses its
engine, so `--engine` is refused there; `--state` runs on a named state's maps.

Exit status: 0, or 3 when a packet's run trapped (the summary is still
printed), 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from bpfexec.client.cli import (
    _CONNECTION_FLAGS,
    EXIT_OK,
    EXIT_TRAP,
    UsageError,
    _positive,
    parse_fuel,
)
from bpfexec.client.cli_batch import Progress

DLT_EN10MB = 1  # Ethernet: what XDP, tc and socket programs see


def add_test_run_parser(sub: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        "test-run",
        help="run an XDP, tc or socket-filter program over a pcap, as BPF_PROG_TEST_RUN would",
    )
    parser.add_argument("file", help="ELF object (libbpf-style)")
    parser.add_argument(
        "--program", required=True, metavar="NAME", help="function or section name (xdp, tc, ...)"
    )
    parser.add_argument("--pcap", required=True, metavar="IN.pcap", help="pcap or pcapng input")
    parser.add_argument(
        "--out", metavar="OUT.pcap", help="write the packets after the run (.pcapng: pcapng)"
    )
    parser.add_argument("--per-packet", action="store_true", help="add each packet's result")
    parser.add_argument("--dump-maps", action="store_true", help="add the maps after the run")
    parser.add_argument(
        "--repeat", type=_positive, default=1, metavar="N",
        help="run each packet N times (the maps going on); report the last run",
    )  # fmt: skip
    parser.add_argument(
        "--engine", choices=["interpreter", "jit"], help="local runs only; default: interpreter"
    )
    parser.add_argument("--fuel", type=parse_fuel, help="fuel budget of each packet's run")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--server", metavar="HOST:PORT", help="run on a bpfexec server")
    parser.add_argument(
        "--state", metavar="NAME",
        help="with --server: run on the maps of this named state (docs/states.md)",
    )  # fmt: skip
    try:
        from bpfexec.client.cli_remote import add_connection_arguments
    except ImportError:  # no gRPC: local runs only
        pass
    else:
        add_connection_arguments(parser)  # with --server
    parser.set_defaults(handler=cmd_test_run)
    return parser


def _check_mode(args: argparse.Namespace) -> None:
    """Flags that do not apply to where the program runs are an error, not ignored."""
    if args.server:
        if args.engine is not None:
            raise UsageError(
                "--engine applies only to a local run, not with --server (the server "
                "chooses its engine)"
            )
    elif args.state is not None:
        raise UsageError("--state needs --server (named states live on a server)")
    elif any(getattr(args, flag, None) for flag in _CONNECTION_FLAGS):
        raise UsageError("--token and --tls* need --server")


class _Outcome(Protocol):
    """What the command reads of a packet's result, local or remote."""

    @property
    def verdict(self) -> str: ...

    @property
    def data(self) -> bytes: ...

    @property
    def duration_ns(self) -> int: ...

    @property
    def trap(self) -> object: ...

    def to_dict(self) -> dict[str, object]: ...


class _Run(Protocol):
    """A test run, local or on a server."""

    def start(self, packets: Iterator[bytes], check: Callable[[str], None]) -> str:
        """Start the run over `packets` once `check(program_type)` has passed; the type."""

    def results(self) -> Iterator[_Outcome]: ...

    def maps(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


class _LocalRun:
    """`bpfexec.vm.packet_run.run_packets` in this process, on fresh maps."""

    def __init__(self, args: argparse.Namespace) -> None:
        from bpfexec.client.cli import _load
        from bpfexec.vm.maps import MapSet

        self._args = args
        self._program = _load(args.file)
        self._maps = MapSet(self._program.maps, init=self._program.map_init)
        self._runs: Iterator[_Outcome] = iter(())

    def start(self, packets: Iterator[bytes], check: Callable[[str], None]) -> str:
        from bpfexec.vm.context_access import context_type
        from bpfexec.vm.packet_run import run_packets

        args = self._args
        kind: str = context_type(self._program, args.program).value
        check(kind)
        self._runs = run_packets(
            self._program, args.program, packets, fuel=args.fuel, engine=args.engine or
            "interpreter", maps=self._maps, repeat=args.repeat,
        )  # fmt: skip
        return kind

    def results(self) -> Iterator[_Outcome]:
        from bpfexec.vm.packet_run import PacketError

        try:
            yield from self._runs
        except PacketError as exc:
            raise UsageError(f"--pcap {self._args.pcap}: {exc}") from None

    def maps(self) -> dict[str, Any]:
        return self._maps.dump()

    def close(self) -> None:
        pass


class _RemoteRun:
    """The server's `TestRun`: the object uploaded, the packets streamed as they are read."""

    def __init__(self, args: argparse.Namespace) -> None:
        from bpfexec.client.cli import _read_file
        from bpfexec.client.cli_remote import connection_options
        from bpfexec.client.client import Client

        self._args = args
        code = _read_file(args.file)
        self._client = Client(args.server, **connection_options(args))
        try:
            self._module = self._client.load(code, Path(args.file).name)
        except BaseException:
            self._client.close()
            raise
        self._run: Any = None
        # The packets are read (on gRPC's sending thread) only once the server has said
        # the program's type and the capture's link type suits it.
        self._checked = threading.Event()
        self._refused = False

    def start(self, packets: Iterator[bytes], check: Callable[[str], None]) -> str:
        def checked() -> Iterator[bytes]:
            self._checked.wait()
            if not self._refused:
                yield from packets

        args = self._args
        self._run = self._client.test_run(
            self._module, args.program, checked(), fuel=args.fuel, state=args.state,
            repeat=args.repeat, dump_maps=args.dump_maps,
        )  # fmt: skip
        try:
            kind: str = self._run.start()
            check(kind)
        except BaseException:
            self._refused = True
            raise
        finally:
            self._checked.set()
        return kind

    def results(self) -> Iterator[_Outcome]:
        from bpfexec.client.client import packet_index
        from bpfexec.client.errors import InvalidArgument

        try:
            yield from self._run
        except InvalidArgument as exc:
            if packet_index(exc) is None:
                raise
            raise UsageError(f"--pcap {self._args.pcap}: {exc}") from None

    def maps(self) -> dict[str, Any]:
        dumped = self._run.maps or {}
        return {name: dump.to_dict() for name, dump in dumped.items()}

    def close(self) -> None:
        self._refused = True
        self._checked.set()
        if self._run is not None:
            self._run.close()
        self._client.close()


def _natively(args: argparse.Namespace) -> bool:
    """Whether the run can read its capture in chunks with libpcap and count verdicts
    without a Python object a packet: a local run on the JIT that wants no packet
    one by one (no `--out`, no `--per-packet`)."""
    if args.server or args.engine != "jit" or args.out or args.per_packet:
        return False
    from bpfexec.client.capture_chunks import available

    return available()


def cmd_test_run(args: argparse.Namespace) -> int:
    from bpfexec.client.captures import CaptureError, Packet, read_capture, write_capture

    _check_mode(args)
    if _natively(args):
        return _summarize(args, *_count_natively(args))
    runner: _Run = _RemoteRun(args) if args.server else _LocalRun(args)
    verdicts: Counter[str] = Counter()
    results: list[dict[str, object]] = []
    duration = 0
    trapped = False
    try:
        with read_capture(args.pcap) as capture:

            def check(kind: str) -> None:
                if kind != "syscall" and capture.link_type != DLT_EN10MB:
                    raise UsageError(
                        f"--pcap {args.pcap}: link type {capture.link_type} is not Ethernet "
                        f"({DLT_EN10MB}), which {kind} programs see"
                    )

            stamps: deque[Packet] = deque()  # the packets running, for their timestamps

            def packets() -> Iterator[bytes]:
                for packet in capture:
                    stamps.append(packet)
                    yield packet.data

            kind = runner.start(packets(), check)
            progress = Progress("packets") if sys.stderr.isatty() else None

            def outputs() -> Iterator[Packet]:
                nonlocal duration, trapped
                for result in runner.results():
                    verdicts[result.verdict] += 1
                    duration += result.duration_ns
                    trapped = trapped or result.trap is not None
                    if args.per_packet:
                        results.append(result.to_dict())
                    if progress is not None:
                        progress.step()
                    given = stamps.popleft()
                    yield Packet(result.data, given.timestamp_ns, given.interface)
                if progress is not None:
                    progress.done()

            if args.out:
                write_capture(args.out, capture.link_type, outputs())
            else:
                for _ in outputs():
                    pass
            dumped = runner.maps() if args.dump_maps else None
    except CaptureError as exc:
        raise UsageError(str(exc)) from None
    finally:
        runner.close()
    summary = _summary(kind, verdicts, duration, dumped)
    if args.per_packet:
        summary["results"] = results
    return _summarize(args, summary, trapped)


def _summary(
    kind: str, verdicts: Counter[str], duration: int, maps: dict[str, Any] | None
) -> dict[str, object]:
    """The JSON object of a run, without `results`."""
    summary: dict[str, object] = {
        "program_type": kind,
        "packets": sum(verdicts.values()),
        "verdicts": dict(verdicts),
        "duration_ns": duration,
    }
    if maps is not None:
        summary["maps"] = maps
    return summary


def _summarize(args: argparse.Namespace, summary: dict[str, object], trapped: bool) -> int:
    """Print the summary as asked; the exit status."""
    if args.json:
        print(json.dumps(summary))
    else:
        _print_table(args.program, summary)
    return EXIT_TRAP if trapped else EXIT_OK


def _count_natively(args: argparse.Namespace) -> tuple[dict[str, object], bool]:
    """The summary of a local run on the JIT, its capture read by libpcap in chunks
    (`bpfexec.client.capture_chunks`), each run in native code
    (`bpfexec.vm.packet_run.run_packet_chunks`); and whether a packet's run trapped."""
    from bpfexec.client.capture_chunks import LibpcapCapture
    from bpfexec.client.captures import CaptureError
    from bpfexec.client.cli import _load
    from bpfexec.vm.batch import CHUNK
    from bpfexec.vm.context_access import context_type
    from bpfexec.vm.maps import MapSet
    from bpfexec.vm.packet_run import PacketError, run_packet_chunks

    program = _load(args.file)
    maps = MapSet(program.maps, init=program.map_init)
    kind: str = context_type(program, args.program).value
    verdicts: Counter[str] = Counter()
    duration = 0
    trapped = False
    progress = Progress("packets") if sys.stderr.isatty() else None
    try:
        with LibpcapCapture(args.pcap) as capture:
            if kind != "syscall" and capture.link_type != DLT_EN10MB:
                raise UsageError(
                    f"--pcap {args.pcap}: link type {capture.link_type} is not Ethernet "
                    f"({DLT_EN10MB}), which {kind} programs see"
                )
            chunks = capture.chunks(CHUNK)
            for runs in run_packet_chunks(
                program, args.program, chunks, fuel=args.fuel, engine="jit", maps=maps,
                repeat=args.repeat,
            ):  # fmt: skip
                verdicts += runs.verdicts()
                duration += runs.duration_ns
                trapped = trapped or runs.trapped
                if progress is not None:
                    progress.step(runs.count)
    except CaptureError as exc:
        raise UsageError(str(exc)) from None
    except PacketError as exc:
        raise UsageError(f"--pcap {args.pcap}: {exc}") from None
    if progress is not None:
        progress.done()
    return _summary(kind, verdicts, duration, maps.dump() if args.dump_maps else None), trapped


def _print_table(name: str, summary: dict[str, Any]) -> None:
    count = summary["packets"]
    mean = summary["duration_ns"] / count if count else 0
    print(f"{name} ({summary['program_type']}): {count} packets, {mean:,.0f} ns a packet")
    print(f"{'verdict':<16} {'packets':>10}")
    for verdict, n in sorted(summary["verdicts"].items(), key=lambda item: -item[1]):
        print(f"{verdict:<16} {n:>10}")
    for index, result in enumerate(summary.get("results", []), start=1):
        extra = f" trap {result['trap']['kind']}" if "trap" in result else ""
        print(f"packet {index}: {result['verdict']} len {result['len']} {result['ctx_out']}{extra}")
    for map_name, contents in summary.get("maps", {}).items():
        print(f"map {map_name} ({contents['type']}, {len(contents['entries'])} entries):")
        for entry in contents["entries"]:
            print(f"  {entry['key']}: {entry['value']}")
