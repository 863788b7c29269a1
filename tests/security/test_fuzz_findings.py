"""What the stateful fuzzer (test_fuzz.py) found, one minimal message
sequence each, against real nodes.  A request must be answered (an answer
or an Error) and leave no traceback in the node's log; an 'internal error'
closes the connection without an answer.

Findings not fixed yet are strict xfails naming the file where the fix
belongs: when it is fixed, the test passes, pytest reports it, and the mark
(and the finding's entry in test_fuzz.KNOWN) go.
"""
from __future__ import annotations

import hashlib
import itertools
import os

import pytest
from fuzzing import Session, SessionClosed, identify_client, log_problems, own_entry

from neozodb.cli.cluster import LocalCluster, wait_until
from neozodb.protocol import ZERO_TID, ErrorCodes, NodeTypes, Packets, p64

pytestmark = pytest.mark.timeout(180)

HIGH = b"\xff" * 8  # any 8 bytes are a valid p64: this one is beyond SQLite's integers


class Client:
    """A raw client: identified to the master, then to storages."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        self.name = cluster.name.encode()
        self.master = identify_client(cluster.master_address, self.name, None)
        self.nid = self.master.accepted[2]
        self.id_timestamp = own_entry(self.master, self.nid)[4]
        self.storages: dict[int, tuple] = {}
        for packet, args in self.master.notifications:
            if packet is Packets.NotifyNodeInformation:
                for entry in args[1]:
                    if entry[0] is NodeTypes.STORAGE and entry[1] is not None:
                        self.storages[entry[2]] = entry

    def storage(self, nid: int | None = None) -> Session:
        nid = min(self.storages) if nid is None else nid
        host, port = self.storages[nid][1]
        return identify_client((host.decode(), port), self.name, None, self.nid, self.id_timestamp)

    def close(self) -> None:
        self.master.close()


def _offsets(cluster: LocalCluster) -> dict[str, int]:
    return {name: os.path.getsize(node.logfile) for name, node in cluster.nodes.items()}


def _tracebacks(cluster: LocalCluster, offsets: dict[str, int]) -> list[str]:
    return ["%s: %s" % (name, record) for name, node in cluster.nodes.items()
            for _, _, record in log_problems(node.logfile, offsets[name])]


def _answer(session: Session, packet, *args) -> tuple | None:
    msg_id, data = session.frame(packet, args)
    session.send(data)
    return session.wait_answer(msg_id, 10)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One cluster for the findings that do not damage it."""
    c = LocalCluster(str(tmp_path_factory.mktemp("findings") / "cluster"), name="findings",
                     storages=2, replicas=1, partitions=12)
    c.start_or_kill(wait=60)
    try:
        yield c
    finally:
        c.kill()


@pytest.fixture
def client(shared):
    c = Client(shared)
    try:
        yield c
    finally:
        c.close()


def _clean(cluster: LocalCluster, offsets: dict[str, int]) -> None:
    problems = _tracebacks(cluster, offsets)
    assert not problems, "\n".join(problems)


# -- fixed ------------------------------------------------------------------------

def test_f1_abort_of_ttid_beyond_sqlite_keeps_the_storage_in_operation(shared):
    """A client stores under TTID ff*8, then goes away: the storage aborted
    that transaction with an OverflowError while handling the master's
    NotifyNodeInformation, dropped its master and left operation."""
    offsets = _offsets(shared)
    c = Client(shared)
    s = c.storage()
    data = b"x"
    got = _answer(s, Packets.AskStoreObject, p64(1 << 62), ZERO_TID, 0,
                  hashlib.sha1(data).digest(), data, None, HIGH)
    assert got is not None  # answered: refused (beyond 63 bits) or stored
    s.close()
    c.close()
    master_log = shared.nodes["M1"].logfile
    wait_until(lambda: "lost C%d " % (c.nid & 0xFFFFFF) in open(master_log).read(), 10,
               "the master to see the client go")
    # identified by the storage only once it knows the new client, that
    # is after the master's news of the old one
    after = Client(shared)
    try:
        got = _answer(after.storage(), Packets.Ping)
        assert got is not None
    finally:
        after.close()
    _clean(shared, offsets)
    assert "lost the master" not in open(shared.nodes["S1"].logfile).read()[offsets["S1"]:]


def test_f4_finish_with_partitions_outside_the_table(client, shared):
    offsets = _offsets(shared)
    (ttid,) = client.master.call(Packets.AskBeginTransaction, None)
    got = _answer(client.master, Packets.AskFinishTransaction, ttid, [], [99], [], None)
    assert got is not None and got[0] is Packets.Error
    assert got[1][0] == ErrorCodes.PROTOCOL_ERROR.value
    _clean(shared, offsets)


