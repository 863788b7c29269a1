"""ZConfig support for the NEO client storage.

``component.xml`` (in this package, also reachable as ``%import neozodb``)
defines the ``<NEOStorage>`` section type, which implements ZODB's
``ZODB.storage`` abstract type::

    %import neozodb
    <zodb>
      <NEOStorage>
        master_nodes 127.0.0.1:10000 127.0.0.1:10001
        name test
        cache-size 50MB
      </NEOStorage>
    </zodb>

The section's datatype is :class:`NEOStorageConfig`; its ``open()`` returns
``neozodb.client.Storage(**kwargs)``.  The value converters below are shared
with the ``neo://`` zodburi resolver.
"""

from __future__ import annotations

import math
import re

__all__ = [
    "NEOStorageConfig",
    "convert_bool",
    "convert_bytesize",
    "convert_compress",
    "convert_timeout",
    "master_nodes",
]

_TRUE = frozenset(("1", "true", "yes", "on"))
_FALSE = frozenset(("0", "false", "no", "off"))
_BYTESIZE_RE = re.compile(r"^\s*([0-9]+)\s*([kmg]?)b?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
_COMPRESS_RE = re.compile(r"^zlib(=[0-9])?$")


def convert_bool(value: str | bool) -> bool:
    """true/false/1/0/yes/no/on/off (any case) -> bool."""
    if isinstance(value, bool):
        return value
    s = str(value).strip().lower()
    if s in _TRUE:
        return True
    if s in _FALSE:
        return False
    raise ValueError(f"not a boolean: {value!r}")


def convert_compress(value: str | bool) -> bool | str:
    """Boolean words -> bool; ``zlib`` or ``zlib=N`` (level 0-9) kept as a string."""
    try:
        return convert_bool(value)
    except ValueError:
        s = str(value).strip().lower()
    if _COMPRESS_RE.match(s):
        return s
    raise ValueError(f"invalid compress value {value!r}: expected a boolean, 'zlib' or 'zlib=N'")


def convert_bytesize(value: str | int) -> int:
    """``20MB``, ``512KB``, ``1GB``, ``100`` -> number of bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    else:
        m = _BYTESIZE_RE.match(str(value))
        if m is None:
            raise ValueError(f"invalid size {value!r}: expected e.g. 100, 512KB, 20MB, 1GB")
        n = int(m.group(1)) * _UNITS[m.group(2).lower()]
    if n < 0:
        raise ValueError(f"invalid size {value!r}: negative")
    return n


def convert_timeout(value: str | float) -> float:
    """A non-negative number of seconds."""
    try:
        t = float(str(value).strip())
    except ValueError:
        raise ValueError(f"invalid timeout {value!r}: expected seconds") from None
    if math.isnan(t) or t < 0:
        raise ValueError(f"invalid timeout {value!r}: expected seconds >= 0")
    return t


def master_nodes(value: str) -> str:
    """Validate a master list ("h:p h:p", spaces or commas) and normalize it."""
    from neozodb.cli.config import format_address, parse_masters

    masters = parse_masters(value)
    if not masters:
        raise ValueError("no master address given")
    return " ".join(format_address(a) for a in masters)


def cluster_name(value: str) -> str:
    s = value.strip()
    if not s:
        raise ValueError("empty cluster name")
    return s


class NEOStorageConfig:
    """Datatype of the ``<NEOStorage>`` section: ``open()`` makes the storage."""

    def __init__(self, config):
        self.config = config
        self.name = config.getSectionName()

    def storage_kwargs(self) -> dict:
        """Keyword arguments for ``neozodb.client.Storage``."""
        c = self.config
        return {
            "master_nodes": c.master_nodes,
            "name": c.name,
            "read_only": c.read_only,
            "compress": c.compress,
            "cache_size": c.cache_size,
            "read_ahead": c.read_ahead,
            "server_sync": c.server_sync,
            "logfile": c.logfile,
            "ignore_wrong_checksum": c.ignore_wrong_checksum,
            "pack_gc": c.pack_gc,
            # blobs only with a blob-dir, as ZEO
            **({} if not c.blob_dir else {
                "blob_dir": c.blob_dir, "blob_cache_size": c.blob_cache_size,
                "blob_cache_size_check": c.blob_cache_size_check}),
            "connect_timeout": c.connect_timeout,
            # only when given: None would mean the same, Storage's default
            **({} if c.keepalive is None else {"keepalive": c.keepalive}),
            **{k: getattr(c, k) for k in ("ca", "cert", "key") if getattr(c, k)},
        }

    def open(self):
        from neozodb.client import Storage

        return Storage(**self.storage_kwargs())
