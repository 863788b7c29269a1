"""The client's own error, in a module of its own so that every part of
the client (``app.py`` and its mixins) can raise and catch it."""
from __future__ import annotations


class NEOStorageError(Exception):
    """The cluster could not serve a request: no master, no replica."""
