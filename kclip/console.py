"""What the console shows: kclip's own log lines (loggers named `kclip...`) and kclip's progress bars.

Everything else goes to the command's log file (`run_log`: RUN/log.txt for `kclip train` and `kclip teacher-cache`;
`beside`: OUT.log for `kclip prepare` and `kclip eval --out`), and to the console too with --verbose:
- other libraries' log records. DeepSpeed, transformers and torch print theirs through handlers of their own that
  do not propagate to the root logger; those handlers are taken off and propagation restored (`setup`);
- Python warnings (`logging.captureWarnings`);
- what a library prints with print() inside the calls kclip wraps in `printed_to_log`;
- other libraries' tqdm bars are switched off instead (TQDM_DISABLE, which tqdm reads when it is first imported);
  kclip's bars (`progress`) pass `disable` themselves, so the variable leaves them alone.
Under several ranks only rank 0 prints kclip's lines; every rank writes its own file. The one-line errors
(`kclip: error: ...`) and the commands' results are print()ed, not logged: they always reach the console.
"""
from __future__ import annotations

import collections
import contextlib
import io
import logging
import os
import sys
from pathlib import Path

FORMAT = "%(asctime)s %(name)s: %(message)s"
# Records logged before the run's log file opens (imports, set-up before the run folder is locked) wait in memory;
# only the last ones are kept, for the commands that never open one.
PENDING_LIMIT = 2000
# The resource tracker's exit warnings all start with "resource_tracker:" (see `setup`).
TRACKER_FILTER = "ignore:resource_tracker:UserWarning"
# kclip's progress bars appear once their work has lasted this long.
BAR_DELAY_S = 2.0

_handlers: list[logging.Handler] = []


def is_kclip(record: logging.LogRecord) -> bool:
    return record.name == "kclip" or record.name.startswith("kclip.")


def rank() -> int:
    """This process's rank from the environment: every launcher sets RANK (kclip.dist maps srun's); none is rank 0.
    Read from the environment, not the process group, so that lines logged before it exists are sorted too."""
    return int(os.environ.get("RANK", "0"))


class _Console(logging.StreamHandler):
    """The console: rank 0's kclip records, or every record with --verbose, on the stderr of the moment (tests and
    contextlib.redirect_stderr replace sys.stderr after this handler exists)."""

    def __init__(self, verbose: bool):
        super().__init__(sys.stderr)
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        return self.verbose or (is_kclip(record) and rank() == 0)

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


class _Pending(logging.Handler):
    """Every record, formatted, until `run_log` writes them to the file it opens."""

    def __init__(self):
        super().__init__()
        self.lines: collections.deque[str] = collections.deque(maxlen=PENDING_LIMIT)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def _adopt(name: str) -> None:
    """Route the library logger `name` through the root logger's handlers instead of its own."""
    logger = logging.getLogger(name)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    logger.propagate = True


class _ToRoot(logging.Filter):
    """On a library's logger: hand each record to the root logger's handlers, and none to the library's own."""

    def filter(self, record: logging.LogRecord) -> bool:
        logging.getLogger().handle(record)
        return False


def setup(verbose: bool = False) -> None:
    """Configure the console for one command (again on every call: tests run several commands in one process)."""
    if not verbose:
        os.environ.setdefault("TQDM_DISABLE", "1")  # before the imports below: tqdm reads it once
        # multiprocessing's resource tracker, a separate interpreter started with the first shared memory segment
        # (streaming's), unlinks at exit the segments their creators left behind (a process killed or interrupted
        # before streaming's atexit cleanup, a segment that another job's stale-memory sweep unlinked first) and
        # warns about each, straight to the inherited stderr: its lines never pass through this process's logging.
        # It takes its warning filters from the environment when it starts, before any segment exists.
        filters = [f for f in os.environ.get("PYTHONWARNINGS", "").split(",") if f]
        os.environ["PYTHONWARNINGS"] = ",".join(dict.fromkeys([*filters, TRACKER_FILTER]))
    root = logging.getLogger()
    for handler in _handlers:
        root.removeHandler(handler)
    _handlers[:] = [_Console(verbose), _Pending()]
    for handler in _handlers:
        handler.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)


