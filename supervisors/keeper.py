"""The process supervisor's keeper: runs the sidecar, starts it again whenever it exits, stops it on request.

It behaves like launchd's KeepAlive with ThrottleInterval (and systemd's Restart=always):
- a sidecar that exits for any reason but a stop request — a crash, a signal from someone else
  (SIGKILL, SIGTERM, …), even status 0 — is started again, no sooner than `throttle` seconds after
  its previous start (at once if it had been up longer than that);
- a configuration error (`common.exit_codes.CONFIG_ERROR`) ends the keeper: a restart cannot fix it;
- a sidecar whose port or state dir is taken (exit 75) is started again like after a crash, so it comes
  back if they free soon, and the keeper gives up like after any crash loop if they do not;
- after MAX_QUICK_CRASHES exits in a row, each within `throttle` seconds of its start, it gives
  up, so that a broken install does not spin for ever;
- SIGTERM, SIGINT or SIGHUP to the keeper stop the sidecar (SIGTERM, then SIGKILL after
  STOP_TIMEOUT_S) and end the keeper: that is the only way to stop it for good. On Linux the
  sidecar also gets SIGTERM if the keeper dies.

Once the sidecar has exited, a small JSON state file says how it last exited, when, how many times
the keeper started it again, and whether the keeper waits to start it again or gave up; the
process supervisor reads it for `status`.

With `--pidfile`, only one keeper runs per pidfile: a keeper first takes an exclusive lock next to
it (`<pidfile without .json>.lock`, held for its whole life and dropped by the kernel when it exits)
and only then writes its pid, start time and command line into the pidfile. A second keeper finds
the lock taken and exits at once with status 0, leaving the first one's pidfile alone.

Run as `python -m supervisors.keeper --state-file PATH [--pidfile PATH] [--throttle S] -- COMMAND...`.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Literal

import psutil

from common.exit_codes import CONFIG_ERROR, PORT_IN_USE
from common.files import atomic_write_json
from supervisors import LastExit, iso_time

THROTTLE_S = 10.0
MAX_QUICK_CRASHES = 5
# Below the process supervisor's own STOP_TIMEOUT_S, so the keeper finishes the job itself.
STOP_TIMEOUT_S = 15.0

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
PR_SET_PDEATHSIG = 1
# What the sidecar's own exit statuses mean, for the log, the state file and `status`.
EXIT_MEANINGS = {
    CONFIG_ERROR: "its configuration is wrong; a restart cannot fix it",
    PORT_IN_USE: "its port or its state dir is in use",
}

KeeperState = Literal["running", "restarting", "gave-up"]

log = logging.getLogger("keeper")


@dataclass(frozen=True)
class RestartPolicy:
    """How soon a crashed sidecar is started again, and when to give up."""

    throttle_s: float = THROTTLE_S
    max_quick_crashes: int = MAX_QUICK_CRASHES

    def after_crash(self, quick_crashes: int, uptime_s: float) -> tuple[int, float | None]:
        """After an exit `uptime_s` seconds into a run that followed `quick_crashes` quick exits in a
        row: the new count, and the seconds to wait before the next start (None: give up)."""
        crashes = quick_crashes + 1 if uptime_s < self.throttle_s else 0
        if crashes >= self.max_quick_crashes:
            return crashes, None
        return crashes, max(0.0, self.throttle_s - uptime_s)


def keeper_command(
    command: list[str], state_file: Path, throttle_s: float = THROTTLE_S, pidfile: Path | None = None
) -> list[str]:
    """The argument list that runs `command` under a keeper (this Python, this module)."""
    keeper = [sys.executable, "-m", "supervisors.keeper", "--state-file", str(state_file)]
    if pidfile is not None:
        keeper += ["--pidfile", str(pidfile)]
    return [*keeper, "--throttle", f"{throttle_s:g}", "--", *command]


def keeper_lock_path(pidfile: Path) -> Path:
    """The lock a keeper holds while it owns `pidfile`."""
    return pidfile.with_suffix(".lock")


def signal_name(number: int) -> str:
    """'SIGTERM' for 15; 'signal 99' for a number this platform does not name."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def describe_exit(returncode: int) -> str:
    """'exited with status 3', 'exited with status 78 (its configuration is wrong; …)' or 'was killed by SIGKILL'."""
    if returncode < 0:
        return f"was killed by {signal_name(-returncode)}"
    meaning = EXIT_MEANINGS.get(returncode)
    return f"exited with status {returncode}" + (f" ({meaning})" if meaning else "")


def last_exit_of(returncode: int, at: float, restarts: int) -> LastExit:
    """The `LastExit` of a sidecar that ended with this Popen return code at this time."""
    return LastExit(
        description=describe_exit(returncode),
        code=returncode if returncode >= 0 else None,
        signal=signal_name(-returncode) if returncode < 0 else None,
        time=iso_time(at),
        restarts=restarts,
    )


