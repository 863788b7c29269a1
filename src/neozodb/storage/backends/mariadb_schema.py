"""MariaDB backend: NEO's MySQL schema (version 4), the ``-d`` string, and
every SQL statement of ``MariaDBBackend`` as module constants with bound
parameters (``?``).

The tables are NEO's, column for column, so that a database is served in
place by either implementation (docs/backends.md, "MariaDB"):

* ``config`` (name, value): NEO's keys and encodings (``version`` is 4,
  ``truncate_tid`` and ``backup_tid`` are 16 hex digits, the others
  decimal).  What neozodb keeps beyond NEO's model (replication resume
  points, pack progress, GC pack orders, the number of partitions before
  the first partition table) are keys named ``neozodb.*``, which NEO
  ignores and which go with the table when NEO erases the database.
* ``pt`` (partition, nid, tid, pack): ``tid`` is minus the cell state, or,
  for a cell of this node that is OUT_OF_DATE, the tid up to which it is
  replicated (0: from the start); ``pack`` is the last pack order applied
  to this node's cells, NULL on other nodes' cells.  The number of
  partitions is one more than the greatest ``partition``.
* ``data``: ids are ``(partition << 48) + n``, allocated per partition of
  the object first stored with it; a value of 16 MiB or more is cut in
  8 MiB rows of ``bigdata`` and its ``data.value`` is ``>LL`` (first
  bigdata id, length), with bit 0x80 set in ``compression``.
* ``pack`` holds the pack orders of voted transactions under their ttid
  until unlock renames them (as NEO does); ``todel`` lists data ids whose
  deletion NEO deferred: they are pruned at startup.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Sequence
from urllib.parse import parse_qs, unquote, urlsplit

SCHEMA_VERSION = '4'
ENGINES = ('InnoDB', 'RocksDB')
LOCK_SUFFIX = 'neostorage'        # GET_LOCK('<database>.neostorage'), as NEO
BIG = 0x1000000                   # values this long go to bigdata (MEDIUMBLOB limit)
BIG_CHUNK = 0x800000              # bigdata row size
BIG_FLAG = 0x80                   # in data.compression
_LL = struct.Struct('>LL')
_U64 = struct.Struct('>Q')
# server error codes that mean the connection is gone (client side: 2006
# server gone, 2013 lost during query, 2055 lost at handshake; server side:
# 1927 connection killed, 4031 disconnected for inactivity)
GONE = frozenset({2006, 2013, 2055, 1927, 4031})
# a statement refused for a conflict the server resolved by undoing it:
# retried when nothing else was pending
RETRY = frozenset({1205, 1213})   # lock wait timeout, deadlock

_TABLES = ('config', 'pt', 'pack', 'trans', 'obj', 'data', 'bigdata', 'ttrans', 'tobj',
           'todel')

# neozodb's own configuration keys (NEO ignores them)
KEY_PARTITIONS = 'partitions'
KEY_REPLICATION = 'neozodb.replication.%d'
KEY_PACK = 'neozodb.pack.%d'
KEY_GC = 'neozodb.gc.%016x'
KEY_GC_PREFIX = 'neozodb.gc.'


def schema(engine: str, dedup: bool) -> list[tuple[str, str]]:
    """(table, CREATE TABLE IF NOT EXISTS statement) of NEO's schema."""
    if engine == 'RocksDB':
        def cf(name: str, rev: bool = False) -> str:
            return " COMMENT '%scf_neo_%s'" % ('rev:' if rev else '', name)
    else:
        def cf(name: str, rev: bool = False) -> str:
            return ''
    e = ' ENGINE=' + engine
    unique = ', UNIQUE (hash, compression)' + cf('no_comp') if dedup else ''
    return [
        ('config', "CREATE TABLE IF NOT EXISTS config ("
                   " name VARBINARY(255) NOT NULL PRIMARY KEY,"
                   " value VARBINARY(255) NULL)" + e),
        ('pt', "CREATE TABLE IF NOT EXISTS pt ("
               " `partition` SMALLINT UNSIGNED NOT NULL, nid INT NOT NULL,"
               " tid BIGINT NOT NULL, pack BIGINT UNSIGNED,"
               " PRIMARY KEY (`partition`, nid))" + e),
        ('pack', "CREATE TABLE IF NOT EXISTS pack ("
                 " tid BIGINT UNSIGNED NOT NULL PRIMARY KEY, approved BOOLEAN,"
                 " partial BOOLEAN NOT NULL, oids MEDIUMBLOB, pack_tid BIGINT UNSIGNED)" + e),
        ('trans', "CREATE TABLE IF NOT EXISTS trans ("
                  " `partition` SMALLINT UNSIGNED NOT NULL, tid BIGINT UNSIGNED NOT NULL,"
                  " packed BOOLEAN NOT NULL, oids MEDIUMBLOB NOT NULL, user BLOB NOT NULL,"
                  " description BLOB NOT NULL, ext BLOB NOT NULL,"
                  " ttid BIGINT UNSIGNED NOT NULL,"
                  " PRIMARY KEY (`partition`, tid)%s)%s" % (cf('append_meta'), e)),
        ('obj', "CREATE TABLE IF NOT EXISTS obj ("
                " `partition` SMALLINT UNSIGNED NOT NULL, oid BIGINT UNSIGNED NOT NULL,"
                " tid BIGINT UNSIGNED NOT NULL, data_id BIGINT UNSIGNED NULL,"
                " value_tid BIGINT UNSIGNED NULL,"
                " PRIMARY KEY (`partition`, oid, tid)%s,"
                " KEY tid (`partition`, tid, oid)%s, KEY (data_id)%s)%s"
                % (cf('obj_pk', True), cf('append_meta'), cf('append_meta'), e)),
        ('data', "CREATE TABLE IF NOT EXISTS data ("
                 " id BIGINT UNSIGNED NOT NULL, hash BINARY(20) NOT NULL,"
                 " compression TINYINT UNSIGNED NULL, value MEDIUMBLOB NOT NULL,"
                 " PRIMARY KEY (id)%s%s)%s" % (cf('append'), unique, e)),
        ('bigdata', "CREATE TABLE IF NOT EXISTS bigdata ("
                    " id INT UNSIGNED NOT NULL AUTO_INCREMENT, value MEDIUMBLOB NOT NULL,"
                    " PRIMARY KEY (id)%s)%s" % (cf('append'), e)),
        ('ttrans', "CREATE TABLE IF NOT EXISTS ttrans ("
                   " `partition` SMALLINT UNSIGNED NOT NULL, tid BIGINT UNSIGNED,"
                   " packed BOOLEAN NOT NULL, oids MEDIUMBLOB NOT NULL, user BLOB NOT NULL,"
                   " description BLOB NOT NULL, ext BLOB NOT NULL,"
                   " ttid BIGINT UNSIGNED NOT NULL, PRIMARY KEY (ttid)%s)%s"
                   % (cf('no_comp'), e)),
        ('tobj', "CREATE TABLE IF NOT EXISTS tobj ("
                 " `partition` SMALLINT UNSIGNED NOT NULL, oid BIGINT UNSIGNED NOT NULL,"
                 " tid BIGINT UNSIGNED NOT NULL, data_id BIGINT UNSIGNED NULL,"
                 " value_tid BIGINT UNSIGNED NULL, PRIMARY KEY (tid, oid)%s)%s"
                 % (cf('no_comp'), e)),
        ('todel', "CREATE TABLE IF NOT EXISTS todel ("
                  " data_id BIGINT UNSIGNED NOT NULL, PRIMARY KEY (data_id)%s)%s"
                  % (cf('no_comp'), e)),
    ]


