"""zodburi resolver for ``neo://`` URIs.

    neo://CLUSTER@HOST:PORT[,HOST:PORT...][?opt=val&...]
    neos://...   the same over TLS

``neo://`` uses TLS only when ``ca``, ``cert`` and ``key`` (PEM files) are
in the query; ``neos://`` always does, taking each of them that the query
lacks from ``$NEO_CA``, ``$NEO_CERT`` and ``$NEO_KEY`` (as NEO does).

IPv6 masters go in brackets (``neo://test@[::1]:10000``).  Query options
(``-`` and ``_`` are interchangeable):

- storage options, passed to ``neozodb.client.Storage``: ``read_only``,
  ``compress`` (boolean, ``zlib`` or ``zlib=N``), ``cache_size`` (``20MB``,
  ``512KB``, plain bytes), ``read_ahead`` (objects), ``logfile``,
  ``ignore_wrong_checksum``, ``server_sync``,
  ``pack_gc``, ``connect_timeout`` and ``keepalive`` (seconds),
  ``blob_dir``, ``blob_cache_size`` (a size) and ``blob_cache_size_check``
  (a percentage); booleans are true/false/1/0/yes/no/on/off;
- database options known by zodburi: ``database_name`` and
  ``connection_<p>`` for ``pool_size``, ``pool_timeout``, ``cache_size``,
  ``cache_size_bytes``, ... (``<p>`` alone is accepted too, except
  ``cache_size`` which is the storage's cache size).

Anything else raises ValueError naming the option.

:func:`resolve_uri` follows zodburi's resolver convention: it returns
``(factory, dbkw)`` where ``factory()`` opens the storage and *dbkw* holds
the database options under zodburi's names (``database_name``,
``connection_pool_size``, ...).  ``zodburi.resolve_uri(uri)`` (which finds
this resolver through the ``zodburi.resolvers`` entry point ``neo``)
turns them into ``ZODB.DB`` keyword arguments.
"""

from __future__ import annotations

import os
from urllib.parse import parse_qsl, unquote

from neozodb.client.zconfig import (
    convert_bool,
    convert_bytesize,
    convert_compress,
    convert_timeout,
)

try:  # zodburi's own table of DB parameters, when installed
    from zodburi import BYTES_PARAMETERS as _BYTES_PARAMETERS
    from zodburi import CONNECTION_PARAMETERS as _CONNECTION_PARAMETERS
except ImportError:  # pragma: no cover - zodburi is a client dependency
    _CONNECTION_PARAMETERS = (
        "pool_size",
        "pool_timeout",
        "cache_size",
        "cache_size_bytes",
        "historical_pool_size",
        "historical_cache_size",
        "historical_cache_size_bytes",
        "historical_timeout",
        "large_record_size",
    )
    _BYTES_PARAMETERS = ("cache_size_bytes", "historical_cache_size_bytes", "large_record_size")

__all__ = ["SCHEME", "STORAGE_OPTIONS", "DB_OPTIONS", "NEOStorageFactory", "parse_uri", "resolve_uri"]

SCHEME = "neo"
TLS_SCHEME = "neos"


def _path(value: str) -> str:
    if not value:
        raise ValueError("empty path")
    return value


def _name(value: str) -> str:
    if not value:
        raise ValueError("empty name")
    return value


def _int(value: str) -> int:
    try:
        n = int(value.strip())
    except ValueError:
        raise ValueError(f"not an integer: {value!r}") from None
    if n < 0:
        raise ValueError(f"negative value: {value!r}")
    return n


STORAGE_OPTIONS = {
    "read_only": convert_bool,
    "compress": convert_compress,
    "cache_size": convert_bytesize,
    "read_ahead": _int,
    "server_sync": convert_bool,
    "logfile": _path,
    "ignore_wrong_checksum": convert_bool,
    "pack_gc": convert_bool,
    "blob_dir": _path,
    "blob_cache_size": convert_bytesize,
    "blob_cache_size_check": _int,
    "connect_timeout": convert_timeout,
    "keepalive": convert_timeout,
    "ca": _path,
    "cert": _path,
    "key": _path,
}
TLS_OPTIONS = ("ca", "cert", "key")

