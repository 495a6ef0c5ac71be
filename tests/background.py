"""Subprocess fixtures that run in the background while the session's in-process tests run.

A test that only waits for a subprocess (a torchrun launch, a real ``python -m vdvae_latents``,
a worker that kills itself) leaves the single-threaded pytest process idle and the second core
unused. Declared with ``@subprocess_fixture``, such a subprocess becomes a session fixture whose
value is the finished process (``returncode``, ``stdout``, ``stderr`` and the fields its prepare
function adds). When the session's tests use it, ``start`` (called by tests/conftest.py as the
session begins) runs every such subprocess in turn on one background thread, in the order the
tests will want them; a test that gets there first waits for it, or runs it itself if its turn
has not come.

    @subprocess_fixture
    def my_process(request):          # called on the main thread, before the process starts
        out = request.getfixturevalue("tmp_path_factory").mktemp("mine")
        return [sys.executable, ...], cwd, env, timeout_s, {"out": out}

    def test_it(my_process):
        assert my_process.returncode == 0, my_process.stderr

``prepare`` may only ask ``request`` for session fixtures of pytest or tests/conftest.py. It may
instead return a function, which then runs on the background thread and returns the value (for
a subprocess that the test has to watch, say to kill it at the right moment; start it with
``preexec_fn=lower_priority``, as the subprocesses here are, below the in-process tests).
"""

from __future__ import annotations

import fcntl
import json
import os
import queue
import subprocess
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest


def shared_root(tmp_path_factory) -> Path:
    """The session's temporary folder that every pytest-xdist worker sees (each worker's basetemp
    is a folder of it); the basetemp itself without xdist."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@contextmanager
def first_worker_makes(tmp_path_factory, name: str):
    """``with first_worker_makes(f, "x") as (folder, make):`` -- ``folder`` is the same for every
    worker; ``make`` is true in the one worker that gets there first, which fills the folder while
    the others wait at the ``with`` for it to finish; then they find it made."""
    root = shared_root(tmp_path_factory)
    folder, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        make = not done.exists()
        if make:
            folder.mkdir(exist_ok=True)
        yield folder, make
        if make:
            done.touch()


def lower_priority() -> None:
    """``preexec_fn`` of the background subprocesses: a little below the pytest process, which runs
    the in-process tests meanwhile (``nice 5``), so that when both want a core the tests get it
    (on two cores a two-rank torchrun launch would otherwise take a third of it)."""
    os.nice(5)


class Job:
    """One subprocess, run at most once per session."""

    def __init__(self, prepare, name: str) -> None:
        self._prepare = prepare
        self._name = name
        self._spec = None
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._result: SimpleNamespace | None = None

    def prepare(self, request) -> None:
        if self._spec is None:
            self._spec = self._prepare(request)

    def run(self) -> SimpleNamespace:
        with self._lock:
            if self._result is None and callable(self._spec):
                self._result = self._spec()
            if self._result is None:
                argv, cwd, env, timeout, extra = self._spec
                # Files, not pipes: a process killed with children (a DataLoader worker) leaves them
                # holding its pipes open, and reading those would wait for the children to notice.
                with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
                    note = ""
                    try:
                        self._proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=err, text=True,
                                                      preexec_fn=lower_priority)
                        try:
                            self._proc.wait(timeout=timeout)
                        except subprocess.TimeoutExpired:
                            self._proc.kill()
                            self._proc.wait()
                            note = f"\n(killed after {timeout} s)"
                        returncode = self._proc.returncode
                    except BaseException as exc:  # noqa: BLE001 - reported to the test that asks
                        returncode, note = None, repr(exc)
                    out.seek(0)
                    err.seek(0)
                    self._result = SimpleNamespace(returncode=returncode, stdout=out.read(), stderr=err.read() + note,
                                                   **extra)
            return self._result

    def result(self, request) -> SimpleNamespace:
        if not os.environ.get("PYTEST_XDIST_WORKER"):
            self.prepare(request)
            return self.run()
        # Under pytest-xdist the first worker to ask runs the process and the others read its result
        # (paths in it point into that worker's temp folder, which they can read). A process to watch
        # in place (``prepare`` returned a function) has no saved result and runs in every worker.
        if self._result is None:
            factory = request.getfixturevalue("tmp_path_factory")
            with first_worker_makes(factory, f"job-{self._name}") as (folder, make):
                saved = folder / "result.json"
                if make or not saved.exists():
                    self.prepare(request)
                    self.run()
                    if make and not callable(self._spec):
                        _save(self._result, saved)
                else:
                    self._result = _load(saved)
        return self._result

    def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()


def _save(result: SimpleNamespace, path: Path) -> None:
    fields = vars(result)
    path.write_text(json.dumps({"values": {k: str(v) if isinstance(v, Path) else v for k, v in fields.items()},
                                "paths": [k for k, v in fields.items() if isinstance(v, Path)]}))


def _load(path: Path) -> SimpleNamespace:
    saved = json.loads(path.read_text())
    return SimpleNamespace(**{k: Path(v) if k in saved["paths"] else v for k, v in saved["values"].items()})


JOBS: dict[str, Job] = {}
_thread: threading.Thread | None = None


def subprocess_fixture(prepare, name: str | None = None):
    """Make ``prepare(request) -> (argv, cwd, env, timeout_s, extra fields)`` a session fixture
    (named ``name``, by default after it) whose value is the finished subprocess."""
    name = name or prepare.__name__
    job = JOBS.setdefault(name, Job(prepare, name))

    @pytest.fixture(scope="session", name=name)
    def fixture(request):
        return job.result(request)

    fixture.__doc__ = prepare.__doc__
    return fixture


def start(request) -> None:
    """Start, on one background thread, the jobs the session's tests use, first needed first.

    Each job is prepared on the main thread and then queued, so the thread runs the first jobs while
    the main thread prepares later ones (the torchrun launch needs a trained checkpoint first).
    Not under pytest-xdist: there every worker collects every test, so each job runs when a test
    first asks for it, in the first worker that asks (``Job.result``)."""
    global _thread
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    first_use: dict[str, int] = {}
    for i, item in enumerate(request.session.items):
        for name in getattr(item, "fixturenames", ()):
            if name in JOBS:
                first_use.setdefault(name, i)
    names = sorted(first_use, key=first_use.get)
    if not names:
        return
    todo: queue.Queue = queue.Queue()

    def worker() -> None:
        while (name := todo.get()) is not None:
            JOBS[name].run()

    _thread = threading.Thread(target=worker, daemon=True)
    _thread.start()
    try:
        for name in names:
            try:
                JOBS[name].prepare(request)  # on the main thread: may make session fixtures (a trained run)
            except Exception:  # noqa: BLE001 - the tests that use the job get the error when they ask for it
                continue
            todo.put(name)
    finally:
        todo.put(None)


def close() -> None:
    for job in JOBS.values():
        job.kill()
    if _thread is not None:
        _thread.join(timeout=60)
