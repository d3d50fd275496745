"""The database segflow talks to, and the local PostgreSQL cluster behind it.

`SEGFLOW_DATABASE_URL` selects a server. Without it segflow initialises, starts and reuses a
persistent cluster of its own in the user's data directory, listening on 127.0.0.1 only.

PostgreSQL refuses to run as root, so when segflow runs as root the server programs (initdb,
pg_ctl, postgres) run as the unprivileged `postgres` system user, which owns the cluster
directory. Everything else (this Python process included) keeps running as the caller.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import pwd
import re
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
from psycopg import errors, sql

__all__ = [
    "ClusterError",
    "MIN_PG_VERSION",
    "database_url",
    "ensure_local_cluster",
    "find_pg_bindir",
    "local_cluster_dir",
    "local_cluster_running",
    "local_port",
    "server_popen_kwargs",
    "server_user",
    "stop_local_cluster",
]

MIN_PG_VERSION = 15
DEFAULT_PORT = 54329
DATABASE = "segflow"
SUPERUSER = "postgres"
# The system user that runs the server when segflow itself runs as root.
SERVER_USER = "postgres"
# Where root's cluster lives: root's home (/root) is mode 0700, so the postgres user could not
# even reach a data directory below it.
ROOT_DATA_DIR = Path("/var/lib/segflow")

# Server settings for a developer laptop. segflow creates many partitions and functions per
# transaction, hence the large lock table.
SERVER_SETTINGS: dict[str, str | int] = {
    "listen_addresses": "127.0.0.1",
    "max_connections": 200,
    "shared_buffers": "256MB",
    "max_locks_per_transaction": 1024,
    "timezone": "UTC",
    "log_timezone": "UTC",
    "logging_collector": "off",
}

_START_TIMEOUT_S = 120
_CONNECT_TIMEOUT_S = 30
# sockaddr_un.sun_path is 108 bytes on Linux, 104 on macOS; keep a margin.
_MAX_SOCKET_PATH = 100

_INSTALL_HINT = (
    "segflow needs the PostgreSQL server programs (initdb, pg_ctl, postgres), version "
    f"{MIN_PG_VERSION} or later. Install them, e.g. `apt-get install postgresql` on "
    "Debian/Ubuntu, `dnf install postgresql-server` on Fedora, `brew install postgresql@16` "
    "on macOS, or set SEGFLOW_PG_BINDIR to the directory holding them. "
    "Or point SEGFLOW_DATABASE_URL at an existing server."
)


class ClusterError(RuntimeError):
    """The local PostgreSQL cluster cannot be found, initialised or started."""


# --------------------------------------------------------------------------------------------
# Finding the server programs


def _server_version(bindir: Path) -> int | None:
    """Major version of the server programs in `bindir`, or None if they are incomplete."""
    if not all(os.access(bindir / prog, os.X_OK) for prog in ("postgres", "initdb", "pg_ctl")):
        return None
    try:
        out = subprocess.run(
            [str(bindir / "postgres"), "--version"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"\(PostgreSQL\)\s+(\d+)", out)
    return int(match.group(1)) if match else None


def _candidate_bindirs() -> list[Path]:
    """Directories that may hold the server programs, best first."""
    found: list[Path] = []
    explicit = os.environ.get("SEGFLOW_PG_BINDIR")
    if explicit:
        found.append(Path(explicit))
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=30, check=True
            ).stdout.strip()
            if out:
                found.append(Path(out))

    def version_key(path: str) -> int:
        # ".../postgresql/16/bin", "/usr/pgsql-16/bin", ".../postgresql@16/bin"
        match = re.search(r"(\d+)$", Path(path).parent.name)
        return int(match.group(1)) if match else 0

    # Debian/Ubuntu install each major version side by side, outside PATH; Homebrew's
    # versioned formulas are keg-only, also outside PATH.
    for pattern in (
        "/usr/lib/postgresql/*/bin",
        "/usr/pgsql-*/bin",
        "/opt/homebrew/opt/postgresql@*/bin",
        "/usr/local/opt/postgresql@*/bin",
    ):
        found.extend(Path(p) for p in sorted(glob.glob(pattern), key=version_key, reverse=True))
    postgres = shutil.which("postgres")
    if postgres:
        found.append(Path(postgres).resolve().parent)
    return found


def find_pg_bindir(version: int | None = None) -> Path:
    """The directory of PostgreSQL server programs of version >= MIN_PG_VERSION.

    With `version`, of exactly that major version (the one a data directory was made with).
    """
    seen: set[Path] = set()
    others: list[str] = []
    for bindir in _candidate_bindirs():
        if bindir in seen:
            continue
        seen.add(bindir)
        found = _server_version(bindir)
        if found is None:
            continue
        if (found == version) if version is not None else (found >= MIN_PG_VERSION):
            return bindir
        others.append(f"{bindir} (version {found})")
    detail = f" Found only: {', '.join(others)}." if others else ""
    if version is not None:
        raise ClusterError(
            f"The local segflow cluster was created by PostgreSQL {version}, whose server "
            f"programs are no longer installed. Install them again (e.g. `apt-get install "
            f"postgresql-{version}`), or upgrade the cluster with pg_upgrade.{detail}"
        )
    raise ClusterError(_INSTALL_HINT + detail)


# --------------------------------------------------------------------------------------------
# Who runs the server and where the cluster lives


def server_user() -> pwd.struct_passwd | None:
    """The account the server must run as, or None to run it as the current user."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SERVER_USER)
    except KeyError:
        raise ClusterError(
            f"segflow runs as root, and PostgreSQL refuses to: it needs a `{SERVER_USER}` "
            "system user to run the server (installing the postgresql package creates it; "
            f"or `useradd --system {SERVER_USER}`). Or run segflow as a normal user."
        ) from None


