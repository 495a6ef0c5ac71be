"""Shared across the test modules: every module runs its torch work on one thread, and the
expensive things several modules need are made once per session.

Session fixtures (treat what they return as read-only; copy a run with ``copy_run`` before
writing into it):

- ``tiny_digits_run``: a real 30-step tiny-preset training run on scikit-learn's digits.
- ``encode_checkpoint``: its checkpoint with spread-out EMA posterior biases (tests/test_encode.py).
- ``torchrun_session``: one torchrun launch (2 gloo ranks) running every two-rank check of the suite
  (tests/torchrun_worker.py).
- ``gpu_check_dry_run``: ``benchmarks/gpu_check.sh --dry-run`` (tests/test_gpu_check.py).
- ``presets_json``: ``vdvl presets --json`` (tests/test_cli_basics.py, tests/test_presets.py).

The last three are subprocess fixtures (tests/background.py): when the session's tests use them
they start in the background as the session begins, on the core the single-threaded pytest
process leaves free, and a test waits for the result when it gets there. Under pytest-xdist
(`make test` runs a worker per core) each runs when a test first asks for it, in that worker.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings
from threadpoolctl import threadpool_limits

import background
from background import first_worker_makes, subprocess_fixture
from helpers import copy_run, pixels, rewrite_checkpoint

# The fuzz suites (tests/test_fuzz_*.py): a fixed, derandomized example budget, so they take the same
# bounded time and find the same inputs in every run (each test sets its own max_examples); an input
# that takes over 10 s (a hang) fails its test.
settings.register_profile("vdvl", derandomize=True, database=None, deadline=10_000, print_blob=True)
settings.load_profile("vdvl")

# numpy's and scipy's OpenBLAS and scikit-learn's OpenMP on one thread for the whole session, as torch
# is below: their worker threads spin while they wait, and beside a second pytest-xdist worker or a
# background subprocess they fought for the two cores (a 0.4 s probe fit took 6.8 s in the suite).
BLAS_ONE_THREAD = threadpool_limits(limits=1)

ROOT = Path(__file__).resolve().parents[1]
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@contextlib.contextmanager
def single_thread():
    """Torch on one intra-op thread inside the block (session fixtures are set up before the
    module's ``one_thread`` fixture below)."""
    import torch  # here, not at the top: pytest-xdist's controller process runs no test and skips its 1.6 s import

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


@pytest.fixture(scope="session", autouse=True)
def _old_temp_folders_removed_in_the_background(pytestconfig, tmp_path_factory):
    """Remove pytest's old numbered temp folders while the tests run instead of after them.

    At exit pytest deletes the folders of all but its last ``tmp_path_retention_count`` sessions;
    one full session leaves some 6,000 files (Zarr chunks), and on a slow disk removing them takes
    seconds to tens of seconds, inside the measured run. This runs the same pytest routine, with the
    same rules (folders of live sessions are locked and kept), on a thread as the session starts;
    at exit pytest then finds nothing left to remove."""
    keep = int(pytestconfig.getini("tmp_path_retention_count"))
    thread = None
    # Under pytest-xdist each worker's basetemp is a folder (popen-gwN) of the session's numbered
    # folder, and one worker is enough to do the cleaning.
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if pytestconfig.option.basetemp is None and keep >= 1 and worker in (None, "gw0") \
            and pytestconfig.getini("tmp_path_retention_policy") != "none":
        try:
            from _pytest.pathlib import LOCK_TIMEOUT, cleanup_numbered_dir
        except ImportError:  # a pytest without them: it cleans up at exit as usual
            pass
        else:
            session_dir = tmp_path_factory.getbasetemp()
            session_dir = session_dir if worker is None else session_dir.parent
            dead_before = session_dir.stat().st_mtime - LOCK_TIMEOUT
            thread = threading.Thread(target=cleanup_numbered_dir, daemon=True,
                                      args=(session_dir.parent, "pytest-", keep, dead_before))
            thread.start()
    yield
    if thread is not None:
        thread.join(timeout=600)


# ----------------------------------------------------------------------------- trained runs


@pytest.fixture(scope="session")
def tiny_digits_run(tmp_path_factory) -> Path:
    """A run directory with one real tiny checkpoint: 30 steps of 32 digits (8x8x1), on the CPU.

    Shared by every module that needs "a trained tiny model" without caring which: read-only.
    Under pytest-xdist the first worker to ask trains it and the others use the same folder.
    """
    from vdvae_latents.train.loop import train
    from vdvae_latents.train.run_config import resolve_run_config

    with first_worker_makes(tmp_path_factory, "tiny30") as (folder, make):
        if make:
            run = resolve_run_config(preset="tiny", data="digits")
            run = replace(run, train=replace(run.train, steps=30, batch_size=32, val_limit=16, log_every=10,
                                             device="cpu"))
            with single_thread():
                result = train(folder / "run", run, quiet=True)
            assert result.step == 30 and result.checkpoint is not None
    return folder / "run"


@pytest.fixture(scope="session")
def encode_data(tmp_path_factory) -> str:
    """The data spec tests/test_encode.py encodes: the first 600 of scikit-learn's digits as an .npz
    (uint8 images and labels; the library's seeded split makes 480 train, 60 val, 60 test images)."""
    from vdvae_latents.data import load_images

    with first_worker_makes(tmp_path_factory, "encode-data") as (folder, make):
        if make:
            digits = load_images("digits", split="all")
            np.savez(folder / "digits600.npz", images=digits.images[:600], labels=digits.labels[:600])
    return str(folder / "digits600.npz")


@pytest.fixture(scope="session")
def encode_checkpoint(tiny_digits_run, tmp_path_factory) -> Path:
    """The 30-step checkpoint with its EMA posterior biases spread out (N(0, 0.7^2), seed 1) and
    no optimizer state: what tests/test_encode.py encodes. Read-only (its run directory too)."""
    from vdvae_latents.model.checkpoints import latest_checkpoint

    with first_worker_makes(tmp_path_factory, "enc") as (folder, make):
        if make:
            run_dir = copy_run(tiny_digits_run, folder / "run")
            rewrite_checkpoint(latest_checkpoint(run_dir), spread_posterior_biases=0.7, drop_optimizer=True)
    return latest_checkpoint(folder / "run")


# ----------------------------------------------------------------------------- background subprocesses


# The longest modules by measured time (the suite's --durations on a 2-core machine, session 30), after
# the background-subprocess ones: under pytest-xdist a worker takes the next module when it finishes
# one, so handing out the longest first leaves only short modules to even out the end (the
# `make test` command keeps pytest-xdist's own reordering, by number of tests, off).
LONGEST_MODULES = ("test_encode", "test_fault_injection", "test_stores", "test_data_streaming", "test_model",
                   "test_probes", "test_sklearn_api", "test_writer_lock", "test_fuzz_files",
                   "test_store_integrity", "test_probe_stream", "test_training", "test_report")


def pytest_collection_modifyitems(session, config, items):
    """Run the modules whose tests wait for background subprocesses last (in their usual order, each
    module's tests together and in order), so that the subprocesses have the rest of the session to
    finish in. Under pytest-xdist, first instead: there the subprocesses run in the foreground of
    the worker that asks (tests/background.py), which makes those modules the longest, and a long
    module handed out last leaves one worker alone at the end; the other long modules follow them.
    The tests do not depend on their order."""
    waits = {item.module for item in items
             if getattr(item, "module", None) is not None
             and any(name in background.JOBS for name in getattr(item, "fixturenames", ()))}
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=lambda item: getattr(item, "module", None) in waits)  # stable within each group
        return
    rank = {name: i for i, name in enumerate(LONGEST_MODULES)}

    def order(item):
        module = getattr(item, "module", None)
        name = getattr(module, "__name__", "").rpartition(".")[2]
        return (module not in waits, rank.get(name, len(rank)))

    items.sort(key=order)


