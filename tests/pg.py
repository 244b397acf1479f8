"""A real PostgreSQL server for the tests, in a temporary directory, started and stopped by the
test process itself.

What it does. :class:`PostgresServer` makes a cluster (``initdb -A trust -U ccpd --no-sync -E
UTF8``) in a new temporary directory, starts ``postgres`` on ``127.0.0.1`` at a free port (its
Unix socket inside the directory too, so it meets no other server), creates the database
``ccpd`` and the template ``ccpd_template``, and gives ``dsn``
(``postgresql://ccpd@127.0.0.1:PORT/ccpd``), ``host`` and ``port``. :meth:`~PostgresServer.
fresh_database` copies the template into a new database for one test. :meth:`~PostgresServer.
restart` (stop, start: data, port and DSN kept), :meth:`~PostgresServer.stop`,
:meth:`~PostgresServer.kill` (SIGKILL to the postmaster, as a crash) and
:meth:`~PostgresServer.start` are for tests of what a client does when its database goes away.
:meth:`~PostgresServer.close` (the end of ``with``) always stops the server, waits until every
one of its processes is gone and removes the directory, also after a failure or a ``kill()``.
Every wait is bounded (:data:`START_TIMEOUT_S`, ...). Durability is traded for speed
(``fsync=off``, ``full_page_writes=off``, the directory in ``/dev/shm`` when that is a roomy
tmpfs): a killed server loses nothing a commit acknowledged, a killed machine would. ``initdb``
runs once per session (about 0.6 s, in :func:`skip_reason`); each server copies its cluster and
starts in about 0.2 s, a restart takes 0.1 s, a fresh database 40 ms. The ``postgres`` fixture
of ``tests/conftest.py`` runs one server per session and gives each test a fresh database of
its own.

Why as another user. PostgreSQL refuses to run as root (``initdb: error: cannot be run as
root``), and CI runs the tests as root. Then the cluster is owned by, and ``initdb`` and
``postgres`` run as, an unprivileged user: ``postgres`` (which the Debian package creates), else
``nobody``, else a system user ``ccpdtest`` made with ``useradd``. The switch is the standard
library's (``subprocess.Popen(user=, group=, extra_groups=[])``: setgroups, setgid, setuid in
the child before exec): no ``runuser``, ``su`` or PAM is needed. Run as anyone else, the tests
run PostgreSQL as themselves.

Why ``postgres`` is the test process's own child (not ``pg_ctl start``). ``pg_ctl`` detaches
the postmaster, which then belongs to PID 1; where PID 1 does not reap (a container without an
init, or one that reaps only now and then), a stopped or killed postmaster stays a zombie that
``kill(pid, 0)`` still finds, and the next start refuses the data directory ("lock file
already exists"). As a child it is reaped at once, and :meth:`~PostgresServer.stop` and
:meth:`~PostgresServer.kill` know exactly when it has ended. Ready is read from
``postmaster.pid`` as ``pg_ctl -w`` reads it.

Where PostgreSQL comes from. The binaries are looked for on ``PATH`` (``initdb`` with its
``postgres`` beside it), then in ``/usr/lib/postgresql/*/bin`` (newest version first). CI gets
them from the Debian package ``postgresql``, which ``.ci/run`` installs when it is missing.
:func:`skip_reason` says why PostgreSQL cannot be had here (no binaries, no user to run it as,
``initdb`` failing, with the tail of its output), and the fixture skips with it. The client is
psycopg 3 (``psycopg[binary]``, which brings its own libpq).
"""
from __future__ import annotations

import atexit
import glob
import itertools
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass

HOST = "127.0.0.1"
SUPERUSER = "ccpd"
DATABASE = "ccpd"            # the database of PostgresServer.dsn
TEMPLATE = "ccpd_template"   # what fresh_database() copies (empty unless a test fills it)

INITDB_TIMEOUT_S = 60.0
START_TIMEOUT_S = 30.0       # as pg_ctl -w -t 30
STOP_TIMEOUT_S = 30.0
EXIT_TIMEOUT_S = 10.0        # for the processes left by a killed postmaster to end
CONNECT_TIMEOUT_S = 5        # libpq's connect_timeout for the admin connections

FALLBACK_USER = "ccpdtest"
SHM_MIN_FREE_BYTES = 1 << 30   # /dev/shm is used for the data when it has this much room

