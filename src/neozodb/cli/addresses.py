"""Addresses and node ids as operators write them: ``host:port`` lists
(IPv6 in brackets) and ``S1``/``M2`` style ids, parsed and formatted.
Shared by the nodes' options (cli/config.py), neoctl, the client's URIs
and configuration."""
from __future__ import annotations

import ipaddress
import re

from neozodb.protocol import nid_str

DEFAULT_HOST = "127.0.0.1"

# High byte of a NID per node type (see the protocol reference).
NID_NAMESPACES = {"S": 0x00, "M": -0x10, "C": -0x20, "A": -0x30}

_HOSTNAME_RE = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?$")
_PORT_RE = re.compile(r"^[0-9]+$")
_NID_RE = re.compile(r"^([MSCA])([0-9]+)$", re.IGNORECASE)


# -- addresses ----------------------------------------------------------------


def parse_address(
    text: str, default_host: str = DEFAULT_HOST, default_port: int | None = None
) -> tuple[str, int]:
    """Parse ``HOST:PORT``, ``:PORT``, ``PORT`` or ``[IPv6]:PORT``.

    The host defaults to *default_host*; a missing port is an error unless
    *default_port* is given.  Port 0 is accepted (= any free port).
    Raises ValueError with a readable message.
    """
    if not isinstance(text, str):
        raise ValueError(f"invalid address {text!r}: not a string")
    s = text.strip()
    if not s:
        raise ValueError("empty address")
    port_text: str | None
    if s.startswith("["):
        end = s.find("]")
        if end < 0:
            raise ValueError(f"invalid address {text!r}: missing ']'")
        host, rest = s[1:end], s[end + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(
                f"invalid address {text!r}: {host!r} is not an IPv6 address"
            ) from None
        if not rest:
            port_text = None
        elif rest.startswith(":"):
            port_text = rest[1:]
        else:
            raise ValueError(f"invalid address {text!r}: expected ':PORT' after ']'")
    else:
        if s.count(":") > 1:
            raise ValueError(
                f"invalid address {text!r}: write IPv6 addresses in brackets, "
                "e.g. [::1]:10000"
            )
        if ":" in s:
            host, port_text = s.split(":")
        elif _PORT_RE.match(s):
            host, port_text = "", s
        else:
            host, port_text = s, None
        host = host or default_host
        if not _HOSTNAME_RE.match(host):
            raise ValueError(f"invalid address {text!r}: bad host name {host!r}")
    if port_text is None:
        if default_port is None:
            raise ValueError(f"invalid address {text!r}: missing port")
        port = default_port
    else:
        if not _PORT_RE.match(port_text):
            raise ValueError(f"invalid address {text!r}: bad port {port_text!r}")
        port = int(port_text)
        if port > 65535:
            raise ValueError(f"invalid address {text!r}: port {port} out of range")
    return host, port


def parse_masters(text: str | None) -> list[tuple[str, int]]:
    """Parse a list of master addresses separated by spaces and/or commas.

    Every address needs an explicit, non-zero port.  Duplicates are dropped
    (first occurrence kept).  An empty or None text gives ``[]``.
    """
    if text is None:
        return []
    if not isinstance(text, str):
        raise ValueError(f"invalid master list {text!r}: not a string")
    result: list[tuple[str, int]] = []
    for item in re.split(r"[\s,]+", text.strip()):
        if not item:
            continue
        addr = parse_address(item)
        if addr[1] == 0:
            raise ValueError(f"invalid master address {item!r}: port 0")
        if addr not in result:
            result.append(addr)
    return result


def format_address(address: tuple[str, int]) -> str:
    """``(host, port)`` -> ``'host:port'`` (IPv6 hosts in brackets)."""
    host, port = address
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


# -- node ids -----------------------------------------------------------------


def parse_nid(text: str | int) -> int:
    """Parse a NID given as an int (``'-268435455'``, ``'1'``) or ``'S1'`` style."""
    if isinstance(text, int) and not isinstance(text, bool):
        nid = text
    else:
        s = str(text).strip()
        m = _NID_RE.match(s)
        if m:
            number = int(m.group(2))
            if not 0 < number < 1 << 24:
                raise ValueError(f"invalid node id {text!r}: number out of range")
            return (NID_NAMESPACES[m.group(1).upper()] << 24) + number
        try:
            nid = int(s)
        except ValueError:
            raise ValueError(
                f"invalid node id {text!r}: expected an integer or e.g. 'S1', 'M1'"
            ) from None
    if not -(1 << 31) <= nid < 1 << 31:
        raise ValueError(f"invalid node id {text!r}: not a 32-bit integer")
    return nid


def format_nid(nid: int | None) -> str:
    """NID -> ``'S1'``/``'M2'``/``'C3'``/``'A1'`` (plain int if no known namespace)."""
    return nid_str(nid)


# -- argparse value types -----------------------------------------------------
