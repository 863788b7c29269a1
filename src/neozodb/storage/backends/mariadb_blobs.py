"""MariaDB backend: blob contents (``base_blobs.BlobMethods``) beside NEO's
schema, which stays as NEO knows it.

Two tables of our own, which NEO neither reads nor drops:
``neozodb_blob_chunk`` (blob id, chunk number, 1 MiB of content per row)
and ``neozodb_data_blob`` (which blob is the content of which ``data``
row: ``data.id`` is unique in NEO's schema, the partition being in its
high bits, so it is the whole key).  Blob ids come from a counter read
at open, as in SQLite's (sqlite_blobs.py).

A blob revision's compression id on the wire has ``BLOB_FLAG`` (0x80),
which in NEO's ``data.compression`` means "value in ``bigdata``"; the
column keeps it as ``COLUMN_BLOB`` (0x40) instead, translated on write
(``column_compression``) and read (``MariaDBReads._value``), so that a
blob record of 16 MiB or more (bigdata, 0xC0) round-trips too.  NEO's
compression ids are 0 and 1: it never writes 0x40, and never reads a row
of ours as a blob.

Deleting a data row deletes its content: every deletion of a data row of
this backend goes through ``MariaDBWrites._prune``, which does it in the
same round trip that looks for bigdata (no trigger: creating one needs
SUPER on a server with binary logging, and RocksDB has no foreign keys).
Rows NEO deleted while it served the database leave contents that
``drop_unattached_blobs`` deletes at the next start, with the uploads a
crash left.
"""

from __future__ import annotations

from collections.abc import Iterator

from .mariadb_schema import BIG_FLAG
from .sqlite_blobs import END, range_digest

BLOB_FLAG = 0x80        # on the wire (protocol.blobs.BLOB_FLAG)
COLUMN_BLOB = 0x40      # in data.compression

TABLES = ('neozodb_blob_chunk', 'neozodb_data_blob')
DROP = "DROP TABLE IF EXISTS " + ", ".join(TABLES)


def schema(engine: str) -> list[str]:
    """CREATE TABLE IF NOT EXISTS statements of the blob tables."""
    # RocksDB: the content in a column family without compression (as
    # NEO's data), the small mapping with the metadata
    cf = ((lambda name: " COMMENT 'cf_neo_%s'" % name) if engine == 'RocksDB'
          else (lambda name: ''))
    e = ' ENGINE=' + engine
    return [
        "CREATE TABLE IF NOT EXISTS neozodb_blob_chunk ("
        " blob_id BIGINT UNSIGNED NOT NULL, n BIGINT UNSIGNED NOT NULL,"
        " bytes MEDIUMBLOB NOT NULL, PRIMARY KEY (blob_id, n)%s)%s" % (cf('no_comp'), e),
        "CREATE TABLE IF NOT EXISTS neozodb_data_blob ("
        " data_id BIGINT UNSIGNED NOT NULL, blob_id BIGINT UNSIGNED NOT NULL,"
        " PRIMARY KEY (data_id)%s, KEY (blob_id)%s)%s"
        % (cf('append_meta'), cf('append_meta'), e),
    ]


def column_compression(compression: int) -> int:
    """``data.compression`` of a record whose compression id on the wire
    is ``compression`` (before the bigdata flag); ValueError if it has no
    encoding."""
    if not 0 <= compression < 0x100 or compression & COLUMN_BLOB:
        raise ValueError(f'invalid compression {compression}')
    if compression & BLOB_FLAG:
        return compression & ~BLOB_FLAG | COLUMN_BLOB
    return compression


def wire_compression(column: int) -> int:
    """The compression id on the wire of ``data.compression`` (without the
    bigdata flag)."""
    if column & COLUMN_BLOB:
        return column & ~COLUMN_BLOB | BLOB_FLAG
    return column


MAX_BLOB_ID = "SELECT MAX(blob_id) FROM neozodb_blob_chunk"
ADD_CHUNK = "REPLACE INTO neozodb_blob_chunk (blob_id, n, bytes) VALUES (?, ?, ?)"
BLOB_OF = "SELECT blob_id FROM neozodb_data_blob WHERE data_id=?"
ATTACH = "INSERT INTO neozodb_data_blob (data_id, blob_id) VALUES (?, ?)"
DROP_BLOB = "DELETE FROM neozodb_blob_chunk WHERE blob_id=?"
# the content of a data row, with the row (MariaDBWrites._prune)
DEL_CONTENT = ("DELETE b, c FROM neozodb_data_blob AS b LEFT JOIN neozodb_blob_chunk AS c"
               " ON c.blob_id = b.blob_id WHERE b.data_id=?")
CHUNK_BY_HASH = (
    "SELECT c.bytes FROM data AS d JOIN neozodb_data_blob AS b ON b.data_id = d.id"
    " JOIN neozodb_blob_chunk AS c ON c.blob_id = b.blob_id AND c.n = ?"
    " WHERE d.hash = ? LIMIT 1")
