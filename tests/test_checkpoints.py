"""Tests for vdvae_latents.model.checkpoints: full-payload round trips, model rebuilding,
atomic writes, the safe loader's refusals, run-directory helpers and `vdvl info`."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import pickle
import random
from pathlib import Path

import pytest
import torch

from vdvae_latents.model import checkpoints as ck
from vdvae_latents.model.checkpoints import (
    FORMAT_NAME, FORMAT_VERSION, checkpoint_path, describe_run, file_sha256, latest_checkpoint, list_checkpoints,
    load_checkpoint, load_model, prune_checkpoints, resolve_checkpoint, save_checkpoint,
)
from vdvae_latents.core import atomic
from vdvae_latents.core.errors import CheckpointError, UserError
from vdvae_latents.train.presets import get_preset
from vdvae_latents.model.vae import VAE, count_parameters

CFG = get_preset("tiny").config

# ------------------------------------------------------------------------ helpers


def make_payload(step: int = 7, seed: int = 0) -> tuple[VAE, VAE, dict]:
    """A payload like the trainer's, after one real Adamax step; EMA differs from the model."""
    torch.manual_seed(seed)
    model = VAE(CFG)
    ema = copy.deepcopy(model)
    optimizer = torch.optim.Adamax(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=10)
    x = torch.rand(2, CFG.channels, CFG.image_size, CFG.image_size) * 2 - 1
    model(x).loss.backward()
    optimizer.step()
    scheduler.step()
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(0.05)  # make the EMA weights clearly different
    generator = torch.Generator().manual_seed(seed + 1)
    payload = {
        "step": step,
        "preset": "tiny",
        "model_config": CFG.to_dict(),
        "train_config": {"lr": 1e-3, "batch_size": 4, "betas": (0.9, 0.999), "ema_decay": 0.999},
        "model": model.state_dict(),
        "ema": ema.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "generator": generator.get_state(), "python": random.getstate()},
        "data_position": {"epoch": 1, "index": 12},
        "skips": 0,
    }
    return model, ema, payload


