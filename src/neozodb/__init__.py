"""neozodb: a distributed, redundant, scalable storage for ZODB.

It implements the NEO architecture (masters, storages, admin, clients, a
partition table with replicas) and speaks NEO's wire protocol 5.  The ZODB
client storage lives in ``neozodb.client``; server nodes run in their own
processes (see ``neozodb.cli``).
"""

__version__ = "0.1.0"