def test_f5_identification_with_a_host_that_is_not_text(shared):
    offsets = _offsets(shared)
    s = Session(shared.master_address)
    try:
        got = _answer(s, Packets.RequestIdentification, NodeTypes.MASTER, None,
                      (b"\xf6\xff", 1), shared.name.encode(), None, {})
        assert got is not None and got[0] is Packets.Error
    finally:
        s.close()
    _clean(shared, offsets)


# -- not fixed: storage/handlers.py (value validation) ---------------------------------

_TTID = object()  # a TTID of its own per test: aborted ones are remembered by the storage
_HIGH_TTID = object()  # the same, beyond SQLite's integers
_ttids = itertools.count(1 << 62)


@pytest.mark.parametrize("packet,args", [
    ("AskObject", (HIGH, None, None)),
    ("AskObject", (p64(1), HIGH, None)),
    # (another oid: its lock stays, see F10)
    ("AskStoreObject", (b"\xff" * 7 + b"\xfe", ZERO_TID, 0, hashlib.sha1(b"x").digest(), b"x",
                        None, _TTID)),
    ("AskObjectHistory", (HIGH, 0, 1)),
    # an offset beyond SQLite's integers (seen in a 10^6-message run)
    ("AskObjectHistory", (p64(1), 2**63, 2**63 + 1)),
    ("AskTransactionInformation", (HIGH,)),
    ("AskFinalTID", (HIGH,)),
    ("AskTIDsFrom", (ZERO_TID, HIGH, 1, 0)),
    ("AskTIDs", (0, 2**64 - 1, 0xFFFFFFFF)),  # (the count, as SQL LIMIT)
    ("AskOIDsFrom", (0, 1, ZERO_TID, HIGH)),
    ("AskCheckCurrentSerial", (_TTID, HIGH, ZERO_TID)),
    ("AskObjectUndoSerial", (_TTID, _TTID, HIGH, [p64(0)])),
    ("AskStoreTransaction", (_HIGH_TTID, b"", b"", b"", [], None)),
], ids=lambda x: x if isinstance(x, str) else "")
def test_f1_ids_beyond_sqlite_integers(shared, packet, args):
    offsets = _offsets(shared)
    ttid = p64(next(_ttids))
    high = p64((1 << 64) - ttid[-1] - 1)
    args = tuple(ttid if a is _TTID else high if a is _HIGH_TTID else a for a in args)
    c = Client(shared)
    try:
        got = _answer(c.storage(), getattr(Packets, packet), *args)
    finally:
        c.close()
    assert got is not None, "closed without an answer (internal error)"
    _clean(shared, offsets)


def test_f10_lock_left_by_a_failed_store(shared):
    """A store of oid ff..fd fails inside the storage after taking its write
    lock (F1); the client goes away.  Another client's request on that oid
    then waits for the lock forever, instead of being answered (or closed)."""
    oid = b"\xff" * 7 + b"\xfd"
    c = Client(shared)
    try:
        (ttid,) = c.master.call(Packets.AskBeginTransaction, None)
        _answer(c.storage(), Packets.AskStoreObject, oid, ZERO_TID, 0, hashlib.sha1(b"x").digest(),
                b"x", None, ttid)
    finally:
        c.close()
    c = Client(shared)
    try:
        (ttid,) = c.master.call(Packets.AskBeginTransaction, None)
        _answer(c.storage(), Packets.AskCheckCurrentSerial, ttid, oid, ZERO_TID)
    finally:
        c.close()


def test_f2_ask_object_at_and_before(shared):
    offsets = _offsets(shared)
    c = Client(shared)
    try:
        got = _answer(c.storage(), Packets.AskObject, p64(0), p64(1), p64(2))
    finally:
        c.close()
    assert got is not None, "closed without an answer (internal error)"
    _clean(shared, offsets)


def test_f3_store_without_ttid(shared):
    offsets = _offsets(shared)
    c = Client(shared)
    try:
        got = _answer(c.storage(), Packets.AskStoreObject, p64(1), ZERO_TID, 0, b"\1" * 20,
                      b"x", None, None)
    finally:
        c.close()
    assert got is not None, "closed without an answer (internal error)"
    _clean(shared, offsets)


# -- not fixed: master/handlers.py, master/transactions.py -----------------------------

@pytest.mark.parametrize("node_type,nid", [(NodeTypes.MASTER, 2**63 - 1),
                                           (NodeTypes.STORAGE, 2**40)])
def test_f8_identification_with_a_nid_of_no_namespace(shared, node_type, nid):
    offsets = _offsets(shared)
    s = Session(shared.master_address)
    try:
        got = _answer(s, Packets.RequestIdentification, node_type, nid, None,
                      shared.name.encode(), None, {})
    finally:
        s.close()
    assert got is not None, "closed without an answer (internal error)"
    _clean(shared, offsets)


