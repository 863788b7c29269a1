"""The blob methods of ``Backend`` (feature ``blob``; docs/design.md,
"Blobs").  A blob's content is kept as numbered chunks (``protocol.blobs.
CHUNK`` bytes each, the last shorter) under a *blob id*: written while a
client uploads it, then attached to the ``data`` row of its revision's
record when the record is stored.  Deleting a ``data`` row deletes its
content.  Chunk writes follow ``store_data``: not durable by themselves,
made durable by the next durable commit (the vote).

A backend that keeps no contents leaves ``blobs`` false; the storage node
then does not offer the feature, and nothing here is called.
"""
from __future__ import annotations

from .records import Unsupported


class BlobMethods:
    """Blob contents; see the module docstring."""

    #: whether this backend keeps blob contents
    blobs: bool = False

    def _no_blobs(self) -> Unsupported:
        return Unsupported('the %s backend keeps no blobs' % getattr(self, 'name', '?'))

    def new_blob(self) -> int:
        """A blob id for an upload, used by no other blob."""
        raise self._no_blobs()

    def store_blob_chunk(self, blob_id: int, n: int, data: bytes) -> None:
        """Write chunk ``n`` of blob ``blob_id`` (not durable by itself)."""
        raise self._no_blobs()

    def attach_blob(self, data_id: int, blob_id: int) -> bool:
        """Make blob ``blob_id`` the content of data row ``data_id``; False
        (and blob ``blob_id`` deleted) if that row has its content already."""
        raise self._no_blobs()

    def drop_blob(self, blob_id: int) -> None:
        """Delete an upload that will not be attached (not durable by
        itself)."""
        raise self._no_blobs()

    def has_blob(self, data_id: int) -> bool:
        """Whether data row ``data_id`` has its content."""
        raise self._no_blobs()

    def blob_missing(self, checksum: bytes) -> int | None:
        """The id of a data row with this checksum that has no content yet
        (a replicated blob revision), None if there is none."""
        raise self._no_blobs()

    def blobs_lacking(self, partition: int, first: tuple[int, int],
                      last: tuple[int, int] | None) -> list[int]:
        """The data rows without their content here of the blob revisions
        of ``partition`` whose (tid, oid) is at least ``first`` and below
        ``last`` (None: no end): replicated rows whose content was not
        fetched yet, or rows a client stored in an OUT_OF_DATE cell without
        sending the content (``storage/blobs.py``)."""
        raise self._no_blobs()

    def load_blob_chunk(self, checksum: bytes, n: int) -> bytes | None:
        """Chunk ``n`` of the content of the data row with this checksum;
        None if there is no such row, it has no content here, or no such
        chunk."""
        raise self._no_blobs()

    def blob_range_digest(self, partition: int, first: tuple[int, int],
                          last: tuple[int, int]) -> bytes | None:
        """A SHA-1 of the contents, hashed anew, of the blob revisions of
        ``partition`` whose (tid, oid) is within ``first`` and ``last``
        (None if there is none): copies whose contents rotted differ."""
        return None

    def drop_unattached_blobs(self) -> int:
        """Delete every upload not attached to a data row (at start, when
        no upload can be going on); how many blobs were deleted."""
        return 0
