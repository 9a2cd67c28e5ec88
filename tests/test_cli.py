"""The `bpfexec` command line as a user meets it: exit codes, output, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bpfexec.client.cli import UsageError, parse_arg

TESTS = Path(__file__).parent
MASK64 = (1 << 64) - 1


def bpfexec(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(TESTS))
    env.pop("BPFEXEC_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "bpfexec.client.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        input=stdin,
    )


def one_line_error(proc: subprocess.CompletedProcess[str], code: int = 2) -> str:
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("42", 42),
        ("0x2a", 42),
        ("-1", MASK64),
        ("-0x8000000000000000", 1 << 63),
        ("hex:00ff", b"\x00\xff"),
        ("hex:", b""),
        ("hex:de ad", b"\xde\xad"),
    ],
)
def test_parse_arg(text, expected):
    assert parse_arg(text) == expected


@pytest.mark.parametrize("text", ["x", "1.5", "hex:zz", str(1 << 64), "file:/nonexistent/x"])
def test_parse_arg_rejects(text):
    with pytest.raises(UsageError):
        parse_arg(text)


def test_file_argument_becomes_a_buffer(tmp_path):
    (tmp_path / "prog.s").write_text("r0 = *(u8 *)(r1 + 2)\nexit\n")
    (tmp_path / "data.bin").write_bytes(b"\x01\x02\x03")
    proc = bpfexec(
        "run", str(tmp_path / "prog.s"), "--arg", f"file:{tmp_path / 'data.bin'}", "--json"
    )
    out = json.loads(proc.stdout)
    assert (out["return_value"], out["buffers"]) == (3, ["010203"])


def test_human_output(tmp_path):
    (tmp_path / "prog.s").write_text("r0 = r1\nr0 += 1\nexit\n")
    proc = bpfexec("run", str(tmp_path / "prog.s"), "--arg", "41")
    assert proc.returncode == 0
    assert "return_value: 42 (0x2a)" in proc.stdout and "fuel_used: 3" in proc.stdout


def test_trap_exit_status_and_source_line(compile_c, tmp_path):
    (tmp_path / "fault.s").write_text("r1 = 0\nr0 = *(u64 *)(r1 + 0)\nexit\n")
    proc = bpfexec("run", str(tmp_path / "fault.s"), "--json")
    assert proc.returncode == 3
    out = json.loads(proc.stdout)
    assert out["return_value"] is None  # a trapped run returns nothing, not 0
    trap = out["trap"]
    assert trap["kind"] == "MEMORY_FAULT" and trap["pc"] == 1
    assert trap["instruction"] == "r0 = *(u64 *)(r1 + 0)"
    text = bpfexec("run", str(tmp_path / "fault.s"))
    assert text.returncode == 3 and "return_value: none (trapped)" in text.stdout


def test_trap_names_file_and_line_with_debug_info(compile_c):
    path = compile_c("local_calls", debug=True)
    # A context pointer into unmapped memory: the load of ctx->y faults.
    proc = bpfexec("run", str(path), "--function", "foo", "--arg", "0x900000000", "--json")
    assert proc.returncode == 3
    trap = json.loads(proc.stdout)["trap"]
    assert trap["kind"] == "MEMORY_FAULT"
    assert trap["location"].startswith("local_calls.c:")


def test_trace_prints_every_instruction(tmp_path):
    (tmp_path / "prog.s").write_text("r0 = 1\nr0 += 2\nexit\n")
    proc = bpfexec("run", str(tmp_path / "prog.s"), "--trace")
    lines = proc.stderr.splitlines()
    assert len(lines) == 3
    assert "r0 = 1" in lines[0] and "r0 += 2" in lines[1] and "exit" in lines[2]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "/nonexistent/prog.o"], "cannot read"),
        (["run", "{tmp}/bad.s"], "bad.s:1:"),
        (["run", "{tmp}/trunc.o"], "ELF"),
        (["run", "{tmp}/odd.bin"], "not a multiple of 8"),
        (["run", "{tmp}/ok.s", "--function", "nope"], "no function 'nope'"),
        (["run", "{tmp}/ok.s", "--arg", "zz"], "not an integer"),
        (["run", "{tmp}/helper.s"], "unknown helper: #77"),
        (["run", "{tmp}/ok.s", "--helpers", "nosuchmodule:x"], "cannot import"),
        (["run", "{tmp}/ok.s", "--engine", "warp"], "invalid choice"),
        (["run", "{tmp}/ok.s", "--fuel", "-5"], "--fuel: must not be negative, got -5"),
        (["run", "{tmp}/ok.s", "--server", "127.0.0.1:1", "--trace"], "--trace applies only"),
        (["run", "{tmp}/ok.s", "--server", "127.0.0.1:1", "--helpers", "m:r"], "--helpers applies"),
        (["run", "{tmp}/ok.s", "--server", "127.0.0.1:1", "--engine", "jit"], "--engine applies"),
        (["run", "{tmp}/ok.s", "--remote-helpers", "m:r"], "--remote-helpers needs --server"),
        (["run", "{tmp}/ok.s", "--server", "127.0.0.1:1", "--max-fuel", "9"], "--max-fuel applies"),
        (["run", "{tmp}/ok.s", "--fuel", "20000000000"], "exceeds the maximum of 10000000000"),
        (["run", "{tmp}/ok.s", "--token", "secret"], "--token and --tls* need --server"),
        (["run", "{tmp}/prog.c"], "prog.c: C source, not an eBPF object or assembly"),
        (["run", "{tmp}/ok.s", "--server", "http://localhost:1"], "HOST:PORT, not a URL"),
        (["frobnicate"], "invalid choice"),
        (["disasm", "{tmp}/odd.bin"], "not a multiple of 8"),
    ],
)
def test_bad_input_gets_one_line_and_status_2(tmp_path, argv, message):
    (tmp_path / "bad.s").write_text("r11 = 1\nexit\n")
    (tmp_path / "ok.s").write_text("r0 = 0\nexit\n")
    (tmp_path / "helper.s").write_text("call 77\nexit\n")
    (tmp_path / "trunc.o").write_bytes(b"\x7fELF\x02\x01\x01" + bytes(20))
    (tmp_path / "odd.bin").write_bytes(bytes(12))
    (tmp_path / "prog.c").write_text("int foo(int x) { return x + 1; }\n")
    line = one_line_error(bpfexec(*(arg.format(tmp=tmp_path) for arg in argv)))
    assert message in line


def test_disasm_and_asm_round_trip(compile_c, tmp_path):
    listing = bpfexec("disasm", str(compile_c("helper_pointers")))
    assert listing.returncode == 0
    assert "call 42" in listing.stdout and "exit" in listing.stdout
    source = tmp_path / "prog.s"
    source.write_text("r0 = r1\nr0 *= r2\nexit\n")
    out = tmp_path / "prog.bin"
    assert bpfexec("asm", str(source), "-o", str(out)).returncode == 0
    assert len(out.read_bytes()) == 24
    proc = bpfexec("run", str(out), "--arg", "6", "--arg", "7", "--json")
    assert json.loads(proc.stdout)["return_value"] == 42


# -- conformance plugin ------------------------------------------------------------


def hexcode(text: str) -> str:
    from bpfexec.vm import isa, load

    return isa.encode(load(text.encode()).instructions).hex()


def test_plugin_runs_raw_bytecode_with_memory(engine):
    code = hexcode("r0 = *(u32 *)(r1 + 0)\nr0 += r2\nexit")
    proc = bpfexec("conformance-plugin", "--engine", engine, "05000000", stdin=code)
    assert (proc.returncode, proc.stdout) == (0, "9\n")


def test_plugin_helper_5_returns_its_first_argument(engine):
    proc = bpfexec("conformance-plugin", "--engine", engine, stdin=hexcode("r1 = 77\ncall 5\nexit"))
    assert proc.stdout == f"{77:x}\n"


def test_plugin_runtime_function_0x2a_returns_0(engine):
    # The suite's call_runtime test: `call` with src 2, imm 0x2a, expects r0 = 0.
    proc = bpfexec(
        "conformance-plugin", "--engine", engine, stdin="852000002a000000" + "95" + "0" * 14
    )
    assert (proc.returncode, proc.stdout) == (0, "0\n")


def test_plugin_runs_elf(compile_c, engine):
    # example(r1, r2) returns r2 when r1 > 3: r1 is the memory's address, r2 its length.
    code = compile_c("example").read_bytes().hex()
    proc = bpfexec("conformance-plugin", "--engine", engine, "--elf", "0102030405", stdin=code)
    assert proc.stdout == "5\n"


@pytest.mark.parametrize(
    ("stdin", "args", "message"),
    [
        ("zz", [], "must be hex"),
        ("0000", [], "not a multiple of 8"),
        ("ff00000000000000", [], "pc 0"),
        ("{fault}", [], "MEMORY_FAULT"),
        ("{exit}", ["--elf"], "no ELF"),
    ],
)
def test_plugin_errors_exit_1_with_one_line(stdin, args, message):
    stdin = stdin.format(fault=hexcode("r0 = *(u64 *)(r1 + 8)\nexit"), exit=hexcode("exit"))
    line = one_line_error(bpfexec("conformance-plugin", *args, stdin=stdin), code=1)
    assert message in line


def test_plugin_accepts_the_runners_argument_order(engine):
    # The runner passes memory (bytes as "%02x  ") first, then the plugin options.
    code = hexcode("r0 = *(u32 *)(r1 + 0)\nexit")
    proc = bpfexec("07  00  00  00  ", "conformance-plugin", "--engine", engine, stdin=code)
    assert (proc.returncode, proc.stdout) == (0, "7\n")


def test_version():
    proc = bpfexec("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("bpfexec ")


def test_run_imports_helpers_from_the_working_directory(tmp_path):
    # The README's first example: `bpfexec run prog --helpers myhelpers:registry`
    # finds ./myhelpers.py, as `serve` does.
    (tmp_path / "myhelpers.py").write_text(
        "from bpfexec.vm import HelperRegistry\n"
        "registry = HelperRegistry()\n"
        "@registry.helper(id=1, name='max')\n"
        "def max_(ctx, a, b, c, d, e):\n"
        "    return max(a, b)\n"
    )
    (tmp_path / "prog.s").write_text("call 1\nexit\n")
    proc = subprocess.run(
        [sys.executable, "-m", "bpfexec.client.cli", "run", "prog.s", "--arg", "5", "--arg", "6",
         "--helpers", "myhelpers:registry", "--json"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["return_value"] == 6


def test_a_server_that_is_not_there_is_one_short_line(tmp_path):
    import socket

    (tmp_path / "ok.s").write_text("r0 = 0\nexit\n")
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = bpfexec("run", str(tmp_path / "ok.s"), "--server", f"127.0.0.1:{port}")
    line = one_line_error(proc, code=1)
    assert f"cannot connect to 127.0.0.1:{port}: Connection refused" in line, line


def test_a_local_run_takes_the_limit_flags_and_variables_of_serve(tmp_path, monkeypatch):
    (tmp_path / "loop.s").write_text("r0 = 0\nloop:\nr0 += 1\nif r0 < 100 goto loop\nexit\n")
    prog = str(tmp_path / "loop.s")
    # Beyond the default maximum (10^10) only with --max-fuel, as for serve.
    proc = bpfexec("run", prog, "--fuel", "20000000000", "--max-fuel", "100000000000", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["fuel_used"] == 202
    monkeypatch.setenv("BPFEXEC_MAX_FUEL", "100")
    assert "exceeds the maximum of 100" in one_line_error(bpfexec("run", prog, "--fuel", "200"))
    monkeypatch.setenv("BPFEXEC_MAX_CALL_DEPTH", "zero")
    assert "BPFEXEC_MAX_CALL_DEPTH='zero'" in one_line_error(bpfexec("run", prog))


# A function reads an argument register that no --arg sets: a warning, and the run goes on.
READS_R2_IN_A_CALLEE = """
main:
    call add
    exit
