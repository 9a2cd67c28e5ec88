"""`bpfexec test-run` (client/cli_test_run.py): the installed command over real capture
files, its JSON and table, --out captures, and its one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CompileDirectory
from test_cli import bpfexec, one_line_error
from test_packet_run import ethernet, tcp, udp

from bpfexec.client.captures import Packet, read_capture, write_capture

FIXTURES = Path(__file__).parent / "fixtures" / "packets"


@pytest.fixture(scope="module")
def objects(libbpf_objects: CompileDirectory) -> Path:
    return libbpf_objects(FIXTURES)


@pytest.fixture
def capture(tmp_path: Path) -> Path:
    """Five packets a microsecond apart: UDP 53, UDP 9, TCP, tagged UDP 9, tagged UDP 53."""
    path = tmp_path / "in.pcap"
    packets = [ethernet(udp(53)), ethernet(udp(9)), ethernet(tcp(80))]
    packets += [ethernet(udp(9), vlan=3), ethernet(udp(53), vlan=4)]
    write_capture(path, 1, (Packet(p, 1_700_000_000_000_000_123 + n * 1000) for n, p in
                            enumerate(packets)))  # fmt: skip
    return path


@pytest.mark.parametrize("engine", ["interpreter", "jit"])
def test_json_summary_per_packet_results_and_maps(
    objects: Path, capture: Path, engine: str
) -> None:
    proc = bpfexec(
        "test-run", str(objects / "xdp_count.o"), "--program", "xdp_count", "--pcap",
        str(capture), "--per-packet", "--dump-maps", "--engine", engine, "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    assert shown["program_type"] == "xdp"
    assert shown["packets"] == 5
    assert shown["verdicts"] == {"XDP_PASS": 3, "XDP_DROP": 2}
    assert isinstance(shown["duration_ns"], int) and shown["duration_ns"] > 0
    assert [r["verdict"] for r in shown["results"]] == [
        "XDP_PASS", "XDP_DROP", "XDP_PASS", "XDP_DROP", "XDP_PASS",
    ]  # fmt: skip
    assert [r["retval"] for r in shown["results"]] == [2, 1, 2, 1, 2]
    assert shown["results"][0]["ctx_out"] == {}
    assert shown["results"][3]["len"] == len(ethernet(udp(9), vlan=3))
    protocols = shown["maps"]["protocols"]
    assert protocols["entries"] == [
        {"key": "06000000", "value": (1).to_bytes(8, "little").hex()},
        {"key": "11000000", "value": (4).to_bytes(8, "little").hex()},
    ]


@pytest.mark.parametrize("suffix", [".pcap", ".pcapng"])
def test_out_holds_each_packet_after_its_run(
    objects: Path, capture: Path, tmp_path: Path, suffix: str
) -> None:
    out = tmp_path / f"out{suffix}"
    proc = bpfexec(
        "test-run", str(objects / "xdp_count.o"), "--program", "xdp_vlan_strip", "--pcap",
        str(capture), "--out", str(out), "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    with read_capture(capture) as given, read_capture(out) as written:
        assert written.format == suffix[1:] and written.link_type == 1
        pairs = list(zip(given, written, strict=True))
    for before, after in pairs:
        assert after.timestamp_ns == before.timestamp_ns
        tagged = before.data[12:14] == b"\x81\x00"
        assert after.data == (before.data[:12] + before.data[16:] if tagged else before.data)
    assert json.loads(proc.stdout)["verdicts"] == {"XDP_PASS": 3, "XDP_TX": 2}


def test_the_table_without_json(objects: Path, capture: Path) -> None:
    proc = bpfexec(
        "test-run", str(objects / "tc_mark.o"), "--program", "tc", "--pcap", str(capture),
        "--per-packet",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("tc (tc): 5 packets, ")
    assert lines[1].split() == ["verdict", "packets"]
    assert lines[2].split() == ["TC_ACT_OK", "5"]
    assert "'mark': 66" in lines[5]  # the TCP packet, marked 0x42


@pytest.mark.parametrize("engine", ["interpreter", "jit"])
def test_bad_inputs_are_one_line_errors(
    objects: Path, capture: Path, tmp_path: Path, engine: str
) -> None:
    xdp = str(objects / "xdp_count.o")

    def error_of(*args: str) -> str:
        return one_line_error(bpfexec("test-run", *args, "--engine", engine))

    not_a_capture = tmp_path / "notes.txt"
    not_a_capture.write_text("hello\n")
    assert "notes.txt" in error_of(xdp, "--program", "xdp", "--pcap", str(not_a_capture))
    runt = tmp_path / "runt.pcap"
    write_capture(runt, 1, [Packet(ethernet(tcp(1)), 0), Packet(b"\x00" * 10, 1)])
    error = error_of(xdp, "--program", "xdp", "--pcap", str(runt))
    assert "packet 2: 10 bytes, shorter than an Ethernet header" in error
    error = error_of(xdp, "--program", "nope", "--pcap", str(capture))
    assert "no function 'nope'" in error
    bad = str(objects / "bad_context.o")
    error = error_of(bad, "--program", "xdp_writes_data", "--pcap", str(capture))
    assert "xdp programs may not write the context field data" in error
    cooked = tmp_path / "cooked.pcap"
    write_capture(cooked, 113, [Packet(ethernet(tcp(1)), 0)])
    error = error_of(xdp, "--program", "xdp", "--pcap", str(cooked))
    assert "link type 113 is not Ethernet (1)" in error
    truncated = tmp_path / "cut.pcap"
    truncated.write_bytes(capture.read_bytes()[:-5])
    assert "packet 5" in error_of(xdp, "--program", "xdp", "--pcap", str(truncated))


def test_the_jit_summary_counts_as_the_interpreter_does(objects: Path, tmp_path: Path) -> None:
    # Without --out and --per-packet, the JIT reads the capture with libpcap in chunks
    # and counts the verdicts with no object a packet (where libpcap is installed).
    path = tmp_path / "many.pcap"
    kinds = [ethernet(udp(53)), ethernet(udp(9)), ethernet(tcp(80)), ethernet(udp(9), vlan=3)]
    write_capture(path, 1, (Packet(kinds[n % 4], n) for n in range(1000)))
    shown = {}
    for engine in ("interpreter", "jit"):
        proc = bpfexec(
            "test-run", str(objects / "xdp_count.o"), "--program", "xdp_count", "--pcap",
            str(path), "--dump-maps", "--engine", engine, "--json", "--repeat", "2",
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        shown[engine] = json.loads(proc.stdout)
        assert shown[engine].pop("duration_ns") > 0
    assert shown["jit"] == shown["interpreter"]
    assert shown["jit"]["verdicts"] == {"XDP_PASS": 500, "XDP_DROP": 500}
    counts = {e["key"]: int.from_bytes(bytes.fromhex(e["value"]), "little")
              for e in shown["jit"]["maps"]["protocols"]["entries"]}  # fmt: skip
    assert counts == {"06000000": 500, "11000000": 1500}  # twice each: --repeat 2


@pytest.mark.parametrize("engine", ["interpreter", "jit"])
def test_a_trap_in_the_summary_exits_3(objects: Path, capture: Path, engine: str) -> None:
    proc = bpfexec(
        "test-run", str(objects / "xdp_count.o"), "--program", "xdp_count", "--pcap",
        str(capture), "--fuel", "10", "--engine", engine, "--json",
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    assert json.loads(proc.stdout)["verdicts"] == {"TRAP": 5}


def test_a_reader_that_stops_early_stops_the_command_quietly(objects: Path, tmp_path: Path) -> None:
    # `bpfexec test-run ... --per-packet --json | head -c 100`: no error, no traceback.
    path = tmp_path / "many.pcap"
    write_capture(path, 1, (Packet(ethernet(udp(53)), n) for n in range(20_000)))
    command = [
        sys.executable, "-m", "bpfexec.client.cli", "test-run", str(objects / "xdp_count.o"),
        "--program", "xdp_count", "--pcap", str(path), "--per-packet", "--json",
    ]  # fmt: skip
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.read(100).startswith(b'{"program_type": "xdp"')
        proc.stdout.close()
        errors = proc.stderr.read()
        assert proc.wait(timeout=60) == 1
    assert errors == b""
