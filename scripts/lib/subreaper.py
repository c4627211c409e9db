#!/usr/bin/env python3
"""Run a command as a child subreaper, so nothing it starts can outlive it.

    subreaper.py COMMAND [ARG...]

libvirtd double-forks QEMU, so QEMU's parent is whoever reaps orphans. Marked as a child
subreaper (prctl PR_SET_CHILD_SUBREAPER), this process becomes that parent: QEMU processes are
reaped as soon as they exit (PID 1 in a container may take a second or more), and when COMMAND
exits every descendant still running is killed and reaped. Exit status: COMMAND's.
"""
import ctypes
import os
import signal
import sys
import time

PR_SET_CHILD_SUBREAPER = 36


def children(pid):
    """Pids whose parent is `pid` (from /proc/PID/stat)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name (field 2) is in parentheses and may contain anything; the parent pid
        # is the second field after the last ')'.
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            out.append(int(entry))
    return out


def main():
    if len(sys.argv) < 2:
        sys.exit("usage: subreaper.py COMMAND [ARG...]")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        sys.exit(f"subreaper: prctl(PR_SET_CHILD_SUBREAPER) failed: {os.strerror(err)}")

    pid = os.fork()
    if pid == 0:
        try:
            os.execvp(sys.argv[1], sys.argv[1:])
        except OSError as e:
            print(f"subreaper: cannot run {sys.argv[1]}: {e}", file=sys.stderr)
            os._exit(127)

    # Ctrl-C reaches the whole foreground process group; the command handles it (and cleans
    # up), this process only waits. SIGTERM is passed on.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: os.kill(pid, signal.SIGTERM))

    status = None
    while status is None:
        try:
            got, st = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        if got == pid:
            status = os.waitstatus_to_exitcode(st)

    # Anything still running was started by COMMAND and left behind: stop it.
    deadline = time.monotonic() + 5
    sig = signal.SIGTERM
    while True:
        left = children(os.getpid())
        if not left:
            break
        if time.monotonic() > deadline:
            sig = signal.SIGKILL
        for child in left:
            try:
                os.kill(child, sig)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            pass
    if status is None:
        status = 1
    sys.exit(status if status >= 0 else 128 - status)


if __name__ == "__main__":
    main()
