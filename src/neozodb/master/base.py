"""What every handler of a master's connections does: answer pings, and
tell the application when an identified peer's connection is lost.  Its
own module so that the primary's handlers and the secondary's handler of
its primary (``secondary.py``, imported by ``election.py``, which the
primary's handlers use) import it without a cycle."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from neozodb.net.connection import Handler
from neozodb.protocol import Packets

if TYPE_CHECKING:
    from neozodb.master.app import MasterApp

log = logging.getLogger("neozodb.master")


class BaseHandler(Handler):
    def __init__(self, app: MasterApp) -> None:
        self.app = app

    def Ping(self, conn, msg_id):
        conn.answer(msg_id, Packets.Pong)

    def connection_lost(self, conn) -> None:
        node = conn.node
        if node is not None and node.conn is conn:
            node.conn = None
            log.info("%s: lost %s (%s)", self.app.label, node.label, conn.close_reason)
            self.app.node_lost(node)
