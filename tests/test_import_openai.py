"""`vdvl import openai-vdvae`: weight files in openai/vdvae's format become a run every command accepts.

No reference code is needed: the openai-format files are written from a vdvl model through
the inverse key map (``vdvl_to_openai``), with the DDP ``module.`` prefix on the model file
as openai's trainer saves it. A small hyper-parameter set (per-resolution widths, 5-bit
targets) stands in for the published ones, registered for the CLI with monkeypatch.
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from helpers import assert_one_line_error, run_cli
from vdvae_latents.model.checkpoints import file_sha256, load_checkpoint, load_model
from vdvae_latents.core.errors import CheckpointError
from vdvae_latents.data.grids import read_grid
from vdvae_latents.interop.openai import import_openai_vdvae
from vdvae_latents.model.openai_hps import OPENAI_HPS, OpenAIHps, openai_config
from vdvae_latents.interop.openai import vdvl_to_openai
from vdvae_latents.model.vae import VAE

TINY = OpenAIHps("tiny-openai", "ffhq_256", 8, "8x1,8d2,4x1,4d4,1x1", "1x1,4m1,4x1,8m4,8x1", 8,
                 -112.87, 1 / 69.85, custom_widths={4: 16, 1: 16}, zdim=3, num_mixtures=2, low_bit=True)


def random_state(seed: int) -> dict[str, torch.Tensor]:
    """A vdvl state dict for TINY with every tensor random (zero-initialised ones too)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in VAE(openai_config(TINY)).state_dict().items()}
    return {k: 0.2 * torch.randn(s, generator=gen) for k, s in shapes.items()}


def save_openai(path, state: dict[str, torch.Tensor], *, ddp: bool) -> None:
    theirs = vdvl_to_openai(state, TINY)
    torch.save({("module." + k if ddp else k): v for k, v in theirs.items()}, path)


@pytest.fixture
def tiny_hps(monkeypatch):
    monkeypatch.setitem(OPENAI_HPS, TINY.name, TINY)
    return TINY.name


@pytest.fixture(scope="module")
def openai_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("openai")
    model, ema = random_state(0), random_state(1)
    save_openai(folder / "tiny-iter-123-model.th", model, ddp=True)
    save_openai(folder / "tiny-iter-123-model-ema.th", ema, ddp=False)
    gen = np.random.default_rng(0)
    np.savez(folder / "faces.npz", images=gen.integers(0, 256, (60, 8, 8, 3), dtype=np.uint8),
             labels=np.arange(60) % 2)
    return folder, model, ema


def test_library_import_keeps_both_weight_sets_exactly(openai_files, tmp_path):
    folder, model, ema = openai_files
    result = import_openai_vdvae(folder / "tiny-iter-123-model.th", ema_path=folder / "tiny-iter-123-model-ema.th",
                                 hps=TINY, run_dir=tmp_path / "run")
    assert result["step"] == 123 and result["preset"] is None
    assert result["parameters"] == sum(t.numel() for t in model.values())
    for use_ema, expected in ((True, ema), (False, model)):
        loaded, info = load_model(tmp_path / "run", ema=use_ema)
        assert info["weights"] == ("ema" if use_ema else "model")
        assert loaded.cfg == openai_config(TINY)
        assert all(torch.equal(v, expected[k]) for k, v in loaded.state_dict().items())
    record = load_checkpoint(result["checkpoint"])["imported"]
    assert record["kind"] == "openai-vdvae" and record["hps"]["enc_blocks"] == TINY.enc_blocks
    assert record["model_file"]["sha256"] == file_sha256(folder / "tiny-iter-123-model.th")
    assert record["model_file"]["ddp_prefix"] is True and record["ema_file"]["ddp_prefix"] is False
    assert record["mapping"]["decoder.dec_blocks.1.enc.c1.weight"] == "up_blocks.1.0.posterior.c1.weight"


def test_a_lone_ema_file_imports_as_the_only_weights(openai_files, tmp_path):
    """The published CIFAR-10 models are EMA files alone."""
    folder, _, ema = openai_files
    result = import_openai_vdvae(folder / "tiny-iter-123-model-ema.th", hps=TINY, run_dir=tmp_path / "r", step=7)
    loaded, info = load_model(tmp_path / "r")
    assert result["step"] == 7 and info["weights"] == "model"
    assert all(torch.equal(v, ema[k]) for k, v in loaded.state_dict().items())


