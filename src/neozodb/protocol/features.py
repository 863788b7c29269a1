"""What neozodb adds to protocol 5, and how two neozodb peers find out
that they may use it.

A NEO peer must never receive a message it does not know, nor a known one
used in a way it does not expect.  So every extension is a *feature*,
used on a connection only when both ends have it:

- The connecting side lists its features in ``RequestIdentification.extra``
  under ``EXTRA_KEY`` (NEO ignores keys it does not know).
- The accepting side, if it is neozodb and saw that key, sends
  ``NotifyFeatures`` (code 0x7f00) with its own list *before* ``AcceptIdentification``:
  by the time the connector has its answer it knows the acceptor's
  features.  A NEO acceptor sends nothing, so the connector sees none.

Both ends keep the intersection (``conn.peer_features``).  The features:

``status-json``
    The master acknowledges ``CheckReplicas`` and an admin's
    ``AskPackOrders`` with the check and pack status as JSON (``neoctl
    print check``, ``print pack``); NEO's master acknowledges
    ``CheckReplicas`` with an empty message and does not expect
    ``AskPackOrders`` from an admin.  Between neoctl and the admin the
    admin passes on what its master said.
``import-status``
    An importing storage reports its progress to the master with
    ``NotifyMonitorInformation`` (NEO's master does not expect it there).
``gc-pack``
    The node applies pack orders that collect garbage (an oid list of
    unreachable objects), not only NEO's history packs.  NEO's storages
    read such an order's oids as a partial history pack and would keep
    what ours delete: a master offers ``gc-pack`` to clients only while
    every storage of its partition table announced it, and sends clients
    ``NotifyFeatures`` again when that changes (the client decides at each
    pack; without it, the client deletes garbage in ordinary transactions).
``mirror``
    A secondary master mirrors the primary: it is sent what storages are
    (storage entries of the node list, the partition table and its
    changes), an ``InvalidateObjects`` per commit, and asks ``AskLastIDs``,
    so that it takes over without a recovery.  NEO's secondaries only
    follow the list of masters (any other message makes them give up on
    their primary), and NEO's primary sends nothing more: a secondary that
    took over without a mirror recovers the table from the storages.
``check-report``
    A storage ends every ``CheckPartition`` it runs with one
    ``NotifyPartitionCorrupted``, an empty list when the copies agree,
    preceded by ``NotifyMonitorInformation`` ``{b"check": JSON}`` when a
    copy could not be compared or the check failed.
    NEO's storage reports only differences (possibly several times for one
    partition) and nothing when the copies agree: the master can tell when
    its check ends only from a storage with this feature.
``check-digest``
    Between storages: the digests of ``AnswerCheckTIDRange`` and
    ``AnswerCheckSerialRange`` are NEO's (20 bytes, a SHA-1 of the TIDs, or
    OIDs, in decimal) followed by a second SHA-1 covering the metadata of
    transactions and the data checksum and undo back-pointer of object
    revisions.  A check compares whole digests when every copy has the
    feature, NEO's part otherwise.
``early-vote``
    Between a client and a storage: the client sends its vote
    (``AskStoreTransaction`` or ``AskVoteTransaction``) right after its
    stores, in the same write, without waiting for their answers.  The
    storage handles requests in order, so by then every store was handled;
    it refuses the vote with ``NOT_READY`` (nothing voted) while a store or
    check of the transaction is not settled (waiting for a lock, answered
    with a conflict, or its lock given back for a deadlock), and the client
    votes again once it has settled them.  A NEO storage handles a store
    waiting for a lock and a vote differently: it never gets an early vote.
``solo-vote``
    Between a client and a storage: the client sends an early vote as
    ``AskSoloVote`` (code 0x7f02, the fields of ``AskStoreTransaction``)
    when it sent everything of the transaction (stores, checks, metadata)
    to this storage alone.  No other storage can then lock the
    transaction, so this storage's lock, which is made durable before it
    is answered, is the first moment anything of it must be on disk: the
    storage answers the vote without committing it, and the lock's commit
    and sync carry the vote's writes (docs/design.md, "Durability").  A storage whose own partition table shows another cell
    in a partition of the transaction answers after a sync, as for any
    vote.  A NEO storage does not know the message and never gets it.
``repl-batch``
    Between storages: a replication source streams the object revisions of
    a chunk as ``AddObjects`` (code 0x7f01), each a list of what
    ``AddObject`` carries (up to ``storage.peers.BATCH_RECORDS`` records or
    ``BATCH_BYTES`` of data), instead of one ``AddObject`` per revision:
    one message to encode, decode and dispatch for hundreds of records.
    NEO's storages know only ``AddObject``, and get it.
``older-pt``
    ``neoctl print pt_history`` and ``recover_pt PTID``
    (master/older_tables.py): the master asks a storage the history of its
    readable partitions with ``AskPartitionHistory`` (0x7f03), an admin
    asks the master ``AskOlderPartitionTables`` (0x7f04) and
    ``RecoverPartitionTable`` (0x7f05), and neoctl asks the admin the same.
    Each is sent only to a peer that announced the feature: NEO's storages
    are not asked (they have no history), NEO's master and admin are not
    sent the requests (the admin and neoctl refuse the commands in one
    line).
``blob``
    Between a client and a storage whose backend keeps blob contents:
    blob revisions (records with a tail, ``protocol/blobs.py``) and their
    contents, sent in chunks with ``AskStoreBlobChunk`` (0x7f10) before the
    record's store and read with ``AskBlobChunk`` (0x7f11).  A peer without
    the feature gets a blob revision's record alone (``AnswerObject``):
    what a NEO client would have read from NEO.
``ordered-copy``
    Between a client and a master: the master locks a transaction with an
    imposed TID only once every earlier transaction with an imposed TID of
    the same client is locked by all its storages, and fails those that
    wait when an earlier one is not committed.  A pipelined copy
    (client/copying.py) then asks to finish its next transactions before
    the answer to the previous one: a later transaction is never committed
    while an earlier one of the copy is not.  Without the feature the copy
    sends one finish at a time; NEO's master takes no imposed begin while
    earlier ones are being finished, and gets one transaction at a time.
``begin-partition``
    Between a client and a master: where the partitions are not all on the
    same storages (more storages than copies), the client sends the begin
    of a transaction without an imposed TID at its first store, as
    ``AskBeginInPartition`` (0x7f06) with that object's partition, and the
    master gives it a TTID in that partition (the final TID keeps the
    TTID's partition, so the metadata goes there too): a transaction whose
    objects are on one storage is then on that storage alone, and votes
    there without a sync (``solo-vote``).  A NEO master gives TTIDs in any
    partition and gets ``AskBeginTransaction`` at ``tpc_begin``.
``lazy-vote``
    Between a client and a storage, and a storage and its master: the
    client sends ``AskLazyVote`` (code 0x7f07, the fields of
    ``AskStoreTransaction``) instead of ``AskStoreTransaction`` when every
    store and check of the transaction went to the same storages, several,
    which all get its metadata.  Any storage that can lock the transaction
    then holds all of it, and the master reports it committed only once
    each of them locked it or was lost: the storage answers without a sync
    (the sync of its lock carries the vote), if its master has the feature
    and its own partition table shows every cell of the transaction's
    partitions UP_TO_DATE, else after a sync, as any vote.  A storage that
    lost such a vote in a crash lacks a transaction that another one
    locked: the master's verification outdates its cells (it is treated as
    down when the transaction was committed, and catches up by
    replication), which a master without the feature does not do.
    docs/design.md, "Durability", has the argument.
``early-lazy-vote``
    Between a client and a storage, with ``early-vote`` and ``lazy-vote``:
    the client sends ``AskLazyVote`` to each storage of the transaction with
    its stores, as an early vote, without waiting for their answers: one
    round trip instead of two.  The storage refuses it with ``NOT_READY``
    while a store is not settled, as any early vote.  A transaction voted
    this way on one storage may still wait for a lock on another, so the
    storage does not make its vote a reason to keep its locks: an older
    transaction waiting for one of them asks it back (``NotifyDeadlock``),
    and ``AskRelockObject`` undoes the vote there (its rows are dropped)
    before giving the lock away; the client, whose vote is not over, votes
    there again once the lock is back.  A storage without the feature keeps
    the locks of a voted transaction, which could then wait forever for
    another storage: it never gets an early vote of several storages.
``begin-ahead``
    Between a client and a master: the client begins with
    ``AskBeginAhead`` (0x7f0b: a partition or None, a TTID or None),
    answered ``AnswerBeginAhead`` (the TTID, and the first of a block of
    ``num_partitions`` TTIDs reserved for the connection's next begin).
    The client's next commit takes the block's TTID in its first object's
    partition, sends the begin with it and its stores at once, and reads
    the answer at the vote.  The master takes it only if it sent that
    client no node list, partition table or change of them since it
    reserved the block (nor is a storage starting, nor the cluster
    stopping), else refuses it with ``NOT_READY``: the client's vote drops
    what went with it and begins again, waited for.  docs/design.md,
    "Begin ahead".
``bulk-copy``
    Between a client and a master, and a client and a storage: a copy
    (``neomigrate``, ``copyTransactionsFrom``) commits many transactions of
    its source, with their TIDs, through one two-phase commit:
    ``AskBulkBegin`` (0x7f08) with the first and last TID of the batch
    (the TTID is the last), ``AskBulkVote`` (0x7f09) to each storage with
    every transaction and record of the batch, written as one durable
    point, the usual locks and unlocks, each storage locking all the
    batch's transactions at once, and ``AskBulkFinish`` (0x7f0a) with the
    objects of each transaction, which other clients invalidate one
    transaction at a time.  Only while every partition is on the same
    storages, all UP_TO_DATE (one storage, or as many copies as
    storages): any storage that locked the batch then holds every one of
    its transactions.  docs/design.md, "Bulk copy", has the argument.
"""
from __future__ import annotations

