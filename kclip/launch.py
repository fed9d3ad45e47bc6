"""`kclip launch LAUNCHER ARGS...`: run a launcher (`deepspeed`, `torchrun`) so that stop signals reach the ranks.

DeepSpeed 0.19.8's `deepspeed` runner forwards signals only to multi-node pdsh launches: a SIGTERM to a single-node
`deepspeed` (what srun and schedulers send) ends the runner in 0.1 s and signals nothing else: launch.py and the
ranks learn of it only by noticing, within a second, that the runner is gone (kclip.train.launcher_watch), and which
signal it was is lost. Here the launcher runs in its own session, and
SIGTERM / SIGUSR1 / SIGINT are sent straight to this node's ranks (the `-m kclip.cli` processes under it), which
checkpoint at the next step boundary and exit 0; the launcher then sees clean exits and ends by itself, with no
30-second kill deadline. Ranks on other nodes get the signal from their own node's `kclip launch` (srun signals
every task) or, for pdsh launches, from the runner, which gets it when no rank runs on this node. Ctrl-C lands here
only (the launcher is in another session): the first asks the ranks to checkpoint and stop, the second aborts them.

The launcher's own progress lines (DeepSpeed's `[INFO] [runner.py/launch.py]`: the command it runs, the world info,
each rank spawned and exiting) are kept off the console, as kclip keeps other libraries' lines (kclip.console): they
go to the run's `log.txt` when the command names an `--output` run folder, and to stderr if the launch fails. Its
errors, and everything the ranks print, pass through. `--verbose` in the command shows them as they come.
"""
from __future__ import annotations

import collections
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

# A signal that arrives before any rank exists (start-up) waits this long for them before going to the launcher.
RANK_WAIT_S = 10.0
# DeepSpeed's logger format, for its launcher's informational lines (errors are not held back).
LAUNCHER_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+\] \[(DEBUG|INFO|WARNING)\] \[(runner|launch)\.py:\d+:")
HELD_LINES = 1000


def _relay(stream, held: collections.deque) -> None:
    """Copy the launcher's stdout (its ranks' too) to ours, line by line, holding back its own progress lines."""
    for line in stream:
        if LAUNCHER_LINE.match(line):
            held.append(line)
        else:
            sys.stdout.write(line)
            sys.stdout.flush()


def _run_folder(argv: list[str]) -> Path | None:
    for flag, value in zip(argv, argv[1:]):
        if flag == "--output":
            return Path(value)
    return None


def _file_held(held: collections.deque, argv: list[str], failed: bool) -> None:
    if not held:
        return
    if failed:
        sys.stderr.writelines(held)
    run = _run_folder(argv)
    if run is not None and run.is_dir():
        with open(run / "log.txt", "a", encoding="utf-8") as f:
            f.writelines(held)


def _is_rank(proc: psutil.Process) -> bool:
    try:
        cmd = proc.cmdline()
    except psutil.Error:
        return False
    return any(a == "-m" and b == "kclip.cli" for a, b in zip(cmd, cmd[1:]))


def local_ranks(launcher: psutil.Process) -> list[psutil.Process]:
    """The kclip processes under the launcher that a launcher started (not their data-loader workers)."""
    try:
        below = launcher.children(recursive=True)
    except psutil.Error:
        return []
    return [p for p in below if _is_rank(p) and not _is_rank_parent(p)]


def _is_rank_parent(proc: psutil.Process) -> bool:
    try:
        parent = proc.parent()
    except psutil.Error:
        return False
    return parent is not None and _is_rank(parent)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: kclip launch LAUNCHER [ARGS...]   e.g. kclip launch deepspeed --num_gpus 8 --module kclip.cli "
              "train ...", file=sys.stderr)
        return 2
    quiet = "--verbose" not in argv
    child = subprocess.Popen(argv, start_new_session=True, stdout=subprocess.PIPE if quiet else None,
                             text=True, bufsize=1)
    held: collections.deque[str] = collections.deque(maxlen=HELD_LINES)
    relay = threading.Thread(target=_relay, args=(child.stdout, held), daemon=True) if quiet else None
    if relay:
        relay.start()
    launcher = psutil.Process(child.pid)
    pending: list[int] = []

    def remember(signum, frame) -> None:  # forwarded by the loop below, outside the handler
        pending.append(signum)

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, remember)
    first_pending = None
    while child.poll() is None:
        if pending:
            first_pending = first_pending or time.monotonic()
            ranks = local_ranks(launcher)
            if ranks or time.monotonic() - first_pending > RANK_WAIT_S:
                signum = pending.pop(0)
                for target in ranks or [launcher]:
                    try:
                        target.send_signal(signum)
                    except psutil.Error:
                        pass
                first_pending = None
        time.sleep(0.1)
    if relay:
        relay.join(timeout=5)  # what the ranks printed last
        _file_held(held, argv, failed=child.returncode != 0)
    return child.returncode if child.returncode >= 0 else 128 - child.returncode
