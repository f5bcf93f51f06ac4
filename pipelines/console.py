"""What an operator sees while a night runs: a quiet console, with the full logs in a file.

Default (quiet): one progress line per stage (users done/total, ETA), one summary line per stage and a final
summary. Everything else a night prints (Ray, Prefect, library warnings, tqdm bars, worker output streamed to the
driver, Prefect's temporary server) goes to a log file: file descriptors 1 and 2 are pointed at it for the length
of the night, so even output from C++ and child processes lands there, and the console writes through a copy of
the original stdout. `-v` (verbose) keeps today's behaviour (everything on the console) and still writes the file.

The log file starts in a local folder and moves into the night's run folder (`runs/<run_id>/nightly.log`) once
the night has a run id (`attach_run`); `ship_log` copies it to a remote store and logs it to MLflow.
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from typing import IO

log = logging.getLogger(__name__)
LOG_NAME = "nightly.log"
PROGRESS_EVERY_S = 60.0     # a non-terminal console (pipe, file) gets at most one progress line per stage this often

# defaults for the processes a quiet night starts (Ray workers inherit the driver's environment); library
# warnings are not silenced: they belong in the log file, which is where quiet mode sends them
QUIET_ENV = {
    "RAY_DEDUP_LOGS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",   # a bar per tiny artifact is noise even in a file
}


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else (f"{m}m{s:02d}s" if m else f"{s}s")


class Console:
    """Lines for the operator. `stream` is the real terminal/pipe (not whatever fd 1 points at later)."""

    def __init__(self, stream: IO[str], *, verbose: bool = False, log_path: str | None = None,
                 err: IO[str] | None = None):
        self.stream, self.verbose, self.log_path, self.err = stream, verbose, log_path, err
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self._progress: dict[str, tuple[float, float, int]] = {}   # stage -> (t0, last shown, done at t0)
        self._open_line = False                                     # a \r progress line awaits its end

    def line(self, text: str) -> None:
        if self._open_line:
            self.stream.write("\n")
            self._open_line = False
        self.stream.write(text + "\n")
        self.stream.flush()
        log.info("console: %s", text)   # the log file holds the operator's lines too, in order

    def error(self, text: str) -> None:
        """A line for the console's stderr (fd 2 as it was before the night)."""
        if self.err is None:
            self.line(text)
            return
        if self._open_line:
            self.stream.write("\n")
            self._open_line = False
        self.stream.flush()
        self.err.write(text + "\n")
        self.err.flush()
        log.error("console: %s", text)

    def progress(self, stage: str, done: int, total: int, unit: str = "users") -> None:
        """Items done/total with an ETA: rewritten in place on a terminal, at most every
        PROGRESS_EVERY_S on a pipe."""
        now = time.monotonic()
        t0, shown, done0 = self._progress.setdefault(stage, (now, 0.0, done))
        text = f"  {stage:<11} {done}/{total} {unit}"
        if done > done0 and total > done:
            text += f", ETA {_clock((now - t0) / (done - done0) * (total - done))}"
        if self.tty:
            self.stream.write("\r" + text.ljust(60))
            self.stream.flush()
            self._open_line = True
        elif now - shown >= PROGRESS_EVERY_S and done < total and now - t0 >= PROGRESS_EVERY_S:
            self.line(text)
            self._progress[stage] = (t0, now, done0)

    def stage_done(self, stage: str, seconds: float, text: str) -> None:
        self._progress.pop(stage, None)
        if self._open_line:
            self.stream.write("\r")
            self._open_line = False
            self.stream.write(" " * 60 + "\r")
        self.line(f"  {stage:<11} {_clock(seconds):>7}  {text}")


_active: Console | None = None


def current() -> Console | None:
    return _active


def progress(stage: str, done: int, total: int, unit: str = "users") -> None:
    """Report items done/total of a stage to the operator's console, if a night has one (no-op otherwise)."""
    if _active is not None:
        _active.progress(stage, done, total, unit)


def _stream_handlers() -> list[logging.StreamHandler]:
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    return [h for lg in loggers for h in lg.handlers
            if type(h) is logging.StreamHandler or (isinstance(h, logging.StreamHandler)
                                                    and not isinstance(h, logging.FileHandler))]


def _log_folder(store_root: str | None) -> str:
    if store_root and "://" not in store_root:
        folder = os.path.join(os.path.abspath(store_root), "runs")
    else:   # remote store: a local file, shipped to the store at the end (ship_log)
        folder = os.path.join(tempfile.gettempdir(), "latentpref-logs")
    os.makedirs(folder, exist_ok=True)
    return folder


