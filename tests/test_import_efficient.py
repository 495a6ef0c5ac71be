"""Importing official Efficient-VDVAE checkpoints, without the reference code.

A tiny model is described by a hand-written official-format ``.cfg`` (below, written for
these tests). Its vdvl layout was worked out by hand from the official code's rules: the
bottom-up blocks run high to low resolution, each with ``up_n_blocks_per_res + 1`` cells
before its skip; top-down group ``g`` reads the skip of bottom-up block ``K - 1 - g``.
A checkpoint in the official format is built from a random vdvl model through the inverse
mapping, then imported and used by the CLI. (tests/test_conformance.py checks the mapping
against the official code itself.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vdvae_latents.cli import main
from vdvae_latents.model.checkpoints import file_sha256, load_checkpoint, load_model
from vdvae_latents.model.config import ModelConfig
from vdvae_latents.core.errors import CheckpointError, ConfigError
from vdvae_latents.interop.hparams_cfg import parse_hparams
from vdvae_latents.interop.efficient import (
    config_from_hparams, import_efficient_vdvae, official_layout, to_official_state,
)
from vdvae_latents.model.vae import VAE

# 8x8 RGB; 8x8: blocks 0-1, 4x4: blocks 2-3, 1x1: blocks 4-5.
TINY_CFG = """
[run]
name = tiny_official
seed = 1

[data]
dataset_source = 'imagenet'
target_res = 8
channels = 3
num_bits = 8.

[model]
stable_init = True
initialize_prior_weights_as_zero = False
use_1x1_conv = True
distribution_base = 'std'
output_distribution_base = 'logstd'
gradient_smoothing_beta = 0.6931472
output_gradient_smoothing_beta = 1.
input_conv_filters = 8
input_kernel_size = (1, 1)
up_strides = [1, 2] + [1, 4] + [1] * 2
up_n_blocks_per_res = [1] + [0] * 4 + [1]
up_n_blocks = [1] * 6
up_n_layers = [2] * 6
up_filters = [8] + [16] * 5
up_mid_filters_ratio = [1.] * 2 + [0.5] * 4
up_kernel_size = [3] * 4 + [1] * 2
up_skip_filters = [8] * 2 + [16] * 4
use_residual_distribution = False
down_strides = [1] * 2 + [4, 1] + [2, 1]
down_n_blocks_per_res = [0, 1, 0, 2, 0, 0]
down_n_blocks = [1] * 6
down_n_layers = [2] * 6
down_filters = [16] * 4 + [8] * 2
down_mid_filters_ratio = [0.5] * 4 + [1.] * 2
down_kernel_size = [1] * 2 + [3] * 4
down_latent_variates = [4] * 6
output_kernel_size = (1, 1)
num_output_mixtures = 3