CHUNK = "SELECT bytes FROM neozodb_blob_chunk WHERE blob_id=? AND n=?"
MISSING = ("SELECT d.id FROM data AS d LEFT JOIN neozodb_data_blob AS b ON b.data_id = d.id"
           " WHERE d.hash = ? AND d.compression & 64 AND b.data_id IS NULL LIMIT 1")
BLOB_REVISIONS = (
    "SELECT o.tid, o.oid, d.hash, b.blob_id FROM obj AS o FORCE INDEX (tid)"
    " JOIN data AS d ON d.id = o.data_id"
    " LEFT JOIN neozodb_data_blob AS b ON b.data_id = d.id"
    " WHERE o.`partition`=? AND (o.tid>? OR o.tid=? AND o.oid>=?)"
    " AND (o.tid<? OR o.tid=? AND o.oid<=?) AND d.compression & 64"
    " ORDER BY o.tid, o.oid")
LACKING = (
    "SELECT DISTINCT d.id FROM obj AS o FORCE INDEX (tid) JOIN data AS d ON d.id = o.data_id"
    " LEFT JOIN neozodb_data_blob AS b ON b.data_id = d.id"
    " WHERE o.`partition`=? AND (o.tid>? OR o.tid=? AND o.oid>=?)"
    " AND (o.tid<? OR o.tid=? AND o.oid<?) AND d.compression & 64 AND b.data_id IS NULL")
# at start: mappings whose data row NEO deleted (or whose id it reused
# for a row of its own, never a blob revision), then chunks nothing maps
STALE = ("DELETE b FROM neozodb_data_blob AS b LEFT JOIN data AS d ON d.id = b.data_id"
         " WHERE d.id IS NULL OR IFNULL(d.compression, 0) & 64 = 0")
UNATTACHED = ("SELECT DISTINCT blob_id FROM neozodb_blob_chunk"
              " WHERE blob_id NOT IN (SELECT blob_id FROM neozodb_data_blob)")

assert not COLUMN_BLOB & BIG_FLAG


class MariaDBBlobs:
    """The blob methods of ``MariaDBBackend``."""

    blobs = True
    _next_blob: int | None = None

    def new_blob(self) -> int:
        if self._next_blob is None:
            self._next_blob = (self._scalar(MAX_BLOB_ID) or 0) + 1
        blob_id = self._next_blob
        self._next_blob += 1
        return blob_id

    def store_blob_chunk(self, blob_id: int, n: int, data: bytes) -> None:
        # one statement, atomic by itself; pending like store_data's rows
        self._q(ADD_CHUNK, (blob_id, n, data))

    def attach_blob(self, data_id: int, blob_id: int) -> bool:
        if self._q(BLOB_OF, (data_id,)):
            self._q(DROP_BLOB, (blob_id,))
            return False
        self._q(ATTACH, (data_id, blob_id))
        return True

    def drop_blob(self, blob_id: int) -> None:
        self._q(DROP_BLOB, (blob_id,))

    def has_blob(self, data_id: int) -> bool:
        return bool(self._q(BLOB_OF, (data_id,)))

    def blob_missing(self, checksum: bytes) -> int | None:
        return self._scalar(MISSING, (checksum,))

    def blobs_lacking(self, partition: int, first: tuple[int, int],
                      last: tuple[int, int] | None) -> list[int]:
        (first_tid, first_oid), (last_tid, last_oid) = first, last or END
        rows = self._q(LACKING, (partition, first_tid, first_tid, first_oid,
                                 last_tid, last_tid, last_oid))
        return sorted(row[0] for row in rows)

    def load_blob_chunk(self, checksum: bytes, n: int) -> bytes | None:
        value = self._scalar(CHUNK_BY_HASH, (n, checksum))
        return None if value is None else bytes(value)

    def blob_range_digest(self, partition: int, first: tuple[int, int],
                          last: tuple[int, int]) -> bytes | None:
        (first_tid, first_oid), (last_tid, last_oid) = first, last
        revisions = self._q(BLOB_REVISIONS, (partition, first_tid, first_tid, first_oid,
                                             last_tid, last_tid, last_oid))
        return range_digest(revisions, self._blob_chunks)

    def _blob_chunks(self, blob_id: int) -> Iterator[bytes]:
        # one chunk per statement: a whole content is never in memory
        n = 0
        while True:
            rows = self._q(CHUNK, (blob_id, n))
            if not rows:
                return
            yield bytes(rows[0][0])
            n += 1

    def drop_unattached_blobs(self) -> int:
        with self._txn(durable=True):
            self._q(STALE)
            doomed = self._q(UNATTACHED)
            self._many(DROP_BLOB, doomed)
        self._next_blob = None
        return len(doomed)
