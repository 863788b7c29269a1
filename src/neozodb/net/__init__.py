"""Connections between NEO nodes.

``endpoint`` is the pure part (handshake, framing, msg_id allocation,
request/answer matching) shared by both kinds of connection:
``connection`` runs in a server node's asyncio loop, ``threaded`` is the
client's blocking socket with one reader thread.
"""
