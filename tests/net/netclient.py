"""A ZODB client process for tests/net, run inside a host (``NetCluster.client``):

    netclient.py write MASTERS CLUSTER KEEPALIVE KEY STOPFILE
        commits tree[i] = "v<i>" for i = 0, 1, ... into the OOBTree root[KEY],
        one transaction each, printing i once acknowledged, until STOPFILE
        exists; a failed commit (not committed: the client never both raises
        and commits) is retried with the same i, reported on stderr.
    netclient.py check MASTERS CLUSTER KEEPALIVE KEY COUNT
        exits 0 if root[KEY] holds exactly tree[i] = "v<i>" for i < COUNT,
        else prints what differs and exits 1."""
from __future__ import annotations

import os
import sys

import transaction
import ZODB
from BTrees.OOBTree import OOBTree

from neozodb.client import Storage


def write(root, key: str, stop: str) -> None:
    i = 0
    while not os.path.exists(stop):
        try:
            if key not in root:
                root[key] = OOBTree()
            root[key][i] = "v%d" % i
            transaction.commit()
        except Exception as e:
            print("retry", i, type(e).__name__, e, file=sys.stderr, flush=True)
            transaction.abort()
            continue
        print(i, flush=True)
        i += 1


def check(root, key: str, count: int) -> int:
    tree = root.get(key, {})
    keys = list(tree.keys())
    if keys != list(range(count)):
        missing = sorted(set(range(count)) - set(keys))
        print("%d acknowledged, %d in the tree; missing %s, extra %s" % (
            count, len(keys), missing[:20], sorted(set(keys) - set(range(count)))[:20]))
        return 1
    wrong = [i for i in keys if tree[i] != "v%d" % i]
    if wrong:
        print("wrong values at %s" % wrong[:20])
        return 1
    print("ok %d" % count)
    return 0


def main(argv: list[str]) -> int:
    mode, masters, cluster, keepalive, key, arg = argv
    db = ZODB.DB(Storage(masters, cluster, keepalive=float(keepalive)))
    try:
        root = db.open().root()
        if mode == "write":
            write(root, key, arg)
            return 0
        return check(root, key, int(arg))
    finally:
        db.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
