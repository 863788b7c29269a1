"""The admin node (runs in its own asyncio loop): neoctl endpoint, passive copy of the cluster view."""