class Keeper:
    """Runs one command, starting it again whenever it exits, until it is told to stop or gives up.

    It has no threads: signal handlers only set a flag, and the loop sleeps in `select` on the
    signal wakeup pipe, so a child's exit (SIGCHLD) or a stop request wakes it at once.
    """

    def __init__(self, command: list[str], state_file: Path, policy: RestartPolicy) -> None:
        self.command = command
        self.state_file = state_file
        self.policy = policy
        self._stopping = False
        self._wakeup_read, self._wakeup_write = os.pipe()
        for fd in (self._wakeup_read, self._wakeup_write):
            os.set_blocking(fd, False)

    def install_signal_handlers(self) -> None:
        """Stop on SIGTERM, SIGINT and SIGHUP; wake on SIGCHLD (main thread only)."""
        signal.set_wakeup_fd(self._wakeup_write, warn_on_full_buffer=False)
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._request_stop)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)

    def run(self) -> int:
        """Keep the command running; the keeper's exit status (1 when it gave up)."""
        quick_crashes = 0
        restarts = 0
        try:
            while not self._stopping:
                started = time.monotonic()
                returncode = self._run_once()
                if returncode is None:
                    return 0
                ended = time.time()
                uptime = time.monotonic() - started
                quick_crashes, delay = self.policy.after_crash(quick_crashes, uptime)
                what = f"the sidecar {describe_exit(returncode)} after {uptime:.1f} s"
                if returncode == CONFIG_ERROR:
                    log.error("%s, so the keeper does not start it again: fix the cause shown above", what)
                    self._write_state("gave-up", returncode, ended, restarts, quick_crashes)
                    return 1
                if delay is None:
                    log.error(
                        "%s; it exited %d times in a row within %g s of starting, so the keeper gives up: "
                        "fix the cause shown above, then run 'delta-mem-mlx start-sidecar'",
                        what,
                        quick_crashes,
                        self.policy.throttle_s,
                    )
                    self._write_state("gave-up", returncode, ended, restarts, quick_crashes)
                    return 1
                log.warning("%s; starting it again in %.1f s", what, delay)
                self._write_state("restarting", returncode, ended, restarts, quick_crashes, delay)
                self._sleep_until(time.monotonic() + delay)
                if not self._stopping:
                    restarts += 1
                    self._write_state("running", returncode, ended, restarts, quick_crashes)
            return 0
        finally:
            if self._stopping:
                self.state_file.unlink(missing_ok=True)

    def _request_stop(self, signum: int, frame: FrameType | None) -> None:
        self._stopping = True

    def _run_once(self) -> int | None:
        """Start the command and wait for it; None when a stop was requested meanwhile."""
        # preexec_fn is safe here: the keeper never starts a thread.
        child = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent(os.getpid()),  # noqa: PLW1509
        )
        while child.poll() is None and not self._stopping:
            self._wait_for_signal(None)
        if child.returncode is None:
            _stop(child)
            return None
        return child.returncode

    def _sleep_until(self, deadline: float) -> None:
        while not self._stopping and (remaining := deadline - time.monotonic()) > 0:
            self._wait_for_signal(remaining)

    def _wait_for_signal(self, timeout: float | None) -> None:
        readable, _, _ = select.select([self._wakeup_read], [], [], timeout)
        if readable:
            try:
                while os.read(self._wakeup_read, 512):
                    pass
            except BlockingIOError:
                pass

    def _write_state(
        self,
        state: KeeperState,
        returncode: int,
        ended: float,
        restarts: int,
        crashes: int,
        delay: float | None = None,
    ) -> None:
        record: dict[str, Any] = {
            "state": state,
            "last_exit": describe_exit(returncode),
            "returncode": returncode,
            "exited_at": ended,
            "restarts": restarts,
            "quick_crashes": crashes,
            "time": time.time(),
        }
        if delay is not None:
            record["restart_at"] = time.time() + delay
        atomic_write_json(self.state_file, record)


def _stop(child: subprocess.Popen[bytes]) -> None:
    if child.poll() is None:
        child.send_signal(signal.SIGTERM)
    try:
        child.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def _die_with_parent(parent: int) -> Callable[[], None] | None:
    """A preexec_fn that has Linux send the child SIGTERM when the keeper dies (None elsewhere)."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork, not in the child

    def arrange() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the keeper died before the request took effect
            os._exit(1)

    return arrange


def claim_pidfile(pidfile: Path) -> int | None:
    """Lock the pidfile's lock and record this process in the pidfile; None when another keeper holds it.

    The returned descriptor holds the lock: keep it open for as long as the keeper runs.
    """
    lock = keeper_lock_path(pidfile)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    me = psutil.Process()
    atomic_write_json(pidfile, {"pid": me.pid, "create_time": me.create_time(), "cmdline": me.cmdline()})
    return fd


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, install the stop signals and keep the command running."""
    parser = argparse.ArgumentParser(
        prog="python -m supervisors.keeper",
        description="Run a command, start it again when it crashes, stop it on SIGTERM.",
    )
    parser.add_argument("--state-file", type=Path, required=True, help="Where to say that a restart is pending.")
    parser.add_argument("--pidfile", type=Path, help="Where to record this keeper; one keeper per pidfile.")
    parser.add_argument("--throttle", type=float, default=THROTTLE_S, help="Least seconds between two starts.")
    parser.add_argument("command", nargs="+", help="The command to keep running (after --).")
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The lock's descriptor stays open (and locked) until this process exits.
    if args.pidfile is not None and claim_pidfile(args.pidfile) is None:
        log.info("another keeper already keeps this sidecar running (see %s); this one exits", args.pidfile)
        return 0
    keeper = Keeper(args.command, args.state_file, RestartPolicy(throttle_s=args.throttle))
    keeper.install_signal_handlers()
    return keeper.run()


if __name__ == "__main__":
    raise SystemExit(main())
