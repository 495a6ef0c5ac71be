"""Shared across the test modules: every module runs its torch work on one thread, and the
expensive things several modules need are made once per session.

Session fixtures (treat what they return as read-only; copy a run with ``copy_run`` before
writing into it):

- ``tiny_digits_run``: a real 30-step tiny-preset training run on scikit-learn's digits.
- ``encode_checkpoint``: its checkpoint with spread-out EMA posterior biases (tests/test_encode.py).
- ``torchrun_session``: one torchrun launch (2 gloo ranks) running every two-rank check of the suite
  (tests/torchrun_worker.py).
- ``gpu_check_dry_run``: ``benchmarks/gpu_check.sh --dry-run`` (tests/test_gpu_check.py).

The last two are subprocesses that leave the pytest process idle. When the session's tests need
them they start in the background as the session begins (one after the other, on the core the
single-threaded pytest process leaves free), and a test waits for the result when it gets there.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import pixels

ROOT = Path(__file__).resolve().parents[1]
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@contextlib.contextmanager
def single_thread():
    """Torch on one intra-op thread inside the block (session fixtures are set up before the
    module's ``one_thread`` fixture below)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Run each module's tiny models on one intra-op thread, restored afterwards.

    At these sizes thread hand-offs cost more than the arithmetic, and on a busy 2-core
    machine two OpenMP threads per process oversubscribe it (measured: 10-20x slower).
    """
    with single_thread():
        yield


def copy_run(src: Path, dst: Path) -> Path:
    """A private copy of a (session) run directory, to write into."""
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------- trained runs


@pytest.fixture(scope="session")
def tiny_digits_run(tmp_path_factory) -> Path:
    """A run directory with one real tiny checkpoint: 30 steps of 32 digits (8x8x1), on the CPU.

    Shared by every module that needs "a trained tiny model" without caring which: read-only.
    """
    from vdvae_latents.train.loop import train
    from vdvae_latents.train.run_config import resolve_run_config

    run = resolve_run_config(preset="tiny", data="digits")
    run = replace(run, train=replace(run.train, steps=30, batch_size=32, val_limit=16, log_every=10, device="cpu"))
    run_dir = tmp_path_factory.mktemp("tiny30") / "run"
    with single_thread():
        result = train(run_dir, run, quiet=True)
    assert result.step == 30 and result.checkpoint is not None
    return run_dir


def rewrite_checkpoint(path: Path, *, spread_posterior_biases: float | None = None, seed: int = 1,
                       drop_optimizer: bool = False) -> Path:
    """Rewrite a checkpoint in place: optionally add N(0, spread^2) noise to the EMA posterior
    biases (so the KL of the variates is far from zero and well separated, and the posterior
    means carry signal), optionally without the optimizer state (which nothing but resuming
    reads; without it the file loads about 2.5x faster)."""
    from vdvae_latents.model.checkpoints import load_checkpoint, save_checkpoint

    payload = load_checkpoint(path)
    if spread_posterior_biases is not None:
        g = torch.Generator().manual_seed(seed)
        for key, value in payload["ema"].items():
            if key.endswith("posterior_params.bias"):
                payload["ema"][key] = value + torch.randn(value.shape, generator=g) * spread_posterior_biases
    if drop_optimizer:
        payload.pop("optimizer", None)
    for key in ("format", "format_version"):
        payload.pop(key, None)
    save_checkpoint(path, payload)
    return path


@pytest.fixture(scope="session")
def encode_checkpoint(tiny_digits_run, tmp_path_factory) -> Path:
    """The 30-step checkpoint with its EMA posterior biases spread out (N(0, 0.7^2), seed 1) and
    no optimizer state: what tests/test_encode.py encodes. Read-only (its run directory too)."""
    from vdvae_latents.model.checkpoints import latest_checkpoint

    run_dir = copy_run(tiny_digits_run, tmp_path_factory.mktemp("enc") / "run")
    return rewrite_checkpoint(latest_checkpoint(run_dir), spread_posterior_biases=0.7, drop_optimizer=True)


# ----------------------------------------------------------------------------- background subprocesses


class _Job:
    """A subprocess a test asks for the result of; it runs at most once per session.

    ``prepare(**args)`` (called on the main thread) makes its folder and returns
    ``(argv, cwd, env, timeout, extra fields for the result)``; ``run`` may then be called on
    another thread, and ``result`` waits for it (or runs it, when nothing started it).
    """

    def __init__(self, prepare) -> None:
        self._prepare = prepare
        self._spec = None
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._result: SimpleNamespace | None = None

    def prepare(self, **args) -> None:
        if self._spec is None:
            self._spec = self._prepare(**args)

    def run(self) -> SimpleNamespace:
        with self._lock:
            if self._result is None:
                argv, cwd, env, timeout, extra = self._spec
                try:
                    self._proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                                  stderr=subprocess.PIPE, text=True)
                    try:
                        out, err = self._proc.communicate(timeout=timeout)
                    except subprocess.TimeoutExpired:
                        self._proc.kill()
                        out, err = self._proc.communicate()
                        err += f"\n(killed after {timeout} s)"
                    self._result = SimpleNamespace(returncode=self._proc.returncode, stdout=out, stderr=err, **extra)
                except BaseException as exc:  # noqa: BLE001 - reported to the test that asks
                    self._result = SimpleNamespace(returncode=None, stdout="", stderr=repr(exc), **extra)
            return self._result

    def result(self, **args) -> SimpleNamespace:
        self.prepare(**args)
        return self.run()

    def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()


class _Jobs:
    """The session's subprocess jobs; ``start`` runs some of them in order on a background thread."""

    def __init__(self) -> None:
        self.jobs: dict[str, _Job] = {}
        self._thread: threading.Thread | None = None

    def add(self, name: str, prepare) -> None:
        self.jobs[name] = _Job(prepare)

    def start(self, names: list[str]) -> None:
        if names:
            self._thread = threading.Thread(target=lambda: [self.jobs[n].run() for n in names], daemon=True)
            self._thread.start()

    def close(self) -> None:
        for job in self.jobs.values():
            job.kill()
        if self._thread is not None:
            self._thread.join(timeout=60)


@pytest.fixture(scope="session")
def _jobs(tmp_path_factory):
    jobs = _Jobs()

    def torchrun(encode_checkpoint: Path):
        out = tmp_path_factory.mktemp("torchrun")
        data = out / "d.npy"
        np.save(data, pixels(40, 4, 4, 1, seed=5))  # train split: 32 images, 4 batches of 8
        encode_run = encode_checkpoint.parent.parent
        encode_out = out / "ddp.zarr"
        argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(_free_port()), str(ROOT / "tests" / "torchrun_worker.py"), str(out), str(data),
                str(encode_run), str(encode_out)]
        return argv, ROOT, SUBPROCESS_ENV, 600, {"out": out, "encode_run": encode_run, "encode_out": encode_out}

    def gpu_check():
        out = tmp_path_factory.mktemp("gpu_check")
        env = {"PYTHON": sys.executable, "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
        argv = ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(out)]
        return argv, None, env, 600, {"out": out}

    jobs.add("torchrun_session", torchrun)
    jobs.add("gpu_check_dry_run", gpu_check)
    yield jobs
    jobs.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session", autouse=True)