add:
    r0 = r1
    r0 += r2
    exit
"""


@pytest.mark.parametrize(
    ("source", "args", "warning"),
    [
        ("r0 = r1\nr0 += r2\nexit\n", [], "main may read r1, r2 before writing them, "
         "but no --arg was given, so they are 0"),
        ("r0 = r1\nr0 += r2\nexit\n", ["1"], "main may read r2 before writing it, "
         "but only 1 --arg was given, so it is 0"),
        (READS_R2_IN_A_CALLEE, ["1"], "main may read r2 before writing it"),
        ("r0 = 0\nif r0 == 0 goto out\nr0 = r3\nout:\nexit\n", ["1", "2"],
         "main may read r3 before writing it, but only 2 --args were given, so it is 0"),
        ("r0 = r1\nr0 += r2\nexit\n", ["1", "2"], None),
        ("r1 = 5\nr2 = 6\nr0 = r1\nr0 += r2\nexit\n", [], None),  # written before read
        ("r1 = 0\ncall 7\nexit\n", [], None),  # a helper's r2..r5 come from nothing: no args
    ],
)  # fmt: skip
def test_too_few_args_warn(tmp_path, source, args, warning):
    (tmp_path / "prog.s").write_text(source)
    proc = bpfexec("run", str(tmp_path / "prog.s"), *(a for v in args for a in ("--arg", v)))
    assert proc.returncode == 0, proc.stderr
    if warning is None:
        assert proc.stderr == ""
    else:
        assert proc.stderr.startswith("warning: ") and warning in proc.stderr, proc.stderr
        assert len(proc.stderr.splitlines()) == 1


def test_too_few_args_warn_for_a_server_run_too(tmp_path):
    from support import free_port

    from bpfexec.server.app import serve_in_thread
    from bpfexec.server.settings import Settings

    (tmp_path / "prog.s").write_text("r0 = r1\nr0 += r2\nexit\n")
    settings = Settings(port=0, metrics_port=free_port(), entry_point_helpers=False)
    with serve_in_thread(settings) as server:
        proc = bpfexec("run", str(tmp_path / "prog.s"), "--arg", "40", "--server", server.address)
    assert proc.returncode == 0, proc.stderr
    assert "return_value: 40" in proc.stdout
    assert "main may read r2 before writing it" in proc.stderr
