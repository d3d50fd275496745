"""Fixtures for the whole suite: one throwaway PostgreSQL per run, one migrated template
database per run, and a fresh clone of it per test.

Tests ask for `conn` (an autocommit connection) or `db_url`. Set SEGFLOW_TEST_DATABASE_URL to
a maintenance database URL (a role that may create databases) to use your own server instead
of a throwaway one.
"""

from __future__ import annotations

import itertools
import os
import shutil
import stat
import subprocess
import tempfile
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import testing.postgresql
from psycopg import sql

from segflow.cluster import find_pg_bindir, server_popen_kwargs, server_user

# Speed over durability: the cluster is thrown away after the run.
SERVER_ARGS = (
    "-h 127.0.0.1 -F -c logging_collector=off"
    " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    " -c max_locks_per_transaction=1024 -c max_connections=200 -c timezone=UTC"
)
TEMPLATE = "segflow_template"


def reachable_tmpdir(prefix: str) -> Path:
    """A new temporary directory that the server user can enter (mode 0755).

    As root the server runs as `postgres`, which cannot enter 0700 directories such as /root
    or pytest's /tmp/pytest-of-root, so use the system temp directory when it is reachable.
    """
    base = Path(tempfile.gettempdir())
    if server_user() is not None and any(
        not p.stat().st_mode & stat.S_IXOTH for p in (base, *base.parents)
    ):
        base = Path("/tmp")
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    path.chmod(0o755)
    return path


@pytest.fixture
def server_tmp_path() -> Iterator[Path]:
    """A temporary directory the PostgreSQL server user can enter, removed after the test."""
    path = reachable_tmpdir("segflow-tmp-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class _Postgresql(testing.postgresql.Postgresql):
    """testing.postgresql's server; as root, initdb and postgres run as the postgres user."""

    child_process: subprocess.Popen[bytes] | None

    def __init__(self, **kwargs: Any) -> None:
        self._user = server_user()
        super().__init__(**kwargs)

    def _kwargs(self) -> dict[str, Any]:
        return server_popen_kwargs(self._user, Path(self.base_dir))

    def setup(self) -> None:
        # Create the data and socket directories ourselves so that the server user owns them;
        # the base class then skips creating them.
        for sub in self.subdirectories:
            path = Path(self.base_dir, sub)
            path.mkdir(mode=0o700, exist_ok=True)
            if self._user is not None:
                os.chown(path, self._user.pw_uid, self._user.pw_gid)
        super().setup()

    def initialize_database(self) -> None:
        data = os.path.join(self.base_dir, "data")
        if os.path.exists(os.path.join(data, "PG_VERSION")):
            return
        args = [self.initdb, "-D", data, "--lc-messages=C", *self.settings["initdb_args"].split()]
        result = subprocess.run(args, capture_output=True, text=True, **self._kwargs())
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed: {result.stdout}{result.stderr}")

    def start(self) -> None:
        # Same as the base class, but the server process runs as the server user.
        if self.child_process:
            return
        self.prestart()
        with open(os.path.join(self.base_dir, f"{self.name}.log"), "w") as logger:
            self.child_process = subprocess.Popen(
                self.get_server_commandline(),
                stdout=logger,
                stderr=logger,
                stdin=subprocess.DEVNULL,
                **self._kwargs(),
            )
            try:
                self.wait_booting()
                self.poststart()
            except Exception:
                self.stop()
                raise


def _with_dbname(url: str, dbname: str) -> str:
    """`url` pointing at database `dbname` instead."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError(f"expected a postgresql:// URL, got {url!r}")
    return urllib.parse.urlunsplit(parts._replace(path="/" + urllib.parse.quote(dbname)))


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    """URL of the `postgres` database of the server the tests use."""
    external = os.environ.get("SEGFLOW_TEST_DATABASE_URL", "").strip()
    if external:
        yield external
        return
    bindir = find_pg_bindir()
    base_dir = reachable_tmpdir("segflow-test-")
    user = server_user()
    if user is not None:
        os.chown(base_dir, user.pw_uid, user.pw_gid)
    server = _Postgresql(
        base_dir=str(base_dir),
        initdb=str(bindir / "initdb"),
        postgres=str(bindir / "postgres"),
        initdb_args="-U postgres -A trust --encoding=UTF8 --locale=C --no-sync",
        postgres_args=SERVER_ARGS,
        boot_timeout=60,
    )
    try:
        yield server.url(database="postgres")
    finally:
        server.stop()
        shutil.rmtree(base_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def _admin(pg_server_url: str) -> Iterator[psycopg.Connection[Any]]:
    """One autocommit connection for creating and dropping databases."""
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        yield conn


def _drop_database(admin: psycopg.Connection[Any], name: str) -> None:
    admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def template_db(pg_server_url: str, _admin: psycopg.Connection[Any]) -> Iterator[str]:
    """Name of a database with all migrations applied, cloned by every test."""
    # On a shared server, keep concurrent runs apart.
    name = TEMPLATE
    if os.environ.get("SEGFLOW_TEST_DATABASE_URL", "").strip():
        name = f"{TEMPLATE}_{os.getpid()}"
    _drop_database(_admin, name)
    _admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    # Imported here so that tests which need no database do not depend on the migrations.
    from segflow.migrate import upgrade

    upgrade(_with_dbname(pg_server_url, name))
    # A database with open sessions cannot be cloned: close leftovers of the migration run
    # and refuse new connections from now on.
    _admin.execute(
        sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false").format(sql.Identifier(name))
    )
    _admin.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = %s AND pid <> pg_backend_pid()",
        (name,),
    )
    try:
        yield name
    finally:
        _drop_database(_admin, name)


_counter = itertools.count(1)


@pytest.fixture
def db_url(pg_server_url: str, template_db: str, _admin: psycopg.Connection[Any]) -> Iterator[str]:
    """URL of a fresh database cloned from the migrated template, dropped after the test."""
    n = next(_counter)
    name = f"test_{n}" if template_db == TEMPLATE else f"test_{os.getpid()}_{n}"
    _drop_database(_admin, name)
    _admin.execute(
        sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
            sql.Identifier(name), sql.Identifier(template_db)
        )
    )
    try:
        yield _with_dbname(pg_server_url, name)
    finally:
        # FORCE terminates connections the test left open.
        _drop_database(_admin, name)


@pytest.fixture
def conn(db_url: str) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection to the test's fresh database."""
    with psycopg.connect(db_url, autocommit=True) as connection:
        yield connection
