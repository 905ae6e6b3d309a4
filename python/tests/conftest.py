"""Fixtures of the phalanx Python tests: an in-process master and peer processes.

Peer processes run the small scripts in tests/peers/ with this interpreter; they print
one JSON event per line. Every wait has a timeout, and every process a test started is
killed when the test ends, whatever happened.
"""

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import phalanx

PEERS = Path(__file__).parent / "peers"

# The machine running the tests may be small and busy: waits are generous.
TIMEOUT = float(os.environ.get("PHALANX_TEST_TIMEOUT", "90"))


class Peer:
    """A peer process running `tests/peers/<script>`, its events read in the background."""

    def __init__(self, script, *args, env=None):
        self.name = f"{script} {' '.join(map(str, args))}"
        self.proc = subprocess.Popen(
            [sys.executable, "-u", str(PEERS / script), *map(str, args)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.events = queue.Queue()
        self.seen = []  # every event taken from the queue so far, in order
        self.stderr = []
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read_stdout(self):
        for line in self.proc.stdout:
            try:
                self.events.put(json.loads(line))
            except ValueError:
                self.events.put({"event": "text", "line": line.rstrip()})
        self.events.put(None)  # end of output

    def _read_stderr(self):
        for line in self.proc.stderr:
            self.stderr.append(line)

    def expect(self, event, timeout=TIMEOUT):
        """The next event named `event`, or one of them if `event` is a tuple (skipping
        others, which stay in `seen`); fails with the peer's stderr if it exits or the
        time runs out first."""
        names = event if isinstance(event, tuple) else (event,)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                got = self.events.get(timeout=max(left, 0.01))
            except queue.Empty:
                pytest.fail(f"{self.name}: no {event!r} event within {timeout} s\n{self.diagnostics()}")
            if got is None:
                self.events.put(None)
                self.proc.wait(timeout=10)
                pytest.fail(f"{self.name}: exited ({self.proc.returncode}) before {event!r}\n{self.diagnostics()}")
            self.seen.append(got)
            if got.get("event") in names:
                return got
            if got.get("event") == "watchdog":
                pytest.fail(f"{self.name}: its watchdog fired\n{self.diagnostics()}")

    def wait(self, timeout=TIMEOUT):
        """The exit code, once the process ends (fails the test on timeout)."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.name}: still running after {timeout} s\n{self.diagnostics()}")

    def kill(self):
        """SIGKILL, as a crash would."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def diagnostics(self):
        time.sleep(0.2)  # let the reader threads catch the last lines
        return f"--- stderr of {self.name} ---\n{''.join(self.stderr[-60:])}"


@pytest.fixture
def master():
    """A master in this process, on a free port of 127.0.0.1."""
    m = phalanx.Master("127.0.0.1:0", peer_timeout_ms=1000)
    yield m
    m.close()


@pytest.fixture
def spawn():
    """`spawn(script, *args)` starts a peer process; all are killed at the test's end."""
    peers = []

    def start(script, *args, env=None):
        p = Peer(script, *args, env=env)
        peers.append(p)
        return p

    yield start
    for p in peers:
        p.kill()


def on_all(items, f, timeout=TIMEOUT):
    """Runs f(item) for every item at once, one thread each (in-process peers, whose
    collectives block until all have called); returns the results in order and re-raises
    the first error. A call still running after `timeout` seconds fails the test."""
    results, errors = [None] * len(items), []

    def run(i, item):
        try:
            results[i] = f(item)
        except BaseException as e:  # noqa: BLE001 - re-raised below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i, x), daemon=True) for i, x in enumerate(items)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "a call hung"
    if errors:
        raise errors[0]
    return results


def join_group(master, n):
    """n communicators of one group in this process, ranks 0..n-1 in list order: each
    newcomer connects on a thread while the members run the round that admits it."""
    comms = [phalanx.Communicator.connect(master.addr, join_timeout_ms=30_000)]
    for _ in range(n - 1):
        box = {}
        t = threading.Thread(
            target=lambda: box.setdefault("c", phalanx.Communicator.connect(master.addr, join_timeout_ms=30_000)),
            daemon=True,
        )
        t.start()
        deadline = time.monotonic() + 30
        while comms[0].peers_pending == 0:
            assert time.monotonic() < deadline, "the joiner never showed up"
            time.sleep(0.01)
        on_all(comms, lambda c: c.update_topology())
        t.join(timeout=60)
        new = box["c"]
        new.update_topology()  # the members' round counts as its own: returns at once
        comms.append(new)
    assert [c.rank for c in comms] == list(range(n))
    return comms


@pytest.fixture
def make_group(master):
    """`make_group(n)`: n communicators of one group in this process (`join_group`), all
    left at the test's end; with `left_ok=True` one the test already left may refuse."""
    made = []

    def make(n, left_ok=False):
        comms = join_group(master, n)
        made.append((comms, left_ok))
        return comms

    yield make
    for comms, left_ok in made:
        for c in comms:
            try:
                c.leave()
            except phalanx.PhalanxError:
                if not left_ok:
                    raise


@pytest.fixture
def four(make_group):
    """Four communicators of one group on threads, ranks 0..3 in list order."""
    return make_group(4)