DROP = "DROP TABLE IF EXISTS " + ", ".join(_TABLES)
# Finding an identical data row needs an index on its hash: NEO's UNIQUE
# one when the database was made with --dedup, else one of our own that NEO
# does not see (its dedup test looks for an index named 'hash').
HASH_INDEXES = "SHOW INDEX FROM data WHERE Column_name='hash' AND Seq_in_index=1"
ADD_HASH_INDEX = "CREATE INDEX neozodb_hash ON data (hash, compression)"
HAS_CONFIG = ("SELECT 1 FROM information_schema.tables"
              " WHERE table_schema=DATABASE() AND table_name='config'")
ENGINE_SUPPORT = "SELECT support FROM information_schema.engines WHERE engine=?"
SESSION = ("SET SESSION wait_timeout=2147483,"
           " SESSION sql_mode='TRADITIONAL,NO_ENGINE_SUBSTITUTION'")
ISOLATION = "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED"
# a few seconds: the lock of a connection the server is still closing
# (a node restarted after losing it) is released soon
GET_LOCK = "SELECT GET_LOCK(?, 3)"
FLUSH_SETTING = ("SELECT @@innodb_flush_log_at_trx_commit, @@max_allowed_packet, VERSION(),"
                 " @@datadir")
SAVEPOINT = "SAVEPOINT op"
ROLLBACK_TO = "ROLLBACK TO SAVEPOINT op"

