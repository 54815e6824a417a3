"""What a run prints, and where the rest goes.

The console shows this package's lines: the stage lines (`[diffinf] stage train: ...`), the
lines our Ray workers tag (`[train] epoch 2/8 ...`, `[autoencoder] step ...`; each once: Ray
Train's print patch makes a worker print them twice), warnings of this package on the driver
and on local workers, a progress line for a stage that runs long (`stage_progress`), and the
final summary.

Everything Ray says goes to a log file under the run root, `<root>/logs/ray-<time>-<pid>.log`,
named on the console at start: its driver-side Python loggers (`ray`, `ray.data`: start-up,
Ray Data execution plans and progress) and every line its workers, actors and daemons print
(Train's `TrainingReport(...)` dumps, the placement-group cleaner's repeated "Failed to query
Ray Train Controller actor state", raylet warnings, worker tracebacks). An S3 run root gets the
file copied to `<root>/logs/` when the session ends (written to the local temp dir meanwhile).
`--verbose` (`set_verbose`) leaves Ray's console output as it was and still writes the file.

Ray's worker lines are taken from its driver-side dispatcher (`ray._private.ray_logging`), the
only place they all pass; where a Ray version lacks it, they stay on the console (a warning
says so).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

# A line our workers print for the console: "[train] epoch 1/2 ...", "[baselines:elr] ...",
# "[diffinf] WARNING ...". Ray's own bracketed lines start with a digit ("[2026-12-01 ...]") or
# a capital ("[Ray ...").
TAGGED = re.compile(r"^\[[a-z][\w.:-]*\] ")
# Cluster messages that are only noise on a small or busy machine (still in the log file).
CLUSTER_NOISE = ("PYTHON worker processes have been started",)
_RAY_HANDLER = "ray_print_logs"  # Ray's name for its worker-log printer (worker.py)
_FILE_FORMAT = "%(asctime)s\t%(levelname)s %(name)s -- %(message)s"

_verbose = False
_active: RayLogRouter | None = None
last_log_file: str | None = None  # where the last session's Ray logs went (for error hints)


def set_verbose(flag: bool) -> None:
    """`--verbose`: Ray's logs on the console too, as Ray prints them."""
    global _verbose
    _verbose = bool(flag)


def is_verbose() -> bool:
    return _verbose


def for_console(line: str) -> bool:
    """Whether a worker's line belongs on the console (a tagged line of this package)."""
    return bool(TAGGED.match(line))


def _autoscaler_events(lines: list[str]) -> list[str]:
    """The autoscaler's events among its status lines (Ray's own filter; all lines where it
    cannot tell, e.g. before the GCS is reachable)."""
    try:
        from ray._private.worker import filter_autoscaler_events

        return list(filter_autoscaler_events(lines))
    except Exception:  # noqa: BLE001 - an unfiltered status dump is better than none
        return lines


def _source(data: dict) -> str:
    """Ray's prefix for a worker's lines: "RayTrainWorker pid=123" (or the task's name)."""
    name = data.get("actor_name") or data.get("task_name") or ""
    ip = data.get("ip")
    where = "" if ip == data.get("localhost") else f", ip={ip}"
    return f"{name} pid={data.get('pid')}{where}".strip()


class _ProgressNote(logging.Filter):
    """Remembers Ray Data's last "Total Progress: n/N" (the stage progress line shows it)."""

    def __init__(self):
        super().__init__()
        self.last: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("Total Progress:") and not message.startswith("Total Progress: 0/"):
            self.last = message.replace("Total Progress:", "Ray Data rows").strip()
        return True


