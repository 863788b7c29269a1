"""A FileStorage with a bit of everything, for the import tests and
benchmark: many small transactions (raw stores), undos (back-pointers and
undone creations), deleteObject deletions, BTree changes merged by
conflict resolution, and transactions with extension data."""
from __future__ import annotations

import contextlib
import random
import sys
from base64 import encodebytes

import transaction
import ZODB
from BTrees.OOBTree import OOBTree
from persistent.mapping import PersistentMapping
from ZODB.Connection import TransactionMetaData
from ZODB.FileStorage import FileStorage
from ZODB.utils import z64


def commit(storage, stores=(), deletes=(), undos=(), user=b"", description=b"",
           extension=None) -> bytes:
    """One transaction on a raw storage: stores (oid, serial, data),
    deletions (oid, serial), undos (ids of the storage's undo log: a
    cluster's are tids, a FileStorage's ``undo_id(tid)``); returns its tid."""
    t = TransactionMetaData(user, description, extension or {})
    storage.tpc_begin(t)
    try:
        for oid, serial, data in stores:
            storage.store(oid, serial, data, "", t)
        for oid, serial in deletes:
            storage.deleteObject(oid, serial, t)
        for undo in undos:
            storage.undo(undo, t)
        storage.tpc_vote(t)
        return storage.tpc_finish(t)
    except BaseException:
        storage.tpc_abort(t)
        raise


def undo_id(tid: bytes) -> bytes:
    """FileStorage's undo log id of a transaction: its tid in base64."""
    return encodebytes(tid).rstrip(b"\n")


def make_filestorage(path: str, transactions: int = 10000, objects: int = 300,
                     size: int = 60, seed: int = 1, undo: bool = True) -> dict:
    """Write a new FileStorage at ``path`` with about ``transactions``
    transactions; returns a summary (counts of each kind, the raw oids).
    Without ``undo``, no undo transactions."""
    with no_fsync():
        return _make(path, transactions, objects, size, random.Random(seed), undo)


@contextlib.contextmanager
def no_fsync():
    """Test data: FileStorage commits without fsync (it calls its module's)."""
    module = sys.modules[FileStorage.__module__]
    fsync, module.fsync = module.fsync, None
    try:
        yield
    finally:
        module.fsync = fsync


def _make(path, transactions, objects, size, rng, undo) -> dict:
    storage = FileStorage(path, create=True)
    db = ZODB.DB(storage)
    counts = {"stores": 0, "undos": 0, "undone_creations": 0, "deletions": 0,
              "resolved": 0, "extension": 0}
    tm1, tm2 = transaction.TransactionManager(), transaction.TransactionManager()
    c1, c2 = db.open(tm1), db.open(tm2)
    root = c1.root()
    root["tree"] = tree = OOBTree()
    for k in range(20):
        tree["k%02d" % k] = 0
    root["mapping"] = PersistentMapping(n=0)
    tm1.get().setExtendedInfo("origin", "fsdata")
    tm1.commit()
    tm2.begin()
    oids: list[bytes] = []
    serials: dict[bytes, bytes] = {}
    deleted: set[bytes] = set()
    n = 1
    while n < transactions:
        i = n
        if i % 50 == 0:
            # two connections change different keys of one BTree bucket:
            # the second commit is merged by conflict resolution
            tm1.begin()
            tm2.begin()
            c1.root()["tree"]["k%02d" % (i % 10)] = i
            c2.root()["tree"]["k%02d" % (10 + i % 10)] = i
            tm1.commit()
            tm2.get().note("resolved %d" % i)
            tm2.commit()
            counts["resolved"] += 1
            n += 2
            continue
        if undo and i % 97 == 0 and oids:
            # change an object, then undo the change (back-pointer)
            oid = rng.choice([o for o in oids if o not in deleted] or oids)
            if oid not in deleted:
                tid = commit(storage, [(oid, serials[oid], b"to be undone %d" % i)])
                serials[oid] = commit(storage, undos=[undo_id(tid)], description=b"undo")
                counts["undos"] += 1
                n += 2
                continue
        if undo and i % 131 == 0:
            # create an object, then undo its creation (no data)
            oid = storage.new_oid()
            tid = commit(storage, [(oid, z64, b"created %d" % i)])
            commit(storage, undos=[undo_id(tid)], description=b"undo creation")
            counts["undone_creations"] += 1
            n += 2
            continue
        if i % 101 == 0 and len(oids) > 10:
            oid = rng.choice(oids)
            if oid not in deleted:
                commit(storage, deletes=[(oid, serials[oid])], description=b"delete")
                deleted.add(oid)
                counts["deletions"] += 1
                n += 1
                continue
        ext = {}
        if i % 7 == 0:
            ext = {"i": i, "note": "ext %d" % i}
            counts["extension"] += 1
        stores = []
        for _ in range(rng.randint(1, 3)):
            if len(oids) < objects or rng.random() < 0.05:
                oid = storage.new_oid()
                oids.append(oid)
                serial = z64
            else:
                oid = rng.choice(oids)
                if oid in deleted or any(s[0] == oid for s in stores):
                    continue
                serial = serials[oid]
            stores.append((oid, serial, b"%d:%s" % (i, rng.randbytes(size // 2).hex().encode())))
        if not stores:
            continue
        tid = commit(storage, stores, user=b"user%d" % (i % 5), description=b"txn %d" % i,
                     extension=ext)
        for oid, _, _ in stores:
            serials[oid] = tid
        counts["stores"] += 1
        n += 1
    c1.close()
    c2.close()
    db.close()
    counts["oids"] = oids
    counts["deleted"] = sorted(deleted)
    return counts


def records(txn) -> list[tuple]:
    return [(r.oid, r.tid, r.data, r.data_txn) for r in txn]


def transactions(iterator) -> list[tuple]:
    """What the tests compare: every transaction with its records."""
    return [(t.tid, t.status, t.user, t.description, dict(t.extension), records(t))
            for t in iterator]


def made(path: str, count: int, objects: int) -> list[tuple]:
    """``make_filestorage`` at ``path`` (without a summary): its
    ``transactions``, as the tests compare them."""
    make_filestorage(path, transactions=count, objects=objects)
    source = FileStorage(path, read_only=True)
    try:
        return transactions(source.iterator())
    finally:
        source.close()


def in_cluster(cluster) -> list[tuple]:
    """The ``transactions`` a new client of ``cluster`` iterates."""
    from neozodb.client import Storage
    storage = Storage(**cluster.client_kwargs())
    try:
        return transactions(storage.iterator())
    finally:
        storage.close()