GET_CONFIG = "SELECT value FROM config WHERE name=?"
SET_CONFIG = "REPLACE INTO config (name, value) VALUES (?, ?)"
DEL_CONFIG = "DELETE FROM config WHERE name=?"
GC_KEYS = "SELECT name FROM config WHERE name LIKE 'neozodb.gc.%'"

GET_PT = "SELECT `partition`, nid, tid FROM pt ORDER BY `partition`, nid"
MAX_PARTITION = "SELECT MAX(`partition`) FROM pt"
OWN_CELLS = "SELECT `partition`, tid, pack FROM pt WHERE nid=?"
OWN_CELL = "SELECT tid, pack FROM pt WHERE `partition`=? AND nid=?"
CLEAR_PT = "DELETE FROM pt"
# other nodes' cells, and ours that are not OUT_OF_DATE: minus the state;
# ours when OUT_OF_DATE: the replicated tid is kept when it was one
SET_CELL = ("INSERT INTO pt (`partition`, nid, tid, pack) VALUES (?, ?, ?, ?)"
            " ON DUPLICATE KEY UPDATE tid=VALUES(tid), pack=IFNULL(pack, VALUES(pack))")
SET_OWN_OOD_CELL = ("INSERT INTO pt (`partition`, nid, tid, pack) VALUES (?, ?, ?, ?)"
                    " ON DUPLICATE KEY UPDATE tid=IF(tid<0, VALUES(tid), tid),"
                    " pack=IFNULL(pack, VALUES(pack))")
DEL_CELL = "DELETE FROM pt WHERE `partition`=? AND nid=?"
OWN_PACK_DEFAULT = "UPDATE pt SET pack=0 WHERE nid=? AND pack IS NULL"
SET_CELL_TID = "UPDATE pt SET tid=? WHERE `partition`=? AND nid=? AND tid>=0"
SET_CELL_PACK = "UPDATE pt SET pack=? WHERE `partition`=? AND nid=?"

MAX_TRANS_TID = "SELECT MAX(tid) FROM trans WHERE `partition`=?"
MAX_OBJ_TID = "SELECT MAX(tid) FROM obj FORCE INDEX (tid) WHERE `partition`=?"
MAX_OBJ_OID = "SELECT MAX(oid) FROM obj WHERE `partition`=?"
MIN_TRANS_TID = "SELECT MIN(tid) FROM trans WHERE `partition`=?"
MIN_OBJ_TID = "SELECT MIN(tid) FROM obj FORCE INDEX (tid) WHERE `partition`=?"
LOCKED_TTRANS_TIDS = "SELECT `partition`, tid FROM ttrans WHERE tid IS NOT NULL"
TOBJ_MAX_OIDS = "SELECT `partition`, MAX(oid) FROM tobj GROUP BY `partition`"