def assert_same(a, b, where: str = "payload") -> None:
    """Recursive equality with exact tensor comparison (values, dtype, shape)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def sample_input(seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, CFG.channels, CFG.image_size, CFG.image_size, generator=g) * 2 - 1


def outputs(model: VAE, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model.eval()(x, posterior="mean")
    return [out.nll, *out.kl]


def assert_file_error(exc_info: pytest.ExceptionInfo, path: Path) -> None:
    """A CheckpointError that is one line and names the file."""
    message = str(exc_info.value)
    assert isinstance(exc_info.value, UserError)
    assert str(path) in message
    assert "\n" not in message


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def trained():
    return make_payload()


# ------------------------------------------------------------------------ round trip


def test_full_payload_round_trip(tmp_path, trained):
    _, _, payload = trained
    path = tmp_path / "run" / "checkpoints" / "ckpt-00000007.pt"  # parents are created
    assert save_checkpoint(path, payload) == path
    assert "format" not in payload  # the caller's dict is not modified

    loaded = load_checkpoint(path)
    assert loaded["format"] == FORMAT_NAME and loaded["format_version"] == FORMAT_VERSION
    assert_same(payload, {k: v for k, v in loaded.items() if k not in ("format", "format_version")})
    # The optimizer state survived a real step and the RNG states are byte tensors.
    assert loaded["optimizer"]["state"][0]["exp_inf"].abs().sum() > 0
    assert loaded["rng"]["torch"].dtype == torch.uint8
    assert temp_files(path.parent) == []


def test_restored_states_resume_identically(tmp_path, trained):
    """Restoring the RNG and optimizer from a checkpoint reproduces the next step exactly."""
    _, _, payload = trained
    path = save_checkpoint(tmp_path / "c.pt", payload)
    loaded = load_checkpoint(path)
    torch.set_rng_state(loaded["rng"]["torch"])
    expected = torch.rand(5)
    torch.set_rng_state(payload["rng"]["torch"])
    assert torch.equal(torch.rand(5), expected)
    model = VAE(CFG)
    model.load_state_dict(loaded["model"])
    optimizer = torch.optim.Adamax(model.parameters(), lr=1e-3)
    optimizer.load_state_dict(loaded["optimizer"])
    assert_same(optimizer.state_dict(), payload["optimizer"])


def test_load_model_reproduces_outputs_and_picks_weights(tmp_path, trained):
    model, ema, payload = trained
    path = save_checkpoint(checkpoint_path(tmp_path, 7), payload)
    x = sample_input()

    raw, info = load_model(path, ema=False)
    assert not raw.training
    for a, b in zip(outputs(raw, x), outputs(model, x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert info["weights"] == "model"

    smoothed, info = load_model(tmp_path)  # a run dir resolves to its latest checkpoint; EMA by default
    for a, b in zip(smoothed.state_dict().values(), ema.state_dict().values()):
        assert torch.equal(a, b)
    assert not torch.equal(smoothed.initial_state, model.initial_state)  # EMA really differs
    assert info == {
        "path": str(path), "sha256": file_sha256(path), "step": 7, "preset": "tiny",
        "model_config": CFG.to_dict(), "train_config": payload["train_config"],
        "format_version": FORMAT_VERSION, "weights": "ema",
    }


def test_load_model_without_ema_or_optional_keys(tmp_path, trained):
    model, _, payload = trained
    slim = {"model_config": payload["model_config"], "model": payload["model"]}
    path = save_checkpoint(tmp_path / "slim.pt", slim)
    loaded, info = load_model(path, ema=True)  # falls back to the training weights
    assert info["weights"] == "model"
    assert info["step"] is None and info["preset"] is None and info["train_config"] is None
    for a, b in zip(loaded.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("breakage", ["bad_field", "bad_value", "missing_config", "missing_key", "wrong_shape", "no_weights"])
def test_load_model_rejects_inconsistent_checkpoints(tmp_path, trained, breakage):
    _, _, payload = trained
    payload = {**payload, "model_config": dict(payload["model_config"]), "ema": None}
    state = dict(payload["model"])
    if breakage == "bad_field":
        payload["model_config"]["no_such_field"] = 1
    elif breakage == "bad_value":
        payload["model_config"]["widths"] = [32, 16]  # wrong number of resolutions
    elif breakage == "missing_config":
        del payload["model_config"]
    elif breakage == "missing_key":
        state.pop(next(iter(state)))
    elif breakage == "wrong_shape":
        key = next(k for k, v in state.items() if v.ndim == 4)
        state[key] = torch.zeros(1, 1, 1, 1)
    elif breakage == "no_weights":
        del payload["model"]
    if breakage != "no_weights":
        payload["model"] = state
    path = save_checkpoint(tmp_path / "broken.pt", payload)
    with pytest.raises(CheckpointError) as exc_info:
        load_model(path)
    assert_file_error(exc_info, path)


# ------------------------------------------------------------------------ atomic writes


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_crash_during_save_leaves_no_file(tmp_path, monkeypatch, error):
    def crash(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise error("simulated crash during torch.save")

    monkeypatch.setattr(torch, "save", crash)
    path = tmp_path / "checkpoints" / "ckpt-00000001.pt"
    with pytest.raises(error):
        save_checkpoint(path, {"step": 1})
    assert not path.exists()
    assert list(path.parent.iterdir()) == []


def test_failed_replace_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "ckpt.pt", {"step": 1})
    before = path.read_bytes()

    def failing_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(CheckpointError) as exc_info:
        save_checkpoint(path, {"step": 2, "big": torch.ones(100)})
    assert_file_error(exc_info, path)
    assert path.read_bytes() == before
    assert temp_files(tmp_path) == []
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1


class Opaque:
    """A custom class: pickles as a global that the safe loader refuses."""


@pytest.mark.parametrize("bad, where", [
    ({1, 2}, "payload['train_config']['bad']"),
    (Opaque(), "payload['train_config']['bad']"),
    (frozenset(), "payload['train_config']['bad']"),
    (pytest, "payload['train_config']['bad']"),
    ([1, {"deep": lambda: 0}], "payload['train_config']['bad'][1]['deep']"),
])
def test_unsupported_payload_types_rejected_before_writing(tmp_path, bad, where):
    path = tmp_path / "run" / "ckpt.pt"
    with pytest.raises(TypeError) as exc_info:
        save_checkpoint(path, {"step": 1, "train_config": {"lr": 0.1, "bad": bad}})
    assert where in str(exc_info.value)
    assert not (tmp_path / "run").exists()  # nothing touched the disk


def test_unsupported_keys_and_cycles_rejected(tmp_path):
    with pytest.raises(TypeError, match="key"):
        save_checkpoint(tmp_path / "a.pt", {"data_position": {Opaque(): 1}})
    cyclic: list = []
    cyclic.append(cyclic)
    with pytest.raises(TypeError, match="itself"):
        save_checkpoint(tmp_path / "b.pt", {"loop": cyclic})
    with pytest.raises(TypeError, match="must be a dict"):
        save_checkpoint(tmp_path / "c.pt", [1, 2])  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_every_allowed_type_loads_safely(tmp_path):
    """The allow-list must be honest: anything save_checkpoint accepts, weights_only loads."""
    payload = {
        "none": None, "bool": True, "int": 2**70, "float": float("inf"), "str": "é", "bytes": b"\x00\xff",
        "dtype": torch.bfloat16, "size": torch.Size([2, 3]), "tuple_key": {(1, "a"): [1.5]},
        "param": torch.nn.Parameter(torch.ones(2)), "half": torch.ones(3, dtype=torch.float16),
        "view": torch.arange(10)[2:5], "ordered": VAE(CFG).state_dict(),
    }
    assert_same(payload, {k: v for k, v in load_checkpoint(save_checkpoint(tmp_path / "t.pt", payload)).items()
                          if k not in ("format", "format_version")})


# ------------------------------------------------------------------------ refusing bad files


class Exploit:
    """Unpickling this with plain pickle creates ``marker`` (a stand-in for os.system)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note about plain pickle files
