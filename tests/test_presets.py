"""Behaviour of the named presets: they build, match the paper's sizes, and are self-consistent.

Parameter counts are taken on the meta device (no weights allocated) and compared with
Table 3 of the Efficient-VDVAE paper, copied here independently of the package.
"""

from __future__ import annotations

import json
import re
import time

import pytest
import torch

from vdvae_latents.core.errors import ConfigError
from vdvae_latents.train.presets import PAPER_PARAMETERS_M, PRESETS, describe, get_preset, preset_names
from vdvae_latents.model.vae import VAE, count_parameters

# Table 3 of the paper (millions of parameters), written out independently.
TABLE_3_M = {
    "cifar10": {"c1": 18, "c2": 51, "vdvae": 39},
    "imagenet32": {"c1": 52, "c2": 156, "vdvae": 119},
    "imagenet64": {"c1": 57, "c2": 168, "vdvae": 125},
    "ffhq256": {"c1": 66, "c2": 198, "vdvae": 115},
}

NAMES = list(PRESETS)

# Parameter counts of the official Efficient-VDVAE example configs (egs/*.cfg), as the official
# code counts them (trainable parameters after its first forward pass, which creates the unpool
# biases). Recorded by test_conformance.py::test_efficient_egs_parameter_counts, which rebuilds
# every config with the official code when VDVL_REF_EFFICIENT points at a checkout.
OFFICIAL_COUNTS = {
    "cifar10-c1": 18_124_020, "cifar10-c2": 56_598_692,
    "imagenet32-c1": 52_289_316, "imagenet32-c2": 145_068_388,
    "imagenet64-c1": 57_000_740, "imagenet64-c2": 168_367_588,
    "celeba64-c1": 25_426_788, "celeba64-c2": 131_402_212,
    "ffhq256-c1": 67_032_644, "ffhq256-c2": 197_677_156,
    "celebahq256-c1": 71_233_284, "celebahq256-c2": 208_873_444,
    "ffhq1024-c1": 75_869_284, "celebahq1024-c1": 75_869_284,
    "mnist-c1": 69_919_585,
}


@pytest.fixture(scope="module")
def counts(presets_json) -> dict[str, int]:
    """Parameter count of every preset, built once on the meta device: the counts `vdvl presets --json`
    reports (``describe`` -> ``count_parameters``), from the session's one run of the command, in the
    background (tests/conftest.py). ``test_describe_row`` checks them against ``count_parameters``."""
    assert presets_json.returncode == 0, presets_json.stderr[-3000:]
    return {row["name"]: row["parameters"] for row in json.loads(presets_json.stdout)}


class TestEveryPresetBuilds:
    """Each preset constructs a model without allocating memory."""

    @pytest.mark.parametrize("name", NAMES)
    def test_builds_on_meta_device(self, name, counts):
        assert counts[name] > 0

    def test_meta_model_has_no_real_storage(self):
        """The largest preset builds on the meta device instantly (nothing allocated)."""
        cfg = get_preset("ffhq1024-c1").config
        with torch.device("meta"):
            model = VAE(cfg)
        assert all(p.is_meta for p in model.parameters())

    def test_count_parameters_matches_a_real_model(self):
        """The meta-device count equals the numel of a model built for real (tiny preset)."""
        cfg = get_preset("tiny").config
        model = VAE(cfg)
        assert count_parameters(cfg) == sum(p.numel() for p in model.parameters())


class TestPaperParameterCounts:
    """c1/c2 presets have exactly the official configs' counts; all paper presets are within 15% of Table 3."""

    @pytest.mark.parametrize("name", sorted(OFFICIAL_COUNTS))
    def test_exactly_the_official_count(self, name, counts):
        assert counts[name] == OFFICIAL_COUNTS[name]

    def test_every_efficient_paper_preset_is_an_official_config(self):
        """No c1/c2 preset without an official count to check it against."""
        assert {n for n in NAMES if n.endswith(("-c1", "-c2"))} == set(OFFICIAL_COUNTS)

    def test_reference_table_matches_package_table(self):
        """The package's copy of Table 3 agrees with the one written out here."""
        expected = {f"{ds}-{c}": m for ds, row in TABLE_3_M.items() for c, m in row.items()}
        assert PAPER_PARAMETERS_M == expected

    @pytest.mark.parametrize("name", sorted(PAPER_PARAMETERS_M))
    def test_within_15_percent_of_table_3(self, name, counts):
        paper = PAPER_PARAMETERS_M[name] * 1e6
        assert abs(counts[name] - paper) / paper <= 0.15, f"{name}: {counts[name] / 1e6:.1f}M vs {paper / 1e6:.0f}M"

    @pytest.mark.parametrize("dataset", sorted(TABLE_3_M))
    def test_ordering_c1_lt_vdvae_lt_c2(self, dataset, counts):
        """Table 3 orders every dataset as C1 < VDVAE < C2; so must the presets."""
        assert counts[f"{dataset}-c1"] < counts[f"{dataset}-vdvae"] < counts[f"{dataset}-c2"]


