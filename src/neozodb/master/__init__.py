"""The primary master (runs in one asyncio loop): cluster state, node registry, partition table, OID/TID allocation, commit coordination."""
