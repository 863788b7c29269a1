"""neoctl: the operator command line; talks to an admin node only, through the protocol."""
