"""neostorage with SQLite's durable points disabled: every commit runs with
synchronous=OFF and the backend's own sync of the WAL does nothing, so
nothing is ever fsynced.  For test_power_loss.py only,
to show that the power-loss test sees the commits such a storage loses;
production code has no switch for this."""
import sys

from neozodb.cli.storage import main
from neozodb.storage.backends import sqlite

# SQLiteBackend.open() sets this level on its connection (checkpoints
# sync at NORMAL), and durable points rely on SQLiteBackend.sync (see
# backends/sqlite.py); both names must exist, or this would test nothing
assert hasattr(sqlite, "_SYNC_NORMAL") and hasattr(sqlite.SQLiteBackend, "sync")
sqlite._SYNC_NORMAL = "PRAGMA synchronous=OFF"
sqlite.SQLiteBackend.sync = lambda self: None

if __name__ == "__main__":
    sys.exit(main())