@pytest.mark.parametrize("container", ["pickle", "torch"])
def test_malicious_pickle_is_refused_not_executed(tmp_path, container):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    if container == "pickle":
        path.write_bytes(pickle.dumps(Exploit(marker)))
    else:
        torch.save({"format": FORMAT_NAME, "format_version": 1, "step": Exploit(marker)}, path)
    with pytest.raises(CheckpointError) as exc_info:
        load_checkpoint(path)
    assert_file_error(exc_info, path)
    assert not marker.exists()
    with pytest.raises(CheckpointError):
        load_model(path)
    assert not marker.exists()
    if container == "pickle":  # sanity: the exploit is live, so the test is not vacuous
        pickle.loads(path.read_bytes()).close()
        assert marker.exists()


def _write_bad(kind: str, path: Path) -> None:
    if kind == "truncated":
        save_checkpoint(path, {"step": 1, "w": torch.randn(2000)})
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "truncated_tail":
        save_checkpoint(path, {"step": 1, "w": torch.randn(2000)})
        path.write_bytes(path.read_bytes()[:-10])
    elif kind == "random":
        path.write_bytes(random.Random(0).randbytes(4096))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("step = 1000\n")
    elif kind == "plain_dict":
        torch.save({"model": {"w": torch.ones(2)}, "step": 3}, path)
    elif kind == "not_a_dict":
        torch.save([1, 2, 3], path)
    elif kind == "other_format":
        torch.save({"format": "someone-else", "format_version": 1}, path)
    elif kind == "newer_version":
        torch.save({"format": FORMAT_NAME, "format_version": FORMAT_VERSION + 1, "step": 1}, path)
    elif kind == "bad_version":
        torch.save({"format": FORMAT_NAME, "format_version": "1"}, path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "missing":
        pass


@pytest.mark.parametrize("kind", ["truncated", "truncated_tail", "random", "empty", "text", "plain_dict",
                                  "not_a_dict", "other_format", "newer_version", "bad_version", "directory",
                                  "missing"])
def test_bad_files_raise_checkpoint_error(tmp_path, kind):
    path = tmp_path / f"{kind}.pt"
    _write_bad(kind, path)
    with pytest.raises(CheckpointError) as exc_info:
        load_checkpoint(path)
    assert_file_error(exc_info, path)
    if kind == "newer_version":
        assert "version 2" in str(exc_info.value)


# ------------------------------------------------------------------------ run directories


def touch_run(run: Path, steps: list[int]) -> None:
    """Checkpoint-named files plus noise that must be ignored (content is irrelevant here)."""
    folder = run / "checkpoints"
    folder.mkdir(parents=True)
    for step in steps:
        checkpoint_path(run, step).write_bytes(b"x")
    (folder / ".ckpt-00099999.pt.1a2b3c4d.tmp").write_bytes(b"partial")  # a save in progress
    (folder / "notes.txt").write_text("hi")
    (folder / "ckpt-latest.pt").write_bytes(b"x")
    (folder / "ckpt-00000001.pt.bak").write_bytes(b"x")
    (folder / "ckpt-77777777.pt").mkdir()  # a directory is not a checkpoint


def test_checkpoint_path_format(tmp_path):
    assert checkpoint_path(tmp_path, 1000) == tmp_path / "checkpoints" / "ckpt-00001000.pt"
    assert checkpoint_path(str(tmp_path), 123456789).name == "ckpt-123456789.pt"
    with pytest.raises(ValueError):
        checkpoint_path(tmp_path, -1)


def test_list_latest_prune(tmp_path):
    run = tmp_path / "run"
    assert list_checkpoints(run) == [] and latest_checkpoint(run) is None
    touch_run(run, [1000, 5, 20, 123456789])
    assert list_checkpoints(run) == [(s, checkpoint_path(run, s)) for s in (5, 20, 1000, 123456789)]
    assert latest_checkpoint(run) == checkpoint_path(run, 123456789)

    deleted = prune_checkpoints(run, keep=2)
    assert deleted == [checkpoint_path(run, 5), checkpoint_path(run, 20)]
    assert [s for s, _ in list_checkpoints(run)] == [1000, 123456789]
    assert len(temp_files(run / "checkpoints")) == 1  # an in-progress save is left alone
    assert prune_checkpoints(run, keep=5) == []
    with pytest.raises(ValueError):
        prune_checkpoints(run, keep=-1)


def test_resolve_checkpoint(tmp_path):
    run = tmp_path / "run"
    touch_run(run, [10, 30])
    assert resolve_checkpoint(run) == checkpoint_path(run, 30)
    assert resolve_checkpoint(run / "checkpoints") == checkpoint_path(run, 30)
    assert resolve_checkpoint(str(checkpoint_path(run, 10))) == checkpoint_path(run, 10)

    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="has no checkpoints") as exc_info:
        resolve_checkpoint(empty)
    assert_file_error(exc_info, empty)
    missing = tmp_path / "nope"
    with pytest.raises(CheckpointError, match="does not exist") as exc_info:
        resolve_checkpoint(missing)
    assert_file_error(exc_info, missing)
    with pytest.raises(CheckpointError, match="has no checkpoints"):
        load_model(empty)


