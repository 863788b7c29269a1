"""Early votes (feature early-vote): a vote sent with the stores, before
their answers.  A storage votes only for a transaction whose stores are all
settled; otherwise it refuses with NOT_READY and nothing is voted, which
also keeps a client from voting without the objects it did not get."""
from __future__ import annotations

import hashlib

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
    """Real ZODB clients: a one-object commit votes early; a conflict that
    resolution fixes makes the storage refuse the early vote, and the
    client votes again with the resolved object."""
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
        counters = [c.root()["n"] for c in conns]
        counters[0].change(1)
        counters[1].change(10)
        tms[0].commit()
        refused = apps[1].early_votes[1]
        tms[1].commit()  # conflicts with the first, resolved by Length
        assert apps[1].early_votes[1] == refused + 1
        check = dbs[1].open()  # the committer knows its own commit
        assert check.root()["n"]() == 11
        check.close()
    finally:
        for db in dbs:
            db.close()
