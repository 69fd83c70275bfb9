"""A pool of killable worker processes: what rewards and tools run in, so no plugin can hang or kill a run.

Workers are fresh interpreters (`sys.executable -c ...`), not forks and not multiprocessing's spawn:
spawn re-imports the host's `__main__` in every child (a training script, Ray's default_worker), while a
plain interpreter imports only the plugins. Each worker calls a *setup* (`module:function`, given the
pool's payload) once, which loads the plugins and returns the function that serves tasks; each worker has
its own main thread, so plugins that need one (math-verify's SIGALRM) are safe whichever thread submits.

    pool = WorkerPool("posttrain.rewards.runtime:serve_rewards", plugins, size=2, timeout_s=10)
    future = pool.submit(task)          # Future of the serve function's answer, or a `Lost`
    answers = pool.run([task1, task2])  # submit and wait, in order

Policy: at most `size` tasks run at once, in submission order; one more worker stands by, loaded, to take
over from a killed one at once. A task past its time limit has its worker SIGKILLed (with everything it
started) and replaced, and answers `Lost(TIMEOUT)`; a worker that dies mid-task answers `Lost(CRASH)`.
Neither is retried: the time is spent. A serve function reports its plugins' own exceptions and invalid
outputs in its answer (the pool never sees them). Setups that fail to load surface at construction as
the pool's `load_error`; replacement workers that keep dying while loading end the pool the same way.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing.connection import Connection, Pipe, wait
from typing import Any

from posttrain.plugins import PluginLoadError, load_object

logger = logging.getLogger(__name__)

TIMEOUT, EXCEPTION, CRASH, INVALID = "timeout", "exception", "crash", "invalid"
FAILURES = (TIMEOUT, EXCEPTION, CRASH, INVALID)
"""How a plugin call can fail: past its time limit, raised, killed its worker, or returned garbage."""
STARTUP_TIMEOUT_S = 120.0
"""Time a worker gets to import and warm up its plugins (plugins may import heavy libraries)."""
MAX_LOAD_DEATHS = 3
"""Replacement workers that may die while loading, in a row, before the pool gives up."""
STANDBY = 1
"""Workers kept beyond `size`, loaded and idle, so a killed worker's tasks move on at once instead of
waiting the ~1 s a fresh worker needs to import and warm up its plugins."""
POLL_S = 0.25
"""How often busy workers are checked for death when no message arrives."""
_BOOT = "import sys; from posttrain.rewards.pool import worker_main; worker_main(int(sys.argv[1]))"


@dataclass(frozen=True)
class Lost:
    """A task that produced no answer: its worker was killed past the time limit or died."""

    failure: str  # TIMEOUT or CRASH
    message: str


def describe(err: BaseException) -> str:
    """`Type: message at file:line` of the innermost frame, for logs and for answers to the model."""
    frames = traceback.extract_tb(err.__traceback__)
    where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    return f"{type(err).__name__}: {err}{where}"


# ------------------------------------------------------------------------------------------------ worker


def worker_main(fd: int) -> None:
    """Entry point of a worker process: run the setup named in the first message, then serve tasks."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it kills us
    _exit_with_parent(os.getppid())
    conn = Connection(fd)
    try:
        setup, payload = conn.recv()
    except EOFError:
        return
    try:
        serve = load_object(setup)(payload)
    except PluginLoadError as err:
        conn.send(("load_error", str(err)))
        return
    except Exception as err:
        conn.send(("load_error", f"worker setup {setup} failed: {describe(err)}"))
        return
    conn.send(("ready",))
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        conn.send(("done", serve(task)))