def test_file_sha256_streams_large_files(tmp_path, monkeypatch):
    monkeypatch.setattr(ck, "_HASH_CHUNK", 1000)  # force many chunks, including a partial last one
    data = random.Random(1).randbytes(12_345)
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()
    assert file_sha256(str(path)) == hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------ describe_run (`vdvl info`)


@pytest.fixture
def run_dir(tmp_path, trained):
    _, _, payload = trained
    run = tmp_path / "run"
    for step in (10, 20):
        save_checkpoint(checkpoint_path(run, step), {**payload, "step": step})
    lines = [json.dumps({"step": 10, "loss": 3.5, "bits_per_dim": 5.0}),
             json.dumps({"step": 20, "loss": 3.0, "bits_per_dim": 4.3})]
    # A run killed mid-write: the last line is cut off.
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 30, "loss": 2.')
    return run


def test_describe_run_directory(run_dir):
    info = describe_run(run_dir)
    ckpt = checkpoint_path(run_dir, 20)
    assert info["path"] == str(run_dir) and info["run_dir"] == str(run_dir)
    assert info["checkpoint"] == str(ckpt) and info["sha256"] == file_sha256(ckpt)
    assert info["step"] == 20 and info["preset"] == "tiny" and info["format_version"] == FORMAT_VERSION
    assert info["parameters"] == count_parameters(CFG) == sum(p.numel() for p in VAE(CFG).parameters())
    assert info["image_shape"] == [1, 8, 8]
    assert info["latent_layers"] == CFG.n_layers == 5
    assert info["latent_variates"] == CFG.n_latent_variates
    assert info["architecture"] == "efficient" and info["has_ema"] is True
    assert info["checkpoints"] == [10, 20]
    assert info["last_metrics"] == {"step": 20, "loss": 3.0, "bits_per_dim": 4.3}
    json.dumps(info)  # printable as JSON by the CLI