@pytest.fixture(scope="session", autouse=True)
def _background_subprocesses(request):
    """Start the subprocess fixtures the session's tests use (tests/background.py)."""
    background.start(request)
    yield
    background.close()


@subprocess_fixture
def torchrun_session(request):
    """tests/torchrun_worker.py under torchrun (2 gloo ranks): returncode, stdout, stderr, out (its
    folder), encode_run and encode_out (the store its `encode` part wrote, of ``encode_data``)."""
    encode_run = request.getfixturevalue("encode_checkpoint").parent.parent  # trained first, if need be
    encode_data = request.getfixturevalue("encode_data")
    out = request.getfixturevalue("tmp_path_factory").mktemp("torchrun")
    data = out / "d.npy"
    np.save(data, pixels(40, 4, 4, 1, seed=5))  # train split: 32 images, 4 batches of 8
    encode_out = out / "ddp.zarr"
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), str(ROOT / "tests" / "torchrun_worker.py"), str(out), str(data),
            str(encode_run), encode_data, str(encode_out)]
    return argv, ROOT, SUBPROCESS_ENV, 600, {"out": out, "encode_run": encode_run, "encode_out": encode_out}


@subprocess_fixture
def gpu_check_dry_run(request):
    """benchmarks/gpu_check.sh --dry-run --out OUT: returncode, stdout, stderr, out."""
    out = request.getfixturevalue("tmp_path_factory").mktemp("gpu_check")
    env = {"PYTHON": sys.executable, "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    return ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(out)], None, env, 600, \
        {"out": out}


@subprocess_fixture
def presets_json(request):
    """`python -m vdvae_latents presets --json`: returncode, stdout, stderr.

    It builds every preset on the meta device to count its parameters, the slowest command of the
    suite, so it runs once, in the background: tests/test_cli_basics.py checks the command on it and
    tests/test_presets.py takes every preset's parameter count from it (and checks
    ``count_parameters`` itself on a few)."""
    return [sys.executable, "-m", "vdvae_latents", "presets", "--json"], ROOT, SUBPROCESS_ENV, 300, {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
