"""Model options for the official Efficient-VDVAE configs: skip layout, MoL scale and tail, output gain, init.

Skip layouts are checked by watching the real forward pass with hooks (which cell and
which projection run in which order, which skip each top-down block receives) against
orders worked out by hand; scales and likelihood tails against closed forms.
"""

from __future__ import annotations

import math
import tomllib

import pytest
import torch

from vdvae_latents.model.config import ModelConfig
from vdvae_latents.core.errors import ConfigError
from vdvae_latents.model.likelihoods import discretized_mol_log_prob
from vdvae_latents.train.run_config import dump_toml
from vdvae_latents.model.vae import VAE, count_parameters, skip_of_layer

# 8x8 grayscale, resolutions (1, 4, 8): 8x8 has two skips, read by 1 and 2 top-down blocks and
# fed by 1 and 2 bottom-up cells (listed in top-down order).
GROUPED = dict(image_size=8, channels=1, n_mixtures=2, resolutions=(1, 4, 8), up_blocks=(1, 2, 3),
               down_blocks=(1, 1, 3), widths=(8, 8, 4), bottleneck=0.5, variates=2,
               up_skip_groups=((1,), (1, 1), (1, 2)), down_skip_groups=((1,), (0, 1), (1, 2)))


def grouped(**changes) -> ModelConfig:
    return ModelConfig(**{**GROUPED, **changes})


class TestSkipLayout:
    def test_which_skip_each_layer_reads(self):
        """Skips are numbered in top-down order: 1x1 -> 0; 4x4 -> 1, 2; 8x8 -> 3 (one block), 4 (two)."""
        assert skip_of_layer(grouped()) == [0, 1, 2, 3, 4, 4]
        one_per_resolution = grouped(up_skip_groups=None, down_skip_groups=None)
        assert skip_of_layer(one_per_resolution) == [0, 1, 1, 2, 2, 2]
        assert (grouped().n_skips, one_per_resolution.n_skips) == (5, 3)

    def test_bottom_up_runs_groups_last_to_first(self):
        """At 8x8 the group of skip 4 (2 cells) runs first, then skip 3's (1 cell), then the pool."""
        model = VAE(grouped())
        calls: list[str] = []
        for i, cells in enumerate(model.down_cells):
            for c, cell in enumerate(cells):
                cell.register_forward_hook(lambda *_, n=f"cell{i}.{c}": calls.append(n))
            for k, proj in enumerate(model.skip_proj[i]):
                proj.register_forward_hook(lambda *_, n=f"skip{i}.{k}": calls.append(n))
        for i, pool in enumerate(model.pools):
            pool.register_forward_hook(lambda *_, n=f"pool{i}": calls.append(n))
        model.bottom_up(torch.zeros(1, 1, 8, 8))
        assert calls == ["cell2.0", "cell2.1", "skip2.1", "cell2.2", "skip2.0", "pool2",  # 8x8
                         "cell1.0", "skip1.1", "skip1.0", "pool1",                       # 4x4: skip 1 has no cell
                         "cell0.0", "skip0.0", "pool0"]                                  # 1x1

    def test_each_block_receives_the_skip_of_its_group(self):
        torch.manual_seed(0)
        model = VAE(grouped())
        projected: list[torch.Tensor] = []
        for i in range(3):
            for proj in model.skip_proj[i]:
                proj.register_forward_hook(lambda m, a, out: projected.append(out))
        received: list[torch.Tensor] = []
        for blocks in model.up_blocks:
            for block in blocks:
                block.posterior.register_forward_pre_hook(
                    lambda m, args, w=block.cell.c1.in_channels: received.append(args[0][:, w:]))
        model(torch.rand(2, 1, 8, 8) * 2 - 1)
        # projections ran in bottom-up order: skip2.1, skip2.0, skip1.1, skip1.0, skip0.0 -> top-down numbering
        by_skip = dict(zip([4, 3, 2, 1, 0], projected))
        for layer, skip in enumerate(skip_of_layer(model.cfg)):
            assert torch.equal(received[layer], by_skip[skip]), layer

    def test_single_groups_compute_what_one_skip_per_resolution_does(self):
        """Explicit one-group layout = the default layout, with the projection weights renamed."""
        base = grouped(up_skip_groups=None, down_skip_groups=None)
        explicit = base.replace(up_skip_groups=[[b] for b in base.up_blocks],
                                down_skip_groups=[[c] for c in base.down_blocks])
        torch.manual_seed(0)
        a = VAE(base)
        renamed = {k.replace(f"skip_proj.{k.split('.')[1]}.", f"skip_proj.{k.split('.')[1]}.0.")
                   if k.startswith("skip_proj.") else k: v for k, v in a.state_dict().items()}
        b = VAE(explicit)
        b.load_state_dict(renamed)
        x = torch.rand(3, 1, 8, 8) * 2 - 1
        assert torch.equal(a(x, posterior="mean").nll, b(x, posterior="mean").nll)

    def test_parameter_count_grows_by_the_extra_projections(self):
        """Two extra 1x1 skip projections (8x8: 4 -> 4, 4x4: 8 -> 8) over one per resolution."""
        one = grouped(up_skip_groups=None, down_skip_groups=None)
        assert count_parameters(grouped()) - count_parameters(one) == (4 * 4 + 4) + (8 * 8 + 8)

    @pytest.mark.parametrize("changes,field", [
        (dict(up_skip_groups=((1,), (1, 1), (3,))), "down_skip_groups"),   # group counts differ
        (dict(up_skip_groups=((1,), (1, 1), (2, 2))), "up_skip_groups"),    # sums to 4, up_blocks 3
        (dict(down_skip_groups=((1,), (0, 1), (1, 1))), "down_skip_groups"),  # sums to 2, down_blocks 3
        (dict(up_skip_groups=((1,), (2, 0), (1, 2))), "up_skip_groups"),    # a group no block reads
        (dict(down_skip_groups=None), "down_skip_groups"),
        (dict(up_skip_groups=((1,), (1, 1))), "up_skip_groups"),            # two resolutions only
        (dict(architecture="vdvae", widths=8, activation="gelu"), "up_skip_groups"),
    ])
    def test_invalid_layouts_name_the_field(self, changes, field):
        with pytest.raises(ConfigError, match=field):
            grouped(**changes)

    def test_layout_survives_toml_and_set(self):
        cfg = grouped(mol_log_scale_floor=-14.0, mol_scale="logstd")
        assert ModelConfig.from_dict(tomllib.loads(dump_toml(cfg.to_dict()))) == cfg
        changed = cfg.with_overrides({"up_skip_groups": "[[1], [2], [3]]", "down_skip_groups": "[[1], [1], [3]]"})
        assert changed.up_skip_groups == ((1,), (2,), (3,))
        assert cfg.with_overrides({"up_skip_groups": "none", "down_skip_groups": "none"}).n_skips == 3
        assert cfg.with_overrides({"mol_log_scale_floor": "-7.5"}).mol_floor == -7.5
        with pytest.raises(ConfigError, match="up_skip_groups"):
            cfg.with_overrides({"up_skip_groups": "[[1], 2"})


