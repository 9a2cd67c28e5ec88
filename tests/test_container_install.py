"""The container's install path, proven without a Docker engine.

What the Dockerfile copies into its build context is copied to a temporary
directory (read from its COPY lines, so the two cannot drift apart), a wheel is
built from it, which must hold the one top-level package `bpfexec` and every
module of the repository's package folders, and installed into a fresh venv
with the Dockerfile's pip environment. `bpfexec serve` from that venv, outside
the repository, must then answer `bpfexec health` with SERVING and stop cleanly
on SIGTERM. When a Docker engine is present, the image itself is built and
probed the same way.

Needs a package index for the dependencies; skipped when there is none.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from support import free_port

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
NO_INDEX = re.compile(
    r"No matching distribution|Could not find a version|NewConnectionError|"
    r"Temporary failure in name resolution|Network is unreachable|ConnectTimeout"
)

pytestmark = pytest.mark.slow


def dockerfile_copies() -> list[str]:
    """The repository paths the Dockerfile's COPY lines put in the image."""
    paths = []
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY "):
            *sources, _destination = line.split()[1:]
            paths += sources
    return paths


def dockerfile_extras() -> str:
    """The extras the Dockerfile installs the package with (`pip install ".[jit]"`)."""
    match = re.search(r'pip install "?\.(\[[\w,]+\])?"?', DOCKERFILE.read_text())
    assert match is not None, "the Dockerfile installs the package with `pip install .`"
    return match.group(1) or ""


def dockerfile_env() -> dict[str, str]:
    """The variables of the Dockerfile's first ENV instruction (the pip settings)."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    first = next(line for line in text.splitlines() if line.startswith("ENV "))
    return dict(re.findall(r"(\w+)=(\S+)", first))


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without bpfexec settings or anything pointing at this checkout."""
    drop = ("BPFEXEC_", "PYTHONPATH", "VIRTUAL_ENV", "PROMETHEUS_MULTIPROC_DIR")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    return {**env, **extra}


def wait_for_health(bpfexec: list[str], address: str, timeout: float, env: dict[str, str]) -> None:
    deadline = time.monotonic() + timeout
    while True:
        probe = subprocess.run(
            [*bpfexec, "health", "--server", address, "--timeout", "1"],
            capture_output=True, text=True, env=env, timeout=10,
        )  # fmt: skip
        if probe.returncode == 0:
            assert probe.stdout.strip() == f"{address}: SERVING"
            return
        assert time.monotonic() < deadline, f"not healthy in {timeout} s: {probe.stderr}"
        time.sleep(0.2)


def pip_env() -> dict[str, str]:
    """The Dockerfile's pip settings, except the cache: a warm cache keeps these tests short."""
    return clean_env(**{k: v for k, v in dockerfile_env().items() if k != "PIP_NO_CACHE_DIR"})


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from what the Dockerfile copies into the image."""
    tmp_path = tmp_path_factory.mktemp("wheel")
    context = tmp_path / "src"
    for name in dockerfile_copies():
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, context / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            context.mkdir(exist_ok=True)
            shutil.copy2(source, context / name)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "-q", "-w", str(tmp_path)],
        cwd=context, env=pip_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if build.returncode != 0 and NO_INDEX.search(build.stderr):
        pytest.skip(f"no package index for the build backend: {build.stderr.strip()[-200:]}")
    assert build.returncode == 0, build.stderr
    (built,) = tmp_path.glob("bpfexec-*.whl")
    return built


def test_wheel_installs_only_the_bpfexec_package(wheel: Path) -> None:
    name, version = wheel.name.split("-")[:2]
    dist_info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = archive.read(f"{dist_info}/entry_points.txt").decode()
    assert {path.split("/")[0] for path in names} == {"bpfexec", dist_info}
    # Every module of the folders pyproject.toml maps into the package: a subpackage
    # missing from its `packages` list would be left out.
    folders = {"bpfexec": "bpfexec", "vm": "bpfexec/vm", "server": "bpfexec/server"}
    folders["client"] = "bpfexec/client"
    expected = {
        f"{inside}/{path.relative_to(ROOT / folder).as_posix()}"
        for folder, inside in folders.items()
        for path in (ROOT / folder).rglob("*")
        if path.suffix in (".py", ".pyi", ".typed") and "__pycache__" not in path.parts
    }
    assert expected - names == set()
    assert {"bpfexec/py.typed", "bpfexec/_pb/bpfexec/v1/executor_pb2.pyi"} <= names
    assert "bpfexec = bpfexec.client.cli:main" in entry_points


def test_wheel_installed_as_the_dockerfile_does_serves(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=60)
    install = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", f"{wheel}{dockerfile_extras()}"],
        cwd=tmp_path, env=pip_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if install.returncode != 0 and NO_INDEX.search(install.stderr):
        pytest.skip(f"no package index for the dependencies: {install.stderr.strip()[-200:]}")
    assert install.returncode == 0, install.stderr

    bpfexec = [str(venv / "bin" / "bpfexec")]
    port = free_port()
    env = clean_env(PYTHONDONTWRITEBYTECODE="1")
    # Outside the checkout, so only the installed packages can be imported.
    server = subprocess.Popen(
        [*bpfexec, "serve", "--port", str(port), "--metrics-port", "0"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        wait_for_health(bpfexec, f"127.0.0.1:{port}", timeout=30, env=env)
        server.send_signal(signal.SIGTERM)
        output, _ = server.communicate(timeout=30)
        assert server.returncode == 0, output
        assert "with the jit engine" in output, output  # the image runs native code
        assert str(venv) in subprocess.run(
            [str(venv / "bin" / "python"), "-c",
             "from bpfexec import server; print(server.__file__)"],
            cwd=tmp_path, env=env, capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        version = subprocess.run(
            [str(venv / "bin" / "python"), "-m", "bpfexec", "--version"],
            cwd=tmp_path, env=env, capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert version.strip() == f"bpfexec {wheel.name.split('-')[1]}"
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def docker_engine() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode == 0
    except subprocess.SubprocessError:
        return False


@pytest.mark.skipif(not docker_engine(), reason="no Docker engine")
def test_image_builds_and_serves() -> None:
    tag = f"bpfexec:test-{os.getpid()}"
    subprocess.run(["docker", "build", "-q", "-t", tag, str(ROOT)], check=True, timeout=600)
    port = free_port()
    container = subprocess.run(
        ["docker", "run", "-d", "--rm", "-p", f"127.0.0.1:{port}:50051", tag],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout.strip()  # fmt: skip
    try:
        bpfexec = [sys.executable, "-m", "bpfexec.client.cli"]
        wait_for_health(bpfexec, f"127.0.0.1:{port}", timeout=60, env=clean_env())
        inside = subprocess.run(
            ["docker", "exec", container, "bpfexec", "health"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert inside.returncode == 0, inside.stderr
    finally:
        subprocess.run(["docker", "stop", "-t", "15", container], capture_output=True, timeout=60)
        subprocess.run(["docker", "rmi", "-f", tag], capture_output=True, timeout=60)
