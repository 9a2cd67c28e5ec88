"""Packets per second of `bpfexec test-run`'s engine over a large capture, side by side.

    python bench/bench_test_run.py [--packets 1000000] [--repeat 3]

The capture (written once to a temporary pcap) mixes UDP, TCP, 802.1Q-tagged and
IPv6 frames. The program is `xdp_count` of tests/fixtures/packets/xdp_count.c
(parses Ethernet, a VLAN tag, IPv4 and UDP, counts protocols in an array map):
compiled with clang when present, else the committed object. The rows, each the
best of `--repeat` runs, capture reading always included:

- reading the capture alone: with libpcap in chunks (`bpfexec.client.capture_chunks`,
  what `test-run --engine jit` reads with when it wants no packet one by one), and
  packet by packet with dpkt (`bpfexec.client.captures`);
- the summary path of `test-run --engine jit` (no `--out`, no `--per-packet`):
  libpcap chunks into `run_packet_chunks`, verdicts counted, for `xdp_count` and
  for `xdp_pass` (`return XDP_PASS`: the path's own cost);
- `run_packets` over the dpkt reader, a `PacketResult` a packet (what `--out`,
  `--per-packet` and a server's TestRun take), on the JIT and on the interpreter
  (a tenth of the packets);
- `run_batch` of the seed's `example` on the JIT: the batch path's own overhead.

Goal (issue 20): one million packets a second through the JIT on one core,
capture reading included. The table is markdown.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from bpfexec.client.capture_chunks import LibpcapCapture, available
from bpfexec.client.captures import Packet, read_capture, write_capture
from bpfexec.vm import Program, load
from bpfexec.vm.batch import CHUNK, run_batch
from bpfexec.vm.maps import MapSet
from bpfexec.vm.packet_run import run_packet_chunks, run_packets

ROOT = Path(__file__).resolve().parents[1]
PACKETS = ROOT / "tests" / "fixtures" / "packets"
EXAMPLE = ROOT / "tests" / "fixtures" / "obj" / "example-O2.o"
PASS = b"r0 = 2\nexit\n"  # XDP_PASS, as assembly (a section is set below)


def frames() -> list[bytes]:
    mac = b"\x02\x00\x00\x00\x00\x01\x02\x11\x22\x33\x44\x55"
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 33, 0, 0, 64, 17, 0, b"\n\0\0\1", b"\n\0\0\2")
    udp = struct.pack("!HHHH", 4242, 53, 13, 0) + b"hello"
    tcp_ip = ip[:9] + b"\x06" + ip[10:]
    return [
        mac + b"\x08\x00" + ip + udp,
        mac + b"\x08\x00" + tcp_ip + bytes(21),
        mac + b"\x81\x00\x00\x05\x08\x00" + ip + udp,
        mac + b"\x86\xdd" + bytes(60),
    ]


def write(path: Path, count: int) -> None:
    kinds = frames()
    write_capture(path, 1, (Packet(kinds[n % 4], n * 1000) for n in range(count)))


def best(run: Callable[[], int], repeat: int) -> float:
    """Items a second: the best of `repeat` runs of `run` (which returns its count)."""
    rate = 0.0
    for _ in range(repeat):
        start = time.perf_counter()
        count = run()
        rate = max(rate, count / (time.perf_counter() - start))
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--packets", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        out = Path(temporary)
        capture = out / "mixed.pcap"
        write(capture, args.packets)
        small = out / "small.pcap"
        write(small, max(args.packets // 10, 1))
        source = PACKETS / "xdp_count.o"
        clang = shutil.which("clang")
        if clang is not None:
            source = out / "xdp_count.o"
            flags = ["-O2", "-g", "-target", "bpf", f"-I/usr/include/{_multiarch()}"]
            subprocess.run([clang, *flags, "-c", str(PACKETS / "xdp_count.c"), "-o", str(source)],
                           check=True)  # fmt: skip
        parsing = load(source.read_bytes(), "xdp_count.o")
        passing = _in_section(load(PASS), "xdp")
        example = load(EXAMPLE.read_bytes(), "example-O2.o")

        def packets(path: Path) -> Iterator[bytes]:
            with read_capture(path) as reader:
                for packet in reader:
                    yield packet.data

        def reading() -> int:
            return sum(1 for _ in packets(capture))

        def reading_chunks() -> int:
            with LibpcapCapture(capture) as reader:
                return sum(len(chunk) for chunk in reader.chunks(CHUNK))

        def summarizing(program: Program, function: str) -> Callable[[], int]:
            def go() -> int:
                maps = MapSet(program.maps)
                with LibpcapCapture(capture) as reader:
                    chunks = reader.chunks(CHUNK)
                    runs = run_packet_chunks(program, function, chunks, engine="jit", maps=maps)
                    return sum(sum(r.verdicts().values()) for r in runs)

            return go

        def running(program: Program, function: str, engine: str, path: Path) -> Callable[[], int]:
            def go() -> int:
                maps = MapSet(parsing.maps) if program is parsing else None
                results = run_packets(program, function, packets(path), engine=engine, maps=maps)
                return sum(1 for _ in results)

            return go

        def batch() -> int:
            inputs = ([n % 8, n] for n in range(args.packets))
            return sum(1 for _ in run_batch(example, "example", inputs, engine="jit"))

        rows = []
        if available():
            rows += [
                ("reading: libpcap, in chunks", best(reading_chunks, args.repeat)),
                ("xdp_count, JIT, summary", best(summarizing(parsing, "xdp_count"), args.repeat)),
                ("xdp_pass, JIT, summary", best(summarizing(passing, "xdp_pass"), args.repeat)),
            ]
        rows += [
            ("reading: dpkt, packet by packet", best(reading, args.repeat)),
            (
                "xdp_count, JIT, a PacketResult each",
                best(running(parsing, "xdp_count", "jit", capture), args.repeat),
            ),
            (
                "xdp_count, interpreter, a PacketResult each",
                best(running(parsing, "xdp_count", "interpreter", small), args.repeat),
            ),
            ("run_batch of example, JIT", best(batch, args.repeat)),
        ]
    print(f"{args.packets} packets (interpreter: {max(args.packets // 10, 1)})\n")
    print("| path | packets/s | µs a packet |")
    print("| --- | ---: | ---: |")
    for name, rate in rows:
        print(f"| {name} | {rate:,.0f} | {1e6 / rate:.2f} |")


def _in_section(program: Program, section: str) -> Program:
    functions = tuple(
        dataclasses.replace(fn, name="xdp_pass", section=section) for fn in program.functions
    )
    return dataclasses.replace(program, functions=functions)


def _multiarch() -> str:
    gcc = shutil.which("gcc")
    if gcc is None:
        return ""
    return subprocess.run([gcc, "-print-multiarch"], capture_output=True, text=True).stdout.strip()


if __name__ == "__main__":
    main()