def test_every_command_runs_on_an_imported_model(capsys, openai_files, tmp_path, tiny_hps):
    folder, _, _ = openai_files
    run, data = tmp_path / "run", str(folder / "faces.npz")

    def ok(*argv) -> str:
        code, out, err = run_cli(capsys, *argv)
        assert code == 0, err
        return out

    imported = json.loads(ok("import", "openai-vdvae", folder / "tiny-iter-123-model.th", "--ema",
                             folder / "tiny-iter-123-model-ema.th", "--hps", tiny_hps, "--run-dir", run, "--json"))
    assert imported["step"] == 123 and imported["hps"] == tiny_hps
    ev = json.loads(ok("eval", run, "--data", data, "--json"))
    assert np.isfinite(ev["bits_per_dim"]) and ev["step"] == 123
    ok("analyze-kl", run, "--data", data, "--out", tmp_path / "active.json", "--keep", "50%", "--split", "train")
    ok("encode", run, "--data", data, "--split", "all", "--out", tmp_path / "store.zarr", "--active",
       tmp_path / "active.json", "--quiet")
    ok("decode", tmp_path / "store.zarr", "--rows", "0:4", "--out", tmp_path / "decoded.png")
    ok("sample", run, "--n", "4", "--out", tmp_path / "sample.png")
    ok("reconstruct", run, "--data", data, "--n", "4", "--out", tmp_path / "recon.png")
    probe = json.loads(ok("probe", tmp_path / "store.zarr", "--seeds", "1", "--cv", "2", "--baselines", "none",
                          "--json", "--quiet"))
    assert probe["rows"] and 0 <= probe["rows"][0]["test_accuracy"] <= 1
    pixels = read_grid(tmp_path / "sample.png")  # the samples, without the figure's title
    # Samples lie on the truncated 5-bit grid (multiples of 8); the grid's separators are gray 128.
    assert np.all((pixels % 8 == 0) | (pixels == 128))


# ------------------------------------------------------------------ refusals


class Opaque:
    """Pickled by reference: loading it would need this class (and so run code)."""


def write_bad_files(folder, good):
    torch.save({"encoder.in_conv.weight": Opaque()}, folder / "object.th")
    data = (good).read_bytes()
    (folder / "truncated.th").write_bytes(data[: len(data) // 2])
    (folder / "text.th").write_text("not weights\n")
    np.save(folder / "array.npy", np.zeros(3))
    torch.save({"state": {}, "param_groups": [{"lr": 1.0}]}, folder / "opt.th")
    (folder / "plain.pkl").write_bytes(pickle.dumps({"a": 1}, protocol=4))


@pytest.mark.parametrize("name,needle", [
    ("object.th", "holds Python objects besides tensors"),
    ("truncated.th", "may be truncated"),
    ("text.th", "text.th"),
    ("array.npy", "not a PyTorch weight file"),
    ("plain.pkl", "not a PyTorch weight file"),
    ("opt.th", "not a model state dict"),
    ("missing.th", "does not exist"),
])
def test_bad_files_exit_2_with_one_sentence(capsys, openai_files, tmp_path, tiny_hps, name, needle):
    folder, _, _ = openai_files
    write_bad_files(tmp_path, folder / "tiny-iter-123-model.th")
    code, _, err = run_cli(capsys, "import", "openai-vdvae", tmp_path / name, "--hps", tiny_hps,
                           "--run-dir", tmp_path / "run")
    assert_one_line_error(code, err, needle)
    assert name in err
    assert not (tmp_path / "run").exists()


def test_wrong_hps_names_the_first_mismatching_tensor(capsys, openai_files, tmp_path):
    folder, _, _ = openai_files
    code, _, err = run_cli(capsys, "import", "openai-vdvae", folder / "tiny-iter-123-model.th", "--hps", "cifar10",
                           "--run-dir", tmp_path / "run")
    assert_one_line_error(code, err, "'encoder.in_conv.weight' of shape [8, 3, 3, 3], but --hps cifar10 expects "
                                     "[384, 3, 3, 3]")


@pytest.mark.parametrize("change,needle", [
    ("drop", "has no tensor 'decoder.dec_blocks.2.prior.c3.bias'"),
    ("extra", "has tensor 'decoder.surplus', which --hps tiny-openai does not have"),
    ("shape", "'decoder.gain' of shape [1, 9, 1, 1]"),
])
def test_damaged_state_dicts_name_the_tensor(openai_files, tmp_path, tiny_hps, change, needle):
    folder, _, _ = openai_files
    state = torch.load(folder / "tiny-iter-123-model.th", weights_only=True)
    if change == "drop":
        del state["module.decoder.dec_blocks.2.prior.c3.bias"]
    elif change == "extra":
        state["module.decoder.surplus"] = torch.zeros(1)
    else:
        state["module.decoder.gain"] = torch.zeros(1, 9, 1, 1)
    torch.save(state, tmp_path / "m.th")
    with pytest.raises(CheckpointError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        import_openai_vdvae(tmp_path / "m.th", hps=tiny_hps, run_dir=tmp_path / "run")


def test_unknown_hps_and_used_run_dir_exit_2(capsys, openai_files, tmp_path, tiny_hps):
    folder, _, _ = openai_files
    model = folder / "tiny-iter-123-model.th"
    code, _, err = run_cli(capsys, "import", "openai-vdvae", model, "--hps", "cifar100", "--run-dir", tmp_path / "a")
    assert_one_line_error(code, err, "'cifar100'")
    assert run_cli(capsys, "import", "openai-vdvae", model, "--hps", tiny_hps, "--run-dir", tmp_path / "b")[0] == 0
    code, _, err = run_cli(capsys, "import", "openai-vdvae", model, "--hps", tiny_hps, "--run-dir", tmp_path / "b")
    assert_one_line_error(code, err, "already holds checkpoints")
