"""The begin of a commit, not waited for: ``tpc_begin`` sends it (or,
with feature begin-partition, the first store does, for a TTID in that
object's partition) and the answer, the TTID, is read when the transaction
first needs it (docs/design.md, "Begin").  A mixin of ``Commit``
(client/commit.py), which owns the attributes used here."""
from __future__ import annotations

from ZODB.POSException import StorageTransactionError

from neozodb.net.endpoint import RemoteError
from neozodb.protocol import ErrorCodes, Packets


class Begin:
    def _send_begin(self, oid: bytes | None) -> None:
        """Send the begin held back by ``tpc_begin``: for a TTID in oid's
        partition, so that the metadata goes where the object goes (one
        storage for a transaction whose objects are on one: a solo vote),
        or anywhere when the TTID is needed before any object."""
        self.begin_unsent = False
        if oid is None:
            self.begin_answer = self.master.ask(Packets.AskBeginTransaction, None)
        else:
            self.begin_answer = self.master.ask(Packets.AskBeginInPartition,
                                                self.app.pt.partition(oid))

    def _answered(self) -> None:
        """Read the master's answer to a begin not waited for: the TTID
        (or, imposed, the TID accepted).  Everything the master sent before
        it (node and partition table changes) is read before it too."""
        if self.begin_unsent:
            self._send_begin(None)
        queue, self.begin_answer = self.begin_answer, None
        if queue is None:
            return
        _, result, error, _ = self.master.wait(queue)
        if isinstance(error, RemoteError) and error.code is ErrorCodes.DENIED:
            raise StorageTransactionError(f"tpc_begin refused: {error.message}")
        if error is not None:
            raise StorageTransactionError(f"tpc_begin failed: {error}")
        if self.ttid is None:
            self.ttid = result[0]
            self.app.transactions[self.ttid] = self
        elif result[0] != self.ttid:
            raise StorageTransactionError(
                f"tpc_begin failed: the master began {result[0].hex()} for {self.ttid.hex()}")

    def _begun(self) -> None:
        """The begin answered, and the stores deferred until then sent."""
        self._answered()
        deferred, self.deferred = self.deferred, []
        for args, token in deferred:
            self._send_store(args, token, buffer=True)

    def known_ttid(self) -> bytes:
        """The TTID, for a request that carries it, after the stores
        deferred until the begin's answer.  An imposed TID is known from
        the start, and a pipelined copy's stores wait for the vote
        (``store``)."""
        if not self.imposed:
            self._begun()
        return self.ttid
