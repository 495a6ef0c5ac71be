"""write_imported_run: foreign weights become an ordinary run directory."""

from __future__ import annotations

import pytest
import torch

from vdvae_latents.model.checkpoints import describe_run, load_checkpoint, load_model, list_checkpoints
from vdvae_latents.core.errors import CheckpointError
from vdvae_latents.interop.run_dir import write_imported_run
from vdvae_latents.train.presets import get_preset
from vdvae_latents.model.vae import VAE


def test_imported_weights_load_back_exactly(tmp_path):
    cfg = get_preset("tiny").config
    torch.manual_seed(0)
    model, ema = VAE(cfg).state_dict(), VAE(cfg).state_dict()
    source = {"kind": "test", "files": {"w.th": "ab" * 32}, "mapping": {"a": "b"}}
    path = write_imported_run(tmp_path / "run", cfg, model, ema, step=1234, source=source)
    assert list_checkpoints(tmp_path / "run") == [(1234, path)]
    loaded, info = load_model(tmp_path / "run")
    assert info["step"] == 1234 and info["weights"] == "ema"
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, ema[k]), k
    assert load_checkpoint(path)["imported"] == source
    assert describe_run(tmp_path / "run")["step"] == 1234


def test_import_refuses_wrong_weights_and_existing_runs(tmp_path):
    cfg = get_preset("tiny").config
    state = VAE(cfg).state_dict()
    name = next(iter(state))
    bad = {**state, name: torch.zeros(3)}
    with pytest.raises(CheckpointError, match=f"wrong shape for '{name}'"):
        write_imported_run(tmp_path / "a", cfg, bad, None, step=0, source={})
    write_imported_run(tmp_path / "b", cfg, state, None, step=0, source={})
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        write_imported_run(tmp_path / "b", cfg, state, None, step=0, source={})