class TestOutputScale:
    @staticmethod
    def raw_and_scales(**changes):
        torch.manual_seed(0)
        model = VAE(grouped(**changes))
        h = torch.randn(2, 4, 8, 8) * 5
        m, c = model.cfg.n_mixtures, model.cfg.channels
        raw = model.head.out(h)[:, m + m * c:m + 2 * m * c].reshape(2, m, c, 8, 8)
        return raw, model.head.params(h)["scales"]

    def test_logstd_is_exp_of_beta_times_the_floored_raw_output(self):
        raw, scales = self.raw_and_scales(mol_scale="logstd", output_beta=0.5, mol_log_scale_floor=-1.0)
        torch.testing.assert_close(scales, torch.exp(0.5 * raw.clamp(min=-1.0)))
        assert (raw < -1.0).any()  # the floor was exercised

    def test_softplus_with_beta_and_floor(self):
        raw, scales = self.raw_and_scales(output_beta=2.0, mol_log_scale_floor=-3.0)
        torch.testing.assert_close(scales, (torch.log1p(torch.exp(2.0 * raw)) / 2.0).clamp(min=math.exp(-3.0)))

    def test_defaults_unchanged(self):
        """Efficient: softplus floored at exp(-80); vdvae: exp floored at -7 (mol_bounded)."""
        assert (grouped().mol_scale_kind, grouped().mol_floor) == ("softplus", -80.0)
        vdvae = ModelConfig(architecture="vdvae", activation="gelu", mol_bounded=True, widths=16)
        assert (vdvae.mol_scale_kind, vdvae.mol_floor) == ("exp", -7.0)

    @pytest.mark.parametrize("changes,field", [(dict(mol_scale="log"), "mol_scale"),
                                               (dict(mol_bounded=True, mol_log_scale_floor=-7.0), "mol_log_scale_floor"),
                                               (dict(mol_tail="approx"), "mol_tail"),
                                               (dict(init="he"), "init")])
    def test_invalid_values_name_the_field(self, changes, field):
        with pytest.raises(ConfigError, match=field):
            grouped(**changes)


