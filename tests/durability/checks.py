"""The checks of the power-loss tests: every acknowledged commit is on every
readable replica, raw in the SQLite files (``check_disk``), and whole
through a ZODB client (``check_through_client``)."""
from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
from dataclasses import dataclass, field

READABLE = (1, 2)  # CellStates UP_TO_DATE, FEEDING


@dataclass
class Replica:
    """What one storage database holds, as read raw with sqlite3."""
    name: str
    nid: int | None = None
    ptid: int = -1
    partitions: int = 0
    replicas: int = 0
    cells: dict[int, dict[int, int]] = field(default_factory=dict)  # partition -> {nid: state}
    # tid -> (ttid, description, "committed" | "locked")
    meta: dict[int, tuple[int, bytes, str]] = field(default_factory=dict)
    voted: dict[int, bytes] = field(default_factory=dict)  # ttid -> description, not locked
    # (oid, tid) of obj, (oid, ttid) of tobj -> (value_tid, hash, compression, value)
    objs: dict[tuple[int, int], tuple] = field(default_factory=dict)
    tobjs: dict[tuple[int, int], tuple] = field(default_factory=dict)


_OBJ = ("SELECT o.oid, o.tid, o.value_tid, d.hash, d.compression, d.value FROM {} AS o"
        " LEFT JOIN data AS d ON d.id = o.data_id WHERE o.oid IN ({})")


def read_replica(path: str, oids: list[int]) -> Replica:
    """Read a storage database (and its WAL) from a copy, so that SQLite's
    recovery writes nothing where the storage will run again."""
    replica = Replica(os.path.basename(path))
    if not os.path.exists(path):
        return replica
    with tempfile.TemporaryDirectory() as tmp:
        copy = os.path.join(tmp, "db.sqlite")
        shutil.copyfile(path, copy)
        if os.path.exists(path + "-wal"):
            shutil.copyfile(path + "-wal", copy + "-wal")  # not -shm: rebuilt from the WAL
        conn = sqlite3.connect(copy)
        try:
            tables = {row[0] for row in conn.execute(
                "SELECT name FROM sqlite_master WHERE type='table'")}
            if "config" not in tables:
                return replica  # nothing durable at all
            config = dict(conn.execute("SELECT name, value FROM config"))
            replica.nid = int(config["nid"]) if "nid" in config else None
            replica.ptid = int(config.get("ptid", -1))
            replica.partitions = int(config.get("partitions", 0))
            replica.replicas = int(config.get("replicas", 0))
            for p, nid, state in conn.execute("SELECT partition, nid, state FROM pt"):
                replica.cells.setdefault(p, {})[nid] = state
            for tid, ttid, description in conn.execute(
                    "SELECT tid, ttid, description FROM trans"):
                replica.meta[tid] = (ttid, bytes(description), "committed")
            for tid, ttid, description in conn.execute(
                    "SELECT tid, ttid, description FROM ttrans WHERE tid IS NOT NULL"):
                replica.meta[tid] = (ttid, bytes(description), "locked")
            for ttid, description in conn.execute(
                    "SELECT ttid, description FROM ttrans WHERE tid IS NULL"):
                replica.voted[ttid] = bytes(description)
            marks = ",".join("?" * len(oids))
            for table, out in (("obj", replica.objs), ("tobj", replica.tobjs)):
                for oid, tid, value_tid, digest, compression, value in conn.execute(
                        _OBJ.format(table, marks), oids):
                    out[oid, tid] = (value_tid, digest and bytes(digest), compression,
                                     value and bytes(value))
        finally:
            conn.close()
    return replica


