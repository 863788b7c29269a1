"""The delaying TCP proxy of tests/net (``netns.Network.delay``): run as a
process inside a host's network namespace, where an iptables rule
(nat OUTPUT, REDIRECT) sends it the TCP connections this host opens to the
delayed hosts.  For each connection it reads the original destination
(``SO_ORIGINAL_DST``), connects there itself (its sockets carry the mark
MARK, which the rule skips, so they are not redirected again), and forwards
the bytes each way, each chunk after a delay of ``base + uniform(0,
jitter)`` ms from when it was read, never before the chunk read before it
in that direction (TCP bytes cannot be reordered; the delay is what
counts).  The connection to the destination is opened after one upstream
delay, as the SYN would arrive.

``python delayproxy.py MARK``: listens on 127.0.0.1 (a free port), prints
``port N``, then reads its configuration from stdin, one JSON line at a
time, each replacing the previous one and answered ``ok``::

    {"10.1.2.3": [[up_ms, up_jitter_ms], [down_ms, down_jitter_ms]], ...}

up: bytes from this host to that address; down: bytes back.  Addresses
not listed are not delayed.  At the end of stdin (the harness is gone) the
proxy exits, closing what it forwards.

Limits: TCP only; only connections opened after the rule exists pass
through it (the iptables NAT decision is made once per connection); the
destination's refusal is seen as a connection accepted then closed; a
connection to a host that does not answer stays accepted until the
proxy's own connect fails; each chunk read is one unit (a large write may
be split, which only delays parts of it the same way)."""
from __future__ import annotations

import asyncio
import json
import random
import socket
import struct
import sys
import time

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
SO_MARK = getattr(socket, "SO_MARK", 36)
CHUNK = 1 << 16
QUEUED = 64  # chunks in flight per direction before reading stops (back pressure)

# destination address -> ((up_ms, up_jitter), (down_ms, down_jitter))
delays: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {}


def original_destination(sock: socket.socket) -> tuple[str, int]:
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, packed = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(packed), port


def sample(address: str, way: int) -> float:
    """Seconds to hold a chunk going ``way`` (0 up, 1 down) now."""
    pair = delays.get(address)
    if pair is None:
        return 0.0
    base, jitter = pair[way]
    return (base + random.uniform(0, jitter)) / 1000.0


def reading(reader: asyncio.StreamReader, address: str, way: int,
            tasks: list) -> asyncio.Queue:
    """Chunks of ``reader`` as they arrive, each with the time it is due
    (never before the one before it), then b"" (end) or None (a reset)."""
    queue: asyncio.Queue = asyncio.Queue(QUEUED)

    async def read() -> None:
        due = 0.0
        while True:
            try:
                data = await reader.read(CHUNK)
            except OSError:
                data = None
            due = max(due, time.monotonic() + sample(address, way))
            await queue.put((due, data))
            if not data:
                return
    tasks.append(asyncio.ensure_future(read()))
    return queue


async def writing(queue: asyncio.Queue, writer: asyncio.StreamWriter) -> None:
    """Write each chunk when due; the end of the stream (half close) and a
    reset too."""
    while True:
        due, data = await queue.get()
        wait = due - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)  # the latency injected: what this proxy is for
        if data is None:
            raise ConnectionResetError
        if not data:
            if writer.can_write_eof():
                writer.write_eof()
            return
        writer.write(data)
        await writer.drain()


async def handle(creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
    swriter = None
    tasks: list = []
    try:
        address, port = original_destination(cwriter.get_extra_info("socket"))
        up = reading(creader, address, 0, tasks)  # what is sent meanwhile is on its way
        await asyncio.sleep(sample(address, 0))  # the SYN's way
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, MARK)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (address, port))
        except BaseException:
            sock.close()
            raise
        sreader, swriter = await asyncio.open_connection(sock=sock)
        down = reading(sreader, address, 1, tasks)
        tasks += [asyncio.ensure_future(writing(up, swriter)),
                  asyncio.ensure_future(writing(down, cwriter))]
        await asyncio.gather(*tasks)
    except OSError:
        pass  # either end went away: close both
    finally:
        for task in tasks:
            task.cancel()
        for w in (cwriter, swriter):
            if w is not None:
                w.transport.abort()


async def control(server: asyncio.Server) -> None:
    """Configuration lines from stdin until its end."""
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    while line := await stdin.readline():
        delays.clear()
        delays.update({a: (tuple(up), tuple(down))
                       for a, (up, down) in json.loads(line).items()})
        print("ok", flush=True)
    server.close()


async def main() -> None:
    server = await asyncio.start_server(handle, "127.0.0.1", 0, reuse_address=True)
    print("port %d" % server.sockets[0].getsockname()[1], flush=True)
    await control(server)


if __name__ == "__main__":
    MARK = int(sys.argv[1], 0)
    asyncio.run(main())
