"""Micro-benchmark of the receive hot path: Decoder and Connection.data_received.

    PYTHONPATH=src python bench/decode_micro.py

Decodes 1e5 small AskStoreObject messages (100-byte values), fed in
64 KiB chunks, through the bare Decoder and through an identified asyncio
Connection whose handler answers each one (AnswerStoreObject, as a storage
does); prints CPU ns per message (process time, best of 5 runs: other
processes on the machine do not count)."""
from __future__ import annotations

import asyncio
import time

from neozodb.net.connection import Connection, Handler
from neozodb.protocol import HANDSHAKE, Decoder, Packets, encode

N = 100_000
OID = b"\0" * 7 + b"\1"
TID = b"\3" * 8


def _stream() -> bytes:
    msg = encode(1, Packets.AskStoreObject.code, (OID, TID, 0, b"\0" * 20, b"x" * 100, None, TID))
    return msg * N


def _chunks(data: bytes, size: int = 65536) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


def bench_decoder(chunks: list[bytes]) -> float:
    best = float("inf")
    for _ in range(5):
        d = Decoder()
        t = time.process_time()
        n = 0
        for c in chunks:
            d.feed(c)
            for _m in d:
                n += 1
        best = min(best, time.process_time() - t)
        assert n == N
    return best / N * 1e9


class _Sink(Handler):
    def AskStoreObject(self, conn, msg_id, *args):
        conn.answer(msg_id, Packets.AnswerStoreObject, None)  # as a storage does


class _Transport(asyncio.Transport):
    def write(self, data):
        pass

    def get_extra_info(self, name, default=None):
        return default


class _App:
    label = "B1"


def bench_connection(chunks: list[bytes]) -> float:
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    best = float("inf")
    for _ in range(5):
        conn = Connection(_App(), _Sink(), keepalive=0)
        conn.connection_made(_Transport())
        conn.data_received(HANDSHAKE)
        conn.handler = _Sink()  # identified
        t = time.process_time()
        for c in chunks:
            conn.data_received(c)
        best = min(best, time.process_time() - t)
        assert not conn.closed
    loop.close()
    return best / N * 1e9


if __name__ == "__main__":
    chunks = _chunks(_stream())
    print("Decoder:               %6.0f ns/message" % bench_decoder(chunks))
    print("Connection.data_recv:  %6.0f ns/message" % bench_connection(chunks))
