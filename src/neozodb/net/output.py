"""Output of a server node's connection (the ``Output`` mixin of
``net.connection.Connection``): what is written to a peer while a chunk of
its input is processed leaves in one write (corked), the storage's group
commit holds it longer (``hold``/``release``), and a notification may wait
a little for the next output to its peer (``notify_soon``)."""
from __future__ import annotations

import asyncio
from typing import Any

from neozodb.net.limits import WRITE_HIGH

# notify_soon: how long a notification may wait for other output to its peer
SOON = 0.005


class Output:
    """Writing to the transport (state set up by ``Connection.__init__``)."""

    def _write(self, data: bytes) -> None:
        if self._soon is not None:
            data = self._take_soon() + data
        if self._corked:
            self._out.append(data)
            self._out_size += len(data)
            if self._out_size > WRITE_HIGH:
                # big answers: send now, so that the transport can tell
                # us (pause_writing) to stop processing this peer's requests
                self._flush_out()
                self._corked = True
        else:
            self._transport_write(data)

    def _transport_write(self, data: bytes) -> None:
        transport = self.transport
        if transport.is_closing():  # type: ignore[union-attr]
            # Closed under us (the peer reset it, or we aborted) and
            # connection_lost not run yet: it fails what waits for an
            # answer.  uvloop raises on such a write, from a keep-alive
            # timer for instance, where nothing catches it.
            return
        try:
            transport.write(data)  # type: ignore[union-attr]
        except RuntimeError:
            # uvloop's handle may be closed (a reset seen by libuv) while
            # its transport does not say it is closing yet: the same case
            if not transport.is_closing():  # type: ignore[union-attr]
                transport.abort()  # type: ignore[union-attr]
            return
        if self._paused:
            self._check_backlog()

    def hold(self) -> None:
        """Keep output (answers already written included) until
        ``release()``, at most until the end of the next loop iteration:
        the storage's group commit sends the answers of a chunk of requests
        with the durable answers that follow them, in one write."""
        self._held = True
        self._corked = True

    def release(self) -> None:
        self._held = False
        if self._corked:
            self._flush_out()

    def _flush_out(self) -> None:
        self._corked = False
        out = self._out
        if out:
            self._out_size = 0
            data = b"".join(out) if len(out) > 1 else out[0]
            out.clear()
            self._transport_write(data)

    def notify_soon(self, packet: Any, *args: Any) -> None:
        """A notification that may wait ``SOON`` seconds for other output to
        this peer, and leave with it: never after anything written later.
        The master's invalidations to clients: they come with the next
        answer (a committing client's begin or finish, a ``Pong``), not
        each on its own, waking the client for nothing."""
        if self.closed:
            return
        data = self.endpoint.notify(packet, args)
        if self._soon is None:
            self._soon = [data]
            self._soon_timer = asyncio.get_running_loop().call_later(SOON, self._send_soon)
        else:
            self._soon.append(data)

    def _take_soon(self) -> bytes:
        soon, self._soon = self._soon, None
        if self._soon_timer is not None:
            self._soon_timer.cancel()
            self._soon_timer = None
        return b"".join(soon) if soon else b""

    def _send_soon(self) -> None:
        self._soon_timer = None
        if self._soon is not None and not self.closed:
            self._write(b"")