@contextmanager
def operator_console(*, verbose: bool, store_root: str | None, restore: bool = True):
    """The night's console: quiet unless `verbose`; all output also (quiet: only) in a log file.

    Args:
        verbose: keep every log line on the console (today's behaviour, `-v`).
        store_root: a local store gets the log file inside its `runs/` folder from the start.
        restore: point fds 1/2 back at the console on exit (False: leave them on the log file, so noise at
            interpreter exit, such as Prefect's temporary server stopping, stays out of the console too).
    Yields:
        the Console.
    """
    global _active
    folder = _log_folder(store_root)
    log_path = os.path.join(folder, f".night-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    console_stream = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace")
    console_err = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    file_handler = logging.FileHandler(log_path, encoding="utf-8") if verbose else None
    env_before = {k: os.environ.get(k) for k in QUIET_ENV}
    root = logging.getLogger()
    level_before = root.level
    swapped: list[tuple[logging.StreamHandler, IO[str]]] = []
    streams_before = (sys.stdout, sys.stderr)
    log_text = None
    if not verbose:
        for k, v in QUIET_ENV.items():
            os.environ.setdefault(k, v)
        os.dup2(log_fd, 1)   # Python, C++ and child processes alike
        os.dup2(log_fd, 2)
        # Python-level streams too, in case they were replaced (by a test harness, say) and no longer write to
        # fds 1/2; and the log handlers that hold the old ones
        log_text = open(os.dup(log_fd), "w", buffering=1, encoding="utf-8", errors="replace", closefd=True)
        for handler in _stream_handlers():
            if handler.stream in streams_before:
                swapped.append((handler, handler.setStream(log_text)))
        sys.stdout = sys.stderr = log_text
        if not any(h for h, _ in swapped if h in root.handlers):   # root logs nowhere we see: into the file
            file_handler = logging.StreamHandler(log_text)
            file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            root.addHandler(file_handler)
    else:
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(file_handler)
    root.setLevel(min(level_before or logging.WARNING, logging.INFO))
    logging.captureWarnings(True)
    _active = Console(console_stream, verbose=verbose, log_path=log_path, err=console_err)
    try:
        yield _active
    finally:
        _active = None
        sys.stdout.flush()
        sys.stderr.flush()
        if restore:
            sys.stdout, sys.stderr = streams_before
            for handler, stream in swapped:
                handler.setStream(stream)
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            if file_handler is not None:
                root.removeHandler(file_handler)
                file_handler.close()
            if log_text is not None:
                log_text.close()
            for k, v in env_before.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        for fd in (*saved, log_fd):
            os.close(fd)
        if restore:
            logging.captureWarnings(False)
            root.setLevel(level_before)
        console_stream.close()
        console_err.close()


def attach_run(store, run_id: str) -> str | None:
    """Move the night's log file into its run folder (local stores; the open descriptors follow the rename).
    Returns the log file's path."""
    console = _active
    if console is None or not console.log_path:
        return None
    if store.is_local:
        target = store.url("runs", run_id, LOG_NAME)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        try:
            os.replace(console.log_path, target)
            console.log_path = target
        except OSError as err:   # another filesystem: keep writing where it is
            log.warning("night log stays at %s (%s)", console.log_path, err)
    return console.log_path


def ship_log(store, run_id: str) -> str | None:
    """Copy the log so far to a remote store's run folder and to MLflow (artifact `logs/nightly.log`).
    Best effort: a night never fails for its log. Returns where the log is (store URL or local path)."""
    console = _active
    if console is None or not console.log_path or not os.path.exists(console.log_path):
        return None
    sys.stdout.flush()
    sys.stderr.flush()
    where = console.log_path
    try:
        if not store.is_local:
            with open(console.log_path, "rb") as fh:
                store.write_bytes(fh.read(), "runs", run_id, LOG_NAME)
            where = store.url("runs", run_id, LOG_NAME)
    except Exception as err:  # noqa: BLE001
        log.warning("could not copy the night log to the store: %s", err)
    try:
        import shutil

        import mlflow
        with tempfile.TemporaryDirectory() as d:   # the artifact is called nightly.log whatever the local name
            shutil.copyfile(console.log_path, os.path.join(d, LOG_NAME))
            mlflow.MlflowClient().log_artifact(run_id, os.path.join(d, LOG_NAME), artifact_path="logs")
    except Exception as err:  # noqa: BLE001
        log.warning("could not log the night log to MLflow: %s", err)
    return where
