"""The unlock of a big transaction is committed at the next turn of the
event loop, not within the second as other pending writes: the next lock,
which a client waits for, would write its rows otherwise
(storage/app.py, EARLY_WRITE_OBJECTS); so is a big vote answered without a
commit.  Driven in-process
(tests/storage_inprocess.py); what is committed is read through a
connection of its own to the SQLite database."""
from __future__ import annotations

import asyncio
import hashlib
import sqlite3

import pytest

from neozodb.protocol import NodeTypes, Packets, make_nid, p64
from neozodb.protocol.features import SOLO_VOTE
from neozodb.storage.app import EARLY_WRITE_OBJECTS
from neozodb.storage.handlers import ClientHandler, MasterHandler
from storage_inprocess import FakeConn, run

pytestmark = pytest.mark.timeout(60)

CLIENT = make_nid(NodeTypes.CLIENT, 1)
TTID, TID = p64(0x100), p64(0x101)
NOTHING = p64(0)


def store(app, count: int, features=frozenset()):
    """``count`` new objects stored in TTID: the client's handler, its
    connection and the oids."""
    handler = ClientHandler(app)
    conn = FakeConn(CLIENT, handler)
    conn.peer_features = features
    oids = [p64(n) for n in range(1, count + 1)]
    for n, oid in enumerate(oids):
        data = b"object %d" % n
        handler.AskStoreObject(conn, n, oid, NOTHING, 0, hashlib.sha1(data).digest(), data,
                               None, TTID)
    return handler, conn, oids


def rows(tmp_path, table: str) -> int:
    """The rows of ``table`` committed, read through a connection of our own."""
    with sqlite3.connect(tmp_path / "storage.sqlite") as reader:
        return reader.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


def commit(app, count: int) -> None:
    """A transaction of ``count`` new objects, voted, locked and unlocked."""
    handler, conn, oids = store(app, count)
    handler.AskStoreTransaction(conn, count, TTID, b"", b"", b"", oids, None)
    app.group_sync.flush()
    assert conn.sent[-1] == (Packets.AnswerStoreTransaction, ())
    master = FakeConn()
    MasterHandler(app).AskLockInformation(master, 1, TTID, TID, False)
    app.group_sync.flush()
    assert master.sent == [(Packets.AnswerInformationLocked, (TTID,))]
    MasterHandler(app).NotifyUnlockInformation(master, 2, TTID)


@pytest.mark.parametrize("count, early", [(EARLY_WRITE_OBJECTS, True),
                                          (EARLY_WRITE_OBJECTS - 1, False)])
def test_a_big_unlock_is_committed_at_the_next_turn(tmp_path, count, early):
    async def scenario(app):
        commit(app, count)
        assert rows(tmp_path, "obj") == 0  # still in the open transaction
        await asyncio.sleep(0)  # one turn of the loop: what call_soon scheduled ran
        assert rows(tmp_path, "obj") == (count if early else 0)
        app.backend.commit_pending()  # what the timer does within the second
        assert rows(tmp_path, "obj") == count
    run(tmp_path, scenario)


@pytest.mark.parametrize("count, early", [(EARLY_WRITE_OBJECTS, True),
                                          (EARLY_WRITE_OBJECTS - 1, False)])
def test_a_big_solo_vote_is_written_at_the_next_turn(tmp_path, count, early):
    """A solo vote is answered without a commit (its storage's lock makes it
    durable): a big one is committed at the next turn, before the lock."""
    async def scenario(app):
        handler, conn, oids = store(app, count, frozenset((SOLO_VOTE,)))
        handler.AskSoloVote(conn, count, TTID, b"", b"", b"", oids, None)
        assert conn.sent[-1] == (Packets.AnswerSoloVote, ())
        assert rows(tmp_path, "tobj") == 0  # answered, not committed
        await asyncio.sleep(0)
        assert rows(tmp_path, "tobj") == (count if early else 0)
        master = FakeConn()
        MasterHandler(app).AskLockInformation(master, 1, TTID, TID, False)
        app.group_sync.flush()
        assert master.sent == [(Packets.AnswerInformationLocked, (TTID,))]
        assert rows(tmp_path, "tobj") == count  # the lock commits what is left
    run(tmp_path, scenario)
