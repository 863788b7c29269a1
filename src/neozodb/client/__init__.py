"""ZODB client for neozodb: ``Storage`` is what an application opens.

Runs in the application's threads, which read their own answers; one
reader thread per connection (``neozodb.net.threaded``) handles what the
cluster sends unasked.
"""

from neozodb.client.storage import NEOStorageError, Storage

__all__ = ["Storage", "NEOStorageError"]