# Speed over durability; a commit still reaches the WAL file before it is acknowledged
# (synchronous_commit stays on), so kill() loses nothing committed: only an OS crash would.
SETTINGS = {
    "fsync": "off",
    "full_page_writes": "off",
    "autovacuum": "off",                   # nothing runs unasked (nor holds the template)
    "dynamic_shared_memory_type": "mmap",  # in the data directory: kill() leaves no /dev/shm file
    "shared_buffers": "32MB",
    "max_connections": "50",
    "log_min_messages": "warning",
    "log_line_prefix": "'%m [%p] %d '",
}


class PostgresUnavailable(Exception):
    """PostgreSQL cannot be had here; the message says why (a reason to skip)."""


# -- what runs it --------------------------------------------------------------------------------

def _version_key(path: str) -> tuple:
    version = os.path.basename(os.path.dirname(path))   # /usr/lib/postgresql/<version>/bin
    return tuple(int(part) if part.isdigit() else -1 for part in version.split("."))


def find_bindir() -> str:
    """The directory of ``initdb`` and ``postgres``: the one on ``PATH`` (symlinks followed),
    else the newest ``/usr/lib/postgresql/*/bin``."""
    candidates = []
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(os.path.dirname(os.path.realpath(initdb)))
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)
    for bindir in candidates:
        if all(os.access(os.path.join(bindir, name), os.X_OK) for name in ("initdb", "postgres")):
            return bindir
    raise PostgresUnavailable(
        "PostgreSQL is not installed: no initdb and postgres on PATH nor in "
        "/usr/lib/postgresql/*/bin (Debian package postgresql)")


@dataclass(frozen=True)
class RunAs:
    """The unprivileged user PostgreSQL runs as when the tests run as root."""

    name: str
    uid: int
    gid: int

    def popen_options(self) -> dict:
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


def _unprivileged_user() -> RunAs | None:
    """None when not root (PostgreSQL runs as the test process); else the user it runs as."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody", FALLBACK_USER):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        if entry.pw_uid != 0:
            return RunAs(name, entry.pw_uid, entry.pw_gid)
    useradd = shutil.which("useradd")
    if useradd is None:
        raise PostgresUnavailable("running as root, with no postgres or nobody user to run "
                                  "PostgreSQL as and no useradd to make one")
    made = subprocess.run([useradd, "--system", "--no-create-home", "--shell",
                           "/usr/sbin/nologin", FALLBACK_USER],
                          capture_output=True, text=True, timeout=30, check=False)
    try:
        entry = pwd.getpwnam(FALLBACK_USER)
    except KeyError:
        raise PostgresUnavailable(f"running as root, and could not create a user to run "
                                  f"PostgreSQL as: {_tail(made.stderr)}") from None
    return RunAs(FALLBACK_USER, entry.pw_uid, entry.pw_gid)


def _reachable(path: str, run_as: RunAs | None) -> bool:
    """Whether ``run_as`` may enter every directory on the way to ``path``."""
    if run_as is None:
        return True
    path = os.path.realpath(path)
    while True:
        st = os.stat(path)
        if not (st.st_mode & stat.S_IXOTH
                or (st.st_uid == run_as.uid and st.st_mode & stat.S_IXUSR)
                or (st.st_gid == run_as.gid and st.st_mode & stat.S_IXGRP)):
            return False
        if path == "/":
            return True
        path = os.path.dirname(path)


def _base_directory(run_as: RunAs | None) -> str:
    """Where the temporary directories go: ``/dev/shm`` when it is a roomy tmpfs (a cluster
    is some 40 MB and a thousand files, which a disk may take a second to write, tmpfs a tenth
    of that), else the system's temporary directory, else ``/tmp``; one ``run_as`` can reach."""
    candidates = []
    try:
        shm = os.statvfs("/dev/shm")
        if shm.f_bavail * shm.f_frsize >= SHM_MIN_FREE_BYTES and os.access("/dev/shm", os.W_OK):
            candidates.append("/dev/shm")
    except OSError:
        pass
    candidates += [tempfile.gettempdir(), "/tmp"]
    for base in candidates:
        if _reachable(base, run_as):
            return base
    raise PostgresUnavailable(f"user {run_as.name} cannot reach a temporary directory")


