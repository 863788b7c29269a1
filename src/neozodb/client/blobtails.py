"""What the blob revisions a client loaded say of their contents: the
record's checksum (the key of its content on the storages), the content's
SHA-256 and size.  ``loadBlob`` right after the load of the object (what
ZODB does) then asks for the content at once, without loading the record
again."""
from __future__ import annotations

import threading
from collections import OrderedDict

from neozodb.protocol.blobs import TAIL_SIZE

MEMORY = 10000  # revisions remembered, the oldest forgotten first


class BlobTails:
    def __init__(self) -> None:
        self._tails: OrderedDict[tuple[bytes, bytes], tuple[bytes, bytes, int]] = OrderedDict()
        self._lock = threading.Lock()

    def note(self, oid: bytes, serial: bytes, checksum: bytes, stored: bytes) -> None:
        """A blob revision's stored bytes, as loaded (checksum verified)."""
        if len(stored) < TAIL_SIZE:
            return
        tail = (checksum, stored[-TAIL_SIZE:-8], int.from_bytes(stored[-8:], "big"))
        with self._lock:
            self._tails[oid, serial] = tail
            self._tails.move_to_end((oid, serial))
            if len(self._tails) > MEMORY:
                self._tails.popitem(last=False)

    def get(self, oid: bytes, serial: bytes) -> tuple[bytes, bytes, int] | None:
        """(checksum, content digest, size) of that revision, if loaded."""
        with self._lock:
            return self._tails.get((oid, serial))
