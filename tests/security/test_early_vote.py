"""Early votes (feature early-vote): a vote sent with the stores, before
their answers.  A storage votes only for a transaction whose stores are all
settled; otherwise it refuses with NOT_READY and nothing is voted, which
also keeps a client from voting without the objects it did not get."""
from __future__ import annotations

import hashlib
import threading

import pytest
import transaction
import ZODB
from BTrees.Length import Length
from rawpeer import Client, load

from neozodb.net.endpoint import RemoteError
from neozodb.protocol import ZERO_TID, ErrorCodes, Packets

pytestmark = pytest.mark.timeout(180)
TIMEOUT = 30
# the cluster: tests/conftest.py's one_storage (every transaction on one
# storage: the case where the client votes early)


def _store(client: Client, ttid: bytes, oid: bytes, data: bytes, serial: bytes = ZERO_TID):
    """Send a store without waiting: the queue its answer goes to."""
    (nid,) = client.cells(oid)
    return client.conn(nid).ask(Packets.AskStoreObject, oid, serial, 0,
                                hashlib.sha1(data).digest(), data, None, ttid)


def _vote(client: Client, ttid: bytes, oids: list[bytes]) -> None:
    (nid,) = client.cells(ttid)
    client.conn(nid).call(Packets.AskStoreTransaction, ttid, b"", b"", b"", oids, None,
                          timeout=TIMEOUT)


def test_vote_refused_while_a_store_waits_for_a_lock(one_storage):
    first, second = Client(one_storage), Client(one_storage)
    try:
        oid = first.new_oid()
        older = first.begin()
        assert _store(first, older, oid, b"first").get(timeout=TIMEOUT)[1] == (None,)
        younger = second.begin()
        waiting = _store(second, younger, oid, b"second")  # waits for older's lock
        with pytest.raises(RemoteError) as e:
            _vote(second, younger, [oid])
        assert e.value.code is ErrorCodes.NOT_READY and "not settled" in e.value.message
        # nothing was voted: the older one aborts, the store goes on, and
        # the same vote, asked again, commits
        first.conn(first.cells(oid)[0]).notify(Packets.AbortTransaction, older, [])
        first.master.notify(Packets.AbortTransaction, older, first.cells(oid))
        assert waiting.get(timeout=TIMEOUT)[1] == (None,)
        _vote(second, younger, [oid])
        second.finish(younger, [oid])
        assert load(one_storage, oid) == b"second"
    finally:
        first.close()
        second.close()


def test_vote_refused_after_a_conflict_until_stored_again(one_storage):
    client = Client(one_storage)
    try:
        oid = client.new_oid()
        ttid = client.begin()
        assert _store(client, ttid, oid, b"v1").get(timeout=TIMEOUT)[1] == (None,)
        _vote(client, ttid, [oid])
        tid = client.finish(ttid, [oid])
        ttid = client.begin()
        # based on no revision: a conflict, the object is not stored
        (conflict,) = _store(client, ttid, oid, b"v2").get(timeout=TIMEOUT)[1]
        assert conflict == tid
        with pytest.raises(RemoteError) as e:
            _vote(client, ttid, [oid])
        assert e.value.code is ErrorCodes.NOT_READY
        assert load(one_storage, oid) == b"v1"
        assert _store(client, ttid, oid, b"v2", tid).get(timeout=TIMEOUT)[1] == (None,)
        _vote(client, ttid, [oid])
        client.finish(ttid, [oid])
        assert load(one_storage, oid) == b"v2"
    finally:
        client.close()


def test_client_votes_early_and_again_after_resolving_a_conflict(one_storage):
    """Real ZODB clients: a one-object commit votes early; when its store
    waits for the lock of a transaction that then commits, the storage
    refuses the early vote, and the client resolves the conflict and votes
    again.  The other transaction holds its lock (voted, not finished)
    until the refusal arrived: no timing decides which path is taken."""
    from ZODB.Connection import TransactionMetaData

    from neozodb.cli.cluster import wait_until
    from neozodb.client import Storage
    dbs = [ZODB.DB(Storage(one_storage.masters, one_storage.name)) for _ in range(2)]
    try:
        tms = [transaction.TransactionManager() for _ in dbs]
        conns = [db.open(transaction_manager=tm) for db, tm in zip(dbs, tms, strict=True)]
        conns[0].root()["n"] = Length(0)
        tms[0].commit()
        apps = [db.storage.app for db in dbs]
        assert apps[0].early_votes[0] >= 1  # taken at once
        conns[1].sync()
        counter = conns[1].root()["n"]
        counter.change(10)
        # another transaction rewrites n and holds its lock
        storage = dbs[0].storage
        data, serial = storage.load(counter._p_oid)
        other = TransactionMetaData()
        storage.tpc_begin(other)
        storage.store(counter._p_oid, serial, data, "", other)
        storage.tpc_vote(other)
        taken, refused = apps[1].early_votes
        committer = threading.Thread(target=tms[1].commit)
        committer.start()
        try:
            wait_until(lambda: any(getattr(c, "revote", None)
                                   for c in list(apps[1].transactions.values())),
                       TIMEOUT, "the early vote refused")
        finally:
            storage.tpc_finish(other)
            committer.join(TIMEOUT)
        assert not committer.is_alive()
        assert apps[1].early_votes == [taken, refused + 1]
        check = dbs[1].open()  # the committer knows its own commit
        assert check.root()["n"]() == 10  # 0, rewritten as is, + 10
        check.close()
    finally:
        for db in dbs:
            db.close()
