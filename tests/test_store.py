"""Durable modules: `--store DIR` keeps every accepted module across restarts.

Each test runs a real server on a free localhost port over a store in tmp_path,
stops it, damages or keeps the directory, and starts another on the same one.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from bpfexec.client.client import Client
from bpfexec.client.errors import NotFound
from bpfexec.server.app import serve_in_thread
from bpfexec.server.metrics import Metrics
from bpfexec.server.settings import Settings
from bpfexec.server.store import ModuleStore
from bpfexec.vm.program import content_id

ADD_ONE = b"r0 = r1\nr0 += 1\nexit\n"
TIMES_TWO = b"r0 = r1\nr0 *= 2\nexit\n"
TIMEOUT = 10.0


def file_name(module_id: str) -> str:
    return module_id.removeprefix("sha256:")


def settings(store: Path, **changes: object) -> Settings:
    base = Settings(port=0, metrics_port=0, entry_point_helpers=False, store=str(store))
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_a_restarted_server_executes_a_module_by_id(tmp_path: Path) -> None:
    with (
        serve_in_thread(settings(tmp_path)) as running,
        Client(running.address, timeout=TIMEOUT) as client,
    ):
        module_id = client.load(ADD_ONE, "add-one").id
    assert (tmp_path / file_name(module_id)).read_bytes() == ADD_ONE
    with (
        serve_in_thread(settings(tmp_path)) as running,
        Client(running.address, timeout=TIMEOUT) as client,
    ):
        assert [m.id for m in client.list_modules()] == [module_id]
        assert client.get_module(module_id).name == "add-one"
        assert client.execute(module_id, args=[41]).return_value == 42


def test_a_module_evicted_from_the_cache_is_read_back_from_the_store(tmp_path: Path) -> None:
    with (
        serve_in_thread(settings(tmp_path, cache_max_modules=1)) as running,
        Client(running.address, timeout=TIMEOUT) as client,
    ):
        first = client.load(ADD_ONE).id
        client.load(TIMES_TWO)  # evicts the first
        assert client.execute(first, args=[1]).return_value == 2


def test_delete_removes_the_module_from_disk(tmp_path: Path) -> None:
    with (
        serve_in_thread(settings(tmp_path)) as running,
        Client(running.address, timeout=TIMEOUT) as client,
    ):
        module_id = client.load(ADD_ONE).id
        client.delete_module(module_id)
        with pytest.raises(NotFound):
            client.execute(module_id)
    assert not (tmp_path / file_name(module_id)).exists()
    assert not (tmp_path / f"{file_name(module_id)}.json").exists()


def test_a_corrupt_file_is_set_aside_reported_and_never_served(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    module_id = content_id(ADD_ONE)
    (tmp_path / file_name(module_id)).write_bytes(ADD_ONE.replace(b"+= 1", b"+= 9"))  # bit rot
    with serve_in_thread(settings(tmp_path)) as running:
        assert running.metrics.store_corrupt._value.get() == 1
        with Client(running.address, timeout=TIMEOUT) as client:
            assert client.list_modules() == []
            with pytest.raises(NotFound):
                client.execute(module_id, args=[1])
            assert client.load(ADD_ONE).id == module_id  # a fresh upload heals it
            assert client.execute(module_id, args=[1]).return_value == 2
    assert "does not match its sha256" in caplog.text
    assert (tmp_path / f"{file_name(module_id)}.corrupt").exists()
    assert (tmp_path / file_name(module_id)).read_bytes() == ADD_ONE


def test_half_written_temporary_files_and_stray_names_are_ignored(tmp_path: Path) -> None:
    (tmp_path / ".tmp-abc123").write_bytes(ADD_ONE[:5])  # a crash in the middle of a write
    (tmp_path / "README").write_text("not a module")
    with serve_in_thread(settings(tmp_path)) as running:
        assert running.metrics.store_corrupt._value.get() == 0
        with Client(running.address, timeout=TIMEOUT) as client:
            assert client.list_modules() == []
            with pytest.raises(NotFound):
                client.get_module("../README")


def test_writes_are_atomic_and_leave_no_temporary_file(tmp_path: Path) -> None:
    store = ModuleStore(tmp_path, Metrics())
    module_id = content_id(ADD_ONE)
    store.save(module_id, ADD_ONE, "m", {"a"})
    store.save(module_id, ADD_ONE, "m", {"a", "b"})
    name = file_name(module_id)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name, f"{name}.json"]
    stored = store.read(module_id)
    assert stored is not None and stored.tenants == {"a", "b"} and stored.code == ADD_ONE
    with pytest.raises(ValueError, match="not the sha256"):
        store.save("sha256:" + "0" * 64, ADD_ONE, None, ())
    assert store.read("../" + name) is None
