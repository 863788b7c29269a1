"""SQLite backend: the schema (tables, version, orphan floor settings) and
every SQL statement of ``SQLiteBackend``, as module constants so that
``sqlite3``'s statement cache prepares each of them once per connection,
and the packing of oid lists into BLOBs."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from itertools import chain

from neozodb.protocol.blobs import BLOB_FLAG

SCHEMA_VERSION = '1'

# Data rows are never referenced below this id without being referenced by
# obj/tobj (see drop_unfinished): it bounds the orphan scan at startup.
_CONFIG_ORPHAN_FLOOR = 'orphan_floor'
# Votes and replication chunks raise the floor every this many new data
# ids: the scan after a crash covers about that many rows, plus those still
# held, instead of everything written since the last start.
_FLOOR_STEP = 1000
_CONFIG_VERSION = 'version'

_TABLES = ('config', 'pt', 'trans', 'obj', 'data', 'ttrans', 'tobj', 'replication',
           'pack', 'tpack', 'pack_progress')

# obj and tobj rows are small: WITHOUT ROWID keeps each of them in a single
# b-tree ordered by the primary key used by every read.  trans/ttrans rows
# carry the oid list, too big for that.  data ids use AUTOINCREMENT so an id
# is never reused, which makes the orphan floor meaningful.
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS config (
        name TEXT NOT NULL PRIMARY KEY, value TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS pt (
        partition INTEGER NOT NULL, nid INTEGER NOT NULL, state INTEGER NOT NULL,
        PRIMARY KEY (partition, nid)) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS trans (
        partition INTEGER NOT NULL, tid INTEGER NOT NULL, packed BOOLEAN NOT NULL,
        oids BLOB NOT NULL, user BLOB NOT NULL, description BLOB NOT NULL,
        ext BLOB NOT NULL, ttid INTEGER NOT NULL,
        PRIMARY KEY (partition, tid))""",
    """CREATE TABLE IF NOT EXISTS obj (
        partition INTEGER NOT NULL, oid INTEGER NOT NULL, tid INTEGER NOT NULL,
        data_id INTEGER, value_tid INTEGER,
        PRIMARY KEY (partition, oid, tid)) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS obj_tid ON obj (partition, tid, oid)",
    "CREATE INDEX IF NOT EXISTS obj_data_id ON obj (data_id)",
    """CREATE TABLE IF NOT EXISTS data (
        id INTEGER PRIMARY KEY AUTOINCREMENT, hash BLOB NOT NULL,
        compression INTEGER NOT NULL, value BLOB NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS ttrans (
        partition INTEGER NOT NULL, tid INTEGER, packed BOOLEAN NOT NULL,
        oids BLOB NOT NULL, user BLOB NOT NULL, description BLOB NOT NULL,
        ext BLOB NOT NULL, ttid INTEGER NOT NULL PRIMARY KEY)""",
    """CREATE TABLE IF NOT EXISTS tobj (
        partition INTEGER NOT NULL, oid INTEGER NOT NULL, tid INTEGER NOT NULL,
        data_id INTEGER, value_tid INTEGER,
        PRIMARY KEY (tid, oid)) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS replication (
        partition INTEGER NOT NULL PRIMARY KEY, next_tid INTEGER NOT NULL,
        next_obj_tid INTEGER NOT NULL, next_obj_oid INTEGER NOT NULL)""",
    # pack orders of committed transactions (by tid) and of voted ones (by
    # ttid); oids NULL: all objects
    """CREATE TABLE IF NOT EXISTS pack (
        tid INTEGER NOT NULL PRIMARY KEY, approved BOOLEAN, partial BOOLEAN NOT NULL,
        oids BLOB, pack_tid INTEGER NOT NULL, gc BOOLEAN NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS tpack (
        ttid INTEGER NOT NULL PRIMARY KEY, approved BOOLEAN, partial BOOLEAN NOT NULL,
        oids BLOB, pack_tid INTEGER NOT NULL, gc BOOLEAN NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS pack_progress (
        partition INTEGER NOT NULL PRIMARY KEY, done INTEGER NOT NULL, target INTEGER,
        next_oid INTEGER NOT NULL)""",
)
_DROP = tuple(f"DROP TABLE IF EXISTS {table}" for table in _TABLES)
_HAS_CONFIG = "SELECT 1 FROM sqlite_master WHERE type='table' AND name='config'"

_BEGIN = "BEGIN IMMEDIATE"
_COMMIT = "COMMIT"
_ROLLBACK = "ROLLBACK"
# SQLite never syncs a commit itself: durable points are made durable by
# an fdatasync of the WAL file (SQLiteBackend.sync), so that one sync can
# cover several of them (group commit).  Checkpoints still sync the WAL
# before copying it and the database file after.
_SYNC_NORMAL = "PRAGMA synchronous=NORMAL"
# 16 MiB of page cache (SQLite's default is 2 MB): a replication chunk, or
# a commit of a few thousand objects, dirties more pages than that, and
# SQLite then writes pages to the WAL before the commit, some of them
# twice (bench/README.md, "Replication").  A bound, whatever the size of
# the database.
_CACHE_SIZE = "PRAGMA cache_size=-16384"
_SAVEPOINT = "SAVEPOINT op"
_ROLLBACK_TO = "ROLLBACK TO op"
_RELEASE = "RELEASE op"

_GET_CONFIG = "SELECT value FROM config WHERE name=?"
_SET_CONFIG = "INSERT OR REPLACE INTO config (name, value) VALUES (?, ?)"
_DEL_CONFIG = "DELETE FROM config WHERE name=?"

_GET_PT = "SELECT partition, nid, state FROM pt ORDER BY partition, nid"
_CLEAR_PT = "DELETE FROM pt"
_SET_CELL = "INSERT OR REPLACE INTO pt (partition, nid, state) VALUES (?, ?, ?)"
_DEL_CELL = "DELETE FROM pt WHERE partition=? AND nid=?"

_MAX_TRANS_TID = "SELECT MAX(tid) FROM trans WHERE partition=?"
_MAX_OBJ_TID = "SELECT MAX(tid) FROM obj WHERE partition=?"
_MAX_OBJ_OID = "SELECT MAX(oid) FROM obj WHERE partition=?"
_MIN_TRANS_TID = "SELECT MIN(tid) FROM trans WHERE partition=?"
_MIN_OBJ_TID = "SELECT MIN(tid) FROM obj WHERE partition=?"
_LOCKED_TTRANS_TIDS = "SELECT partition, tid FROM ttrans WHERE tid IS NOT NULL"
_TOBJ_MAX_OIDS = "SELECT partition, MAX(oid) FROM tobj GROUP BY partition"

_OBJ_COLUMNS = ("SELECT o.tid, o.value_tid, d.compression, d.hash, d.value"
                " FROM obj AS o LEFT JOIN data AS d ON d.id = o.data_id"
                " WHERE o.partition=? AND o.oid=?")
_GET_LATEST = _OBJ_COLUMNS + " ORDER BY o.tid DESC LIMIT 1"
# A revision with the serial of the next one: one statement per
# loadBefore (what ZODB's MVCC asks for every object it loads)
_OBJ_COLUMNS_NEXT = (
    "SELECT o.tid, o.value_tid, d.compression, d.hash, d.value,"
    " (SELECT MIN(n.tid) FROM obj AS n WHERE n.partition=o.partition AND n.oid=o.oid"
    " AND n.tid>o.tid)"
    " FROM obj AS o LEFT JOIN data AS d ON d.id = o.data_id"
    " WHERE o.partition=? AND o.oid=?")
_GET_AT_NEXT = _OBJ_COLUMNS_NEXT + " AND o.tid=?"
_GET_BEFORE_NEXT = _OBJ_COLUMNS_NEXT + " AND o.tid<? ORDER BY o.tid DESC LIMIT 1"
_REVISION_AT = "SELECT tid, data_id, value_tid FROM obj WHERE partition=? AND oid=? AND tid=?"
_REVISION_BEFORE = ("SELECT tid, data_id, value_tid FROM obj WHERE partition=? AND oid=?"
                    " AND tid<? ORDER BY tid DESC LIMIT 1")
# With a single MAX() aggregate, SQLite takes the bare columns (data_id)
# from the row holding the maximum: the latest revision up to tid.
_OIDS_FROM = ("SELECT oid, MAX(tid), data_id FROM obj WHERE partition=? AND oid>=?"
              " AND tid<=? GROUP BY oid ORDER BY oid LIMIT ?")
_NEXT_SERIAL = "SELECT MIN(tid) FROM obj WHERE partition=? AND oid=? AND tid>?"
_OID_EXISTS = "SELECT 1 FROM obj WHERE partition=? AND oid=? LIMIT 1"
_LAST_SERIAL = "SELECT MAX(tid) FROM obj WHERE partition=? AND oid=?"
# one indexed lookup per (partition, oid) row of the VALUES list
_LAST_SERIALS = ("WITH w(p, o) AS (VALUES %s)"
                 " SELECT o, (SELECT MAX(tid) FROM obj WHERE partition=p AND oid=o) FROM w")
_LAST_SERIALS_CHUNK = 250
_LOAD_DATA = "SELECT hash, compression, value FROM data WHERE id=?"

# Identical data rows are found through this index; a database made with
# ``dedup`` has it, and so has every database made before dedup became an
# option (2026-12-03): its presence is what turns deduplication on.
_DATA_HASH_INDEX = "CREATE INDEX IF NOT EXISTS data_hash ON data (hash, compression)"
_HAS_DATA_HASH_INDEX = "SELECT 1 FROM sqlite_master WHERE type='index' AND name='data_hash'"
# Without it, blob revisions are still deduplicated (their content may be
# large, their rows are few): a partial index holds only their rows, and the
# queries repeat its condition so that SQLite uses it.
_BLOB_ROWS = f"compression >= {BLOB_FLAG}"
_BLOB_DATA_HASH_INDEX = ("CREATE INDEX IF NOT EXISTS data_blob_hash ON data (hash, compression)"
                         f" WHERE {_BLOB_ROWS}")
_FIND_BLOB_DATA = ("SELECT id FROM data WHERE hash=? AND compression=? AND value=?"
                   f" AND {_BLOB_ROWS}")
_FIND_DATA = "SELECT id FROM data WHERE hash=? AND compression=? AND value=?"
_INSERT_DATA = "INSERT INTO data (hash, compression, value) VALUES (?, ?, ?)"
_DEL_DATA = "DELETE FROM data WHERE id=?"
_DATA_IN_OBJ = "SELECT 1 FROM obj WHERE data_id=? LIMIT 1"
_TOBJ_DATA_IDS = "SELECT DISTINCT data_id FROM tobj WHERE data_id IS NOT NULL"
_MAX_DATA_ID = "SELECT MAX(id) FROM data"
_DATA_SEQ = "SELECT seq FROM sqlite_sequence WHERE name='data'"
_INSERT_DATA_ID = "INSERT INTO data (id, hash, compression, value) VALUES (?, ?, ?, ?)"
_DATA_NOT_IN_OBJ = ("SELECT id FROM data AS d WHERE id>?"
                    " AND NOT EXISTS (SELECT 1 FROM obj WHERE obj.data_id=d.id)")

_INSERT_TOBJ = ("INSERT OR REPLACE INTO tobj (partition, oid, tid, data_id, value_tid)"
                " VALUES (?, ?, ?, ?, ?)")
_INSERT_TTRANS = ("INSERT OR REPLACE INTO ttrans"
                  " (partition, tid, packed, oids, user, description, ext, ttid)"
                  " VALUES (?, NULL, ?, ?, ?, ?, ?, ?)")
_LOCK = "UPDATE ttrans SET tid=? WHERE ttid=?"
_MOVE_TRANS = ("INSERT OR REPLACE INTO trans"
               " (partition, tid, packed, oids, user, description, ext, ttid)"
               " SELECT partition, ?, packed, oids, user, description, ext, ttid"
               " FROM ttrans WHERE ttid=?")
_MOVE_OBJ = ("INSERT OR REPLACE INTO obj (partition, oid, tid, data_id, value_tid)"
             " SELECT partition, oid, ?, data_id, value_tid FROM tobj WHERE tid=?")
_DEL_TTRANS = "DELETE FROM ttrans WHERE ttid=?"
_DEL_TOBJ = "DELETE FROM tobj WHERE tid=?"
_TOBJ_DATA_IDS_OF = "SELECT data_id FROM tobj WHERE tid=? AND data_id IS NOT NULL"

_GET_TTRANS = "SELECT ttid, tid FROM ttrans"
_GET_TOBJ_TTIDS = "SELECT DISTINCT tid FROM tobj"
_LOCKED_TTID = "SELECT tid FROM ttrans WHERE ttid=?"
# TIDs are allocated after their TTID (tid >= ttid), so the search is a
# short primary-key range scan for the recent transactions it is used for.
_FINAL_TID = "SELECT tid FROM trans WHERE partition=? AND tid>=? AND ttid=? LIMIT 1"
_UNFINISHED_DATA_IDS = ("SELECT data_id FROM tobj WHERE data_id IS NOT NULL AND tid NOT IN"
                        " (SELECT ttid FROM ttrans WHERE tid IS NOT NULL)")
_DROP_UNFINISHED_TOBJ = ("DELETE FROM tobj WHERE tid NOT IN"
                         " (SELECT ttid FROM ttrans WHERE tid IS NOT NULL)")
_DROP_UNFINISHED_TTRANS = "DELETE FROM ttrans WHERE tid IS NULL"

_GET_TRANS = ("SELECT oids, user, description, ext, packed, ttid FROM trans"
              " WHERE partition=? AND tid=?")
_HISTORY = ("SELECT o.tid, COALESCE(LENGTH(d.value), 0)"
            " FROM obj AS o LEFT JOIN data AS d ON d.id = o.data_id"
            " WHERE o.partition=? AND o.oid=? ORDER BY o.tid DESC LIMIT ? OFFSET ?")
# the undo log: neither pack transactions nor what a pack of the partition
# made undoable no more (up to the pack_tid of the last order applied)
_UNDO_TIDS_DESC = ("SELECT tid FROM trans WHERE partition=? AND tid>? AND tid NOT IN"
                   " (SELECT tid FROM pack) ORDER BY tid DESC LIMIT ?")
_PACKED_UP_TO = ("SELECT MAX(pack_tid) FROM pack WHERE NOT partial AND tid<="
                 " (SELECT done FROM pack_progress WHERE partition=?)")
_TIDS_FROM = ("SELECT tid FROM trans WHERE partition=? AND tid>=? AND tid<=?"
              " ORDER BY tid LIMIT ?")

_FETCH_TIDS = ("SELECT tid FROM trans WHERE partition=? AND tid>=? AND tid<=?"
               " ORDER BY tid LIMIT ?")
# (tid, oid) >= (min_tid, min_oid): a row-value comparison walks obj_tid
_FETCH_OBJ_KEYS = ("SELECT tid, oid FROM obj WHERE partition=? AND (tid, oid)>=(?, ?)"
                   " AND tid<=? ORDER BY tid, oid LIMIT ?")
_FETCH_OBJ = ("SELECT o.value_tid, d.compression, d.hash, d.value"
              " FROM obj AS o LEFT JOIN data AS d ON d.id = o.data_id"
              " WHERE o.partition=? AND o.oid=? AND o.tid=?")
_ADD_TRANS = ("INSERT OR REPLACE INTO trans"
              " (partition, tid, packed, oids, user, description, ext, ttid)"
              " VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
_OBJ_DATA_ID = "SELECT data_id FROM obj WHERE partition=? AND oid=? AND tid=?"
_ADD_OBJ = ("INSERT OR REPLACE INTO obj (partition, oid, tid, data_id, value_tid)"
            " VALUES (?, ?, ?, ?, ?)")
_DEL_TRANS = "DELETE FROM trans WHERE partition=? AND tid=?"
_DEL_OBJ = "DELETE FROM obj WHERE partition=? AND oid=? AND tid=?"
_GET_REPLICATION = ("SELECT next_tid, next_obj_tid, next_obj_oid FROM replication"
                    " WHERE partition=?")
_SET_REPLICATION = ("INSERT OR REPLACE INTO replication"
                    " (partition, next_tid, next_obj_tid, next_obj_oid) VALUES (?, ?, ?, ?)")
_DEL_REPLICATION = "DELETE FROM replication WHERE partition=?"
_PARTITION_OBJ_CHUNK = ("SELECT oid, tid, data_id FROM obj WHERE partition=?"
                        " ORDER BY tid, oid LIMIT ?")
_PARTITION_TRANS_CHUNK = "SELECT tid FROM trans WHERE partition=? ORDER BY tid LIMIT ?"
# truncate: per partition, on the (partition, tid) keys of trans and obj_tid
_TRUNCATE_DATA_IDS = ("SELECT data_id FROM obj WHERE partition=? AND tid>?"
                      " AND data_id IS NOT NULL")
_TRUNCATE_OBJ = "DELETE FROM obj WHERE partition=? AND tid>?"
_TRUNCATE_TRANS = "DELETE FROM trans WHERE partition=? AND tid>?"
_TRUNCATE_TTRANS = "DELETE FROM ttrans WHERE tid IS NULL OR tid>?"
_TRUNCATE_REPLICATION_TRANS = "UPDATE replication SET next_tid=? WHERE next_tid>?"
_TRUNCATE_REPLICATION_OBJ = ("UPDATE replication SET next_obj_tid=?, next_obj_oid=0"
                             " WHERE (next_obj_tid, next_obj_oid)>(?, 0)")
# pack
_INSERT_TPACK = ("INSERT OR REPLACE INTO tpack (ttid, approved, partial, oids, pack_tid, gc)"
                 " VALUES (?, NULL, ?, ?, ?, ?)")
_APPROVE_TPACK = "UPDATE tpack SET approved=TRUE WHERE ttid=?"
_MOVE_PACK = ("INSERT OR REPLACE INTO pack (tid, approved, partial, oids, pack_tid, gc)"
              " SELECT ?, approved, partial, oids, pack_tid, gc FROM tpack WHERE ttid=?")
_DEL_TPACK = "DELETE FROM tpack WHERE ttid=?"
_TPACK_TTIDS = "SELECT ttid FROM tpack"
_DROP_UNFINISHED_TPACK = ("DELETE FROM tpack WHERE ttid NOT IN"
                          " (SELECT ttid FROM ttrans WHERE tid IS NOT NULL)")
_TRUNCATE_PACK = "DELETE FROM pack WHERE tid>?"
_GET_PACK_ORDERS = ("SELECT tid, approved, partial, oids, pack_tid, gc FROM pack"
                    " WHERE tid>=? AND tid<=? ORDER BY tid")
_ADD_PACK = ("INSERT OR REPLACE INTO pack (tid, approved, partial, oids, pack_tid, gc)"
             " VALUES (?, ?, ?, ?, ?, ?)")
_SIGN_PACK = "UPDATE pack SET approved=? WHERE tid=?"
_DEL_PACK = "DELETE FROM pack WHERE tid=?"
_GET_PACK_PROGRESS = "SELECT done, target, next_oid FROM pack_progress WHERE partition=?"
_SET_PACK_PROGRESS = ("INSERT OR REPLACE INTO pack_progress (partition, done, target, next_oid)"
                      " VALUES (?, ?, ?, ?)")
_DEL_PACK_PROGRESS = "DELETE FROM pack_progress WHERE partition=?"
_PACK_ROWS = ("SELECT oid, tid, data_id FROM obj WHERE partition=? AND oid>=?"
              " ORDER BY oid, tid LIMIT ?")
_OID_ROWS = "SELECT tid, data_id FROM obj WHERE partition=? AND oid=? ORDER BY tid"
_CHECK_TRANS = ("SELECT tid, packed, oids, user, description, ext FROM trans"
                " WHERE partition=? AND tid>=? AND tid<=? ORDER BY tid LIMIT ?")
_CHECK_OBJ = ("SELECT o.tid, o.oid, o.value_tid, d.hash"
              " FROM obj AS o LEFT JOIN data AS d ON d.id = o.data_id"
              " WHERE o.partition=? AND (o.tid, o.oid)>=(?, ?) AND o.tid<=?"
              " ORDER BY o.tid, o.oid LIMIT ?")
_U64 = struct.Struct('>Q')


#: Rows per multi-row INSERT (at most 8 columns: under SQLite's oldest
#: limit of 999 parameters).  One statement per 100 rows instead of one
#: per row: inserting 100,000 replicated records takes 20-30% less time
#: (bench/README.md, "Replication"; from NEO's list of unfinished work:
#: "insert multiple objects at a time").
_ROWS_PER_INSERT = 100
_MULTI_ROW: dict[str, str] = {}


def _insert_rows(conn, sql: str, rows: Sequence[tuple]) -> None:
    """Run the one-row INSERT ``sql`` (``... VALUES (?, ...)``) for every
    row of ``rows``, in order: full batches as multi-row statements (one
    prepared statement for all of them), the rest one row at a time."""
    n = len(rows)
    full = n - n % _ROWS_PER_INSERT
    if full:
        multi = _MULTI_ROW.get(sql)
        if multi is None:
            head, _, row = sql.rpartition(" VALUES ")
            multi = _MULTI_ROW[sql] = head + " VALUES " + ",".join([row] * _ROWS_PER_INSERT)
        execute = conn.execute
        for i in range(0, full, _ROWS_PER_INSERT):
            execute(multi, list(chain.from_iterable(rows[i:i + _ROWS_PER_INSERT])))
    if full < n:
        conn.executemany(sql, rows[full:])


def _pack_oids(oids: Sequence[int]) -> bytes:
    return struct.pack(f'>{len(oids)}Q', *oids)


def _unpack_oids(blob: bytes) -> list[int]:
    return list(struct.unpack(f'>{len(blob) // 8}Q', blob))
