"""PostgreSQL backend: its schema, and the translation of the statements
the shared SQL logic (``sqlbase``, the ``sqlite_*`` mixins) is written
in, SQLite's dialect, into PostgreSQL's.

The translation is mechanical: ``?`` placeholders become ``%b`` (binary
parameters: bytea travels as is), ``INSERT OR REPLACE`` becomes ``INSERT
... ON CONFLICT (primary key) DO UPDATE``, the ``user`` column is quoted (a
reserved word here); the few statements that have no mechanical equivalent are written out in
``_OVERRIDES``.  Statements are translated once and cached by their text.
"""

from __future__ import annotations

import re

from .sqlite_schema import _BEGIN, _HAS_CONFIG, _OIDS_FROM

# Same tables, columns and keys as SQLite's (sqlite_schema.py): OIDs and
# TIDs are below 2**63 (bigint); bytes are bytea.  Object data is
# compressed by ZODB/NEO already: EXTERNAL storage keeps PostgreSQL from
# trying again (values over ~2 kB are moved out of line uncompressed).
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS config (
        name text NOT NULL PRIMARY KEY, value text NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS pt (
        partition integer NOT NULL, nid integer NOT NULL, state smallint NOT NULL,
        PRIMARY KEY (partition, nid))""",
    """CREATE TABLE IF NOT EXISTS trans (
        partition integer NOT NULL, tid bigint NOT NULL, packed boolean NOT NULL,
        oids bytea NOT NULL, "user" bytea NOT NULL, description bytea NOT NULL,
        ext bytea NOT NULL, ttid bigint NOT NULL,
        PRIMARY KEY (partition, tid))""",
    """CREATE TABLE IF NOT EXISTS obj (
        partition integer NOT NULL, oid bigint NOT NULL, tid bigint NOT NULL,
        data_id bigint, value_tid bigint,
        PRIMARY KEY (partition, oid, tid))""",
    "CREATE INDEX IF NOT EXISTS obj_tid ON obj (partition, tid, oid)",
    "CREATE INDEX IF NOT EXISTS obj_data_id ON obj (data_id)",
    # bigserial: ids are never reused (the orphan floor relies on it)
    """CREATE TABLE IF NOT EXISTS data (
        id bigserial NOT NULL PRIMARY KEY, hash bytea NOT NULL,
        compression smallint NOT NULL, value bytea NOT NULL)""",
    "ALTER TABLE data ALTER COLUMN value SET STORAGE EXTERNAL",
    "CREATE INDEX IF NOT EXISTS data_hash ON data (hash, compression)",
    """CREATE TABLE IF NOT EXISTS ttrans (
        partition integer NOT NULL, tid bigint, packed boolean NOT NULL,
        oids bytea NOT NULL, "user" bytea NOT NULL, description bytea NOT NULL,
        ext bytea NOT NULL, ttid bigint NOT NULL PRIMARY KEY)""",
    """CREATE TABLE IF NOT EXISTS tobj (
        partition integer NOT NULL, oid bigint NOT NULL, tid bigint NOT NULL,
        data_id bigint, value_tid bigint,
        PRIMARY KEY (tid, oid))""",
    """CREATE TABLE IF NOT EXISTS replication (
        partition integer NOT NULL PRIMARY KEY, next_tid bigint NOT NULL,
        next_obj_tid bigint NOT NULL, next_obj_oid bigint NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS pack (
        tid bigint NOT NULL PRIMARY KEY, approved boolean, partial boolean NOT NULL,
        oids bytea, pack_tid bigint NOT NULL, gc boolean NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS tpack (
        ttid bigint NOT NULL PRIMARY KEY, approved boolean, partial boolean NOT NULL,
        oids bytea, pack_tid bigint NOT NULL, gc boolean NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS pack_progress (
        partition integer NOT NULL PRIMARY KEY, done bigint NOT NULL, target bigint,
        next_oid bigint NOT NULL)""",
    # blob contents (sqlite_blobs.py runs on them): 1 MiB chunks, stored
    # out of line uncompressed like data.value; the content of a data row
    # goes with the row (the trigger below)
    """CREATE TABLE IF NOT EXISTS blob_chunk (
        blob_id bigint NOT NULL, n bigint NOT NULL, bytes bytea NOT NULL,
        PRIMARY KEY (blob_id, n))""",
    "ALTER TABLE blob_chunk ALTER COLUMN bytes SET STORAGE EXTERNAL",
    """CREATE TABLE IF NOT EXISTS data_blob (
        data_id bigint NOT NULL PRIMARY KEY, blob_id bigint NOT NULL)""",
    # One statement-level trigger: every DELETE of data rows (pruning of
    # orphans, pack, GC, truncation: one statement over arrays each) deletes
    # their contents in two joins with the deleted rows, so that none of
    # those paths needs code for blobs.  (SQLite's is a row trigger.)
    """CREATE OR REPLACE FUNCTION data_blob_gone() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            DELETE FROM blob_chunk AS c USING gone AS g, data_blob AS b
                WHERE b.data_id = g.id AND c.blob_id = b.blob_id;
            DELETE FROM data_blob AS b USING gone AS g WHERE b.data_id = g.id;
            RETURN NULL;
        END $$""",
    # (CREATE OR REPLACE TRIGGER needs PostgreSQL 14)
    """DO $$ BEGIN
        IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'data_blob_gone'
                       AND tgrelid = 'data'::regclass) THEN
            CREATE TRIGGER data_blob_gone AFTER DELETE ON data
                REFERENCING OLD TABLE AS gone FOR EACH STATEMENT
                EXECUTE FUNCTION data_blob_gone();
        END IF;
    END $$""",
)
_TABLES = ('config', 'pt', 'trans', 'obj', 'data', 'ttrans', 'tobj', 'replication',
           'pack', 'tpack', 'pack_progress', 'blob_chunk', 'data_blob')
_DROP = tuple(f"DROP TABLE IF EXISTS {table}" for table in _TABLES)

# primary key of each table, the conflict target of INSERT OR REPLACE
_KEYS = {
    'config': ('name',), 'pt': ('partition', 'nid'), 'trans': ('partition', 'tid'),
    'obj': ('partition', 'oid', 'tid'), 'ttrans': ('ttid',), 'tobj': ('tid', 'oid'),
    'replication': ('partition',), 'pack': ('tid',), 'tpack': ('ttid',),
    'pack_progress': ('partition',), 'blob_chunk': ('blob_id', 'n'),
    'data_blob': ('data_id',),
}

_OVERRIDES = {
    _BEGIN: "BEGIN",
    _HAS_CONFIG: ("SELECT 1 FROM pg_tables WHERE schemaname=current_schema()"
                  " AND tablename='config'"),
    # SQLite takes data_id from the row holding MAX(tid); here DISTINCT ON
    # keeps the first row of each oid in (oid, tid DESC) order
    _OIDS_FROM: ("SELECT DISTINCT ON (oid) oid, tid, data_id FROM obj"
                 " WHERE partition=%b AND oid>=%b AND tid<=%b ORDER BY oid, tid DESC LIMIT %b"),
}

# one round trip for store_data: the id of an identical row, else of a
# new one (and whether it is new)
FIND_OR_INSERT_DATA = (
    "WITH found AS (SELECT id FROM data WHERE hash=? AND compression=? AND value=? LIMIT 1),"
    " added AS (INSERT INTO data (hash, compression, value) SELECT ?, ?, ?"
    " WHERE NOT EXISTS (SELECT 1 FROM found) RETURNING id)"
    " SELECT id, FALSE FROM found UNION ALL SELECT id, TRUE FROM added")
# store_data for a burst of stores, in one statement: the id of each
# value's row, found or inserted (one row for equal values), in order
FIND_OR_INSERT_DATA_MANY = (
    "WITH w AS (SELECT * FROM unnest(?::bytea[], ?::smallint[], ?::bytea[])"
    "  WITH ORDINALITY AS w(hash, compression, value, n)),"
    " f AS (SELECT w.*, (SELECT d.id FROM data AS d WHERE d.hash=w.hash"
    "  AND d.compression=w.compression AND d.value=w.value LIMIT 1) AS id FROM w),"
    " added AS (INSERT INTO data (hash, compression, value)"
    "  SELECT DISTINCT hash, compression, value FROM f WHERE id IS NULL"
    "  RETURNING id, hash, compression, value)"
    " SELECT COALESCE(f.id, a.id), f.id IS NULL FROM f LEFT JOIN added AS a"
    "  ON f.id IS NULL AND a.hash=f.hash AND a.compression=f.compression AND a.value=f.value"
    " ORDER BY f.n")
# one statement for unlock (the six of SQLiteWrites.unlock_transaction):
# atomic by itself, so no savepoint either
UNLOCK = (
    "WITH t AS (DELETE FROM ttrans WHERE ttid=? RETURNING *),"
    " o AS (DELETE FROM tobj WHERE tid=? RETURNING *),"
    " p AS (DELETE FROM tpack WHERE ttid=? RETURNING *),"
    " mt AS (INSERT INTO trans (partition, tid, packed, oids, user, description, ext, ttid)"
    "  SELECT partition, ?, packed, oids, user, description, ext, ttid FROM t"
    "  ON CONFLICT (partition, tid) DO UPDATE SET packed=EXCLUDED.packed, oids=EXCLUDED.oids,"
    "  user=EXCLUDED.user, description=EXCLUDED.description, ext=EXCLUDED.ext,"
    "  ttid=EXCLUDED.ttid),"
    " mo AS (INSERT INTO obj (partition, oid, tid, data_id, value_tid)"
    "  SELECT partition, oid, ?, data_id, value_tid FROM o"
    "  ON CONFLICT (partition, oid, tid) DO UPDATE SET data_id=EXCLUDED.data_id,"
    "  value_tid=EXCLUDED.value_tid)"
    " INSERT INTO pack (tid, approved, partial, oids, pack_tid, gc)"
    " SELECT ?, approved, partial, oids, pack_tid, gc FROM p"
    " ON CONFLICT (tid) DO UPDATE SET approved=EXCLUDED.approved, partial=EXCLUDED.partial,"
    " oids=EXCLUDED.oids, pack_tid=EXCLUDED.pack_tid, gc=EXCLUDED.gc")
# _prune: the candidates that nothing references, in one statement
DELETE_ORPHANS = ("DELETE FROM data AS d WHERE d.id = ANY(?::bigint[])"
                  " AND NOT EXISTS (SELECT 1 FROM obj WHERE obj.data_id=d.id)"
                  " AND NOT EXISTS (SELECT 1 FROM tobj WHERE tobj.data_id=d.id)")
# the data rows that replicated records may reuse: one array parameter
FIND_DATA_ANY = "SELECT id, hash, compression, value FROM data WHERE hash = ANY(?::bytea[])"
# data ids for replicated rows, taken from the table's own sequence
NEW_DATA_IDS = "SELECT nextval('data_id_seq') FROM generate_series(1, ?)"
# a content's chunks a few at a time (psycopg reads a result whole: a
# content of 1 GB hashed by ``neoctl check`` must not be in memory at once)
CHUNKS_FROM = "SELECT n, bytes FROM blob_chunk WHERE blob_id=? AND n>=? ORDER BY n LIMIT ?"
CHUNKS_AT_ONCE = 8
# one storage node per database: a session-level advisory lock, released
# by PostgreSQL when the connection ends (crash included); the key is
# arbitrary but fixed ("neozodb" as an integer)
LOCK_KEY = int.from_bytes(b'neozodb', 'big')
# taken waiting at most lock_timeout (set for this statement only)
LOCK = "SELECT pg_advisory_lock(?)"
SET_LOCK_TIMEOUT = "SELECT set_config('lock_timeout', ?, false)"
RESET_LOCK_TIMEOUT = "RESET lock_timeout"
LOCK_HOLDER = ("SELECT pid FROM pg_locks WHERE locktype='advisory' AND granted"
               " AND database=(SELECT oid FROM pg_database WHERE datname=current_database())"
               " AND (classid::bigint << 32) + objid::bigint = ?")

_INSERT_OR_REPLACE = re.compile(r'INSERT OR REPLACE INTO (\w+) \(([^)]*)\)(.*)', re.S)
_USER = re.compile(r'(?<!")\buser\b(?!")')
# what executemany sends as one statement (bulk)
_INSERT_ROWS = re.compile(r'INSERT (OR REPLACE )?INTO (\w+) \(([^)]*)\) VALUES \(\?(?:, \?)*\)')
_DELETE_ROWS = re.compile(r'DELETE FROM (\w+) WHERE (\w+=\?(?: AND \w+=\?)*)')
#: the type of every column, by table (bulk statements cast their arrays)
COLUMN_TYPES = (
    "SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod)"
    " FROM pg_attribute a JOIN pg_class c ON c.oid=a.attrelid"
    " JOIN pg_namespace n ON n.oid=c.relnamespace"
    " WHERE n.nspname=current_schema() AND c.relkind='r' AND a.attnum>0"
    " AND NOT a.attisdropped")


def _conflict(table: str, columns: list[str]) -> str:
    keys = _KEYS[table]
    updates = ', '.join(f'{c}=EXCLUDED.{c}' for c in columns if c not in keys)
    return f' ON CONFLICT ({", ".join(keys)}) DO UPDATE SET {updates}'


def bulk(sql: str, types: dict[str, dict[str, str]]
         ) -> tuple[str, tuple[int, ...] | None] | None:
    """One statement doing what ``executemany(sql, rows)`` does, for an
    INSERT (OR REPLACE) of VALUES or a DELETE by equalities: the rows go
    as one array per column (``unnest``).  Returns (PostgreSQL's text,
    positions of the primary key in a row when later rows replace
    earlier ones with the same key), or None for other statements."""
    match = _INSERT_ROWS.fullmatch(sql)
    if match is not None:
        replace, table, columns = match.groups()
        names = [c.strip() for c in columns.split(',')]
        arrays = ', '.join(f'?::{types[table][c]}[]' for c in names)
        text = f'INSERT INTO {table} ({columns}) SELECT * FROM unnest({arrays})'
        keys = None
        if replace:
            text += _conflict(table, names)
            keys = tuple(names.index(k) for k in _KEYS[table])
        return _USER.sub('"user"', text).replace('?', '%b'), keys
    match = _DELETE_ROWS.fullmatch(sql)
    if match is not None:
        table, conditions = match.groups()
        names = [c.split('=')[0] for c in conditions.split(' AND ')]
        arrays = ', '.join(f'?::{types[table][c]}[]' for c in names)
        text = (f'DELETE FROM {table} USING unnest({arrays}) AS k({", ".join(names)})'
                f' WHERE {" AND ".join(f"{table}.{c}=k.{c}" for c in names)}')
        return text.replace('?', '%b'), None
    return None


def translate(sql: str) -> str:
    """PostgreSQL's text for a statement written for SQLite."""
    override = _OVERRIDES.get(sql)
    if override is not None:
        return override
    match = _INSERT_OR_REPLACE.fullmatch(sql)
    if match is not None:
        table, columns, rest = match.groups()
        sql = (f'INSERT INTO {table} ({columns}){rest}'
               + _conflict(table, [c.strip() for c in columns.split(',')]))
    return _USER.sub('"user"', sql).replace('?', '%b')
