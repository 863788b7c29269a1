"""Two-phase commits of a misbehaving client, for the stateful fuzzer: the
right messages in the right order, except where a coin says otherwise
(a storage skipped, a vote missing or doubled, a conflict, an abort in the
middle, a finish naming other oids or sent twice).  Only oids allocated to
the fuzzer are written: whatever it commits is legitimate, and nothing of
the real client's may change."""
from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from typing import Any

from fuzzing import Pools, Session

from neozodb.protocol import ZERO_TID, Packets, p64, u64


def _ask(session: Session, note: Callable[[str, Any, Any], None], where: str, packet: Any,
         *args: Any) -> int | None:
    note(where, packet, args)
    msg_id, data = session.frame(packet, args)
    try:
        session.send(data)
    except Exception:
        return None
    return msg_id


def _wait(session: Session, msg_id: int | None, timeout: float) -> tuple | None:
    if msg_id is None or session.closed:
        return None
    return session.wait_answer(msg_id, timeout)


def adversarial_commit(master: Session, storages: dict[int, Session], pools: Pools,
                       r: random.Random, note: Callable[[str, Any, Any], None],
                       timeout: float, written: dict[bytes, bytes]) -> str:
    """One commit attempt; what became of it ("committed", "refused"...).
    The objects of a commit without misstep are added to ``written``: every
    replica must have them.
    Raises TimeoutError if a node neither answers nor closes in time
    where it must (the begin, the stores, the votes)."""
    def coin(p: float) -> bool:
        return r.random() < p

    got = _wait(master, _ask(master, note, "M", Packets.AskBeginTransaction, None), timeout)
    if got is None or got[0] is not Packets.AnswerBeginTransaction:
        return "begin refused"
    (ttid,) = got[1]
    got = _wait(master, _ask(master, note, "M", Packets.AskNewOIDs, r.randrange(1, 4)), timeout)
    if got is None or got[0] is not Packets.AnswerNewOIDs:
        return "no oids"
    oids = list(got[1][0])
    stores = []
    complete = True
    data_of = {}
    for oid in oids:
        data = r.randbytes(r.randrange(0, 100))
        data_of[oid] = data
        serial = ZERO_TID if not coin(0.1) or not pools.tids else r.choice(pools.tids)
        for nid, s in storages.items():
            if coin(0.05):
                complete = False
                continue  # a storage that never hears of it
            for _ in range(2 if coin(0.05) else 1):
                stores.append((s, _ask(s, note, "S%d" % nid, Packets.AskStoreObject, oid, serial,
                                       0, hashlib.sha1(data).digest(), data, None, ttid)))
        if coin(0.1) and pools.current:
            # a read-conflict check on the real client's object: a wrong serial
            model = r.choice(sorted(pools.current))
            wrong = p64(u64(pools.current[model]) ^ 1)
            nid = r.choice(sorted(storages))
            stores.append((storages[nid], _ask(storages[nid], note, "S%d" % nid,
                                               Packets.AskCheckCurrentSerial, ttid, model, wrong)))
    if coin(0.05):
        nid = r.choice(sorted(storages))
        stores.append((storages[nid], _ask(storages[nid], note, "S%d" % nid,
                                           Packets.AskRelockObject, ttid, r.choice(oids))))
    for s, msg_id in stores:
        got = _wait(s, msg_id, timeout)
        if got is None or got[1] != (None,):
            complete = False  # a conflict, or a relock that gave the object back
    if coin(0.1):
        _ask(master, note, "M", Packets.AbortTransaction, ttid, sorted(storages))
        return "aborted"
    votes = []
    for nid, s in storages.items():
        x = r.random()
        if x < 0.05:
            complete = False
            continue
        packets = [Packets.AskStoreTransaction if x < 0.55 else Packets.AskVoteTransaction]
        if coin(0.05):
            packets.append(packets[0])
        for packet in packets:
            args = ((ttid, b"fuzz", b"", b"", oids, None) if packet is Packets.AskStoreTransaction
                    else (ttid,))
            votes.append((s, _ask(s, note, "S%d" % nid, packet, *args)))
    for s, msg_id in votes:
        got = _wait(s, msg_id, timeout)
        if got is None or got[0] is Packets.Error:
            complete = False
    if coin(0.05):
        # gone after its vote: the storage keeps what it voted for the finish
        storages[r.choice(sorted(storages))].close()
    finish_oids = list(oids)
    if coin(0.1) and pools.current:
        finish_oids.append(r.choice(sorted(pools.current)))  # invalidated, not written
    if coin(0.05):
        finish_oids = finish_oids[1:]
        complete = False
    msg_id = _ask(master, note, "M", Packets.AskFinishTransaction, ttid, finish_oids, [], [], None)
    if coin(0.05):
        _ask(master, note, "M", Packets.AskFinishTransaction, ttid, finish_oids, [], [], None)
    if coin(0.1):
        return "finish not awaited"
    if coin(0.05):
        master.close()  # the master finishes it all the same
        return "gone after finish"
    got = _wait(master, msg_id, timeout)
    if got is None:
        return "master closed"
    if got[0] is Packets.AnswerTransactionFinished:
        pools.tids.append(got[1][1])
        if complete:
            written.update(data_of)
            return "committed"
        return "committed with a misstep"
    return "finish refused"
