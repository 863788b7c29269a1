"""NEO's MySQL databases served in place: in a running cluster on MariaDB,
a NEO storage node is stopped and a neozodb storage node started on its
database (same NID, partition table and data) serves all of it, alone;
then the other way round, a NEO storage node on the database a neozodb node
wrote.  The procedure of docs/operations.md, "Replacing NEO nodes"."""
from __future__ import annotations

import os
import shutil
import signal

import pytest
import ZODB
from neopeer import MixedCluster, neo_client_roundtrip
from persistent.mapping import PersistentMapping

from neozodb.cli.cluster import wait_until
from neozodb.client import Storage

pytestmark = pytest.mark.timeout(300)

mariadb = pytest.importorskip("mariadb")
if not os.path.exists("/usr/sbin/mariadbd") and not shutil.which("mariadbd"):
    pytest.skip("no MariaDB server here", allow_module_level=True)
pytest.importorskip("MySQLdb", reason="NEO's MySQL adapter needs mysqlclient")


OBJECTS = 40
# 16 MiB and more: NEO's schema keeps it in bigdata rows of 8 MiB
HUGE = 17 << 20


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from mdbserver import server_fixture
    yield from server_fixture(tmp_path_factory)


def write(c, version: int, count: int = OBJECTS) -> None:
    db = ZODB.DB(Storage(c.masters, c.name), large_record_size=HUGE * 2)
    try:
        with db.transaction() as conn:
            root = conn.root()
            for i in range(count):
                root.setdefault("o%d" % i, PersistentMapping())["v"] = version
            root["big"] = b"%d" % version * 100000
            if version in (1, 3):  # written by NEO's storages, then by ours
                root["huge"] = PersistentMapping(v=bytes([version]) * 16 + os.urandom(HUGE))
    finally:
        db.close()


def read(c) -> dict:
    db = ZODB.DB(Storage(c.masters, c.name))
    try:
        with db.transaction() as conn:
            root = conn.root()
            values = {k: v["v"] for k, v in root.items() if k.startswith("o")}
            huge = root["huge"]["v"]
            return {"objects": values, "big": root["big"][:10], "len": len(root["big"]),
                    "huge": (huge[:16], len(huge))}
    finally:
        db.close()


def stop(c, name: str) -> None:
    node = c.nodes[name]
    node.signal(signal.SIGTERM)
    if node.wait(30) is None:
        node.kill()


def replace_alone(c, server, name: str, other: str) -> None:
    """``other`` down (its cells out of date: ``name`` alone has
    everything), ``name`` stopped and started as the other kind on its
    database; the cluster runs again on it alone."""
    database = c.db_name(name)
    before = int(config(server, database, "ptid"))
    c.nodes[other].kill()
    wait_until(lambda: "U" not in c.cells()[other], 30, "%s's cells out of date" % other)
    # in its database too, or the master would wait for ``other`` again
    wait_until(lambda: int(config(server, database, "ptid")) > before, 30,
               "the new partition table in %s's database" % name)
    stop(c, name)
    c.switch(name)
    c.storage(int(name[1:])).start()
    c.wait_state("RUNNING", 90)


def bigdata_rows(server, database: str) -> int:
    conn = mariadb.connect(user="root", unix_socket=server.socket, database=database)
    try:
        cur = conn.cursor()
        cur.execute("SELECT COUNT(*) FROM bigdata")
        return cur.fetchone()[0]
    finally:
        conn.close()


def config(server, database: str, name: str) -> bytes:
    conn = mariadb.connect(user="root", unix_socket=server.socket, database=database)
    try:
        cur = conn.cursor()
        cur.execute("SELECT value FROM config WHERE name=?", (name,))
        return bytes(cur.fetchone()[0])
    finally:
        conn.close()


@pytest.mark.parametrize("master", ["NEO", "neozodb"])
def test_storage_nodes_replaced_in_place(tmp_path, server, master):
    prefix = "inplace_%s" % master.lower()
    neo = {"S1", "S2"} | ({"M1"} if master == "NEO" else set())
    c = MixedCluster(str(tmp_path / "c"), neo=neo, name="inplace", storages=2, replicas=1,
                     partitions=6, adapter="MariaDB",
                     databases=lambda i: server.database("%s_s%d" % (prefix, i)))
    c.db_name = lambda name: "%s_s%s" % (prefix, name[1:])
    c.start_or_kill()
    try:
        write(c, 1)
        nid = config(server, prefix + "_s1", "nid")
        assert bigdata_rows(server, prefix + "_s1") == 3     # NEO's

        # NEO's S1 -> ours, on its database, serving it alone (S2 is down)
        replace_alone(c, server, "S1", "S2")
        assert c.kind("S1") == "neozodb" and config(server, prefix + "_s1", "nid") == nid
        assert read(c) == {"objects": {"o%d" % i: 1 for i in range(OBJECTS)},
                           "big": b"1" * 10, "len": 100000,
                           "huge": (b"\1" * 16, 16 + HUGE)}
        # ours writes into NEO's schema; NEO's S2 catches up from it
        write(c, 2, OBJECTS + 10)
        c.nodes["S2"].start()
        wait_until(c.all_up_to_date, 90, "NEO's S2 up to date")

        # and the other way round: ours -> NEO's, on the database ours wrote
        write(c, 3, OBJECTS + 20)
        assert bigdata_rows(server, prefix + "_s1") == 6     # and ours
        replace_alone(c, server, "S1", "S2")
        assert c.kind("S1") == "NEO" and config(server, prefix + "_s1", "nid") == nid
        assert read(c) == {"objects": {"o%d" % i: 3 for i in range(OBJECTS + 20)},
                           "big": b"3" * 10, "len": 100000,
                           "huge": (b"\3" * 16, 16 + HUGE)}
        # NEO's client commits and reads too
        assert neo_client_roundtrip(c, last="neo") == {"last": "neo"}
    finally:
        c.kill()
