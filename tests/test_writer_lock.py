"""One writer per run directory or store (vdvae_latents.core.writer_lock).

A second writer is refused at once with one sentence naming the target and the process that
holds it; a killed writer never leaves a stale lock; readers never take the lock; refusals
leave nothing behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from background import subprocess_fixture
from helpers import assert_one_line_error, copy_run, run_cli
from vdvae_latents.core.errors import UserError
from vdvae_latents.core.writer_lock import RUN_LOCK_NAME, WriterLock, check_run_dir_free, lock_run_dir, lock_store

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def hold_in_another_process(run_dir: Path) -> subprocess.Popen:
    """A process that takes ``run_dir``'s writer lock, says so, and sleeps until killed."""
    code = textwrap.dedent(f"""
        import sys, time
        from vdvae_latents.core.writer_lock import lock_run_dir
        lock = lock_run_dir({str(run_dir)!r})
        print("held", flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=ENV)
    assert proc.stdout.readline().strip() == "held"
    return proc


class TestTheLock:
    def test_a_second_writer_in_another_process_is_refused_naming_the_run_and_the_holder(self, tmp_path):
        run = tmp_path / "run"
        holder = hold_in_another_process(run)
        try:
            for attempt in (lambda: lock_run_dir(run), lambda: check_run_dir_free(run)):
                with pytest.raises(UserError) as exc:
                    attempt()
                message = str(exc.value)
                assert str(run) in message and f"process {holder.pid}" in message and "\n" not in message
        finally:
            holder.kill()
            holder.wait()

    def test_kill_9_leaves_no_stale_lock(self, tmp_path):
        run = tmp_path / "run"
        holder = hold_in_another_process(run)
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        assert (run / RUN_LOCK_NAME).exists()  # the file stays after a kill, but nobody holds it
        check_run_dir_free(run)
        with lock_run_dir(run) as lock:
            assert lock.held

    def test_release_deletes_the_lock_file_and_a_new_writer_may_lock(self, tmp_path):
        store = tmp_path / "enc.zarr"
        with lock_store(store) as lock:
            assert lock.lock_file.exists() and lock.lock_file.parent == tmp_path
            record = json.loads(lock.lock_file.read_text())
            assert record["pid"] == os.getpid()
        assert not lock.lock_file.exists()
        with lock_store(store):
            pass

    def test_a_second_writer_in_the_same_process_is_refused(self, tmp_path):
        with lock_run_dir(tmp_path / "run"):
            with pytest.raises(UserError, match="already being written by this process"):
                lock_run_dir(tmp_path / "run")
            with pytest.raises(UserError, match="already being written by this process"):
                check_run_dir_free(tmp_path / "run")

    def test_an_unlockable_place_is_one_sentence(self, tmp_path):
        (tmp_path / "file").write_text("x")
        with pytest.raises(UserError) as exc:
            WriterLock(tmp_path / "file" / "run", tmp_path / "file" / "run.lock", what="run directory").acquire()
        assert "cannot lock run directory" in str(exc.value)


class TestCommandsTakeIt:
    def test_train_and_import_refuse_a_run_another_process_writes(self, capsys, tmp_path):
        run = tmp_path / "run"
        holder = hold_in_another_process(run)
        try:
            code, _, err = run_cli(capsys, "train", "--run-dir", run, "--preset", "tiny", "--steps", "1")
            assert_one_line_error(code, err, f"process {holder.pid}")
            (tmp_path / "m.th").write_bytes(b"x")
            code, _, err = run_cli(capsys, "import", "openai-vdvae", tmp_path / "m.th", "--hps", "cifar10",
                                   "--run-dir", run)
            assert_one_line_error(code, err, f"process {holder.pid}")
        finally:
            holder.kill()
            holder.wait()

    def test_a_refused_train_leaves_no_run_directory(self, capsys, tmp_path):
        run = tmp_path / "new-run"
        code, _, err = run_cli(capsys, "train", "--run-dir", run, "--preset", "tiny", "--steps", "1",
                               "--batch-size", "100000", "--device", "cpu")
        assert code == 2, err
        assert not run.exists()

    def test_pack_refuses_a_store_another_process_writes(self, capsys, tmp_path):
        store = tmp_path / "d.zarr"
        code_text = ("import time; from vdvae_latents.core.writer_lock import lock_store; "
                     f"l = lock_store({str(store)!r}); print('held', flush=True); time.sleep(600)")
        holder = subprocess.Popen([sys.executable, "-c", code_text], stdout=subprocess.PIPE, text=True, env=ENV)
        try:
            assert holder.stdout.readline().strip() == "held"
            code, _, err = run_cli(capsys, "pack", "digits", "--out", store, "--workers", "0")
            assert_one_line_error(code, err, f"process {holder.pid}")
            assert not store.exists()
        finally:
            holder.kill()
            holder.wait()


@subprocess_fixture
def two_trainers(request):
    """tests/writers_worker.py: two `vdvl train` on one run directory, the second started once the
    first holds the lock. Its JSON says how each ended."""
    out = request.getfixturevalue("tmp_path_factory").mktemp("two-trainers")
    argv = [sys.executable, str(ROOT / "tests" / "writers_worker.py"), str(out / "run"), str(out / "result.json")]
    return argv, ROOT, ENV, 600, {"out": out}


def test_two_concurrent_trainings_on_one_run(two_trainers):
    assert two_trainers.returncode == 0, two_trainers.stderr
    result = json.loads((two_trainers.out / "result.json").read_text())
    first, second = result["first"], result["second"]
    assert first["returncode"] == 0, first["stderr"]
    lines = [line for line in second["stderr"].splitlines() if line.strip()]
    assert second["returncode"] == 2 and len(lines) == 1, second["stderr"]
    assert "is being written by process" in lines[0] and str(first["pid"]) in lines[0]
    assert second["seconds"] < 60  # at once: no model, no data (mostly interpreter start-up on a busy machine)
    steps = [json.loads(line)["step"] for line in (two_trainers.out / "run" / "metrics.jsonl").read_text().splitlines()
             if "validation" not in json.loads(line)]
    assert steps == list(range(5, 21, 5))  # one line per logged step: only the first trainer wrote
    assert not (two_trainers.out / "run" / RUN_LOCK_NAME).exists()


def test_readers_do_not_take_the_lock(capsys, tmp_path, tiny_digits_run):
    run = copy_run(tiny_digits_run, tmp_path / "run")
    holder = hold_in_another_process(run)
    try:
        start = time.monotonic()
        code, _, err = run_cli(capsys, "info", run)
        assert code == 0, err
        assert time.monotonic() - start < 60
    finally:
        holder.kill()
        holder.wait()