# reads: one statement per load, the next serial in a subquery
_OBJ = ("SELECT o.tid, o.value_tid, d.compression, d.hash, d.value")
_FROM_OBJ = (" FROM obj AS o LEFT JOIN data AS d ON d.id = o.data_id"
             " WHERE o.`partition`=? AND o.oid=?")
_NEXT = (", (SELECT MIN(n.tid) FROM obj AS n WHERE n.`partition`=o.`partition`"
         " AND n.oid=o.oid AND n.tid>o.tid)")
GET_LATEST = _OBJ + _FROM_OBJ + " ORDER BY o.tid DESC LIMIT 1"
GET_AT_NEXT = _OBJ + _NEXT + _FROM_OBJ + " AND o.tid=?"
GET_BEFORE_NEXT = _OBJ + _NEXT + _FROM_OBJ + " AND o.tid<? ORDER BY o.tid DESC LIMIT 1"
REVISION_AT = ("SELECT tid, data_id, value_tid FROM obj"
               " WHERE `partition`=? AND oid=? AND tid=?")
REVISION_BEFORE = ("SELECT tid, data_id, value_tid FROM obj WHERE `partition`=? AND oid=?"
                   " AND tid<? ORDER BY tid DESC LIMIT 1")
OIDS_FROM = ("SELECT o.oid, o.data_id FROM obj AS o JOIN ("
             "SELECT oid, MAX(tid) AS tid FROM obj WHERE `partition`=? AND oid>=? AND tid<=?"
             " GROUP BY oid ORDER BY oid LIMIT ?) AS t"
             " ON o.`partition`=? AND o.oid=t.oid AND o.tid=t.tid ORDER BY o.oid")
OID_EXISTS = "SELECT 1 FROM obj WHERE `partition`=? AND oid=? LIMIT 1"
LAST_SERIAL = "SELECT MAX(tid) FROM obj WHERE `partition`=? AND oid=?"
LOAD_DATA = "SELECT hash, compression, value FROM data WHERE id=?"
BIGDATA = "SELECT id, value FROM bigdata WHERE id>=? AND id<? ORDER BY id"

FIND_DATA = "SELECT id, value FROM data WHERE hash=? AND compression=?"
# a burst of stores (store_data_many, last_serials): %s is a list of
# placeholders, at most IN_CHUNK of them
IN_CHUNK = 250
FIND_DATA_ANY = "SELECT id, hash, compression, value FROM data WHERE hash IN (%s)"
OBJ_DATA_IDS = ("SELECT oid, tid, data_id FROM obj WHERE `partition`=? AND tid BETWEEN ? AND ?"
                " AND oid IN (%s)")
# partition is oid % np: the cross product of the two lists matches no
# other (partition, oid) than those asked for
LAST_SERIALS = ("SELECT oid, MAX(tid) FROM obj WHERE `partition` IN (%s) AND oid IN (%s)"
                " GROUP BY oid")
INSERT_DATA = "INSERT INTO data (id, hash, compression, value) VALUES (?, ?, ?, ?)"
# one round trip for new data (the usual case); when a row has the same
# hash, nothing is inserted and FIND_DATA compares the bytes
INSERT_NEW_DATA = ("INSERT INTO data (id, hash, compression, value) SELECT ?, ?, ?, ? FROM DUAL"
                   " WHERE NOT EXISTS (SELECT 1 FROM data WHERE hash=? AND compression=?)")