def server_popen_kwargs(user: pwd.struct_passwd | None, cwd: Path | None = None) -> dict[str, Any]:
    """subprocess keyword arguments that run a server program as `user` (None: as ourselves)."""
    # PGDATA, PGPORT and friends would change what the server programs do.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    kwargs: dict[str, Any] = {"env": env}
    if cwd is not None:
        # Our own working directory may be unreachable for the server user (e.g. under /root).
        kwargs["cwd"] = str(cwd)
    if user is not None:
        kwargs.update(
            user=user.pw_uid,
            group=user.pw_gid,
            extra_groups=os.getgrouplist(user.pw_name, user.pw_gid),
        )
        env.update(HOME=user.pw_dir, USER=user.pw_name, LOGNAME=user.pw_name)
    return kwargs


def segflow_data_dir() -> Path:
    """Where segflow keeps local files: `$SEGFLOW_DATA_DIR`, else the user's data directory
    (`/var/lib/segflow` as root)."""
    explicit = os.environ.get("SEGFLOW_DATA_DIR")
    if explicit:
        return Path(explicit).expanduser().absolute()
    if os.geteuid() == 0:
        return ROOT_DATA_DIR
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".local" / "share"
    return base / "segflow"


def local_cluster_dir() -> Path:
    """Directory of the local cluster: `data/` (PGDATA), `run/` (socket), `server.log`.

    `$SEGFLOW_DATA_DIR/pg` if set, else `$XDG_DATA_HOME/segflow/pg` (default
    `~/.local/share/segflow/pg`), or `/var/lib/segflow/pg` when running as root.
    """
    return segflow_data_dir() / "pg"


def local_port() -> int:
    """TCP port of the local cluster: `SEGFLOW_LOCAL_PORT`, default 54329."""
    raw = os.environ.get("SEGFLOW_LOCAL_PORT", "").strip()
    if not raw:
        return DEFAULT_PORT
    try:
        port = int(raw)
    except ValueError:
        raise ClusterError(f"SEGFLOW_LOCAL_PORT must be a port number, not {raw!r}") from None
    if not 1 <= port <= 65535:
        raise ClusterError(f"SEGFLOW_LOCAL_PORT out of range: {port}")
    return port


def _url(port: int, database: str) -> str:
    return f"postgresql://{SUPERUSER}@127.0.0.1:{port}/{database}"


# --------------------------------------------------------------------------------------------
# Filesystem helpers


def _check_reachable(path: Path, user: pwd.struct_passwd) -> None:
    """Fail clearly if `user` cannot traverse every directory above `path`."""
    groups = set(os.getgrouplist(user.pw_name, user.pw_gid))
    for ancestor in reversed(path.parents):
        st = ancestor.stat()
        if st.st_uid == user.pw_uid:
            ok = bool(st.st_mode & stat.S_IXUSR)
        elif st.st_gid in groups:
            ok = bool(st.st_mode & stat.S_IXGRP)
        else:
            ok = bool(st.st_mode & stat.S_IXOTH)
        if not ok:
            raise ClusterError(
                f"The server runs as the `{user.pw_name}` user, which cannot enter {ancestor} "
                f"(on the way to {path}). Choose a data directory it can reach "
                "(SEGFLOW_DATA_DIR), or allow it: `chmod o+x` on that directory."
            )


def _make_dir(path: Path, user: pwd.struct_passwd | None, mode: int = 0o700) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if user is not None:
        os.chown(path, user.pw_uid, user.pw_gid)
    path.chmod(mode)


