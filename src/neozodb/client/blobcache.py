"""The client's blob cache: committed blob files in a directory that
several client processes on one machine may share (option ``blob-dir``).

What ZODB needs of it: a file name per committed revision (``loadBlob``),
read-only once complete, and a directory for uncommitted files on the
same file system (``temporaryDirectory``), so that moving a file in is a
rename.  The layout is ZEO's blob cache's: 997 directories by oid, a file
``<oid // 997>.<tid hex>.blob`` in each; a ``.layout`` file names it, and
a directory with another layout (a FileStorage's blob directory given by
mistake, say) is refused: pruning would delete its files.

Sharing: a download holds an exclusive ``flock`` on its directory's
``.lock`` file, so that two processes (or threads) wanting the same file
fetch it once, the second waiting for the first and finding it there; the
content is written to ``<name>.dl`` and renamed when complete, so a reader
never sees part of a file.  The kernel drops the lock of a process that
dies, and a ``.dl`` left behind is overwritten by the next download.

Size: with ``size`` set, once ``size_check`` percent of it was loaded
since the last pruning, a thread removes the least recently used files
(access time, which a hit refreshes) until the cache is below ``size``
minus that percentage.  One process prunes at a time (``prune.lock``),
and it skips a directory whose lock is held, where a download is going on.
"""

from __future__ import annotations

import fcntl
import logging
import os
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import BinaryIO

from ZODB.blob import rename_or_copy_blob

logger = logging.getLogger(__name__)

LAYOUT = 'zeocache-neozodb'
DIRECTORIES = 997
SUFFIX = '.blob'
_TMP = 'tmp'


class BlobCacheError(Exception):
    """The directory cannot be used as a blob cache."""


