"""A throw-away PostgreSQL server: ``initdb`` in a directory of its own,
``postgres`` listening on 127.0.0.1 (a free port) and on a unix socket in
that directory, trust authentication for the ``postgres`` role, fsync on
(what the backend's durability points promise is really on disk).

The binaries are looked up in ``$NEOZODB_PG_BIN``, then PostgreSQL's
versioned directories (``/usr/lib/postgresql/*/bin``), then ``$PATH``.
PostgreSQL refuses to run as root: as root, the server runs as the
``postgres`` user, with its files in a private temporary directory that
user owns (the directory given may sit below directories only root can
cross), removed by ``stop()``; otherwise they stay in the directory given,
and a later start there reuses them.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile

__all__ = ['PostgreSQLServer', 'find_binaries', 'start']

_USER = 'postgres'


def find_binaries() -> str | None:
    """Directory holding ``initdb``, ``pg_ctl`` and ``postgres``, or None."""
    candidates = [os.environ.get('NEOZODB_PG_BIN', '')]
    candidates += sorted(glob.glob('/usr/lib/postgresql/*/bin'),
                         key=lambda p: int(p.split('/')[-2]) if p.split('/')[-2].isdigit() else 0,
                         reverse=True)
    which = shutil.which('pg_ctl')
    if which:
        candidates.append(os.path.dirname(which))
    for directory in candidates:
        if directory and all(os.access(os.path.join(directory, name), os.X_OK)
                             for name in ('initdb', 'pg_ctl', 'postgres')):
            return directory
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class PostgreSQLServer:
    """A running throw-away server (see the module docstring)."""

    def __init__(self, directory: str) -> None:
        bindir = find_binaries()
        if bindir is None:
            raise RuntimeError('PostgreSQL binaries not found (initdb, pg_ctl, postgres;'
                               ' set NEOZODB_PG_BIN)')
        self.bindir = bindir
        os.makedirs(directory, exist_ok=True)
        self._as_root = os.geteuid() == 0
        if self._as_root:
            entry = pwd.getpwnam(_USER)  # KeyError: no such user
            self._uid, self._gid = entry.pw_uid, entry.pw_gid
            self.base = tempfile.mkdtemp(prefix='neozodb-pg-')
            os.chown(self.base, self._uid, self._gid)
            # where the files are, for whoever looks in the directory given
            with open(os.path.join(directory, 'postgresql-files'), 'w') as f:
                f.write(self.base + '\n')
        else:
            self.base = os.path.abspath(directory)
        self.data = os.path.join(self.base, 'data')
        self.log = os.path.join(self.base, 'postgresql.log')
        self.host = '127.0.0.1'
        self.port = 0
        self._running = False
        try:
            if not os.path.exists(os.path.join(self.data, 'PG_VERSION')):
                # (a server of an earlier run in the same directory is reused)
                self._run('initdb', '-D', self.data, '-U', _USER, '--auth=trust', '-E', 'UTF8',
                          '--locale=C', '--no-sync')
            self._start()
        except BaseException:
            self.stop()
            raise

    def _run(self, program: str, *args: str, timeout: float = 120) -> None:
        kwargs = {}
        if self._as_root:
            kwargs = dict(user=self._uid, group=self._gid, extra_groups=[])
        result = subprocess.run([os.path.join(self.bindir, program), *args], cwd=self.base,
                                stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                timeout=timeout, **kwargs)
        if result.returncode:
            detail = (result.stderr or result.stdout).strip().splitlines()
            raise RuntimeError(f'{program} failed: {detail[-1] if detail else result.returncode}')

    def _start(self) -> None:
        # a free port may be taken between the probe and the bind: retry
        for attempt in range(3):
            self.port = _free_port()
            options = ' '.join([
                '-c listen_addresses=127.0.0.1', f'-p {self.port}',
                f'-c unix_socket_directories={self.base}',
                '-c fsync=on', '-c synchronous_commit=on',
                '-c max_connections=200', '-c shared_buffers=128MB',
                '-c logging_collector=off'])
            try:
                self._run('pg_ctl', '-D', self.data, '-l', self.log, '-w', '-t', '60',
                          '-o', options, 'start')
            except RuntimeError:
                if attempt == 2:
                    raise RuntimeError(f'cannot start PostgreSQL: {self._log_tail()}') from None
                continue
            self._running = True
            return

    def _log_tail(self) -> str:
        try:
            with open(self.log) as f:
                lines = [line.strip() for line in f if line.strip()]
        except OSError:
            return 'no log'
        return lines[-1] if lines else 'empty log'

    def dsn(self, name: str = 'postgres') -> str:
        """libpq connection string for database ``name``."""
        return f'host={self.host} port={self.port} user={_USER} dbname={name}'

    def database(self, name: str) -> str:
        """Create database ``name`` if it does not exist; its DSN."""
        import psycopg
        from psycopg import sql
        with psycopg.connect(self.dsn(), autocommit=True, connect_timeout=10) as conn:
            exists = conn.execute('SELECT 1 FROM pg_database WHERE datname = %s',
                                  (name,)).fetchone()
            if exists is None:
                conn.execute(sql.SQL('CREATE DATABASE {}').format(sql.Identifier(name)))
        return self.dsn(name)

    def drop(self, name: str) -> None:
        """Drop database ``name`` (its connections are closed first)."""
        import psycopg
        from psycopg import sql
        with psycopg.connect(self.dsn(), autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.SQL('DROP DATABASE IF EXISTS {} WITH (FORCE)')
                         .format(sql.Identifier(name)))

    def stop(self) -> None:
        """Stop the server (fast shutdown: connections are closed) and, as
        root, remove its private directory.  Idempotent."""
        try:
            if self._running:
                self._running = False
                self._run('pg_ctl', '-D', self.data, '-m', 'fast', '-w', '-t', '60', 'stop')
        finally:
            if self._as_root and os.path.isdir(self.base):
                shutil.rmtree(self.base, ignore_errors=True)


def start(directory: str) -> PostgreSQLServer:
    """Start a throw-away server with its files in (or, as root, named in)
    ``directory``."""
    return PostgreSQLServer(directory)