def _write_file(path: Path, text: str, user: pwd.struct_passwd | None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    if user is not None:
        os.chown(tmp, user.pw_uid, user.pw_gid)
    tmp.chmod(0o600)
    tmp.replace(path)


def _log_tail(cluster: Path, lines: int = 30) -> str:
    try:
        text = (cluster / "server.log").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    tail = "\n".join(text.splitlines()[-lines:])
    return f"\nLast lines of {cluster / 'server.log'}:\n{tail}" if tail else ""


@contextlib.contextmanager
def _cluster_lock(cluster: Path) -> Iterator[None]:
    """Serialise init/start/stop between concurrent segflow processes."""
    cluster.parent.mkdir(parents=True, exist_ok=True)
    lock_path = cluster.parent / "pg.lock"
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _run(
    cmd: Sequence[str | Path], user: pwd.struct_passwd | None, cwd: Path, what: str
) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(
            [str(c) for c in cmd],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            check=False,
            **server_popen_kwargs(user, cwd),
        )
    except OSError as exc:
        raise ClusterError(f"{what}: could not run {cmd[0]}: {exc}") from exc
    return result


# --------------------------------------------------------------------------------------------
# The server's state


def _postmaster_pid(data: Path) -> tuple[int, int | None] | None:
    """(pid, port) from postmaster.pid, or None if there is no such file."""
    try:
        lines = (data / "postmaster.pid").read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ClusterError(f"cannot read {data / 'postmaster.pid'}: {exc}") from exc
    try:
        pid = int(lines[0])
    except (IndexError, ValueError):
        # Half-written by a postmaster that is starting right now, or garbage.
        return (0, None)
    port = int(lines[3]) if len(lines) > 3 and lines[3].strip().isdigit() else None
    return (pid, port)


def _process_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    # After a reboot the pid in a leftover postmaster.pid may belong to anything; on Linux
    # check that it is a PostgreSQL server at all.
    comm = Path(f"/proc/{pid}/comm")
    if comm.exists():
        try:
            name = comm.read_text(encoding="utf-8").strip()
        except OSError:
            return True
        return name in ("postgres", "postmaster")
    return True


def _running_port(data: Path) -> int | None:
    """Port of the live server of `data`, None if it is down (removing a stale pid file)."""
    state = _postmaster_pid(data)
    if state is None:
        return None
    pid, port = state
    if _process_alive(pid):
        return port if port is not None else local_port()
    if pid == 0:
        # Possibly a postmaster between creating and filling its pid file: give it a moment.
        time.sleep(1.0)
        state = _postmaster_pid(data)
        if state is not None and state[0] > 0 and _process_alive(state[0]):
            return state[1] if state[1] is not None else local_port()
    # The server died without cleaning up (crash, kill -9, reboot).
    with contextlib.suppress(FileNotFoundError):
        (data / "postmaster.pid").unlink()
    return None


def local_cluster_running() -> bool:
    """Whether the local cluster's server process is alive."""
    data = local_cluster_dir() / "data"
    state = _postmaster_pid(data)
    return state is not None and _process_alive(state[0])


def _wait_connectable(url: str, cluster: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with psycopg.connect(url, connect_timeout=5):
                return
        except psycopg.OperationalError as exc:
            last = exc
            time.sleep(0.2)
    raise ClusterError(
        f"the local PostgreSQL server at {url} does not accept connections: {last}"
        + _log_tail(cluster)
    )


# --------------------------------------------------------------------------------------------
# Init, start, stop


def _settings_text(cluster: Path, port: int) -> str:
    socket_dir = cluster / "run"
    # No unix socket if its path would be too long: segflow connects over TCP anyway.
    sockets = "" if len(str(socket_dir)) + 16 > _MAX_SOCKET_PATH else str(socket_dir)
    settings: dict[str, str | int] = {
        **SERVER_SETTINGS,
        "port": port,
        "unix_socket_directories": sockets,
    }
    lines = [
        "# Written by segflow at every start of the local cluster; do not edit.",
        "# Override a setting with ALTER SYSTEM (postgresql.auto.conf wins over this file).",
    ]
    for key, value in settings.items():
        if isinstance(value, int):
            lines.append(f"{key} = {value}")
        else:
            lines.append(f"{key} = '{value.replace(chr(39), chr(39) * 2)}'")
    return "\n".join(lines) + "\n"


# Appended to postgresql.conf as the last step of initialisation, so it also marks a cluster
# as complete: never change it.
_INCLUDE_LINE = "include_if_exists = 'segflow.conf'"


def _initialised(data: Path) -> bool:
    try:
        return _INCLUDE_LINE in (data / "postgresql.conf").read_text(encoding="utf-8")
    except FileNotFoundError:
        return False


def _initialise(bindir: Path, cluster: Path, user: pwd.struct_passwd | None) -> None:
    data = cluster / "data"
    # A previous initdb was interrupted before the cluster was ever used. initdb needs an
    # empty directory; move the leftovers aside rather than delete anything.
    if data.exists():
        data.rename(cluster / f"data.incomplete-{time.strftime('%Y%m%d%H%M%S')}")
    _make_dir(data, user)
    result = _run(
        [
            bindir / "initdb",
            "-D",
            data,
            "-A",
            "trust",
            "-U",
            SUPERUSER,
            "--encoding=UTF8",
            "--locale=C",
        ],
        user,
        cluster,
        "initdb",
    )
    if result.returncode != 0:
        raise ClusterError(
            f"initdb of {data} failed (exit {result.returncode}):\n{result.stdout}{result.stderr}"
        )
    with open(data / "postgresql.conf", "a", encoding="utf-8") as handle:
        handle.write(f"\n# segflow's settings\n{_INCLUDE_LINE}\n")


def _start(bindir: Path, cluster: Path, user: pwd.struct_passwd | None, port: int) -> None:
    data = cluster / "data"
    _make_dir(cluster / "run", user)
    _write_file(data / "segflow.conf", _settings_text(cluster, port), user)
    log = cluster / "server.log"
    if not log.exists():
        _write_file(log, "", user)
    result = _run(
        [bindir / "pg_ctl", "-D", data, "-l", log, "-w", "-t", str(_START_TIMEOUT_S), "start"],
        user,
        cluster,
        "pg_ctl start",
    )
    if result.returncode != 0:
        hint = ""
        if "could not bind" in _log_tail(cluster, 10):
            hint = (
                f"\nPort {port} on 127.0.0.1 is taken by another program: choose another "
                "with SEGFLOW_LOCAL_PORT."
            )
        raise ClusterError(
            f"could not start the local PostgreSQL server in {data} "
            f"(pg_ctl exit {result.returncode}): {result.stdout}{result.stderr}"
            + hint
            + _log_tail(cluster)
        )


def _ensure_database(port: int, cluster: Path) -> None:
    url = _url(port, "postgres")
    _wait_connectable(url, cluster, _CONNECT_TIMEOUT_S)
    with psycopg.connect(url, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,))
        if exists.fetchone() is None:
            with contextlib.suppress(errors.DuplicateDatabase):
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE)))