class TestPresetLookup:
    """Names resolve to presets; unknown names are user errors that name the preset."""

    def test_names_are_keys_and_config_names(self):
        assert preset_names() == NAMES
        for name in NAMES:
            assert get_preset(name).name == name
            assert get_preset(name).config.name == name

    @pytest.mark.parametrize("bad", ["nope", "cifar10-c3", "TINY", ""])
    def test_unknown_preset_raises_config_error_naming_it(self, bad):
        with pytest.raises(ConfigError) as info:
            get_preset(bad)
        assert f"'{bad}'" in str(info.value)

    def test_unknown_preset_suggests_same_dataset(self):
        """A near miss lists the presets of the same dataset."""
        with pytest.raises(ConfigError, match="cifar10-c1"):
            get_preset("cifar10-c9")


class TestPresetShapes:
    """Latent counts and architectural facts agree with the config and with the paper."""

    @pytest.mark.parametrize("name", NAMES)
    def test_latent_counts_consistent_with_layer_shapes(self, name):
        cfg = get_preset(name).config
        shapes = cfg.layer_shapes()
        assert len(shapes) == cfg.n_layers == sum(cfg.up_blocks)
        assert cfg.n_latent_variates == sum(v for v, _, _ in shapes)
        assert cfg.n_latent_elements == sum(v * h * w for v, h, w in shapes)
        assert {h for _, h, _ in shapes} <= set(cfg.resolutions)
        assert all(h == w for _, h, w in shapes)

    @pytest.mark.parametrize("name", NAMES)
    def test_description_layer_count_is_true(self, name):
        """'N latent layers' / '(N layers' in a description equals the config's layer count."""
        preset = get_preset(name)
        m = re.search(r"(\d+) (?:latent )?layers", preset.description)
        if m:
            assert int(m.group(1)) == preset.config.n_layers

    @pytest.mark.parametrize("name", ["tiny", "cifar10-c1", "cifar10-vdvae", "mnist-c1"])
    def test_describe_row(self, name, counts):
        """The `vdvl presets` row reports the same numbers as the config and the meta count (and the
        command, whose rows ``counts`` holds, the same as ``describe``)."""
        preset = get_preset(name)
        cfg, row = preset.config, describe(preset)
        assert row["name"] == name
        assert row["parameters"] == counts[name] == count_parameters(cfg)
        assert row["image_shape"] == [cfg.channels, cfg.image_size, cfg.image_size]
        assert row["latent_layers"] == len(cfg.layer_shapes())
        assert row["latent_elements"] == cfg.n_latent_elements
        assert ("paper_parameters_m" in row) == (name in PAPER_PARAMETERS_M)

    def test_paper_facts(self):
        """Facts from the paper: CIFAR-10 C1 has 47 layers of 16 variates; MNIST is padded 28 -> 32."""
        c1 = get_preset("cifar10-c1").config
        assert c1.n_layers == 47 and set(c1.variates) == {16}
        assert (c1.channels, c1.image_size, c1.output) == (3, 32, "mol")
        assert len(set(c1.widths)) > 1 and c1.widths[0] > c1.widths[-1]  # grows toward low resolutions
        mnist = get_preset("mnist-c1").config
        assert mnist.output == "bernoulli" and mnist.loss_size == 28 and mnist.image_size == 32
        assert mnist.n_layers == 23
        assert get_preset("ffhq256-c1").config.n_bits == 5

    @pytest.mark.parametrize("name", [n for n in NAMES if n.endswith("-c2")])
    def test_c2_has_constant_width(self, name):
        assert len(set(get_preset(name).config.widths)) == 1

    @pytest.mark.parametrize("name", [n for n in NAMES if n.endswith("-c2")])
    def test_c2_has_c1_layout(self, name):
        """C2 has C1's latent layers per resolution and skip layout (the released configs differ in variates)."""
        c1, c2 = get_preset(name[:-1] + "1").config, get_preset(name).config
        assert (c2.resolutions, c2.up_blocks, c2.up_skip_groups) == (c1.resolutions, c1.up_blocks, c1.up_skip_groups)

    @pytest.mark.parametrize("name", [n for n in NAMES if n.endswith("-vdvae")])
    def test_vdvae_presets_use_vdvae_architecture(self, name):
        cfg = get_preset(name).config
        assert cfg.architecture == "vdvae" and cfg.mol_bounded
        assert list(cfg.widths) == sorted(cfg.widths, reverse=True)  # never wider at a higher resolution


class TestTinyPreset:
    """The CPU test model is small and fast."""

    def test_fewer_than_a_million_parameters(self, counts):
        assert counts["tiny"] < 1_000_000

    def test_forward_backward_batch_16_under_a_second(self):
        torch.manual_seed(0)
        cfg = get_preset("tiny").config
        model = VAE(cfg)
        x = torch.randint(0, 256, (16, cfg.channels, cfg.image_size, cfg.image_size)).float() / 127.5 - 1
        best = float("inf")
        for _ in range(3):  # the first call pays one-off warm-up costs
            start = time.perf_counter()
            out = model(x)
            out.loss.backward()
            best = min(best, time.perf_counter() - start)
        assert torch.isfinite(out.loss)
        assert best < 1.0