def adopt_libraries() -> None:
    """Send torch's, transformers' and DeepSpeed's records through the root logger's handlers (console or log file)
    instead of their own stderr handlers. Each library installs its handler when imported, so torch and transformers
    are imported here: only once a command's arguments are parsed (`parse_args`), so that --help and argument errors
    answer without them. DeepSpeed (seconds to import, and only some commands need it) logs through the one logger
    "DeepSpeed": a filter on it hands the records to the root logger's handlers and keeps them from its own, however
    late it is imported."""
    import torch  # noqa: F401 - kclip's commands import it anyway
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_default_handler()
    transformers_logging.enable_propagation()
    _adopt("torch")
    deepspeed = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _ToRoot) for f in deepspeed.filters):
        deepspeed.addFilter(_ToRoot())


def parse_args(parser, argv: list[str]):
    """A command's arguments, then `adopt_libraries` for the heavy work that follows."""
    args = parser.parse_args(argv)
    adopt_libraries()
    return args


@contextlib.contextmanager
def log_file(path: Path):
    """While the block runs, every record of this process is appended to `path`, after the records logged before it
    opened."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    for pending in [h for h in _handlers if isinstance(h, _Pending)]:  # the file takes over from it
        handler.stream.writelines(line + "\n" for line in pending.lines)
        root.removeHandler(pending)
        _handlers.remove(pending)
    root.addHandler(handler)
    try:
        yield path
    finally:
        root.removeHandler(handler)
        handler.close()


def run_log(run_dir: Path):
    """`log_file` for a run folder: `RUN/log.txt` on rank 0, `RUN/log.rank<N>.txt` on the others (a resumed run
    continues its files)."""
    return log_file(run_dir / ("log.txt" if rank() == 0 else f"log.rank{rank()}.txt"))


@contextlib.contextmanager
def beside(out: str | None):
    """`log_file` for a command whose result is the file or folder OUT: `OUT.log` next to it (`OUT.rank<N>.log` on
    the other ranks), outside what it writes (an MDS folder holds only what streaming reads); no file without OUT.
    The log goes with the result: a command that fails or is interrupted leaves nothing beside OUT (its one-line error
    says why; --verbose shows the rest)."""
    if not out:
        yield None
        return
    path = Path(str(out).rstrip("/") + (".log" if rank() == 0 else f".rank{rank()}.log"))
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with log_file(path):
            yield path
    except BaseException:
        path.unlink(missing_ok=True)
        raise


class _LogWriter(io.TextIOBase):
    def __init__(self, logger: logging.Logger):
        self.logger, self.partial = logger, ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        *lines, self.partial = (self.partial + text).split("\n")
        for line in filter(str.strip, lines):
            self.logger.info(line)
        return len(text)


@contextlib.contextmanager
def printed_to_log(name: str):
    """What the block print()s to stdout becomes INFO records of logger `name`: for libraries that report progress
    with print() (DeepSpeed's op builds, zero_to_fp32)."""
    writer = _LogWriter(logging.getLogger(name))
    try:
        with contextlib.redirect_stdout(writer):
            yield
    finally:
        writer.write("\n")


def comma_list(text: str) -> tuple[str, ...]:
    """An argparse type: comma-separated names (label columns, probes to skip), blanks dropped."""
    return tuple(c.strip() for c in text.split(",") if c.strip())


def add_verbose_flag(parser) -> None:
    """--verbose on a command's parser. `kclip.cli.main` reads it before the command's imports, so that their
    import-time lines obey it too; the parser only lists and accepts it."""
    parser.add_argument("--verbose", action="store_true", help="also show other libraries' log lines, warnings and "
                        "progress bars on the console (otherwise only in the command's log file: RUN/log.txt, OUT.log)")


def progress(total: int | None = None, desc: str | None = None, unit: str = "it", **kwargs):
    """One of kclip's progress bars, with an ETA when `total` is known: on rank 0's stderr, sparser when stderr is a
    file (SLURM logs) so the file stays readable, and only for work that lasts over BAR_DELAY_S (a quick step or a
    command that fails at once leaves no bar behind)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=rank() != 0, dynamic_ncols=True, delay=BAR_DELAY_S,
                mininterval=1.0 if sys.stderr.isatty() else 30.0, **kwargs)


def interrupted(code: int = 130) -> int:
    """The exit code of a command that caught a Ctrl-C and ended cleanly (130: 128 + SIGINT, as a shell reports it).

    A KeyboardInterrupt raised inside code that Python compiled from a string (dataclass and namedtuple definitions
    during imports, library `exec`/`eval` calls) leaves CPython's "unhandled KeyboardInterrupt" flag set even after it
    is caught; at exit, `python -m kclip.cli` then kills itself with SIGINT instead (exit -2: the rare death after the
    abort line). Evaluating a string that completes resets the flag."""
    exec("pass")  # noqa: S102 - a constant string: see the docstring
    return code
