"""powerfs: a FUSE passthrough file system that can lose power.

Run as its own process::

    python tests/durability/powerfs.py BACKING MOUNTPOINT --control SOCKET

Everything under MOUNTPOINT is BACKING.  The file system models a disk with
a volatile write cache: a write reaches the backing file at once (so reads,
sizes and shared mappings are those of a real file), but until the file is
fsynced (fsync or fdatasync: the same here) the layer remembers how to undo
it.  ``cut`` on the control socket is the power cut: every file is put back
as it was at its last fsync, then the file system is dead (every operation
fails with EIO) until it is unmounted.  A new process on the same BACKING is
the machine booting again.

The model, per file (keyed by path; renames carry the state along):

* ``synced_size``: the size at the last fsync (the size when the file was
  first written in this run if it was never fsynced: what was there when
  the layer started is durable; 0 for a file created in this run);
* the original content of each 4 KiB page of ``[0, synced_size)`` that a
  write or a truncate changed since then, saved the first time it changes.

A cut writes the saved pages back and truncates to ``synced_size``: every
byte written since the last fsync is lost, wholly, and nothing else.  A real
disk might keep some of those writes (any subset, in any order, torn
sectors): losing all of them is one of the outcomes it allows, the one that
matters most for acknowledged commits, but not the only one.  What it does
not model:

* metadata, but for one case: mkdir, unlink, rmdir, rename, chmod and
  utimens are durable at once, as LazyFS does it.  The exception is the
  entry of a new file: a file created since the last fsync of its
  directory is gone after a cut (POSIX: fsync of the file itself does not
  make its name durable; SQLite fsyncs the directory when it creates a
  WAL or journal, which also saves the database file created there
  before).  A real file system may also lose a rename or an unlink not
  fsynced with its directory, and bring an unlinked file back;
* partial loss: reordered or torn writes, and a cut in the middle of an
  fsync (an fsync here is atomic);
* the cache of the kernel: FUSE sends every write(2) to this process before
  it returns, except pages dirtied through a shared mmap, which the kernel
  writes back later (at msync, close, unmount or by its flusher).  SQLite
  maps only the WAL index (``-shm``), which it never fsyncs and rebuilds
  from the WAL after a crash, so losing those pages is right;
* the backing file system is never cut: the layer does not fsync it.

The wal-index of SQLite is a shared mapping of the ``-shm`` file: FUSE
supports it only without ``direct_io`` (a shared mapping of a direct_io
file is refused with ENODEV unless the daemon asks for
FUSE_DIRECT_IO_ALLOW_MMAP, which libfuse 2 cannot), and the size the layer
reports must always be the size of what was written: a reported size
smaller than a mapped page truncates the kernel's page cache, and the next
access of that page by SQLite is a SIGBUS.  Writing through to the backing
file keeps the reported size exact (``--naive`` runs the layer that does
otherwise: ``NaiveSizeFS``).
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import socket
import socketserver
import sys
import threading
from collections.abc import Iterator

from fuse import FUSE, FuseOSError, Operations

PAGE = 4096


class FileState:
    """What a cut restores of one file (see the module docstring)."""

    __slots__ = ("synced_size", "saved")

    def __init__(self, synced_size: int) -> None:
        self.synced_size = synced_size
        self.saved: dict[int, bytes] = {}  # page index -> content at the last fsync


class PowerFS(Operations):
    """The file system; every operation runs under one lock, so that the
    undo state always matches the backing files (the order of writes is the
    order of the lock)."""

    use_ns = True

    def __init__(self, backing: str) -> None:
        self.root = os.path.realpath(backing)
        self.mutex = threading.Lock()
        self.files: dict[str, FileState] = {}
        # files created since the last fsync of their directory
        self.new_entries: set[str] = set()
        self.dead = False
        self.stats = {"writes": 0, "bytes_written": 0, "fsyncs": 0, "truncates": 0, "fsyncdirs": 0,
                      "cuts": 0}

    # -- helpers ---------------------------------------------------------------

    def _real(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    def _alive(self) -> None:
        if self.dead:
            raise FuseOSError(errno.EIO)

    def _state(self, path: str, fd: int) -> FileState:
        state = self.files.get(path)
        if state is None:
            # no write since the last fsync (or since the start): all of it
            # is durable
            state = self.files[path] = FileState(os.fstat(fd).st_size)
        return state

    def _save(self, state: FileState, fd: int, start: int, end: int) -> None:
        """Save the pages of [start, end) that hold durable bytes, before
        they change for the first time since the last fsync."""
        end = min(end, state.synced_size)
        if start >= end:
            return
        for page in range(start // PAGE, (end - 1) // PAGE + 1):
            if page not in state.saved:
                length = min(PAGE, state.synced_size - page * PAGE)
                data = os.pread(fd, length, page * PAGE)
                # durable bytes beyond the current end were truncated away
                # earlier and saved then
                state.saved[page] = data

    def _under(self, path: str) -> Iterator[str]:
        prefix = path.rstrip("/") + "/"
        return (p for p in list(self.files) if p == path or p.startswith(prefix))

    # -- the power cut ---------------------------------------------------------

    def cut(self) -> dict:
        """Put every file back as it was at its last fsync; the file system
        is dead from now on.  Returns what was lost."""
        with self.mutex:
            lost_files, lost_bytes = [], 0
            for path in sorted(self.new_entries):
                try:
                    lost_bytes += os.lstat(self._real(path)).st_size
                    os.unlink(self._real(path))
                    lost_files.append(path)
                except FileNotFoundError:
                    pass
                self.files.pop(path, None)
            self.new_entries.clear()
            for path, state in sorted(self.files.items()):
                real = self._real(path)
                try:
                    fd = os.open(real, os.O_RDWR)
                except FileNotFoundError:
                    continue  # unlinked since: unlinks are durable
                try:
                    size = os.fstat(fd).st_size
                    lost = max(0, size - state.synced_size) + sum(map(len, state.saved.values()))
                    for page, data in state.saved.items():
                        os.pwrite(fd, data, page * PAGE)
                    os.ftruncate(fd, state.synced_size)
                finally:
                    os.close(fd)
                if lost:
                    lost_files.append(path)
                    lost_bytes += lost
            self.files.clear()
            self.dead = True
            self.stats["cuts"] += 1
            return {"files": lost_files, "bytes": lost_bytes, **self.stats}

    def report(self) -> dict:
        with self.mutex:
            unsynced = {path: (state.synced_size, len(state.saved))
                        for path, state in self.files.items()}
            return {"dead": self.dead, "unsynced": unsynced,
                    "new_entries": sorted(self.new_entries), **self.stats}

    # -- files -------------------------------------------------------------------

    def _open_flags(self, flags: int) -> int:
        # The layer reads what it overwrites: write-only handles are opened
        # read-write.  O_APPEND is dropped: FUSE passes the offset of every
        # write, the end of file for an append.
        if flags & os.O_ACCMODE != os.O_RDONLY:
            flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
        return flags & ~os.O_APPEND

    def open(self, path: str, flags: int) -> int:
        with self.mutex:
            self._alive()
            if flags & os.O_TRUNC:
                self._truncate_locked(path, 0, None)
            return os.open(self._real(path), self._open_flags(flags) & ~os.O_TRUNC)

    def create(self, path: str, mode: int, fi=None) -> int:
        with self.mutex:
            self._alive()
            fd = os.open(self._real(path), os.O_RDWR | os.O_CREAT, mode)
            if path not in self.files:
                # a new file (FUSE creates only what its lookup did not
                # find): neither its entry nor its content is durable yet
                self.files[path] = FileState(os.fstat(fd).st_size)
                self.new_entries.add(path)
            return fd

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        with self.mutex:
            self._alive()
            return os.pread(fh, size, offset)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        with self.mutex:
            self._alive()
            state = self._state(path, fh)
            self._save(state, fh, offset, offset + len(data))
            self.stats["writes"] += 1
            self.stats["bytes_written"] += len(data)
            return os.pwrite(fh, data, offset)

    def _truncate_locked(self, path: str, length: int, fh: int | None) -> None:
        fd = fh if fh is not None else os.open(self._real(path), os.O_RDWR)
        try:
            state = self._state(path, fd)
            size = os.fstat(fd).st_size
            if length < size:
                self._save(state, fd, length, size)
            self.stats["truncates"] += 1
            os.ftruncate(fd, length)
        finally:
            if fh is None:
                os.close(fd)

    def truncate(self, path: str, length: int, fh: int | None = None) -> None:
        with self.mutex:
            self._alive()
            self._truncate_locked(path, length, fh)

    def fsync(self, path: str, datasync: int, fh: int) -> None:
        with self.mutex:
            self._alive()
            # the durable point: what is in the backing file now survives
            self.files.pop(path, None)
            self.stats["fsyncs"] += 1

    def flush(self, path: str, fh: int) -> None:
        with self.mutex:
            self._alive()

    def release(self, path: str, fh: int) -> None:
        with self.mutex:
            os.close(fh)

    def getattr(self, path: str, fh: int | None = None) -> dict:
        with self.mutex:
            if path != "/":
                self._alive()
            st = os.fstat(fh) if fh is not None else os.lstat(self._real(path))
            attrs = {key: getattr(st, key) for key in (
                "st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_blocks")}
            attrs.update(st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns,
                         st_ctime=st.st_ctime_ns)
            return attrs

    # -- metadata: durable at once ---------------------------------------------

    def access(self, path: str, amode: int) -> None:
        with self.mutex:
            self._alive()
            if not os.access(self._real(path), amode):
                raise FuseOSError(errno.EACCES)

    def readdir(self, path: str, fh: int) -> list[str]:
        with self.mutex:
            self._alive()
            return [".", "..", *os.listdir(self._real(path))]

    def mkdir(self, path: str, mode: int) -> None:
        with self.mutex:
            self._alive()
            os.mkdir(self._real(path), mode)

    def rmdir(self, path: str) -> None:
        with self.mutex:
            self._alive()
            os.rmdir(self._real(path))

    def unlink(self, path: str) -> None:
        with self.mutex:
            self._alive()
            os.unlink(self._real(path))
            self.files.pop(path, None)
            self.new_entries.discard(path)

    def rename(self, old: str, new: str) -> None:
        with self.mutex:
            self._alive()
            os.rename(self._real(old), self._real(new))
            for path in list(self._under(new)):
                del self.files[path]  # replaced
            for path in list(self._under(old)):
                self.files[new + path[len(old):]] = self.files.pop(path)
            for path in [p for p in self.new_entries if p == old or p.startswith(old + "/")]:
                # still not durable, under its new name
                self.new_entries.discard(path)
                self.new_entries.add(new + path[len(old):])

    def link(self, target: str, source: str) -> None:
        # one undo state per path: two names of one file would each undo
        # half of its writes
        raise FuseOSError(errno.EPERM)

    def symlink(self, target: str, source: str) -> None:
        with self.mutex:
            self._alive()
            os.symlink(source, self._real(target))

    def readlink(self, path: str) -> str:
        with self.mutex:
            self._alive()
            return os.readlink(self._real(path))

    def chmod(self, path: str, mode: int) -> None:
        with self.mutex:
            self._alive()
            os.chmod(self._real(path), mode)

    def chown(self, path: str, uid: int, gid: int) -> None:
        with self.mutex:
            self._alive()
            os.chown(self._real(path), uid, gid)

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> None:
        with self.mutex:
            self._alive()
            os.utime(self._real(path), ns=times)

    def fsyncdir(self, path: str, datasync: int, fh: int) -> None:
        with self.mutex:
            self._alive()
            # the names of the files created in it are durable now
            directory = path.rstrip("/") or "/"
            self.new_entries = {p for p in self.new_entries if os.path.dirname(p) != directory}
            self.stats["fsyncdirs"] += 1

    def statfs(self, path: str) -> dict:
        st = os.statvfs(self.root)
        return {key: getattr(st, key) for key in (
            "f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files",
            "f_flag", "f_frsize", "f_namemax")}


class NaiveSizeFS(PowerFS):
    """The mistake that kills SQLite with SIGBUS, kept to show it (``--naive``):
    report the durable size of a file (what a layer that keeps unsynced
    writes in memory and writes them to the backing file at fsync reports
    when it stats the backing file).  The ``-shm`` file is never fsynced, so
    its reported size stays below the pages SQLite extended it by and
    mapped; when the kernel refreshes the attributes it shrinks its page
    cache and the mapping to that size, and SQLite's next access of the
    wal-index is a SIGBUS."""

    def getattr(self, path: str, fh: int | None = None) -> dict:
        attrs = super().getattr(path, fh)
        with self.mutex:
            state = self.files.get(path)
            if state is not None:
                attrs["st_size"] = min(attrs["st_size"], state.synced_size)
        return attrs


def serve_control(fs: PowerFS, path: str) -> socketserver.UnixStreamServer:
    """The control socket: one command a line, one JSON answer a line.
    ``stats``: the unsynced files and counters; ``cut``: the power cut
    (answered once every file is rolled back)."""

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            for line in self.rfile:
                command = line.decode().strip()
                if command == "cut":
                    answer = fs.cut()
                elif command == "stats":
                    answer = fs.report()
                else:
                    answer = {"error": "unknown command %r" % command}
                self.wfile.write(json.dumps(answer).encode() + b"\n")
                self.wfile.flush()

    if os.path.exists(path):
        os.unlink(path)
    server = socketserver.ThreadingUnixStreamServer(path, Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True, name="control").start()
    return server


def control(path: str, command: str, timeout: float = 30.0) -> dict:
    """Send one command to a running powerfs; its JSON answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(command.encode() + b"\n")
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError("powerfs closed the control socket")
            answer += chunk
    return json.loads(answer)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="powerfs", description=__doc__.split("\n\n")[0])
    parser.add_argument("backing")
    parser.add_argument("mountpoint")
    parser.add_argument("--control", required=True, help="Unix socket for stats and cut")
    parser.add_argument("--naive", action="store_true",
                        help="report the durable size of files (the layer that SIGBUSes "
                             "SQLite, see NaiveSizeFS)")
    args = parser.parse_args(argv)
    fs = (NaiveSizeFS if args.naive else PowerFS)(args.backing)
    serve_control(fs, args.control)
    # foreground: the test owns this process; several threads, serialized
    # by the lock (FUSE requests of other files wait while one is served);
    # big writes: SQLite's WAL frames arrive whole
    FUSE(fs, args.mountpoint, foreground=True, nothreads=False, big_writes=True,
         max_write=131072, fsname="powerfs", subtype="powerfs")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main())