def _make_directory(prefix: str, run_as: RunAs | None) -> str:
    """A new temporary directory, owned by whoever runs PostgreSQL."""
    directory = tempfile.mkdtemp(prefix=prefix, dir=_base_directory(run_as))
    if run_as is not None:
        os.chown(directory, run_as.uid, run_as.gid)
    return directory


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _environment(home: str) -> dict:
    """A clean environment for PostgreSQL's programs: no PG* variable of the caller's, the C
    locale, a home they may enter."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C",
            "HOME": home}


def _run(argv: list[str], run_as: RunAs | None, cwd: str, timeout: float,
         ) -> subprocess.CompletedProcess:
    options = run_as.popen_options() if run_as is not None else {}
    return subprocess.run(argv, cwd=cwd, env=_environment(cwd), capture_output=True, text=True,
                          timeout=timeout, check=False, stdin=subprocess.DEVNULL, **options)


# -- one initdb per session, copied for each server ----------------------------------------------

@dataclass(frozen=True)
class _Cluster:
    bindir: str
    run_as: RunAs | None
    directory: str           # removed at exit

    @property
    def data(self) -> str:
        return os.path.join(self.directory, "data")


_cluster: _Cluster | PostgresUnavailable | None = None


def _pristine_cluster() -> _Cluster:
    """A new cluster, made once per process by ``initdb`` and copied (0.1 s) for each server;
    raises (every time) :class:`PostgresUnavailable` when it cannot be made."""
    global _cluster
    if _cluster is None:
        try:
            _cluster = _initdb()
        except PostgresUnavailable as unavailable:
            _cluster = unavailable
    if isinstance(_cluster, PostgresUnavailable):
        raise _cluster
    return _cluster


def _initdb() -> _Cluster:
    bindir = find_bindir()
    run_as = _unprivileged_user()
    directory = _make_directory("ccpd-pg-cluster-", run_as)
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    cluster = _Cluster(bindir, run_as, directory)
    argv = [os.path.join(bindir, "initdb"), "-D", cluster.data, "-A", "trust", "-U", SUPERUSER,
            "--no-sync", "-E", "UTF8", "--no-locale", "--no-instructions"]
    try:
        done = _run(argv, run_as, directory, INITDB_TIMEOUT_S)
    except OSError as error:   # e.g. no right to switch user (setgroups, setuid)
        who = f" as user {run_as.name}" if run_as else ""
        raise PostgresUnavailable(f"cannot run initdb{who}: {error}") from None
    except subprocess.TimeoutExpired:
        raise PostgresUnavailable(f"initdb did not finish in {INITDB_TIMEOUT_S:.0f} s") from None
    if done.returncode != 0:
        who = f" as user {run_as.name}" if run_as else ""
        raise PostgresUnavailable(f"initdb{who} failed (exit {done.returncode}):\n"
                                  f"{_tail(done.stdout + done.stderr)}")
    with open(os.path.join(cluster.data, "postgresql.conf"), "a", encoding="utf-8") as conf:
        conf.write("\ninclude 'ccpd-test.conf'   # tests/pg.py: port, sockets, speed\n")
    return cluster


def skip_reason() -> str | None:
    """None when a PostgreSQL server can be run here, else why not. The first call runs
    ``initdb`` (under a second); its cluster is the one every :class:`PostgresServer` copies."""
    try:
        _pristine_cluster()
    except PostgresUnavailable as unavailable:
        return str(unavailable)
    return None


# -- the server ----------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@dataclass
class Database:
    """A database of ``server``; ``dsn`` connects to it."""

    server: PostgresServer
    name: str

    @property
    def dsn(self) -> str:
        return self.server.dsn_for(self.name)

    @property
    def host(self) -> str:
        return self.server.host

    @property
    def port(self) -> int:
        return self.server.port

    def drop(self) -> None:
        """Drop it, closing whatever connections it still has."""
        self.server.drop_database(self.name)


class PostgresServer:
    """A PostgreSQL server of its own, in a temporary directory; a context manager (``with
    PostgresServer() as server``), or :meth:`start` and, always, :meth:`close`.

    ``settings`` are added to (or override) :data:`SETTINGS`, in the ``ccpd-test.conf`` that
    ``postgresql.conf`` includes.
    """

    host = HOST

    def __init__(self, settings: dict[str, str] | None = None):
        self.settings = {**SETTINGS, **(settings or {})}
        self.directory: str | None = None
        self.port: int | None = None
        self._cluster: _Cluster | None = None
        self._process: subprocess.Popen | None = None
        self._created = False
        self._names = itertools.count(1)

    # -- where it is

    @property
    def data(self) -> str:
        return os.path.join(self.directory, "data")

    @property
    def log_path(self) -> str:
        return os.path.join(self.directory, "postgres.log")

    @property
    def dsn(self) -> str:
        """``postgresql://ccpd@127.0.0.1:PORT/ccpd``: the same across restarts."""
        return self.dsn_for(DATABASE)

    def dsn_for(self, database: str) -> str:
        return f"postgresql://{SUPERUSER}@{self.host}:{self.port}/{database}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as log:
                return _tail(log.read(), lines)
        except OSError:
            return ""

    def processes(self) -> list[int]:
        """The live processes of this server: the postmaster (whose command line names the
        directory) and its children (whose command lines do not, but whose working directory is
        the data directory). Zombies are not counted."""
        if self.directory is None:
            return []
        inside = self.directory + os.sep
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                cwd = os.readlink(f"/proc/{entry}/cwd")
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read().decode(errors="replace")
            except OSError:   # gone, a zombie, or not ours to read
                continue
            if (cwd + os.sep).startswith(inside) or self.directory in cmdline:
                found.append(int(entry))
        return found

    # -- its life

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def start(self) -> None:
        """Start the server (nothing when it runs). The first start makes the directory, the
        cluster and the databases; later ones keep the data, the port and so the DSN."""
        if self.running:
            return
        if self._created:
            self._start_postmaster()
            return
        try:
            self._create()
        except BaseException:
            self.close()
            raise

    def stop(self) -> None:
        """Stop the server (a fast shutdown: open transactions are rolled back, clients cut
        off) and wait until all of it has ended; SIGKILL after :data:`STOP_TIMEOUT_S`."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(EXIT_TIMEOUT_S)
        self._wait_until_gone()

    def kill(self) -> None:
        """SIGKILL the postmaster, as a crash would; returns once its children have ended too
        (they see it die). :meth:`start` then recovers the data from the WAL."""
        process, self._process = self._process, None
        if process is None:
            return
        process.kill()
        process.wait(EXIT_TIMEOUT_S)
        self._wait_until_gone()

    def restart(self) -> None:
        """Stop and start again: the data, the port and the DSN stay."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server, make sure nothing of it runs on, remove the directory. Safe to call
        twice, and after any failure."""
        try:
            try:
                self.stop()
            finally:
                self._wait_until_gone()
                self._remove_stale_shared_memory()
        finally:
            if self.directory is not None:
                shutil.rmtree(self.directory, ignore_errors=True)
                if os.path.exists(self.directory):
                    raise RuntimeError(f"could not remove {self.directory}")
            atexit.unregister(self.close)
            self._created = False

    # -- databases

    def fresh_database(self, template: str = TEMPLATE) -> Database:
        """A new, empty database (a copy of ``template``: nobody may be connected to that)."""
        name = f"test_{next(self._names)}"
        self.execute("CREATE DATABASE {} TEMPLATE {}", name, template)
        return Database(self, name)

    def drop_database(self, name: str) -> None:
        self.execute("DROP DATABASE IF EXISTS {} WITH (FORCE)", name)

    def execute(self, statement: str, *identifiers: str, database: str = "postgres") -> None:
        """Run one statement as the superuser outside a transaction (CREATE DATABASE and the
        like), with ``identifiers`` quoted into its ``{}``."""
        import psycopg
        from psycopg import sql
        query = sql.SQL(statement).format(*(sql.Identifier(name) for name in identifiers))
        with psycopg.connect(self.dsn_for(database), autocommit=True,
                             connect_timeout=CONNECT_TIMEOUT_S) as connection:
            connection.execute(query)

    # -- inside

    def _create(self) -> None:
        try:
            import psycopg  # noqa: F401 - the admin connections need it; fail before initdb
        except ImportError:
            raise RuntimeError("psycopg is not installed: pip install -c constraints.txt "
                               "-e '.[test]'") from None
        self._cluster = _pristine_cluster()
        self.directory = _make_directory("ccpd-pg-", self._cluster.run_as)
        atexit.register(self.close)
        copied = _run(["cp", "-a", self._cluster.data, self.data], self._cluster.run_as,
                      self.directory, INITDB_TIMEOUT_S)
        if copied.returncode != 0:
            raise RuntimeError(f"could not copy the cluster: {_tail(copied.stderr)}")
        self._created = True
        for attempt in range(3):   # the free port may be taken before postgres binds it
            self.port = _free_port()
            self._configure()
            try:
                self._start_postmaster()
                break
            except RuntimeError:
                if attempt == 2 or "could not bind" not in self.log_tail(50):
                    raise
        self.execute("CREATE DATABASE {}", DATABASE)
        self.execute("CREATE DATABASE {} IS_TEMPLATE true", TEMPLATE)

    def _configure(self) -> None:
        settings = {**self.settings, "port": str(self.port), "listen_addresses": f"'{HOST}'",
                    "unix_socket_directories": f"'{self.directory}'"}
        path = os.path.join(self.data, "ccpd-test.conf")
        with open(path, "w", encoding="utf-8") as conf:
            conf.write("# written by tests/pg.py\n")
            conf.writelines(f"{name} = {value}\n" for name, value in settings.items())
        run_as = self._cluster.run_as
        if run_as is not None:
            os.chown(path, run_as.uid, run_as.gid)

    def _start_postmaster(self) -> None:
        run_as = self._cluster.run_as
        with open(self.log_path, "ab") as log:
            if run_as is not None:
                os.fchown(log.fileno(), run_as.uid, run_as.gid)
            self._process = subprocess.Popen(
                [os.path.join(self._cluster.bindir, "postgres"), "-D", self.data],
                cwd=self.directory, env=_environment(self.directory), stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                **(run_as.popen_options() if run_as is not None else {}))
        try:
            self._wait_until_ready()
        except BaseException:
            self.kill()
            raise

    def _wait_until_ready(self) -> None:
        """Until ``postmaster.pid`` names this postmaster and says ``ready`` (as ``pg_ctl -w``
        waits), at most :data:`START_TIMEOUT_S`."""
        process = self._process
        pidfile = os.path.join(self.data, "postmaster.pid")
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"postgres exited ({process.returncode}) while starting:\n"
                                   f"{self.log_tail()}")
            try:
                with open(pidfile, encoding="utf-8") as f:
                    lines = f.read().splitlines()
            except FileNotFoundError:
                lines = []
            if len(lines) >= 8 and lines[0] == str(process.pid) and lines[7].strip() == "ready":
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"postgres was not ready in {START_TIMEOUT_S:.0f} s:\n"
                                   f"{self.log_tail()}")
            time.sleep(0.01)

    def _wait_until_gone(self) -> None:
        """Until no process of this server is left; SIGKILL for any still there after
        :data:`EXIT_TIMEOUT_S` (the children of a killed postmaster leave by themselves)."""
        deadline = time.monotonic() + EXIT_TIMEOUT_S
        while self.processes():
            if time.monotonic() > deadline:
                for pid in self.processes():
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                time.sleep(0.2)
                if self.processes():
                    raise RuntimeError(f"processes of {self.directory} will not end: "
                                       f"{self.processes()}")
                return
            time.sleep(0.01)

    def _remove_stale_shared_memory(self) -> None:
        """A killed postmaster leaves its (56-byte) System V segment, named in line 7 of
        ``postmaster.pid``; the next start would reuse it, the end removes it."""
        if self.directory is None:
            return
        try:
            with open(os.path.join(self.data, "postmaster.pid"), encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError:
            return   # a clean stop removes the file, and the segment with it
        if len(lines) < 7 or len(lines[6].split()) != 2 or not shutil.which("ipcrm"):
            return
        key, shmid = lines[6].split()
        try:
            with open("/proc/sysvipc/shm", encoding="ascii") as f:
                segments = [line.split() for line in f.readlines()[1:]]
        except OSError:
            return
        # key, shmid, perms, size, cpid, lpid, nattch, ...: that very segment, unused
        if any(fields[:2] == [key, shmid] and fields[6] == "0" for fields in segments):
            subprocess.run(["ipcrm", "-m", shmid], capture_output=True, timeout=10,
                           check=False)