class TestPixelcnnTail:
    """mol_tail='pixelcnn': log of the CDF difference, or the centre density x bin width below 1e-5."""

    @staticmethod
    def one_logistic(x: float, mean: float, scale: float, tail: str) -> float:
        t = lambda v: torch.tensor(v, dtype=torch.float64).reshape(1, 1, 1, 1, 1)  # noqa: E731
        return discretized_mol_log_prob(t(x)[0], torch.zeros(1, 1, 1, 1, dtype=torch.float64), t(mean), t(scale),
                                        n_bits=8, tail=tail).item()

    def test_far_tail_uses_the_density_at_the_bin_centre(self):
        x, mean, scale = 2 * 191 / 255 - 1, -0.5, 0.05  # a grid value ~20 scales away: the bin mass is ~1e-10
        z = (x - mean) / scale
        expected = z - math.log(scale) - 2 * math.log1p(math.exp(z)) + math.log(2 / 255)
        assert self.one_logistic(x, mean, scale, "pixelcnn") == pytest.approx(expected, rel=1e-12)
        exact = self.one_logistic(x, mean, scale, "exact")
        assert abs(exact - expected) > 1e-6  # the approximation is not the exact mass

    def test_ordinary_bins_agree_with_the_exact_mass(self):
        x, mean, scale = 2 * 140 / 255 - 1, 0.05, 0.2
        sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
        expected = math.log(sig((x - mean + 1 / 255) / scale) - sig((x - mean - 1 / 255) / scale))
        for tail in ("pixelcnn", "exact"):
            assert self.one_logistic(x, mean, scale, tail) == pytest.approx(expected, rel=1e-12)

    def test_edge_bins_are_the_same_in_both(self):
        for x in (-1.0, 1.0):
            assert self.one_logistic(x, 0.9, 0.01, "pixelcnn") == self.one_logistic(x, 0.9, 0.01, "exact")


class TestOutputGainAndInit:
    def test_without_output_gain_there_are_no_gain_tensors(self):
        with_gain, without = VAE(grouped()), VAE(grouped(output_gain=False))
        assert "final_gain" in with_gain.state_dict() and "final_gain" not in without.state_dict()
        assert count_parameters(grouped()) - count_parameters(grouped(output_gain=False)) == 2 * 4

    def test_xavier_init_bounds_biases_and_scalings(self):
        """Xavier-uniform weights within sqrt(6 / (fan_in + fan_out)) (times sqrt(1/L) where scaled), zero biases,
        except each residual cell's first 1x1, which keeps PyTorch's default (nonzero bias); a nonzero initial state."""
        torch.manual_seed(0)
        cfg = grouped(init="xavier", widths=(16, 16, 16), variates=4)
        model = VAE(cfg)
        scale = math.sqrt(1 / cfg.n_layers)

        def bound(conv):
            fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
            fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
            return math.sqrt(6 / (fan_in + fan_out))

        block = model.up_blocks[2][0]
        for conv in (block.prior.c2, block.prior_params, model.head.out, model.input_conv, model.skip_proj[2][0]):
            w = conv.weight.abs().max().item()
            assert 0.5 * bound(conv) < w <= bound(conv)
            assert not conv.bias.any()
        for conv in (block.z_proj, block.cell.c4, model.down_cells[2][0].c4):
            assert 0.5 * bound(conv) * scale < conv.weight.abs().max().item() <= bound(conv) * scale
        assert block.prior.c1.bias.abs().sum() > 0 and model.initial_state.abs().sum() > 0
        default = VAE(grouped(widths=(16, 16, 16), variates=4))
        assert not default.up_blocks[2][0].prior.c1.bias.any() and not default.initial_state.any()

    def test_head_keeps_float64(self):
        """float64 models score in float64 (the conformance tests compare to 1e-9)."""
        model = VAE(grouped()).double()
        out = model(torch.rand(2, 1, 8, 8, dtype=torch.float64) * 2 - 1)
        assert out.nll.dtype == torch.float64