INSERT_BIGDATA_FIRST = "INSERT INTO bigdata (value) VALUES (?)"
INSERT_BIGDATA = "INSERT INTO bigdata (id, value) VALUES (?, ?)"
DATA_LAST_ID = "SELECT MAX(id) FROM data WHERE id>=? AND id<?"
# a row's compression and, if in bigdata, its reference
DATA_KIND = "SELECT compression, IF(compression>=128, value, NULL) FROM data WHERE id=?"
DEL_DATA = "DELETE FROM data WHERE id=?"
DEL_BIGDATA = "DELETE FROM bigdata WHERE id>=? AND id<?"
DATA_IN_OBJ = "SELECT 1 FROM obj WHERE data_id=? LIMIT 1"
TOBJ_DATA_IDS = "SELECT DISTINCT data_id FROM tobj WHERE data_id IS NOT NULL"
ORPHANS = ("SELECT d.id FROM data AS d LEFT JOIN obj AS o ON o.data_id=d.id"
           " WHERE o.data_id IS NULL")
TODEL = "SELECT data_id FROM todel"
CLEAR_TODEL = "DELETE FROM todel"

INSERT_TOBJ = ("REPLACE INTO tobj (`partition`, oid, tid, data_id, value_tid)"
               " VALUES (?, ?, ?, ?, ?)")
INSERT_TTRANS = ("REPLACE INTO ttrans"
                 " (`partition`, tid, packed, oids, user, description, ext, ttid)"
                 " VALUES (?, NULL, ?, ?, ?, ?, ?, ?)")
LOCK = "UPDATE ttrans SET tid=? WHERE ttid=?"
MOVE_TRANS = ("REPLACE INTO trans"
              " (`partition`, tid, packed, oids, user, description, ext, ttid)"
              " SELECT `partition`, ?, packed, oids, user, description, ext, ttid"
              " FROM ttrans WHERE ttid=?")
MOVE_OBJ = ("REPLACE INTO obj (`partition`, oid, tid, data_id, value_tid)"
            " SELECT `partition`, oid, ?, data_id, value_tid FROM tobj WHERE tid=?")
DEL_TTRANS = "DELETE FROM ttrans WHERE ttid=?"
DEL_TOBJ = "DELETE FROM tobj WHERE tid=?"
TOBJ_DATA_IDS_OF = "SELECT data_id FROM tobj WHERE tid=? AND data_id IS NOT NULL"
GET_TTRANS = "SELECT ttid, tid FROM ttrans"
GET_TOBJ_TTIDS = "SELECT DISTINCT tid FROM tobj"
LOCKED_TTID = "SELECT tid FROM ttrans WHERE ttid=?"
FINAL_TID = "SELECT tid FROM trans WHERE `partition`=? AND tid>=? AND ttid=? LIMIT 1"
UNLOCKED_TTIDS = "SELECT ttid FROM ttrans WHERE tid IS NULL"
UNFINISHED_TOBJ = ("SELECT DISTINCT tid FROM tobj WHERE tid NOT IN"
                   " (SELECT ttid FROM ttrans WHERE tid IS NOT NULL)")
DROP_UNFINISHED_TTRANS = "DELETE FROM ttrans WHERE tid IS NULL"

GET_TRANS = ("SELECT oids, user, description, ext, packed, ttid FROM trans"
             " WHERE `partition`=? AND tid=?")
# the stored length; a bigdata value's is in its reference
HISTORY = ("SELECT o.tid, IF(d.compression>=128, d.value, NULL),"
           " LENGTH(d.value) FROM obj AS o LEFT JOIN data AS d ON d.id = o.data_id"
           " WHERE o.`partition`=? AND o.oid=? ORDER BY o.tid DESC LIMIT ? OFFSET ?")
UNDO_TIDS_DESC = ("SELECT tid FROM trans WHERE `partition`=? AND tid>? AND tid NOT IN"
                  " (SELECT tid FROM pack) ORDER BY tid DESC LIMIT ?")
PACKED_UP_TO = "SELECT MAX(pack_tid) FROM pack WHERE NOT partial AND tid<=?"
TIDS_FROM = ("SELECT tid FROM trans WHERE `partition`=? AND tid>=? AND tid<=?"
             " ORDER BY tid LIMIT ?")