def check_disk(paths: list[str], writers, acked: dict[str, dict[int, int]],
               complete: bool = False) -> list[str]:
    """Problems with the acknowledged commits ``{writer: {n: tid}}`` in the
    databases ``paths`` as they are on disk (after a cut: before any node
    opens them).  A commit must be, on every readable cell of the freshest
    partition table, either committed (trans/obj) or locked (ttrans with
    its tid, tobj by its ttid: verification finishes it at the restart),
    with the same object rows on every replica.  A replica may have it
    only voted (ttrans without tid, tobj) if another one locked it: the
    master died before this one answered the lock (it was SIGKILLed
    first, say), and verification validates it everywhere.  Or none of
    it at all, if another one locked it: a vote not synced (lazy-vote)
    lost in the cut; verification outdates that replica, and the client
    check after the restart sees the commit (not with ``complete``)."""
    oids = sorted(oid for w in writers for oid in w.oids)
    replicas = [read_replica(path, oids) for path in paths]
    problems = []
    fresh = max(replicas, key=lambda r: r.ptid)
    np = fresh.partitions
    if not np:
        return ["no partition table on any storage: nothing durable (%s)" % paths]
    by_nid = {r.nid: r for r in replicas}

    def holders(p: int) -> list[Replica]:
        nids = [nid for nid, state in fresh.cells.get(p, {}).items() if state in READABLE]
        wanted = fresh.replicas + 1 if complete else 1
        if len(nids) < wanted or not set(nids) <= set(by_nid):
            problems.append("partition %d: readable cells %s in the table of %s (ptid %d)"
                            % (p, nids, fresh.name, fresh.ptid))
        return [by_nid[nid] for nid in nids if nid in by_nid]

    for writer in writers:
        for n, tid in sorted(acked[writer.name].items()):
            what = "%s %d (tid %016x)" % (writer.name, n, tid)
            description = ("%s %d" % (writer.name, n)).encode()
            ttids = set()
            meta_holders = holders(tid % np)
            for r in meta_holders:
                meta = r.meta.get(tid)
                if meta is not None:
                    ttids.add(meta[0])
                    if meta[1] != description:
                        problems.append("%s: metadata of %r on %s" % (what, meta[1], r.name))
            if len(ttids) > 1:
                problems.append("%s: ttids %s differ between replicas" % (what, ttids))
            # a storage that lost its vote of it (feature lazy-vote: not
            # synced) has no trace of it, and another one locked it:
            # verification outdates that storage, which catches up (the
            # client check after the restart, and the complete check after
            # the clean stop, see that it did)
            lost = set() if complete or not any(
                r.meta.get(tid, ("", "", ""))[2] == "locked" for r in replicas) else {
                r.name for r in replicas if tid not in r.meta and not any(
                    t in r.voted or any(k[1] == t for k in r.tobjs) for t in ttids)
                and not any(k[1] == tid for k in r.objs)}
            for r in meta_holders:
                if tid not in r.meta and not any(r.voted.get(t) == description for t in ttids) \
                        and r.name not in lost:
                    problems.append("%s: no metadata on %s" % (what, r.name))
            for oid in writer.oids:
                rows = {}
                for r in holders(oid % np):
                    if r.name in lost:
                        continue
                    row = r.objs.get((oid, tid))
                    if row is None:
                        row = next((r.tobjs[oid, t] for t in ttids if (oid, t) in r.tobjs), None)
                    if row is None or row[1] is None:
                        problems.append("%s: object %d missing on %s" % (what, oid, r.name))
                    else:
                        rows[r.name] = row
                if len(set(rows.values())) > 1:
                    problems.append("%s: object %d differs between replicas %s"
                                    % (what, oid, sorted(rows)))
    return list(dict.fromkeys(problems))  # a partition's problem comes once


def load_state(db, pickle: bytes) -> dict:
    """The state of a PersistentMapping from its stored record."""
    from ZODB.serialize import ObjectReader
    return ObjectReader(None, None, db.classFactory).getState(pickle)["data"]


def check_through_client(cluster, writers, acked: dict[str, dict[int, int]]) -> list[str]:
    """Through a ZODB client of the running cluster: each acknowledged
    commit is there with its tid, every object of it at that revision, and
    each writer's current state is one whole transaction, no older than its
    last acknowledged one."""
    import ZODB
    from ZODB.POSException import POSKeyError

    from neozodb.client import Storage
    from neozodb.protocol import p64
    problems = []
    db = ZODB.DB(Storage(cluster.masters, cluster.name))
    try:
        storage = db.storage
        for writer in writers:
            w = writer.name
            counter, *objects = (p64(oid) for oid in writer.oids)
            for n, tid in sorted(acked[w].items()):
                for oid, key, want in [(counter, "n", n)] + [(o, "v", (w, n)) for o in objects]:
                    try:
                        value = load_state(db, storage.loadSerial(oid, p64(tid)))[key]
                    except POSKeyError:
                        problems.append("%s %d (tid %016x): object %s missing"
                                        % (w, n, tid, oid.hex()))
                        continue
                    if value != want:
                        problems.append("%s %d: object %s is %r" % (w, n, oid.hex(), value))
            pickle, _ = storage.load(counter)
            now = load_state(db, pickle)["n"]
            if acked[w] and now < max(acked[w]):
                problems.append("%s: state %d older than acknowledged %d"
                                % (w, now, max(acked[w])))
            values = [load_state(db, storage.load(o)[0])["v"] for o in objects]
            if values != [(w, now)] * len(objects):
                problems.append("%s: state %d is not whole: %s" % (w, now, values))
    finally:
        db.close()
    return problems
