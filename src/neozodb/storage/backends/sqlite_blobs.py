"""SQLite backend: blob contents (``base_blobs.BlobMethods``).

``blob_chunk`` holds the chunks of every blob by blob id; ``data_blob``
says which blob is the content of which ``data`` row.  A trigger deletes a
row's content with the row, so pack, garbage collection, truncation and
orphan pruning need no code of their own for blobs.  Blob ids come from a
counter read at open: an upload given up before it was attached leaves
chunks under an id no ``data_blob`` row names, which ``drop_unattached_
blobs`` deletes at start.

The PostgreSQL backend runs this class on its translating connection;
``range_digest`` is shared with MariaDB's (mariadb_blobs.py), so that
``neoctl check`` compares copies on any two backends.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable

BLOB_TABLES = ('blob_chunk', 'data_blob')

BLOB_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS blob_chunk (
        blob_id INTEGER NOT NULL, n INTEGER NOT NULL, bytes BLOB NOT NULL,
        PRIMARY KEY (blob_id, n))""",
    """CREATE TABLE IF NOT EXISTS data_blob (
        data_id INTEGER NOT NULL PRIMARY KEY, blob_id INTEGER NOT NULL)""",
    """CREATE TRIGGER IF NOT EXISTS data_blob_gone AFTER DELETE ON data
        WHEN EXISTS (SELECT 1 FROM data_blob WHERE data_id = OLD.id) BEGIN
        DELETE FROM blob_chunk
            WHERE blob_id = (SELECT blob_id FROM data_blob WHERE data_id = OLD.id);
        DELETE FROM data_blob WHERE data_id = OLD.id;
        END""",
)

_MAX_BLOB_ID = "SELECT MAX(blob_id) FROM blob_chunk"
_ADD_CHUNK = "INSERT OR REPLACE INTO blob_chunk (blob_id, n, bytes) VALUES (?, ?, ?)"
_BLOB_OF = "SELECT blob_id FROM data_blob WHERE data_id=?"
_ATTACH = "INSERT INTO data_blob (data_id, blob_id) VALUES (?, ?)"
_DROP_BLOB = "DELETE FROM blob_chunk WHERE blob_id=?"
_CHUNK_BY_HASH = (
    "SELECT c.bytes FROM data AS d JOIN data_blob AS b ON b.data_id = d.id"
    " JOIN blob_chunk AS c ON c.blob_id = b.blob_id AND c.n = ?"
    " WHERE d.hash = ? LIMIT 1")
_MISSING = ("SELECT d.id FROM data AS d LEFT JOIN data_blob AS b ON b.data_id = d.id"
            " WHERE d.hash = ? AND b.data_id IS NULL LIMIT 1")
_LACKING = (
    "SELECT DISTINCT d.id FROM obj AS o JOIN data AS d ON d.id = o.data_id"
    " LEFT JOIN data_blob AS b ON b.data_id = d.id"
    " WHERE o.partition=? AND (o.tid, o.oid)>=(?, ?) AND (o.tid, o.oid)<(?, ?)"
    " AND d.compression>=128 AND b.data_id IS NULL")
#: beyond every (tid, oid): no TID reaches MAX_TID
END = ((1 << 63) - 1, (1 << 63) - 1)
_BLOB_REVISIONS = (
    "SELECT o.tid, o.oid, d.hash, b.blob_id FROM obj AS o JOIN data AS d ON d.id = o.data_id"
    " LEFT JOIN data_blob AS b ON b.data_id = d.id"
    " WHERE o.partition=? AND (o.tid, o.oid)>=(?, ?) AND (o.tid, o.oid)<=(?, ?)"
    " AND d.compression>=128 ORDER BY o.tid, o.oid")
_CHUNKS = "SELECT bytes FROM blob_chunk WHERE blob_id=? ORDER BY n"
_UNATTACHED = ("SELECT DISTINCT blob_id FROM blob_chunk"
               " WHERE blob_id NOT IN (SELECT blob_id FROM data_blob)")


def range_digest(revisions: Iterable[tuple[int, int, bytes, int | None]],
                 chunks: Callable[[int], Iterable[bytes]]) -> bytes | None:
    """``blob_range_digest`` of the blob revisions ``(tid, oid, checksum,
    blob id or None)`` in (tid, oid) order, ``chunks(blob_id)`` giving a
    content's chunks in order; None if there is none."""
    digest = None
    for tid, oid, checksum, blob_id in revisions:
        content = hashlib.sha256()
        if blob_id is not None:
            for chunk in chunks(blob_id):
                content.update(chunk)
        if digest is None:
            digest = hashlib.sha1()
        digest.update(b'%d %d ' % (tid, oid) + bytes(checksum) +
                      (content.digest() if blob_id is not None else b'missing'))
    return None if digest is None else digest.digest()


class SQLiteBlobs:
    """The blob methods of ``SQLiteBackend``."""

    blobs = True
    _next_blob: int | None = None

    def new_blob(self) -> int:
        if self._next_blob is None:
            self._next_blob = (self._scalar(_MAX_BLOB_ID, ()) or 0) + 1
        blob_id = self._next_blob
        self._next_blob += 1
        return blob_id

    def store_blob_chunk(self, blob_id: int, n: int, data: bytes) -> None:
        self._begin()
        self._conn.execute(_ADD_CHUNK, (blob_id, n, data))

    def attach_blob(self, data_id: int, blob_id: int) -> bool:
        self._begin()
        conn = self._conn
        if conn.execute(_BLOB_OF, (data_id,)).fetchone() is not None:
            conn.execute(_DROP_BLOB, (blob_id,))
            return False
        conn.execute(_ATTACH, (data_id, blob_id))
        return True

    def drop_blob(self, blob_id: int) -> None:
        self._begin()
        self._conn.execute(_DROP_BLOB, (blob_id,))

    def has_blob(self, data_id: int) -> bool:
        return self.connection.execute(_BLOB_OF, (data_id,)).fetchone() is not None

    def blob_missing(self, checksum: bytes) -> int | None:
        row = self.connection.execute(_MISSING, (checksum,)).fetchone()
        return None if row is None else row[0]

    def blobs_lacking(self, partition: int, first: tuple[int, int],
                      last: tuple[int, int] | None) -> list[int]:
        rows = self.connection.execute(_LACKING, (partition, *first, *(last or END)))
        return sorted(row[0] for row in rows)

    def load_blob_chunk(self, checksum: bytes, n: int) -> bytes | None:
        row = self.connection.execute(_CHUNK_BY_HASH, (n, checksum)).fetchone()
        return None if row is None else row[0]

    def blob_range_digest(self, partition: int, first: tuple[int, int],
                          last: tuple[int, int]) -> bytes | None:
        revisions = self.connection.execute(
            _BLOB_REVISIONS, (partition, *first, *last)).fetchall()
        return range_digest(revisions, self._blob_chunks)

    def _blob_chunks(self, blob_id: int) -> Iterable[bytes]:
        """The chunks of a content in order (read as they are hashed)."""
        for (chunk,) in self.connection.execute(_CHUNKS, (blob_id,)):
            yield chunk

    def drop_unattached_blobs(self) -> int:
        with self._txn(durable=True) as conn:
            doomed = [row for row in conn.execute(_UNATTACHED)]
            conn.executemany(_DROP_BLOB, doomed)
        self._next_blob = None
        return len(doomed)
