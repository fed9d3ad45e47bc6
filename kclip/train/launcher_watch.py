"""A rank whose launcher is gone stops as on SIGTERM.

A SIGTERM to DeepSpeed 0.19.8's single-node `deepspeed` runner (a scheduler's or `kill PID`'s) ends the runner in
0.1 s and signals nothing else: its launch.py, the ranks' parent, keeps waiting on ranks that keep training. Killing
any launcher with SIGKILL leaves the same orphans. So each rank notes, at start, the processes above it up to the
outermost launcher, and a daemon thread checks every second that each of them is still the parent of the one below
it. A process that exits hands its children to another parent at once (even while it is an unreaped zombie), and a
reused pid is never that new parent, so a broken link means that launcher is gone; the thread then raises the same
flag a SIGTERM does (`on_gone`), and the ranks checkpoint together at the next step boundary and exit 0.

Launchers are known by their command lines (the deepspeed runner and its launch.py, torchrun, `kclip launch`): a
rank started from a shell, pytest, a notebook or srun (whose slurmstepd outlives its tasks and signals them itself)
has none above it, and no thread runs.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

import psutil

log = logging.getLogger("kclip.train")

POLL_S = 1.0
# DeepSpeed installs its runner as three scripts; launcher_helper is what its MPI launchers start on each node.
LAUNCHER_SCRIPTS = {"deepspeed", "deepspeed.pt", "ds", "torchrun"}
LAUNCHER_MODULES = {"deepspeed.launcher.runner", "deepspeed.launcher.launch", "deepspeed.launcher.launcher_helper",
                    "torch.distributed.run", "torch.distributed.launch"}
PYTHON_OPTIONS_WITH_VALUE = {"-W", "-X"}

_started = False


def program(cmdline: list[str]) -> tuple[str, list[str]]:
    """What a command line runs, and its arguments: the module of `python -m MODULE`, else the script's or
    executable's file name (an entry point such as `deepspeed` runs as `python /path/bin/deepspeed`)."""
    if cmdline and os.path.basename(cmdline[0]).startswith("python"):
        rest = cmdline[1:]
        while rest and rest[0].startswith("-"):
            if rest[0] == "-m" and len(rest) > 1:
                return rest[1], rest[2:]
            rest = rest[2:] if rest[0] in PYTHON_OPTIONS_WITH_VALUE else rest[1:]
        cmdline = rest
    return (os.path.basename(cmdline[0]), cmdline[1:]) if cmdline else ("", [])


def is_launcher(cmdline: list[str]) -> bool:
    name, args = program(cmdline)
    return name in LAUNCHER_SCRIPTS | LAUNCHER_MODULES or (name in ("kclip", "kclip.cli") and args[:1] == ["launch"])


def _ancestors() -> list[psutil.Process]:
    try:
        return psutil.Process().parents()
    except psutil.Error:
        return []


def launcher_chain(ancestors: list[psutil.Process]) -> list[psutil.Process]:
    """The ancestors (nearest first) up to and including the outermost launcher; none when no launcher is above.
    Whatever lies between (a wrapper script a launcher runs) belongs to the launch and is watched too."""
    outermost = -1
    for i, proc in enumerate(ancestors):
        try:
            if is_launcher(proc.cmdline()):
                outermost = i
        except psutil.Error:  # a process of another user: not ours to launch us
            continue
    return ancestors[: outermost + 1]


def _describe(proc: psutil.Process) -> str:
    try:
        return f"pid {proc.pid}: {' '.join(proc.cmdline())[:120]}"
    except psutil.Error:
        return f"pid {proc.pid}"


def first_gone(chain: list[tuple[int, str]]) -> str | None:
    """The description of the nearest process of `chain` ((pid, description), nearest first) that is gone: no longer
    the parent of the one below it; None while every link holds."""
    below, below_description = os.getpid(), None
    for pid, description in chain:
        try:
            if psutil.Process(below).ppid() != pid:
                return description
        except psutil.Error:  # `below` ended since its own link was checked
            return below_description
        below, below_description = pid, description
    return None


def _watch(chain: list[tuple[int, str]], on_gone: Callable[[], None]) -> None:
    while (gone := first_gone(chain)) is None:
        time.sleep(POLL_S)
    log.warning("the launcher that started this rank is gone (%s): stopping as on SIGTERM", gone)
    on_gone()


def start(on_gone: Callable[[], None]) -> None:
    """Watch this process's launchers, once per process; `on_gone` is called (from the watch thread) when one ends."""
    global _started
    if _started:
        return
    _started = True
    chain = [(proc.pid, _describe(proc)) for proc in launcher_chain(_ancestors())]
    if chain:
        threading.Thread(target=_watch, args=(chain, on_gone), name="kclip-launcher-watch", daemon=True).start()