@contextmanager
def _flock(path: str, blocking: bool = True) -> Iterator[bool]:
    """Hold an exclusive lock on file ``path`` (made if missing); yields
    False without blocking when ``blocking`` is false and it is taken."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _touch(path: str) -> str:
    """Mark ``path`` as just used (the pruning's order), keeping its mtime;
    a file pruned meanwhile is left to the caller to miss."""
    try:
        os.utime(path, (time.time(), os.stat(path).st_mtime))
    except FileNotFoundError:
        pass
    return path


class BlobCache:
    """Committed blob files in ``directory``; see the module docstring.
    ``size`` in bytes (None: unbounded), ``size_check`` a percentage."""

    def __init__(self, directory: str, size: int | None = None, size_check: int = 10) -> None:
        if size is not None and size < 0:
            raise ValueError('blob-cache-size must be >= 0')
        if not 0 < size_check < 100:
            raise ValueError('blob-cache-size-check must be a percentage between 1 and 99')
        self.directory = os.path.abspath(directory)
        self.size = size
        self.check_bytes = None if size is None else size * size_check // 100
        self._loaded = 0
        self._lock = threading.Lock()
        self._pruner: threading.Thread | None = None
        self._create()

    def _create(self) -> None:
        directory = self.directory
        marker = os.path.join(directory, '.layout')
        os.makedirs(directory, 0o700, exist_ok=True)
        try:
            with open(marker) as f:
                layout = f.read().strip()
        except FileNotFoundError:
            if any(name not in (_TMP, 'prune.lock') for name in os.listdir(directory)):
                raise BlobCacheError('%s is not empty and is not a blob cache: give an empty'
                                     ' or new directory as blob-dir' % directory) from None
            with open(marker, 'w') as f:
                f.write(LAYOUT)
            layout = LAYOUT
        if layout != LAYOUT:
            raise BlobCacheError('%s holds blobs in the %r layout, not a client blob cache'
                                 ' (%r): give another blob-dir' % (directory, layout, LAYOUT))
        if stat.S_IMODE(os.stat(directory).st_mode) & 0o077:
            # other users could read every blob of the database
            logger.warning('blob cache %s is readable by other users', directory)
        os.makedirs(os.path.join(directory, _TMP), 0o700, exist_ok=True)

    # -- paths -------------------------------------------------------------------

    def temporary_directory(self) -> str:
        """Where uncommitted blob files go (``temporaryDirectory``)."""
        return os.path.join(self.directory, _TMP)

    def take(self, filename: str) -> str:
        """Move (or copy) an uncommitted file that the storage owns from now
        on into the temporary directory: ZODB may remove the directory it
        was in (a savepoint's) before the transaction ends."""
        fd, ours = tempfile.mkstemp(suffix='.tmp', dir=self.temporary_directory())
        os.close(fd)
        rename_or_copy_blob(filename, ours, chmod=False)
        return ours

    def filename(self, oid: bytes, tid: bytes) -> str:
        n = int.from_bytes(oid, 'big')
        high, low = divmod(n, DIRECTORIES)
        return os.path.join(self.directory, str(low), '%d.%s%s' % (high, tid.hex(), SUFFIX))

    def getBlobFilename(self, oid: bytes, tid: bytes) -> str:
        """``filename`` under the name of ZODB's ``FilesystemHelper``, for
        tools that find a revision's file through ``storage.fshelper``."""
        return self.filename(oid, tid)

    def _dir_lock(self, filename: str) -> str:
        return os.path.join(os.path.dirname(filename), '.lock')

    # -- use -------------------------------------------------------------------

    def get(self, oid: bytes, tid: bytes) -> str | None:
        """The file of this revision if the cache has it."""
        filename = self.filename(oid, tid)
        return _touch(filename) if os.path.exists(filename) else None

    def fetch(self, oid: bytes, tid: bytes, download: Callable[[BinaryIO], None]) -> str:
        """The file of this revision, calling ``download(file)`` to write
        its content unless the cache has it or another process or thread
        is fetching it (then waits for it).  An exception out of
        ``download`` leaves nothing in the cache and is raised."""
        filename = self.filename(oid, tid)
        if os.path.exists(filename):
            return _touch(filename)
        os.makedirs(os.path.dirname(filename), 0o700, exist_ok=True)
        with _flock(self._dir_lock(filename)):
            if os.path.exists(filename):  # fetched while we waited
                return _touch(filename)
            partial = filename + '.dl'
            try:
                with open(partial, 'wb') as f:
                    download(f)
                    size = f.tell()
                rename_or_copy_blob(partial, filename)  # made read-only
            except BaseException:
                try:
                    os.remove(partial)
                except FileNotFoundError:
                    pass
                raise
        self._loaded_bytes(size)
        return filename

    def add(self, oid: bytes, tid: bytes, source: str) -> str:
        """Move uncommitted file ``source`` in as the file of this
        revision (after its commit); copied if it is on another file
        system.  The cache owns it then: it is made read-only."""
        filename = self.filename(oid, tid)
        os.makedirs(os.path.dirname(filename), 0o700, exist_ok=True)
        with _flock(self._dir_lock(filename)):
            if os.path.exists(filename):  # restored twice, or fetched meanwhile
                os.remove(source)
                return filename
            rename_or_copy_blob(source, filename)  # made read-only
        self._loaded_bytes(os.stat(filename).st_size)
        return filename

    def files_before(self, tid: bytes) -> list[tuple[bytes, bytes, str]]:
        """(oid, tid, file) of the revisions in the cache older than ``tid``."""
        found = []
        for entry in os.scandir(self.directory):
            if not (entry.name.isdigit() and entry.is_dir()):
                continue
            low = int(entry.name)
            for blob in os.scandir(entry.path):
                high, _, rest = blob.name.partition('.')
                serial, _, suffix = rest.partition('.')
                if '.' + suffix != SUFFIX or not high.isdigit() or len(serial) != 16:
                    continue
                try:
                    serial_bytes = bytes.fromhex(serial)
                except ValueError:
                    continue
                if serial_bytes < tid:
                    oid = (int(high) * DIRECTORIES + low).to_bytes(8, 'big')
                    found.append((oid, serial_bytes, blob.path))
        return found

    def remove(self, path: str) -> None:
        """Drop a file (a revision packed away), unless being downloaded."""
        with _flock(self._dir_lock(path), blocking=False) as free:
            if free:
                try:
                    os.remove(path)
                except FileNotFoundError:
                    pass

    # -- size ------------------------------------------------------------------

    def _loaded_bytes(self, size: int) -> None:
        if self.check_bytes is None:
            return
        with self._lock:
            self._loaded += size
            if self._loaded < self.check_bytes or (
                    self._pruner is not None and self._pruner.is_alive()):
                return
            self._loaded = 0
            self._pruner = threading.Thread(target=self.prune, name='blob cache pruning',
                                            daemon=True)
            self._pruner.start()

    def wait_pruned(self, timeout: float | None = None) -> None:
        """Wait for a pruning thread started by this object (tests, close)."""
        pruner = self._pruner
        if pruner is not None:
            pruner.join(timeout)

    def prune(self) -> int:
        """Remove least recently used files until the cache is under its
        target; the number of bytes removed (0 if another process is
        pruning or the size is unbounded)."""
        if self.size is None:
            return 0
        target = max(self.size - (self.check_bytes or 0), 0)
        with _flock(os.path.join(self.directory, 'prune.lock'), blocking=False) as mine:
            if not mine:
                return 0
            files = []
            total = 0
            for entry in os.scandir(self.directory):
                if not (entry.name.isdigit() and entry.is_dir()):
                    continue
                for blob in os.scandir(entry.path):
                    if blob.name.endswith(SUFFIX):
                        st = blob.stat()
                        total += st.st_size
                        files.append((st.st_atime, st.st_size, blob.path))
            removed = 0
            files.sort()
            for _, size, path in files:
                if total - removed <= target:
                    break
                with _flock(self._dir_lock(path), blocking=False) as free:
                    if not free:  # a download is going on there
                        continue
                    try:
                        os.remove(path)
                    except FileNotFoundError:
                        continue
                    removed += size
            if removed:
                logger.info('blob cache %s: %d bytes removed, %d left', self.directory,
                            removed, total - removed)
            return removed