from typing import Any

from .catalogue import Packets

EXTRA_KEY = b"neozodb"
REPL_BATCH = b"repl-batch"
EARLY_VOTE = b"early-vote"
SOLO_VOTE = b"solo-vote"
BLOB = b"blob"
OLDER_PT = b"older-pt"
ORDERED_COPY = b"ordered-copy"
BEGIN_PARTITION = b"begin-partition"
LAZY_VOTE = b"lazy-vote"
EARLY_LAZY_VOTE = b"early-lazy-vote"
BULK_COPY = b"bulk-copy"
BEGIN_AHEAD = b"begin-ahead"
FEATURES: frozenset[bytes] = frozenset((b"status-json", b"import-status", b"gc-pack",
                                        b"mirror", b"check-report", b"check-digest",
                                        REPL_BATCH, EARLY_VOTE, SOLO_VOTE, OLDER_PT, BLOB,
                                        ORDERED_COPY, BEGIN_PARTITION, LAZY_VOTE,
                                        EARLY_LAZY_VOTE, BULK_COPY, BEGIN_AHEAD))
#: What RequestIdentification.extra carries from a neozodb node.
ANNOUNCEMENT: dict[bytes, list[bytes]] = {EXTRA_KEY: sorted(FEATURES)}
NO_FEATURES: frozenset[bytes] = frozenset()


def announced(extra: dict) -> frozenset[bytes] | None:
    """The features a connecting peer announced in its identification's
    ``extra`` that we have too; None if it announced nothing (NEO)."""
    value = extra.get(EXTRA_KEY)
    if not isinstance(value, (list, tuple)):
        return None
    return FEATURES.intersection(f for f in value if isinstance(f, bytes))


def common(features: tuple | list) -> frozenset[bytes]:
    """Ours among the features an accepting peer notified."""
    return FEATURES.intersection(features)


def greet(conn: Any, extra: dict, ours: frozenset[bytes] = FEATURES) -> None:
    """On the accepting side, before AcceptIdentification: note what a
    neozodb peer announced and tell it ours (``ours``: a master offers
    clients what the whole cluster can do); nothing for a NEO peer."""
    features = announced(extra)
    if features is not None:
        conn.peer_features = features & ours
        conn.notify(Packets.NotifyFeatures, sorted(ours))
