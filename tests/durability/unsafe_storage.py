"""neostorage with SQLite's durable points disabled: every commit runs with
synchronous=OFF, so nothing is ever fsynced.  For test_power_loss.py only,
to show that the power-loss test sees the commits such a storage loses;
production code has no switch for this."""
import sys

from neozodb.cli.storage import main
from neozodb.storage.backends import sqlite

# SQLiteBackend.open() sets this level on its connection; the durable
# commits rely on it (see backends/sqlite.py)
sqlite._SYNC_FULL = "PRAGMA synchronous=OFF"

if __name__ == "__main__":
    sys.exit(main())