def test_f6_imposed_tid_ff(cluster):
    """AskBeginTransaction(ff*8) from any client: accepted, and every later
    begin fails (struct.error: the next TID does not fit in 64 bits)."""
    offsets = _offsets(cluster)
    c = Client(cluster)
    try:
        got = _answer(c.master, Packets.AskBeginTransaction, HIGH)
        # refused: a protocol error, which also closes that connection
        assert got is None or got[0] is Packets.Error, "imposed TID ff*8 accepted"
    finally:
        c.close()
    other = Client(cluster)
    try:
        got = _answer(other.master, Packets.AskBeginTransaction, None)
        assert got is not None and got[0] is Packets.AnswerBeginTransaction
    finally:
        other.close()
    _clean(cluster, offsets)


def test_f11_finish_naming_oid_ff_stops_oid_allocation(cluster):
    """One client finishes an empty transaction naming oid ff*8: from then
    on AskNewOIDs is an internal error (struct.error) for every client."""
    offsets = _offsets(cluster)
    c = Client(cluster)
    try:
        (ttid,) = c.master.call(Packets.AskBeginTransaction, None)
        got = _answer(c.master, Packets.AskFinishTransaction, ttid, [HIGH], [], [], None)
        assert got is not None
    finally:
        c.close()
    other = Client(cluster)
    try:
        got = _answer(other.master, Packets.AskNewOIDs, 1)
        assert got is not None and got[0] is Packets.AnswerNewOIDs, "no more OIDs"
    finally:
        other.close()
    _clean(cluster, offsets)


def test_f7_failed_vote_of_no_transaction_drops_a_storage(cluster):
    """Any client, with no transaction, makes the master close the
    connection of the node it names (a storage here; a client or the admin
    as well)."""
    c = Client(cluster)
    try:
        storage = min(c.storages)
        got = _answer(c.master, Packets.FailedVote, p64(12345), [storage])
        assert got is not None
        assert got[1][0] != ErrorCodes.ACK.value, "FailedVote of no transaction acknowledged"
    finally:
        c.close()


def test_f9_replicas_diverge_when_a_client_skips_a_storage(shared):
    """Both storages hold every partition (2 storages, replicas 1).  A
    client stores and votes at one only, then finishes: the commit
    succeeds, and the other storage, still UP_TO_DATE, says the object
    does not exist."""
    c = Client(shared)
    try:
        first, second = sorted(c.storages)
        s1 = c.storage(first)
        (ttid,) = c.master.call(Packets.AskBeginTransaction, None)
        ((oid,),) = c.master.call(Packets.AskNewOIDs, 1)
        data = b"only on one replica"
        assert s1.call(Packets.AskStoreObject, oid, ZERO_TID, 0, hashlib.sha1(data).digest(),
                       data, None, ttid) == (None,)
        s1.call(Packets.AskStoreTransaction, ttid, b"", b"", b"", [oid], None)
        got = _answer(c.master, Packets.AskFinishTransaction, ttid, [oid], [], [], None)
        committed = got is not None and got[0] is Packets.AnswerTransactionFinished
    finally:
        c.close()
    if committed:
        # the storage that never got it refused to lock it: its cells are
        # replicated again, and then it has the object like the other one
        def both_have_it():
            reader = Client(shared)
            try:
                answers = [_answer(reader.storage(nid), Packets.AskObject, oid, None, None)
                           for nid in (first, second)]
            except SessionClosed:
                return False  # the storage dropped is not operational again yet
            finally:
                reader.close()
            return all(a is not None and a[0] is Packets.AnswerObject for a in answers)
        wait_until(both_have_it, 60, "the second replica to get the object")
        wait_until(shared.all_up_to_date, 60, "every cell up to date")


@pytest.mark.parametrize("min_tid, max_tid", [(HIGH, None), (ZERO_TID, HIGH)])
def test_f12_check_with_a_tid_beyond_sqlite_integers(shared, min_tid, max_tid):
    """``CheckReplicas`` through the admin with a TID beyond 63 bits: the
    master passed it on and each storage's check failed on it with an
    OverflowError in its log (seen with NEOZODB_FUZZ_SEED=4049854216).
    Now the master refuses it (Denied: the admin keeps its master
    connection), and no storage starts a check."""
    offsets = _offsets(shared)
    s = Session(shared.admin_address)
    try:
        s.call(Packets.RequestIdentification, NodeTypes.ADMIN, None, None, b"findings",
               None, {})
        got = _answer(s, Packets.CheckReplicas, {0: None}, min_tid, max_tid)
    except SessionClosed:
        got = "closed"
    finally:
        s.close()
    assert got is not None, "closed without an answer (internal error)"
    # a valid check, once the cluster takes it, ran after whatever the
    # hostile one started: its traces are in the logs by then
    wait_until(lambda: not isinstance(shared.neoctl("check", "0", refusal=True), str), 30,
               "a valid check to run")
    _clean(shared, offsets)
