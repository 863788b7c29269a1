"""The import (``importer.Importer``) into a PostgreSQL database: the
Importer adapter's configuration names ``adapter = PostgreSQL`` and a DSN
as ``database``.  Apart so that psycopg is imported only then."""

from __future__ import annotations

from .importer import Importer
from .postgresql import PostgreSQLBackend


class PostgreSQLImporterBackend(Importer, PostgreSQLBackend):
    """The import into a PostgreSQL database."""
