"""What a storage's database holds, read with raw SQL (sqlite3, read
only): replicas are compared on this, not through the project's own
backend, so that a read bug hiding the same rows on both copies cannot
make them look identical."""
from __future__ import annotations

import sqlite3


def raw_contents(path: str) -> dict[int, tuple[dict, dict]]:
    """partition -> (committed transactions {tid: (oids, user,
    description, ext, packed, ttid)}, object revisions {(tid, oid):
    (value_tid, data hash, compression, data)}).  Data rows are compared by
    content: their ids are each database's own."""
    conn = sqlite3.connect("file:%s?mode=ro" % path, uri=True)
    try:
        return _contents(conn)
    finally:
        conn.close()


def raw_contents_postgresql(dsn: str) -> dict[int, tuple[dict, dict]]:
    """``raw_contents`` of a PostgreSQL backend's database (psycopg)."""
    import psycopg
    with psycopg.connect(dsn, autocommit=True) as conn:
        return _contents(conn)


def _contents(conn) -> dict[int, tuple[dict, dict]]:
    """``raw_contents`` read on a connection (sqlite3's or psycopg's)."""
    (partitions,) = conn.execute(
        "SELECT value FROM config WHERE name='partitions'").fetchone()
    content: dict[int, tuple[dict, dict]] = {p: ({}, {}) for p in range(int(partitions))}
    for p, tid, *meta in conn.execute(
            'SELECT partition, tid, oids, "user", description, ext, packed, ttid FROM trans'):
        content[p][0][tid] = tuple(meta)
    for p, oid, tid, value_tid, *data in conn.execute(
            "SELECT o.partition, o.oid, o.tid, o.value_tid, d.hash, d.compression, d.value"
            " FROM obj o LEFT JOIN data d ON d.id = o.data_id"):
        content[p][1][tid, oid] = (value_tid, *data)
    return content


def config_value(path: str, name: str) -> str | None:
    conn = sqlite3.connect("file:%s?mode=ro" % path, uri=True)
    try:
        row = conn.execute("SELECT value FROM config WHERE name=?", (name,)).fetchone()
        return None if row is None else row[0]
    finally:
        conn.close()


def raw_blobs(path: str) -> dict[bytes, tuple[int, bytes]]:
    """Blob contents of a storage: data hash -> (size, SHA-256 of the
    chunks in order), for every data row that has its content."""
    import hashlib
    conn = sqlite3.connect("file:%s?mode=ro" % path, uri=True)
    try:
        blobs = {}
        for data_hash, blob_id in conn.execute(
                "SELECT d.hash, b.blob_id FROM data d JOIN data_blob b ON b.data_id = d.id"):
            hasher = hashlib.sha256()
            size = 0
            for (chunk,) in conn.execute(
                    "SELECT bytes FROM blob_chunk WHERE blob_id=? ORDER BY n", (blob_id,)):
                hasher.update(chunk)
                size += len(chunk)
            blobs[data_hash] = (size, hasher.digest())
        return blobs
    finally:
        conn.close()


def raw_blob_chunks(path: str) -> int:
    """How many blob chunks a storage holds, attached or not."""
    conn = sqlite3.connect("file:%s?mode=ro" % path, uri=True)
    try:
        return conn.execute("SELECT COUNT(*) FROM blob_chunk").fetchone()[0]
    finally:
        conn.close()


def pending_rows(path: str) -> dict[str, int]:
    """Rows of transactions not committed: voted or locked (ttrans, tobj),
    by table; none once the cluster settled and stopped cleanly."""
    conn = sqlite3.connect("file:%s?mode=ro" % path, uri=True)
    try:
        return {table: conn.execute("SELECT COUNT(*) FROM %s" % table).fetchone()[0]
                for table in ("ttrans", "tobj")}  # table names: constants, not values
    finally:
        conn.close()


def orphan_data_rows(path: str) -> int:
    """Data rows that no object revision, committed or not, refers to:
    none once the cluster settled and stopped cleanly."""
    conn = sqlite3.connect("file:%s?mode=ro" % path, uri=True)
    try:
        return conn.execute(
            "SELECT COUNT(*) FROM data WHERE id NOT IN (SELECT data_id FROM obj"
            " WHERE data_id IS NOT NULL UNION SELECT data_id FROM tobj"
            " WHERE data_id IS NOT NULL)").fetchone()[0]
    finally:
        conn.close()
