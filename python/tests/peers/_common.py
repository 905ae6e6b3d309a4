"""Helpers of the peer scripts that the tests start as processes.

Each script prints one JSON object per line on stdout (its events) and exits 0 when it
did what the test expects. A watchdog ends a script that hangs, so no test waits on a
stuck process for longer than its own timeout.
"""

import json
import os
import sys
import threading
import time

import phalanx


def emit(event, **fields):
    """Prints one event line and flushes it, so that the test reading the pipe sees it."""
    print(json.dumps({"event": event, **fields}), flush=True)


def watchdog(seconds=120.0):
    """Ends this process (exit code 3) if it is still running after `seconds`."""

    def fire():
        emit("watchdog", seconds=seconds)
        os._exit(3)

    t = threading.Timer(seconds, fire)
    t.daemon = True
    t.start()


def connect(**kwargs):
    """Connects to the master whose address is the script's first argument."""
    kwargs.setdefault("join_timeout_ms", 60_000)
    return phalanx.Communicator.connect(sys.argv[1], **kwargs)


def wait_for_size(comm, n, timeout=60.0):
    """Runs topology rounds until the group has `n` members. Every peer makes at least
    one call, so all make equally many: a joiner's first call returns at once, standing
    for the members' round that admitted it."""
    deadline = time.monotonic() + timeout
    comm.update_topology()
    while comm.size < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"group has {comm.size} members, expected {n}")
        time.sleep(0.02)
        comm.update_topology()