def test_describe_checkpoint_file(run_dir, tmp_path, trained):
    ckpt = checkpoint_path(run_dir, 10)
    info = describe_run(ckpt)
    assert info["checkpoint"] == str(ckpt) and info["step"] == 10
    assert info["run_dir"] == str(run_dir) and info["checkpoints"] == [10, 20]
    assert info["last_metrics"]["step"] == 20

    # Metrics absent, or only a truncated line: None.
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "lo')
    assert describe_run(run_dir)["last_metrics"] is None
    (run_dir / "metrics.jsonl").unlink()
    assert describe_run(run_dir)["last_metrics"] is None

    # A file outside any run directory.
    _, _, payload = trained
    loose = save_checkpoint(tmp_path / "elsewhere" / "model.pt", payload)
    info = describe_run(loose)
    assert info["run_dir"] is None and info["checkpoints"] == [] and info["last_metrics"] is None
    assert info["step"] == 7


def test_describe_run_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        describe_run(tmp_path / "missing")
    bad = tmp_path / "run"
    checkpoint_path(bad, 1).parent.mkdir(parents=True)
    checkpoint_path(bad, 1).write_bytes(b"garbage")
    with pytest.raises(CheckpointError) as exc_info:
        describe_run(bad)
    assert_file_error(exc_info, checkpoint_path(bad, 1))


class _FillsUp(io.FileIO):
    """A file on a disk with ``room`` bytes left: the write that would pass it fails with ENOSPC."""

    room = 100_000

    def write(self, data) -> int:
        if self.tell() + len(data) > self.room:
            raise OSError(28, "No space left on device")
        return super().write(data)


def test_a_full_disk_during_save_names_the_file_and_keeps_the_previous_one(tmp_path, monkeypatch):
    # torch's zip writer fails a second time as it closes after the failed write (a RuntimeError
    # over the OSError); the user must still get one sentence naming the disk, not that.
    path = save_checkpoint(tmp_path / "ckpt.pt", {"step": 1})
    before = path.read_bytes()
    monkeypatch.setattr(atomic.os, "fdopen", lambda fd, mode: _FillsUp(fd, "wb"))
    with pytest.raises(CheckpointError) as exc_info:
        save_checkpoint(path, {"step": 2, "big": torch.ones(100_000)})
    assert_file_error(exc_info, path)
    assert "No space left on device" in str(exc_info.value)
    assert path.read_bytes() == before and temp_files(tmp_path) == []
