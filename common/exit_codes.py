"""Exit statuses of `serve` that its supervisors and the CLI tell apart from a crash."""

# From sysexits.h: a configuration problem that a restart will not fix by itself.
CONFIG_ERROR = 78
# The port is taken by another process; restarting at once would fail the same way.
PORT_IN_USE = 75  # EX_TEMPFAIL: it may work later, once the port is free
# Another server holds the state dir's lock: as with the port, it may work once that one has exited
# (a supervisor restarting the sidecar may start the new process before the old one is gone).
STATE_DIR_IN_USE = 75
