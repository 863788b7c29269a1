"""Command-line entry points of the server nodes and tools.

Entry points (declared in ``pyproject.toml``):

- ``neomaster``  -> ``neozodb.cli.master:main``
- ``neostorage`` -> ``neozodb.cli.storage:main``
- ``neoadmin``   -> ``neozodb.cli.admin:main``
- ``neoctl``     -> ``neozodb.ctl.neoctl:main``
- ``neosimple``  -> ``neozodb.cli.simple:main``
- ``neomigrate`` -> ``neozodb.cli.migrate:main`` (FileStorage <-> cluster copy)

Options
-------
``neozodb.cli.config.parse_options(node, argv)`` builds the options of a
master, storage or admin node, using NEO's option names: ``-c/--cluster``,
``-m/--masters "H:P H:P"``, ``-b/--bind H:P``, ``-l/--logfile``,
``--loglevel``, ``-i/--nid``; master ``-p/--partitions``, ``-r/--replicas``,
``-A/--autostart``; storage ``-a/--adapter``, ``-d/--database``,
``-w/--wait``, ``--reset``.  Any error (bad value, missing option, unreadable
file) is reported as one line ``prog: error: ...`` and exit status 2.

Config files
------------
``-f/--file PATH`` names an INI file read with :mod:`configparser`;
``-s/--section NAME`` picks its section (default: the node type, i.e.
``[master]``, ``[storage]`` or ``[admin]``).  Values of ``[DEFAULT]`` are
shared by all sections; keys spell options with ``_`` instead of ``-``
(``cluster``, ``masters``, ``bind``, ``database``, ...).  Options given on
the command line override the file::

    [DEFAULT]
    cluster = test
    masters = 127.0.0.1:10000

    [master]
    partitions = 12
    replicas = 1

    [storage]
    database = /var/lib/neo/s1.sqlite

Local-cluster launcher
----------------------
``neosimple`` (``neozodb.cli.simple``) starts a throw-away cluster on the
local host (one master, N storages, an admin node) in separate processes,
which is what ``make run`` uses.
"""
