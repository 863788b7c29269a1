"""The storage node: it keeps the transactions and object revisions of the
partitions assigned to it, takes part in two-phase commit, serves reads and
replicates partitions from other storage nodes.

Everything here runs in the storage node's single asyncio event loop thread,
including the database backend (``neozodb.storage.backends``), which is
synchronous and owns one database connection.  A worker thread may later be
handed that connection for long jobs, never concurrently with the loop.
"""