# replication
FETCH_OBJ_KEYS = ("SELECT tid, oid FROM obj FORCE INDEX (tid) WHERE `partition`=?"
                  " AND (tid>? OR tid=? AND oid>=?) AND tid<=? ORDER BY tid, oid LIMIT ?")
FETCH_OBJ = ("SELECT o.value_tid, d.compression, d.hash, d.value"
             " FROM obj AS o LEFT JOIN data AS d ON d.id = o.data_id"
             " WHERE o.`partition`=? AND o.oid=? AND o.tid=?")
ADD_TRANS = ("REPLACE INTO trans"
             " (`partition`, tid, packed, oids, user, description, ext, ttid)"
             " VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
OBJ_DATA_ID = "SELECT data_id FROM obj WHERE `partition`=? AND oid=? AND tid=?"
ADD_OBJ = ("REPLACE INTO obj (`partition`, oid, tid, data_id, value_tid)"
           " VALUES (?, ?, ?, ?, ?)")
DEL_TRANS = "DELETE FROM trans WHERE `partition`=? AND tid=?"
DEL_OBJ = "DELETE FROM obj WHERE `partition`=? AND oid=? AND tid=?"
PARTITION_OBJ_CHUNK = ("SELECT oid, tid, data_id FROM obj FORCE INDEX (tid)"
                       " WHERE `partition`=? ORDER BY tid, oid LIMIT ?")
PARTITION_TRANS_CHUNK = "SELECT tid FROM trans WHERE `partition`=? ORDER BY tid LIMIT ?"
TRUNCATE_DATA_IDS = ("SELECT data_id FROM obj FORCE INDEX (tid) WHERE `partition`=?"
                     " AND tid>? AND data_id IS NOT NULL")
TRUNCATE_OBJ = "DELETE FROM obj WHERE `partition`=? AND tid>?"
TRUNCATE_TRANS = "DELETE FROM trans WHERE `partition`=? AND tid>?"
# this node's OUT_OF_DATE cells replicated beyond a truncation
TRUNCATE_CELL_TIDS = "UPDATE pt SET tid=? WHERE tid>?"
TRUNCATE_TTRANS_TTIDS = "SELECT ttid FROM ttrans WHERE tid IS NULL OR tid>?"
CHECK_TRANS = ("SELECT tid, packed, oids, user, description, ext FROM trans"
               " WHERE `partition`=? AND tid>=? AND tid<=? ORDER BY tid LIMIT ?")
CHECK_OBJ = ("SELECT o.tid, o.oid, o.value_tid, d.hash"
             " FROM obj AS o FORCE INDEX (tid) LEFT JOIN data AS d ON d.id = o.data_id"
             " WHERE o.`partition`=? AND (o.tid>? OR o.tid=? AND o.oid>=?) AND o.tid<=?"
             " ORDER BY o.tid, o.oid LIMIT ?")

# pack orders: those of voted transactions are under their ttid (in ttrans)
INSERT_VOTED_PACK = ("REPLACE INTO pack (tid, approved, partial, oids, pack_tid)"
                     " VALUES (?, NULL, ?, ?, ?)")
APPROVE_PACK = "UPDATE pack SET approved=1 WHERE tid=?"
VOTED_PACK_TTIDS = "SELECT p.tid FROM pack AS p JOIN ttrans AS t ON t.ttid = p.tid"
MOVE_PACK = "UPDATE pack SET tid=? WHERE tid=?"
DEL_PACK = "DELETE FROM pack WHERE tid=?"
TRUNCATE_PACK = "SELECT tid FROM pack WHERE tid>?"
GET_PACK_ORDERS = ("SELECT tid, approved, partial, oids, pack_tid FROM pack"
                   " WHERE tid>=? AND tid<=? AND tid NOT IN (SELECT ttid FROM ttrans)"
                   " ORDER BY tid")
ADD_PACK = ("REPLACE INTO pack (tid, approved, partial, oids, pack_tid)"
            " VALUES (?, ?, ?, ?, ?)")
SIGN_PACK = "UPDATE pack SET approved=? WHERE tid=?"
PACK_ROWS = ("SELECT oid, tid, data_id FROM obj WHERE `partition`=? AND oid>=?"
             " ORDER BY oid, tid LIMIT ?")
OID_ROWS = "SELECT tid, data_id FROM obj WHERE `partition`=? AND oid=? ORDER BY tid"


def pack_oids(oids: Sequence[int]) -> bytes:
    return struct.pack(f'>{len(oids)}Q', *oids)


def unpack_oids(blob: bytes) -> list[int]:
    if len(blob) % 8:
        raise ValueError(f'invalid oid list of {len(blob)} bytes')
    return list(struct.unpack(f'>{len(blob) // 8}Q', blob))


def big_ids(value: bytes) -> tuple[int, int, int]:
    """(first bigdata id, end id, length) of a bigdata reference."""
    first, length = _LL.unpack(value)
    return first, first + (length + BIG_CHUNK - 1) // BIG_CHUNK, length


def big_reference(first: int, length: int) -> bytes:
    return _LL.pack(first, length)


# -- the -d string ---------------------------------------------------------------

_NAME = re.compile(r'[A-Za-z0-9_$-]+\Z')


def shown(database: str) -> str:
    """``database`` for messages, its password replaced by ***."""
    return re.sub(r"^((?:\w+://)?[^:@/]+):.*@", r"\1:***@", database)


def parse_database(database: str) -> dict[str, object]:
    """Connection arguments for the ``mariadb`` driver from ``database``:
    NEO's ``[user[:password]@]database[socket]`` (the socket path starts
    with ``/``, ``.`` or ``~``) or a URI ``mariadb://`` (or ``mysql://``)
    ``[user[:password]@][host][:port]/database[?unix_socket=PATH]``.
    ValueError with a one-line reason."""
    text = database.strip()
    if '://' in text:
        return _parse_uri(text)
    user = password = None
    if '@' in text:
        credentials, text = text.rsplit('@', 1)
        user, colon, password = credentials.partition(':')
        if not colon:
            password = None
        if not user:
            raise ValueError(f'empty user name in {shown(database)!r}')
    match = re.match(r'([^~./]+)(.*)\Z', text)
    if match is None:
        raise ValueError(f'no database name in {shown(database)!r}'
                         ' (expected [user[:password]@]database[socket])')
    name, socket = match.groups()
    if not _NAME.match(name):
        raise ValueError(f'invalid database name {name!r}')
    args: dict[str, object] = {'database': name}
    if user:
        args['user'] = user
        if password is not None:
            args['password'] = password
    if socket:
        args['unix_socket'] = os.path.expanduser(socket)
    return args


def _parse_uri(text: str) -> dict[str, object]:
    try:
        url = urlsplit(text)
        port = url.port
    except ValueError as e:
        raise ValueError(f'invalid database URI {shown(text)!r}: {e}') from None
    if url.scheme not in ('mariadb', 'mysql'):
        raise ValueError(f'database URI scheme must be mariadb:// or mysql://, not {url.scheme!r}')
    name = unquote(url.path.lstrip('/'))
    if not _NAME.match(name):
        raise ValueError(f'no valid database name in {shown(text)!r}')
    args: dict[str, object] = {'database': name}
    if url.username:
        args['user'] = unquote(url.username)
    if url.password is not None:
        args['password'] = unquote(url.password)
    if url.hostname:
        args['host'] = url.hostname
    if port is not None:
        args['port'] = port
    for key, values in parse_qs(url.query, keep_blank_values=True).items():
        if key in ('unix_socket', 'socket'):
            args['unix_socket'] = os.path.expanduser(values[-1])
        else:
            raise ValueError(f'unknown database URI parameter {key!r}')
    return args