def _cluster_version(data: Path) -> int:
    raw = (data / "PG_VERSION").read_text(encoding="utf-8").strip()
    try:
        return int(raw.split(".")[0])
    except ValueError:
        raise ClusterError(f"unreadable {data / 'PG_VERSION'}: {raw!r}") from None


def ensure_local_cluster() -> str:
    """Initialise and start the local cluster as needed; return the URL of its `segflow` db."""
    user = server_user()
    cluster = local_cluster_dir()
    data = cluster / "data"
    if user is not None and not cluster.parent.exists():
        # segflow's own data directory: the server user must be able to pass through it.
        cluster.parent.mkdir(parents=True, exist_ok=True)
        cluster.parent.chmod(0o755)
    with _cluster_lock(cluster):
        if user is not None:
            _check_reachable(cluster, user)
        _make_dir(cluster, user)
        if not _initialised(data):
            _initialise(find_pg_bindir(), cluster, user)
        port = _running_port(data)
        if port is None:
            port = local_port()
            # The programs of the version that made the data directory, even if a newer
            # PostgreSQL was installed since.
            _start(find_pg_bindir(_cluster_version(data)), cluster, user, port)
        _ensure_database(port, cluster)
    return _url(port, DATABASE)


def stop_local_cluster() -> bool:
    """Stop the local cluster if it runs; return whether a server was stopped."""
    cluster = local_cluster_dir()
    data = cluster / "data"
    if not _initialised(data):
        return False
    user = server_user()
    with _cluster_lock(cluster):
        if _running_port(data) is None:
            return False
        bindir = find_pg_bindir(_cluster_version(data))
        result = _run(
            [bindir / "pg_ctl", "-D", data, "-m", "fast", "-w", "-t", "120", "stop"],
            user,
            cluster,
            "pg_ctl stop",
        )
        if result.returncode != 0:
            raise ClusterError(
                f"could not stop the local PostgreSQL server in {data}: "
                f"{result.stdout}{result.stderr}" + _log_tail(cluster)
            )
    return True


def database_url() -> str:
    """URL of the database segflow uses: `SEGFLOW_DATABASE_URL`, else the local cluster's."""
    explicit = os.environ.get("SEGFLOW_DATABASE_URL", "").strip()
    if explicit:
        return explicit
    return ensure_local_cluster()