def _start_background_jobs(request, _jobs):
    """Start the jobs the collected tests will ask for (not under pytest-xdist, where every worker
    collects every test: there each job starts when a test first asks for it)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    wanted = {name for item in request.session.items for name in getattr(item, "fixturenames", ())}
    names = [n for n in _jobs.jobs if n in wanted]
    for name in names:
        args = {"encode_checkpoint": request.getfixturevalue("encode_checkpoint")} if name == "torchrun_session" \
            else {}  # the launch encodes the checkpoint, so it is trained first, here
        _jobs.jobs[name].prepare(**args)
    _jobs.start(names)


@pytest.fixture(scope="session")
def torchrun_session(_jobs, encode_checkpoint) -> SimpleNamespace:
    """tests/torchrun_worker.py under torchrun (2 gloo ranks): returncode, stdout, stderr, out (its
    folder), encode_run and encode_out (the store its `encode` part wrote)."""
    return _jobs.jobs["torchrun_session"].result(encode_checkpoint=encode_checkpoint)


@pytest.fixture(scope="session")
def gpu_check_dry_run(_jobs) -> SimpleNamespace:
    """benchmarks/gpu_check.sh --dry-run --out OUT: returncode, stdout, stderr, out."""
    return _jobs.jobs["gpu_check_dry_run"].result()