class RayLogRouter:
    """Ray's driver loggers and worker lines into `path`; on the console only `for_console`
    lines (each once), or everything as before when `verbose`."""

    def __init__(self, path: Path, verbose: bool = False, console=None):
        self.path = Path(path)
        self.verbose = verbose
        self.console = console  # a stream; None: sys.stdout at the time of writing
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
        self._lock = threading.Lock()
        self._shown: deque[tuple] = deque(maxlen=256)
        self.progress = _ProgressNote()
        self.file_handler = logging.StreamHandler(self._file)
        self.file_handler.setLevel(logging.INFO)  # what Ray showed on the console before
        self.file_handler.setFormatter(logging.Formatter(_FILE_FORMAT))
        self.file_handler.addFilter(self.progress)
        self._moved: list[tuple[logging.Logger, logging.Handler]] = []
        self._added: list[logging.Logger] = []
        self._ray_printer = None
        self._ray_messages = None  # Ray's print_to_stdstream, while ours replaces it

    # -- worker lines (Ray's log-monitor batches: {"lines", "pid", "actor_name", ...}) ------
    def on_worker_lines(self, data: dict) -> None:
        lines = data.get("lines") or []
        if data.get("pid") == "autoscaler":  # its status dumps: only the events Ray would print
            lines = list(_autoscaler_events(lines))
        source = _source(data)
        with self._lock:
            for line in lines:
                self._file.write(f"({source}) {line}\n")
        if self.verbose and self._ray_printer is not None:
            self._ray_printer(data)
            return
        shown = []
        with self._lock:
            for line in lines:
                key = (data.get("pid"), line)
                if for_console(line) and key not in self._shown:
                    self._shown.append(key)
                    shown.append(line)
        if shown:
            out = self.console or sys.stdout
            out.write("".join(f"{line}\n" for line in shown))
            out.flush()

    def on_cluster_message(self, data: dict, ignore_prefix: bool = False) -> None:
        """A message the cluster pushes to the driver ("(raylet) ..."): into the file; on the
        console too unless it is known noise (or as Ray prints it, when verbose)."""
        with self._lock:
            for line in data.get("lines") or []:
                self._file.write(f"({data.get('pid')}) {line}\n")
        text = " ".join(data.get("lines") or [])
        if self._ray_messages is not None and (
                self.verbose or not any(noise in text for noise in CLUSTER_NOISE)):
            self._ray_messages(data, ignore_prefix)

    def capture_worker_lines(self) -> bool:
        """Take over Ray's printers of worker lines and cluster messages (after `ray.init`).
        False where this Ray version has neither."""
        try:
            import ray._private.worker as ray_worker
            from ray._private.ray_logging import global_worker_stdstream_dispatcher as disp
        except ImportError:
            return False
        with disp._lock:
            found = [h for name, h in disp.handlers if name == _RAY_HANDLER]
            if not found:
                return False
            self._ray_printer = found[0]
            # under Ray's name, so that ray.shutdown removes it as it removes its own
            disp.handlers = [(n, h) for n, h in disp.handlers if n != _RAY_HANDLER]
            disp.handlers.append((_RAY_HANDLER, self.on_worker_lines))
        if callable(getattr(ray_worker, "print_to_stdstream", None)):
            # the raylet's messages reach the driver through this module global
            self._ray_messages = ray_worker.print_to_stdstream
            ray_worker.print_to_stdstream = self.on_cluster_message
        return True

    # -- the driver's Ray loggers -----------------------------------------------------------
    def route_loggers(self) -> None:
        """Give every `ray*` logger that has handlers our file handler; unless verbose, its
        console handlers are taken off (an ERROR still reaches the console)."""
        names = ["ray", *(n for n in logging.root.manager.loggerDict if n.startswith("ray."))]
        for name in names:
            logger = logging.getLogger(name)
            if not logger.handlers or self.file_handler in logger.handlers:
                continue
            logger.addHandler(self.file_handler)
            self._added.append(logger)
            if self.verbose:
                continue
            moved = [h for h in logger.handlers if h is not self.file_handler and _to_console(h)]
            for handler in moved:
                logger.removeHandler(handler)
                self._moved.append((logger, handler))
            if moved:
                logger.addHandler(_errors_to_console())

    def close(self) -> None:
        """Put Ray's printer and loggers back and close the file (call after ray.shutdown)."""
        if self._ray_messages is not None:
            import ray._private.worker as ray_worker

            ray_worker.print_to_stdstream = self._ray_messages
            self._ray_messages = None
        for logger in self._added:
            logger.removeHandler(self.file_handler)
            for handler in [h for h in logger.handlers if getattr(h, "_diffinf_errors", False)]:
                logger.removeHandler(handler)
        for logger, handler in self._moved:
            logger.addHandler(handler)
        self._moved.clear()
        self._added.clear()
        with self._lock:
            self._file.close()