# zodburi name -> converter
DB_OPTIONS = {"database_name": _name}
for _p in _CONNECTION_PARAMETERS:
    DB_OPTIONS["connection_" + _p] = convert_bytesize if _p in _BYTES_PARAMETERS else _int
del _p


class NEOStorageFactory:
    """Callable returned by :func:`resolve_uri`; ``kwargs`` are Storage's."""

    def __init__(self, kwargs: dict):
        self.kwargs = kwargs

    def __call__(self):
        from neozodb.client import Storage

        return Storage(**self.kwargs)

    def __repr__(self):
        return f"NEOStorageFactory({self.kwargs!r})"


def parse_uri(uri: str) -> tuple[dict, dict]:
    """Split a ``neo://`` URI into (Storage kwargs, zodburi dbkw).

    Raises ValueError on a malformed URI, a bad value or an unknown option.
    """
    from neozodb.cli.config import format_address, parse_masters

    scheme, sep, rest = uri.partition("://") if isinstance(uri, str) else ("", "", "")
    scheme = scheme.lower()
    if not sep or scheme not in (SCHEME, TLS_SCHEME):
        raise ValueError(f"not a neo:// or neos:// URI: {uri!r}")
    rest, _, fragment = rest.partition("#")
    if fragment:
        raise ValueError(f"{uri!r}: fragments are not supported")
    location, _, query = rest.partition("?")
    location = location.rstrip("/")
    if "/" in location:
        raise ValueError(f"{uri!r}: a neo:// URI has no path")
    name, at, hosts = location.rpartition("@")
    name = unquote(name)
    if not at or not name:
        raise ValueError(f"{uri!r}: missing cluster name (neo://CLUSTER@HOST:PORT)")
    try:
        masters = parse_masters(unquote(hosts))
    except ValueError as e:
        raise ValueError(f"{uri!r}: {e}") from None
    if not masters:
        raise ValueError(f"{uri!r}: no master address (neo://CLUSTER@HOST:PORT)")

    kwargs: dict = {
        "master_nodes": " ".join(format_address(a) for a in masters),
        "name": name,
    }
    dbkw: dict = {}
    seen: set[str] = set()
    try:
        fields = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError as e:
        raise ValueError(f"{uri!r}: bad query string: {e}") from None
    for raw_key, value in fields:
        key = raw_key.strip().replace("-", "_").lower()
        if key in seen:
            raise ValueError(f"{uri!r}: option {raw_key!r} given more than once")
        seen.add(key)
        if key in STORAGE_OPTIONS:
            target, convert = kwargs, STORAGE_OPTIONS[key]
        elif key in DB_OPTIONS:
            target, convert = dbkw, DB_OPTIONS[key]
        elif "connection_" + key in DB_OPTIONS:
            key = "connection_" + key
            if key in seen:
                raise ValueError(f"{uri!r}: option {raw_key!r} given more than once")
            seen.add(key)
            target, convert = dbkw, DB_OPTIONS[key]
        else:
            raise ValueError(f"{uri!r}: unknown option {raw_key!r}")
        try:
            target[key] = convert(value)
        except ValueError as e:
            raise ValueError(f"{uri!r}: option {raw_key!r}: {e}") from None
    if scheme == TLS_SCHEME:
        for key in TLS_OPTIONS:
            if key not in kwargs:
                value = os.environ.get("NEO_" + key.upper())
                if not value:
                    raise ValueError(f"{uri!r}: option {key!r} not given and $NEO_{key.upper()}"
                                     " not set (neos:// needs a CA, a certificate and a key)")
                kwargs[key] = value
    given = [k for k in TLS_OPTIONS if k in kwargs]
    if given and len(given) != len(TLS_OPTIONS):
        raise ValueError(f"{uri!r}: TLS needs all of ca, cert and key (only {', '.join(given)})")
    return kwargs, dbkw


def resolve_uri(uri: str):
    """zodburi resolver: ``neo://...`` or ``neos://...`` -> ``(factory, dbkw)``."""
    kwargs, dbkw = parse_uri(uri)
    return NEOStorageFactory(kwargs), dbkw
