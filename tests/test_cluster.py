"""The persistent local cluster: a real PostgreSQL in a temporary data directory."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from segflow import cluster
from segflow.cluster import (
    ClusterError,
    database_url,
    find_pg_bindir,
    local_cluster_dir,
    local_cluster_running,
    stop_local_cluster,
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _postmaster_pid(data: Path) -> int:
    return int((data / "postmaster.pid").read_text().splitlines()[0])


@pytest.fixture
def local(server_tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Point the local cluster at a temporary directory and port; stop it afterwards."""
    monkeypatch.delenv("SEGFLOW_DATABASE_URL", raising=False)
    monkeypatch.setenv("SEGFLOW_DATA_DIR", str(server_tmp_path / "segflow"))
    monkeypatch.setenv("SEGFLOW_LOCAL_PORT", str(_free_port()))
    try:
        yield local_cluster_dir()
    finally:
        stop_local_cluster()


def test_cluster_dir_follows_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SEGFLOW_DATA_DIR", str(tmp_path))
    assert local_cluster_dir() == tmp_path / "pg"
    monkeypatch.delenv("SEGFLOW_DATA_DIR")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    expected = cluster.ROOT_DATA_DIR / "pg" if os.geteuid() == 0 else tmp_path / "xdg/segflow/pg"
    assert local_cluster_dir() == expected
    monkeypatch.setenv("SEGFLOW_LOCAL_PORT", "6000")
    assert cluster.local_port() == 6000
    monkeypatch.delenv("SEGFLOW_LOCAL_PORT")
    assert cluster.local_port() == cluster.DEFAULT_PORT


def test_find_pg_bindir_finds_a_recent_server() -> None:
    bindir = find_pg_bindir()
    for prog in ("initdb", "pg_ctl", "postgres"):
        assert (bindir / prog).exists()
    version = cluster._server_version(bindir)
    assert version is not None and version >= cluster.MIN_PG_VERSION
    # A data directory is always served by the programs of the version that made it.
    assert cluster._server_version(find_pg_bindir(version)) == version
    with pytest.raises(ClusterError, match="created by PostgreSQL 99"):
        find_pg_bindir(99)


def test_find_pg_bindir_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cluster, "_candidate_bindirs", lambda: [])
    with pytest.raises(ClusterError, match="apt-get install postgresql"):
        find_pg_bindir()


def test_database_url_short_circuits(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SEGFLOW_DATA_DIR", str(tmp_path / "segflow"))
    monkeypatch.setenv("SEGFLOW_DATABASE_URL", "postgresql://app@db.example:5432/crm")
    assert database_url() == "postgresql://app@db.example:5432/crm"
    assert not (tmp_path / "segflow").exists()


def test_lifecycle(local: Path) -> None:
    data = local / "data"

    # First use: initialised and started, with segflow's settings and database.
    url = database_url()
    assert url.endswith("/segflow")
    assert f":{os.environ['SEGFLOW_LOCAL_PORT']}/" in url
    assert (data / "PG_VERSION").exists()
    assert local_cluster_running()
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT current_database(), current_setting('max_locks_per_transaction'),"
            " current_setting('TimeZone'), current_setting('data_directory')"
        ).fetchone()
        assert row == ("segflow", "1024", "UTC", str(data))
        conn.execute("CREATE TABLE kept (x int)")
        conn.execute("INSERT INTO kept VALUES (42)")
    server_user = cluster.server_user()
    if server_user is not None:
        assert data.stat().st_uid == server_user.pw_uid
    pid = _postmaster_pid(data)
    version_mtime = (data / "PG_VERSION").stat().st_mtime_ns

    # Second use: the running server is reused, nothing is initialised again.
    assert database_url() == url
    assert _postmaster_pid(data) == pid
    assert (data / "PG_VERSION").stat().st_mtime_ns == version_mtime

    # After a stop: started again on the same data.
    assert stop_local_cluster() is True
    assert not local_cluster_running()
    assert not (data / "postmaster.pid").exists()
    assert stop_local_cluster() is False
    assert database_url() == url
    assert _postmaster_pid(data) != pid
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT x FROM kept").fetchone() == (42,)
    assert (data / "PG_VERSION").stat().st_mtime_ns == version_mtime


def test_restarts_after_a_crash(local: Path) -> None:
    data = local / "data"
    url = database_url()
    assert stop_local_cluster() is True
    # A postmaster.pid left by a server that died: its pid belongs to no live process.
    probe = subprocess.Popen(["true"])
    probe.wait()
    lines = [str(probe.pid), str(data), "0", os.environ["SEGFLOW_LOCAL_PORT"], "", "", ""]
    (data / "postmaster.pid").write_text("\n".join(lines) + "\n")

    assert database_url() == url
    assert _postmaster_pid(data) != probe.pid
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_concurrent_first_use(local: Path) -> None:
    # Two segflow commands started at once: one initialises and starts, the other waits.
    code = "from segflow.cluster import database_url; print(database_url())"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    results = [proc.communicate(timeout=240) for proc in procs]
    for proc, (_, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err
    urls = {out.strip() for out, _ in results}
    assert len(urls) == 1
    with psycopg.connect(urls.pop()) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("segflow",)


def test_port_taken_by_another_program(local: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", int(os.environ["SEGFLOW_LOCAL_PORT"])))
        sock.listen()
        with pytest.raises(ClusterError, match="SEGFLOW_LOCAL_PORT"):
            database_url()
    assert not local_cluster_running()


def test_interrupted_initdb_is_redone(local: Path) -> None:
    # Leftovers of an initdb that never finished: set aside, not deleted, and initdb reruns.
    (local / "data").mkdir(parents=True)
    (local / "data" / "PG_VERSION").write_text("15\n")
    url = database_url()
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("segflow",)
    aside = list(local.glob("data.incomplete-*"))
    assert len(aside) == 1 and (aside[0] / "PG_VERSION").exists()
