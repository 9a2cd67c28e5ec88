"""The Node.js example client (examples/node) against a real server.

The client is written from proto/ alone and loads the .proto at run time; this
test runs it against a server on a free localhost port and checks every line
it prints. Skipped when node or npm is missing, or its packages cannot be
installed (`.ci/run` installs them with `npm ci` first).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from bpfexec.server.app import serve_in_thread
from bpfexec.server.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "node"

EXPECTED = [
    "ok example-O2.o example(5, 7) = 7 (Execute, fuel 3)",
    "ok example-O2.o example(1, 7) = 5 (Execute, fuel 4)",
    "ok helper_pointers-O2.o foo(7, 3) = 7 (ExecuteStream, fuel 5)",
    "ok helper_pointers-O2.o foo(2, 3) = 106 (ExecuteStream, fuel 4)",
    "ok helper_prototypes-O2.o foo(7, 3) = 7 (ExecuteStream, fuel 5)",
    "ok helper_prototypes-O2.o foo(2, 3) = 106 (ExecuteStream, fuel 4)",
    "ok infinite_loop-O2.o infinite_loop(0) = OUT_OF_FUEL (Execute, fuel 9996)",
    "7 of 7 executions as expected",
]


@pytest.fixture(scope="module")
def node() -> str:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node or npm is not installed")
    if not (EXAMPLE / "node_modules").is_dir():
        try:
            subprocess.run(
                [npm, "ci", "--no-audit", "--no-fund", "--prefix", str(EXAMPLE)],
                check=True, capture_output=True, timeout=180,
            )  # fmt: skip
        except (subprocess.SubprocessError, OSError) as exc:
            pytest.skip(f"npm ci failed in examples/node: {exc}")
    return node


def test_node_client_runs_the_seed_programs(node: str) -> None:
    settings = Settings(host="127.0.0.1", port=0, metrics_port=0, entry_point_helpers=False)
    with serve_in_thread(settings) as server:
        run = subprocess.run(
            [node, str(EXAMPLE / "client.js"), "--server", server.address],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.splitlines() == EXPECTED
