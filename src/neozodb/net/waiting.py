"""Waiting for answers from several threaded connections
(net/threaded.py): the waiting thread reads their sockets itself while no
other thread does (``wait_any``, ``_read_all``), else their reader threads
are told to read meanwhile (``wait_for_readers``).  A commit on replicas
waits so for the answers of each of its storages."""
from __future__ import annotations

import select
import time
from queue import SimpleQueue
from typing import Any

# Seconds the reader thread leaves the socket to the application threads
# after one of them read it (net/threaded.py's docstring): longer than the usual gap
# between a thread's requests, short enough for what arrives unasked
# meanwhile (an invalidation, a Ping) to wait little.
DIRECT_GRACE = 0.05


def wait_any(queue: SimpleQueue, conns: Any, timeout: float | None = None) -> tuple:
    """The next item of ``queue``, whose answers come from ``conns``: read
    in this thread while no other thread reads any of them (``_read_all``),
    else by their reader threads, told to read meanwhile.  Raises
    ``queue.Empty`` after ``timeout`` seconds."""
    if timeout is None:
        if len(conns) == 1:
            for conn in conns:
                return conn.wait(queue)
        if not queue.empty():
            return queue.get()
        item = _read_all(queue, list(conns))
        if item is not None:
            return item
    return wait_for_readers(queue, conns, timeout)


def _read_all(queue: SimpleQueue, conns: list) -> tuple | None:
    """``conn.wait`` for several connections: this thread takes the reading
    turn of each and polls their sockets, reading what arrives, until
    ``queue`` has an item (returned).  Waiting for answers from several
    storages (the stores and votes of a commit on replicas) then costs no
    wake-up of their reader threads.  Keep-alive as in ``_read_once``: a
    connection silent for half its keep-alive is pinged, and ended if
    still silent after as long again.  None as soon as this cannot go on
    (another thread reads one of them, or one ended): the caller then
    waits for the reader threads."""
    last = dict.fromkeys(conns, time.monotonic())  # when each was last heard
    while True:
        taken = []
        try:
            # as conn.wait: the reader threads keep out until we are done
            until = time.monotonic() + DIRECT_GRACE
            for conn in conns:
                conn._direct_until = until
            for conn in conns:
                with conn._turn:
                    if conn._reading or conn._finished is not None:
                        return None
                    conn._reading = True
                taken.append(conn)
            # an answer may have come while another thread read
            if not queue.empty():
                return queue.get()
            # in our turn and not finished: the socket is open (only the
            # reader thread closes it, once the connection finished)
            poller = select.poll()
            fds = {}
            for conn in conns:
                sock = conn.sock
                fd = getattr(sock, "sock", sock).fileno()  # under TLSSocket, the plain one
                fds[fd] = conn
                poller.register(fd, select.POLLIN)
            quiet = [last[c] + c.keepalive / 2 for c in conns if c.keepalive > 0]
            timeout = None if not quiet else max(0.0, min(quiet) - time.monotonic()) * 1000
            heard = set()
            for fd, _ in poller.poll(timeout):
                conn = fds[fd]
                conn._read_once()
                heard.add(conn)
            now = time.monotonic()
            for conn in conns:
                if conn in heard:
                    last[conn] = now
                elif conn.keepalive > 0 and now >= last[conn] + conn.keepalive / 2:
                    last[conn] = now
                    conn._quiet()
        finally:
            for conn in taken:
                conn._end_turn()
        if not queue.empty():
            return queue.get()


def wait_for_readers(queue: SimpleQueue, conns: Any, timeout: float | None) -> tuple:
    """The next item of ``queue``, read by the reader threads of ``conns``,
    told they are needed meanwhile."""
    if not queue.empty():
        return queue.get()
    conns = list(conns)
    for conn in conns:
        conn._needed(1)
    try:
        return queue.get(timeout=timeout)
    finally:
        for conn in conns:
            conn._needed(-1)