def _exit_with_parent(parent_pid: int) -> None:
    """Workers live in their own session (so killing one takes its children too): exit when orphaned."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


# ------------------------------------------------------------------------------------------------ parent


@dataclass
class _Job:
    task: Any
    future: Future[Any]
    timeout_s: float


class _Worker:
    def __init__(self, setup: str, payload: Any) -> None:
        self.conn, child = Pipe()
        # The worker imports what this process can import, and nothing from its __main__.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) or os.getcwd() for p in sys.path)}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _BOOT, str(child.fileno())],
            pass_fds=[child.fileno()],
            env=env,
            start_new_session=True,
        )
        child.close()
        self.conn.send((setup, payload))
        self.ready = False
        self.job: _Job | None = None
        self.deadline = time.monotonic() + STARTUP_TIMEOUT_S

    def exit_reason(self) -> str:
        code = self.proc.poll()
        if code is None:
            return "still running"
        return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # the worker and anything it started
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        self.conn.close()


def _kill_all(workers: list[_Worker]) -> None:
    for worker in workers:
        worker.kill()
    workers.clear()


class WorkerPool:
    """Killable worker processes serving tasks from any thread (`submit` is thread-safe); a background
    thread dispatches tasks, enforces time limits and replaces dead workers. Use as a context manager."""

    def __init__(
        self,
        setup: str,
        payload: Any,
        *,
        size: int,
        timeout_s: float,
        what: str = "plugin",
        load_error: Callable[[str], Exception] = PluginLoadError,
    ) -> None:
        """`setup`: 'module:function' called in each worker with `payload`, returning the serve function;
        `what`: the word log lines use ("reward", "tool"); `load_error`: raised when workers cannot load."""
        self.setup, self.payload, self.size, self.timeout_s = setup, payload, size, timeout_s
        self.what, self._load_error = what, load_error
        self.workers: list[_Worker] = []
        self._queue: deque[_Job] = deque()
        self._lock = threading.Lock()
        self._wake_read, self._wake = Pipe(duplex=False)
        self._broken: str | None = None  # why workers cannot load: every task fails with it
        self._load_deaths = 0
        self._closing = False
        self._closed = weakref.finalize(self, _kill_all, self.workers)
        try:
            self.workers.extend(_Worker(setup, payload) for _ in range(size + STANDBY))
            while not all(w.ready for w in self.workers) and self._broken is None:
                self._wait_once()
        except BaseException:
            self._closed()
            raise
        if self._broken is not None:
            self._closed()
            raise load_error(self._broken)
        self._thread = threading.Thread(
            target=self._serve_forever, name=f"posttrain-{what}-pool", daemon=True
        )
        self._thread.start()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Kill the workers; tasks not yet answered fail with RuntimeError."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
        self._poke()
        self._thread.join()
        self._closed()
        self._fail_queued(RuntimeError(f"{self.what} pool is closed"))

    # ----------------------------------------------------------------------------------------- tasks

    def submit(self, task: Any, timeout_s: float | None = None) -> Future[Any]:
        """Queue `task`; its future holds the serve function's answer or a `Lost`."""
        future: Future[Any] = Future()
        with self._lock:
            if self._closing:
                raise RuntimeError(f"{self.what} pool is closed")
            if self._broken is not None:
                raise self._load_error(self._broken)
            self._queue.append(_Job(task, future, timeout_s or self.timeout_s))
        self._poke()
        return future

    def run(self, tasks: Sequence[Any]) -> list[Any]:
        """Answers (or `Lost`) of `tasks`, in order. Interrupted (e.g. KeyboardInterrupt), the tasks not
        yet started are dropped and the running ones' workers replaced: they belong to no caller."""
        futures = [self.submit(task) for task in tasks]
        try:
            return [f.result() for f in futures]
        except BaseException:
            self.abandon(futures)
            raise

    def abandon(self, futures: Sequence[Future[Any]]) -> None:
        mine = set(map(id, futures))
        with self._lock:
            self._queue = deque(j for j in self._queue if id(j.future) not in mine)
            for worker in self.workers:
                if worker.job is not None and id(worker.job.future) in mine:
                    worker.deadline = 0.0  # the loop kills and replaces it at once
        for future in futures:
            future.cancel()
        self._poke()

    # ------------------------------------------------------------------------------------------ loop

    def _poke(self) -> None:
        with contextlib.suppress(OSError):
            self._wake.send_bytes(b".")

    def _serve_forever(self) -> None:
        while True:
            with self._lock:
                if self._closing:
                    return
                self._dispatch_queued()
            self._wait_once()

    def _dispatch_queued(self) -> None:
        for i, worker in enumerate(self.workers):
            running = sum(w.job is not None for w in self.workers)
            if not self._queue or running >= self.size:
                return
            if not worker.ready or worker.job is not None:
                continue
            if worker.proc.poll() is not None:  # died while idle: not any task's fault
                logger.warning("%s worker %s while idle; replacing it", self.what, worker.exit_reason())
                self._replace(i)
                continue
            job = self._queue.popleft()
            if job.future.set_running_or_notify_cancel():
                self._send(i, job)

    def _send(self, i: int, job: _Job) -> None:
        worker = self.workers[i]
        worker.job = job
        try:
            worker.conn.send(job.task)
        except OSError:
            self._lost(i, CRASH, f"worker died ({worker.exit_reason()})")
            return
        worker.deadline = time.monotonic() + job.timeout_s

    def _wait_once(self) -> None:
        """Wait for one message, a deadline or a new task, then handle every worker that has news."""
        busy = [w for w in self.workers if w.job is not None or not w.ready]
        timeout = min([POLL_S] + [max(0.0, w.deadline - time.monotonic()) for w in busy])
        readable = wait([self._wake_read] + [w.conn for w in busy], timeout)
        if self._wake_read in readable:
            while self._wake_read.poll():
                self._wake_read.recv_bytes()
        with self._lock:
            for worker in busy:
                i = self.workers.index(worker)
                if worker.conn in readable:
                    self._receive(i)
                elif worker.proc.poll() is not None:
                    self._lost(i, CRASH, f"worker died ({worker.exit_reason()})")
                elif time.monotonic() >= worker.deadline:
                    late = (
                        f"no result within {worker.job.timeout_s:g} s" if worker.job else "not ready in time"
                    )
                    self._lost(i, TIMEOUT, late)

    def _receive(self, i: int) -> None:
        worker = self.workers[i]
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.proc.wait(timeout=1)  # the pipe closed as the process exits: get its status
            self._lost(i, CRASH, f"worker died ({worker.exit_reason()})")
            return
        if message[0] == "load_error":
            self._give_up(message[1])
        elif message[0] == "ready":
            worker.ready = True
            self._load_deaths = 0
        elif worker.job is not None:
            job, worker.job = worker.job, None
            _answer(job.future, message[1])

    def _lost(self, i: int, failure: str, message: str) -> None:
        """Kill worker i and start a replacement; its task (if any) answers `Lost(failure)`."""
        job = self.workers[i].job
        if job is None:
            self._died_loading(message)
        else:
            _answer(job.future, Lost(failure, message))
        self._replace(i)

    def _died_loading(self, message: str) -> None:
        """At start that is the plugins' fault; a replacement may have been killed from outside (e.g. the
        OOM killer), so it gets a few more tries before the pool gives up."""
        self._load_deaths += 1
        if self._thread_started() and self._load_deaths < MAX_LOAD_DEATHS:
            logger.warning("%s worker died while loading (%s); restarting it", self.what, message)
            return
        self._give_up(f"a {self.what} worker failed while loading: {message}")

    def _give_up(self, message: str) -> None:
        """Workers cannot load the plugins: every queued and later task fails with the load error."""
        self._broken = message
        self._fail_queued(self._load_error(message))

    def _fail_queued(self, error: Exception) -> None:
        while self._queue:
            job = self._queue.popleft()
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(error)

    def _thread_started(self) -> bool:
        return hasattr(self, "_thread")

    def _replace(self, i: int) -> None:
        self.workers[i].kill()
        if self._broken is None:
            self.workers[i] = _Worker(self.setup, self.payload)
        else:  # nothing more can load: the pool shrinks to the workers still serving
            del self.workers[i]


def _answer(future: Future[Any], value: Any) -> None:
    if not future.done():  # an abandoned task's future is cancelled
        future.set_result(value)