[loss]
min_mol_logscale = -250.
"""

# The same model in vdvl's terms (per resolution, lowest first), derived by hand.
TINY_EXPECTED = ModelConfig(
    image_size=8, channels=3, n_mixtures=3, resolutions=(1, 4, 8),
    up_blocks=(3, 4, 2), down_blocks=(3, 2, 3), widths=(16, 16, 8), skip_widths=(16, 16, 8),
    bottleneck=(0.5, 0.5, 1.0), variates=4, latent_beta=0.6931472, output_beta=1.0,
    up_skip_groups=((1, 2), (1, 3), (1, 1)),     # groups 0,1 | 2,3 | 4,5; groups 1 and 3 re-use their skip
    down_skip_groups=((2, 1), (1, 1), (1, 2)),   # block 5 (2 cells) feeds group 0, block 0 (2 cells) group 5
    mol_scale="logstd", mol_log_scale_floor=-250.0, mol_tail="pixelcnn", output_gain=False, init="xavier")


def tiny_hparams() -> dict:
    return parse_hparams(TINY_CFG)


@pytest.fixture
def official(tmp_path):
    """(cfg path, checkpoint path, vdvl model whose weights the checkpoint holds, EMA state)."""
    torch.manual_seed(0)
    layout = official_layout(tiny_hparams())
    model = VAE(layout.cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # zero-initialised biases and states become distinguishable
    ema = {k: v + 0.01 for k, v in model.state_dict().items()}
    cfg_path = tmp_path / "hparams-tiny_official.cfg"
    cfg_path.write_text(TINY_CFG)
    ckpt = tmp_path / "checkpoints-tiny_official"
    torch.save({"global_step": 4321, "model_state_dict": to_official_state(model.state_dict(), layout),
                "ema_model_state_dict": to_official_state(ema, layout),
                "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0]}]},
                "scheduler_state_dict": {"last_epoch": torch.tensor(4321)}}, ckpt)
    return cfg_path, ckpt, model, ema


class TestConfigFromHparams:
    def test_tiny_layout_worked_out_by_hand(self):
        assert config_from_hparams(tiny_hparams()) == TINY_EXPECTED

    def test_official_names_of_some_tensors(self):
        """Names in the official state dict, derived by hand from its module structure."""
        layout = official_layout(tiny_hparams())
        names = set(to_official_state(VAE(layout.cfg).state_dict(), layout))
        for name in ("bottom_up.input_conv.weight",
                     "bottom_up.levels_up.0.0.residual_block.0.convs.1.weight",      # block 0's extra cell
                     "bottom_up.levels_up_downsample.1.pool.ops.0.weight",           # 8 -> 4
                     "bottom_up.levels_up_downsample.3.pool.ops.0.bias",             # 4 -> 1
                     "bottom_up.levels_up_downsample.5.skip_projection.weight",
                     "top_down.trainable_h",
                     "top_down.levels_down_upsample.2.unpool.scale_bias",            # 1 -> 4
                     "top_down.levels_down.3.1.prior_net.0.convs.7.weight",          # group 3's third block
                     "top_down.levels_down_upsample.5.posterior_layer.projection.bias",
                     "top_down.output_conv.weight"):
            assert name in names, name
        assert not any("levels_up.1." in n or "levels_down.0." in n for n in names)  # blocks without extras
        assert len(names) == len(VAE(layout.cfg).state_dict())

    @pytest.mark.parametrize("edit,field", [
        ("use_1x1_conv = False", "use_1x1_conv"),
        ("up_n_layers = [3] * 6", "up_n_layers"),
        ("down_strides = [1] * 6", "down_strides"),
        ("up_skip_filters = [8] * 2 + [12] * 4", "up_skip_filters"),
        ("down_kernel_size = [3] * 6", "down_kernel_size"),
        ("distribution_base = 'logstd'", "distribution_base"),
        ("down_latent_variates = [4] * 5 + [5]", "down_latent_variates"),
        ("up_filters = [8] * 3", "up_filters"),
        ("up_filters = ['a'] * 6", "up_filters"),
        ("input_conv_filters = 'eight'", "input_conv_filters"),
        ("up_kernel_size = [(3, 1)] * 6", "up_kernel_size"),
    ])
    def test_settings_vdvl_cannot_express_name_the_key(self, edit, field):
        key = edit.split(" =")[0]
        text = "\n".join(edit if line.startswith(key + " =") else line for line in TINY_CFG.splitlines())
        with pytest.raises(ConfigError, match=f"model.{field}"):
            config_from_hparams(parse_hparams(text))

    def test_missing_setting_is_named(self):
        text = TINY_CFG.replace("num_output_mixtures = 3\n", "")
        with pytest.raises(ConfigError, match="model.num_output_mixtures"):
            config_from_hparams(parse_hparams(text))


class TestImport:
    def test_weights_round_trip_exactly(self, official, tmp_path):
        cfg_path, ckpt, model, ema = official
        result = import_efficient_vdvae(ckpt, cfg_path, tmp_path / "run")
        assert (result["step"], result["ema"], result["zero_filled"]) == (4321, True, [])
        assert result["parameters"] == sum(p.numel() for p in model.parameters())
        payload = load_checkpoint(result["checkpoint"])
        for name, tensor in model.state_dict().items():
            assert torch.equal(payload["model"][name], tensor), name
            assert torch.equal(payload["ema"][name], ema[name]), name
        imported = payload["imported"]
        assert imported["kind"] == "efficient-vdvae"
        assert imported["files"]["checkpoint"]["sha256"] == __import__("hashlib").sha256(ckpt.read_bytes()).hexdigest()
        assert imported["key_mapping"]["initial_state"] == "top_down.trainable_h"
        assert imported["hparams"]["model"]["up_strides"] == [1, 2, 1, 4, 1, 1]

    def test_imported_model_computes_what_the_original_does(self, official, tmp_path):
        cfg_path, ckpt, model, _ = official
        import_efficient_vdvae(ckpt, cfg_path, tmp_path / "run")
        loaded, _ = load_model(tmp_path / "run", ema=False)
        x = torch.randint(0, 256, (3, 3, 8, 8)).float() / 127.5 - 1
        torch.testing.assert_close(loaded(x, posterior="mean").nll, model.eval()(x, posterior="mean").nll,
                                   rtol=0, atol=0)

    def test_missing_unpool_biases_become_zeros_and_are_recorded(self, official, tmp_path):
        """The official code creates scale_bias in its first forward pass; a checkpoint saved before has none."""
        cfg_path, ckpt, _, _ = official
        payload = torch.load(ckpt, weights_only=True)
        for key in ("model_state_dict", "ema_model_state_dict"):
            payload[key] = {k: v for k, v in payload[key].items() if not k.endswith("scale_bias")}
        torch.save(payload, ckpt)
        result = import_efficient_vdvae(ckpt, cfg_path, tmp_path / "run")
        assert result["zero_filled"] == ["top_down.levels_down_upsample.2.unpool.scale_bias",
                                         "top_down.levels_down_upsample.4.unpool.scale_bias"]
        state = load_checkpoint(result["checkpoint"])["model"]
        assert not state["res_bias_1"].any() and not state["res_bias_2"].any()

    def test_ddp_prefix_is_accepted(self, official, tmp_path):
        cfg_path, ckpt, model, _ = official
        payload = torch.load(ckpt, weights_only=True)
        payload["model_state_dict"] = {"module." + k: v for k, v in payload["model_state_dict"].items()}
        del payload["ema_model_state_dict"]
        torch.save(payload, ckpt)
        result = import_efficient_vdvae(ckpt, cfg_path, tmp_path / "run")
        assert result["ema"] is False
        assert torch.equal(load_checkpoint(result["checkpoint"])["model"]["initial_state"], model.initial_state)

    def test_wrong_config_names_the_first_mismatching_tensor(self, official, tmp_path):
        cfg_path, ckpt, _, _ = official
        cfg_path.write_text(TINY_CFG.replace("down_latent_variates = [4] * 6", "down_latent_variates = [5] * 6"))
        with pytest.raises(CheckpointError, match=r"top_down\.levels_down_upsample\.0\.prior_layer\.projection\.weight"):
            import_efficient_vdvae(ckpt, cfg_path, tmp_path / "run")
        assert not (tmp_path / "run").exists()

    def test_refuses_a_run_directory_with_checkpoints(self, official, tmp_path):
        cfg_path, ckpt, _, _ = official
        import_efficient_vdvae(ckpt, cfg_path, tmp_path / "run")
        with pytest.raises(CheckpointError, match="already holds checkpoints"):
            import_efficient_vdvae(ckpt, cfg_path, tmp_path / "run")


class Pickled:
    """Any class: torch.save pickles instances as a reference to it, which the safe loader refuses."""


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


class TestCommandLine:
    def test_import_then_the_analysis_commands(self, official, tmp_path, capsys):
        """The imported run works with eval, analyze-kl, encode, decode and sample (reconstruct and probe
        read the same run and stores; they were run by hand on an import, and left out here for time)."""
        cfg_path, ckpt, _, _ = official
        run = str(tmp_path / "run")
        code, out, err = _cli(capsys, "import", "efficient-vdvae", str(ckpt), "--config", str(cfg_path),
                              "--run-dir", run)
        assert code == 0, err
        assert "step 4321" in out
        code, out, err = _cli(capsys, "info", run, "--json")
        imported = __import__("json").loads(out)["imported"]
        assert imported["kind"] == "efficient-vdvae"
        assert {f["role"]: f["sha256"] for f in imported["files"]} == {
            "checkpoint": file_sha256(ckpt), "hparams": file_sha256(cfg_path)}
        code, out, err = _cli(capsys, "info", run)
        assert code == 0 and "from efficient-vdvae" in out
        rng = np.random.default_rng(0)
        data = tmp_path / "images.npz"
        np.savez(data, x_train=rng.integers(0, 256, (24, 8, 8, 3), dtype=np.uint8), y_train=np.arange(24) % 2,
                 x_test=rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8), y_test=np.arange(12) % 2)
        code, out, err = _cli(capsys, "eval", run, "--data", str(data), "--json")
        assert code == 0, err
        assert __import__("json").loads(out)["n_images"] == 12
        active = str(tmp_path / "active.json")
        code, _, err = _cli(capsys, "analyze-kl", run, "--data", str(data), "--split", "train", "--keep", "10%",
                            "--out", active)
        assert code == 0, err
        code, _, err = _cli(capsys, "encode", run, "--data", str(data), "--split", "test", "--active", active,
                            "--out", str(tmp_path / "test.zarr"))
        assert code == 0, err
        for args in (("sample", run, "--n", "2", "--out", str(tmp_path / "s.png")),
                     ("decode", str(tmp_path / "test.zarr"), "--rows", "0:2", "--out", str(tmp_path / "d.png"))):
            code, _, err = _cli(capsys, *args)
            assert code == 0, (args[0], err)

    @pytest.mark.parametrize("damage", ["pickled object", "truncated", "not a checkpoint", "plain tensor"])
    def test_bad_files_exit_2_with_one_sentence(self, official, tmp_path, capsys, damage):
        cfg_path, ckpt, _, _ = official
        if damage == "pickled object":
            torch.save({"model_state_dict": {}, "extra": Pickled()}, ckpt)
        elif damage == "truncated":
            ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
        elif damage == "not a checkpoint":
            ckpt.write_text("hello, not a checkpoint\n")
        else:
            torch.save(torch.zeros(3), ckpt)
        code, out, err = _cli(capsys, "import", "efficient-vdvae", str(ckpt), "--config", str(cfg_path),
                              "--run-dir", str(tmp_path / "run"))
        assert code == 2
        assert str(ckpt) in err and err.count("\n") == 1 and "Traceback" not in err
        assert not (tmp_path / "run").exists()

    @pytest.mark.parametrize("value,named", [("4", "top_down.output_conv.weight"),  # a wrong --config
                                             ("__import__('os')", "model.num_output_mixtures")])  # code
    def test_bad_config_exits_2_naming_the_tensor_or_value(self, official, tmp_path, capsys, value, named):
        cfg_path, ckpt, _, _ = official
        cfg_path.write_text(TINY_CFG.replace("num_output_mixtures = 3", f"num_output_mixtures = {value}"))
        code, _, err = _cli(capsys, "import", "efficient-vdvae", str(ckpt), "--config", str(cfg_path),
                            "--run-dir", str(tmp_path / "run"))
        assert code == 2
        assert named in err and err.count("\n") == 1