def _to_console(handler: logging.Handler) -> bool:
    """A handler that writes to the terminal (stderr/stdout), not to a file."""
    if isinstance(handler, logging.FileHandler) or not isinstance(handler, logging.StreamHandler):
        return False
    return getattr(handler, "stream", None) in (sys.stderr, sys.stdout, sys.__stderr__,
                                                sys.__stdout__) or type(handler).__name__ in (
        "PlainRayHandler", "_StderrHandler")


def _errors_to_console() -> logging.Handler:
    handler = logging.StreamHandler()
    handler.setLevel(logging.ERROR)
    handler.setFormatter(logging.Formatter("[ray] %(message)s"))
    handler._diffinf_errors = True
    return handler


# -- one Ray session's log file ------------------------------------------------------------


def log_file_for(root) -> tuple[Path, object | None]:
    """(local file to write, S3 `Location` to copy it to at the end or None) for a session
    whose run root is `root` (a RunRoot or Location)."""
    name = f"ray-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    if root.is_local:
        return Path(root.path) / "logs" / name, None
    return Path(tempfile.gettempdir()) / "diffinf-logs" / name, root.child("logs", name)


@contextmanager
def routed_ray_logs(root) -> Iterator[RayLogRouter]:
    """Route Ray's logs into a file under run root `root` for the `with` block. Call before
    `ray.init` (its start-up lines go to the file) and call `.capture_worker_lines()` on the
    router after it."""
    global _active, last_log_file
    path, upload = log_file_for(root)
    router = RayLogRouter(path, verbose=_verbose)
    router.route_loggers()
    last_log_file = str(path)
    where = f"{path} (copied to {upload} at the end)" if upload is not None else str(path)
    log.info("Ray's logs: %s%s", where, "" if _verbose else " (--verbose: here too)")
    _active = router
    try:
        yield router
    finally:
        _active = None
        router.close()
        if upload is not None:
            try:
                upload.write_bytes(path.read_bytes())
                last_log_file = upload.display
            except Exception as err:  # noqa: BLE001 - a lost copy must not mask the run's result
                log.warning("could not copy Ray's logs to %s: %s (kept at %s)", upload, err, path)


def _elapsed(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


@contextmanager
def stage_progress(stage: str, first_s: float = 60.0, max_s: float = 600.0) -> Iterator[None]:
    """While the block runs, a line "stage X: running, N min elapsed" (with Ray Data's row
    count when the driver runs a dataset) after `first_s`, then at doubling intervals up to
    every `max_s`: one progress indication per stage, however many datasets it runs."""
    stop = threading.Event()
    started = time.monotonic()
    note = _active.progress if _active is not None else None
    if note is not None:
        note.last = None

    def beat() -> None:
        wait = first_s
        while not stop.wait(wait):
            rows = f"; {note.last}" if note is not None and note.last else ""
            log.info("stage %s: running, %s elapsed%s", stage,
                     _elapsed(time.monotonic() - started), rows)
            wait = min(wait * 2, max_s)

    thread = threading.Thread(target=beat, name=f"progress-{stage}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def tag_worker_logs() -> None:
    """In a Ray worker, this package's warnings print as "[diffinf] WARNING ..." lines, which
    reach the console (plain, Ray prints a worker's log records as bare messages, and they
    would only be in the log file). Called when the package is imported (__init__.py); a
    no-op outside Ray workers. (Not Ray's worker_process_setup_hook: a runtime env that is not
    empty makes every worker start through the runtime-env agent, slower on a small box.)"""
    ray_worker = sys.modules.get("ray._private.worker")  # imported first in a Ray worker
    mode = getattr(getattr(ray_worker, "global_worker", None), "mode", None)
    if mode is None or mode != getattr(ray_worker, "WORKER_MODE", None):
        return
    logger = logging.getLogger("diffinf_ray")
    if any(getattr(h, "_diffinf_tag", False) for h in logger.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("[diffinf] %(levelname)s %(message)s"))
    handler._diffinf_tag = True
    logger.addHandler(handler)  # still propagated: the worker's own log keeps its record
