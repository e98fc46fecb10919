"""Runs a trainer so that it cannot outlive the daemon that started it.

Usage: ``python -I -S _leash.py DAEMON_PID -- ARGV...`` (started by the
command hook as the leader of a new session and process group).

It runs as its own file, importing nothing from the package: it is the
first thing in the new process and must be small. It asks the kernel for
SIGTERM when its parent dies (``PR_SET_PDEATHSIG``), starts the trainer in
its own process group and waits for it; when the daemon dies, even by
``kill -9``, it kills the whole group (the trainer and anything the trainer
started) and goes with it. The trainer's exit status is passed on as its
own: the same code, or death by the same signal.

Why not ``preexec_fn``: the daemon has threads (gRPC, the store writer), and
Python code between fork and exec in a threaded process can deadlock on a
lock another thread held at the fork. Here the prctl runs in a fresh,
single-threaded interpreter.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def _kill_group(_signum: int = 0, _frame: object = None) -> None:
    # SIGKILL to the group includes this process: nothing after it runs.
    os.killpg(0, signal.SIGKILL)


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: _leash.py DAEMON_PID -- ARGV...", file=sys.stderr)
        return 2
    daemon_pid = int(argv[0])
    cmd = argv[2:]
    signal.signal(signal.SIGTERM, _kill_group)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            err = os.strerror(ctypes.get_errno())
            print(
                f"trainer leash: PR_SET_PDEATHSIG failed ({err}); the trainer may outlive "
                "the daemon, which kills it at its next start",
                file=sys.stderr,
            )
    else:  # no parent-death signal: the next start's clean-up is all there is
        print("trainer leash: no PR_SET_PDEATHSIG on this system", file=sys.stderr)
    if os.getppid() != daemon_pid:
        return 125  # the daemon died before the signal was armed
    # What the trainer writes (checkpoints, adapters, its own files) is as
    # private as the dataset it reads: user text, for the daemon's user only.
    os.umask(0o077)
    try:
        pid = os.posix_spawnp(cmd[0], cmd, os.environ)
    except OSError as exc:
        print(f"cannot start trainer {cmd[0]!r}: {exc.strerror}", file=sys.stderr)
        return 127
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
