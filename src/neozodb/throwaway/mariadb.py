"""A throw-away MariaDB server: Debian's ``mariadbd``, its data directory
and socket in a directory of the caller's, listening on 127.0.0.1 on a free
port, stopped (SIGTERM, then SIGKILL past a bound) with its files.

Durability is real (``innodb_flush_log_at_trx_commit=1``: every commit
is fsynced), so crash tests on it mean something; the buffer pool and
redo log are kept small because a test run starts several of them.
``max_allowed_packet`` is what NEO's MySQL adapter requires (32 MiB and
more), so NEO's storage nodes can use the same server.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence

__all__ = ['MariaDBServer', 'start']

MARIADBD = os.environ.get('NEOZODB_MARIADBD', '/usr/sbin/mariadbd')
INSTALL_DB = os.environ.get('NEOZODB_MARIADB_INSTALL_DB', 'mariadb-install-db')
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class MariaDBServer:
    """A running server; ``database(name)`` gives a ``-d`` string for it."""

    def __init__(self, directory: str, server_args: Sequence[str] = ()) -> None:
        self.directory = os.path.abspath(directory)
        self.server_args = list(server_args)  # more mariadbd options
        self.datadir = os.path.join(self.directory, 'data')
        self.socket = os.path.join(self.directory, 'mysqld.sock')
        self.port = 0
        self.user = 'root'
        self._proc: subprocess.Popen | None = None
        self._log = os.path.join(self.directory, 'mariadbd.log')

    def _server_args(self) -> list[str]:
        args = [
            MARIADBD, '--no-defaults', f'--datadir={self.datadir}',
            f'--socket={self.socket}', f'--port={self.port}', '--bind-address=127.0.0.1',
            f'--pid-file={os.path.join(self.directory, "mariadbd.pid")}',
            f'--log-error={self._log}',
            '--innodb-flush-log-at-trx-commit=1', '--sync-binlog=1',
            '--innodb-buffer-pool-size=64M', '--innodb-log-file-size=32M',
            '--max-allowed-packet=64M', '--max-connections=200',
            '--skip-name-resolve', '--skip-log-bin',
        ]
        if os.geteuid() == 0:
            args.append('--user=root')
        return args + self.server_args

    def start(self) -> None:
        os.makedirs(self.directory, exist_ok=True)
        if not os.path.isdir(os.path.join(self.datadir, 'mysql')):
            install = [INSTALL_DB, '--no-defaults', f'--datadir={self.datadir}',
                       '--auth-root-authentication-method=normal', '--skip-test-db']
            if os.geteuid() == 0:
                install.append('--user=root')
            done = subprocess.run(install, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  timeout=START_TIMEOUT, check=False)
            if done.returncode:
                tail = done.stdout.decode(errors='replace').strip().splitlines()[-1:]
                raise RuntimeError(f'mariadb-install-db failed: {" ".join(tail)}')
        for _ in range(3):   # the free port may be taken before the server binds it
            self.port = _free_port()
            with open(os.path.join(self.directory, 'mariadbd.out'), 'ab') as out:
                self._proc = subprocess.Popen(self._server_args(), stdout=out,
                                              stderr=subprocess.STDOUT,
                                              start_new_session=True)
            if self._wait_ready():
                return
            self.stop(remove=False)
        raise RuntimeError(f'mariadbd did not start: {self._log_tail()}')

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        delay = 0.02
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            if os.path.exists(self.socket):
                try:
                    with socket.create_connection(('127.0.0.1', self.port), timeout=1):
                        return True
                except OSError:
                    pass
            time.sleep(delay)   # polling the server's start, bounded by the deadline
            delay = min(delay * 2, 0.2)
        return False

    def _log_tail(self) -> str:
        try:
            with open(self._log, encoding='utf-8', errors='replace') as f:
                lines = [line.strip() for line in f if '[ERROR]' in line]
        except OSError:
            return 'no log'
        return lines[-1] if lines else 'no error logged'

    def _connect(self):
        import mariadb
        return mariadb.connect(user=self.user, unix_socket=self.socket, autocommit=True)

    def database(self, name: str) -> str:
        """Create database ``name`` (if missing); return NEO's ``-d`` syntax
        for it: ``root@NAME/path/to/socket``."""
        if not name.replace('_', '').isalnum():
            raise ValueError(f'invalid database name {name!r}')
        conn = self._connect()
        try:
            # a name cannot be a bound parameter; it was checked above
            conn.cursor().execute(f'CREATE DATABASE IF NOT EXISTS `{name}`')
        finally:
            conn.close()
        return f'{self.user}@{name}{self.socket}'

    def uri(self, name: str) -> str:
        """The URI form of ``database(name)``, over TCP."""
        self.database(name)
        return f'mariadb://{self.user}@127.0.0.1:{self.port}/{name}'

    def stop(self, remove: bool = True) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT)
        if remove:
            shutil.rmtree(self.datadir, ignore_errors=True)

    def __enter__(self) -> MariaDBServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start(directory: str, server_args: Sequence[str] = ()) -> MariaDBServer:
    """Start a server with its files in ``directory`` (created), with
    ``server_args`` added to mariadbd's options; stopped and its data
    removed by ``stop()``, also when starting fails."""
    server = MariaDBServer(directory, server_args)
    try:
        server.start()
    except BaseException:
        server.stop()
        raise
    return server
