"""Behaviour of ModelConfig: validation, derived sizes, (de)serialisation and --set overrides.

Expected values are worked out by hand from the documented meaning of each field
(per-resolution tuples run from the lowest resolution to the highest).
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from vdvae_latents.model.config import ModelConfig
from vdvae_latents.core.errors import ConfigError, UserError


def small(**changes) -> ModelConfig:
    """A valid 3-resolution 8x8 config; ``changes`` override single fields."""
    base = dict(image_size=8, channels=1, n_mixtures=3, resolutions=(1, 4, 8), up_blocks=(1, 2, 3),
                down_blocks=(1, 1, 1), widths=(32, 32, 16), bottleneck=(0.5, 0.5, 1.0), variates=(4, 3, 2))
    base.update(changes)
    return ModelConfig(**base)


class TestNormalisation:
    """Scalars broadcast to one entry per resolution; lists become tuples."""

    def test_scalars_broadcast_to_every_resolution(self):
        """A single width/variates/bottleneck value applies to all resolutions."""
        cfg = small(widths=16, variates=5, bottleneck=0.25, up_blocks=2, down_blocks=0)
        assert cfg.widths == (16, 16, 16)
        assert cfg.variates == (5, 5, 5)
        assert cfg.bottleneck == (0.25, 0.25, 0.25)
        assert cfg.up_blocks == (2, 2, 2)
        assert cfg.down_blocks == (0, 0, 0)

    def test_lists_become_tuples(self):
        """JSON/TOML lists are stored as (hashable, immutable) tuples."""
        cfg = small(resolutions=[1, 4, 8], widths=[8, 8, 8], up_blocks=[1, 1, 1])
        assert cfg.resolutions == (1, 4, 8) and isinstance(cfg.resolutions, tuple)
        assert cfg.widths == (8, 8, 8) and isinstance(cfg.widths, tuple)
        hash(cfg)

    def test_skip_widths_default_to_widths(self):
        """Without skip_widths the posterior skip has the residual-stream width."""
        assert small().skip_widths == (32, 32, 16)
        assert small(skip_widths=(4, 5, 6)).skip_widths == (4, 5, 6)

    def test_config_is_frozen(self):
        """Fields cannot be reassigned after validation."""
        cfg = small()
        with pytest.raises(dataclasses.FrozenInstanceError):
            cfg.image_size = 16  # type: ignore[misc]

    def test_name_is_ignored_by_equality(self):
        """Two configs that build the same network compare equal whatever their names."""
        assert small(name="a") == small(name="b")
        assert small() != small(variates=7)


class TestDerivedSizes:
    """Layer shapes and dimension counts follow from the per-resolution fields."""

    def test_layer_shapes_lowest_resolution_first(self):
        """One (V, H, W) per top-down block, in top-down order."""
        cfg = small()
        assert cfg.layer_shapes() == [(4, 1, 1), (3, 4, 4), (3, 4, 4), (2, 8, 8), (2, 8, 8), (2, 8, 8)]
        assert cfg.n_layers == 6

    def test_latent_counts(self):
        """Variates = sum of V over layers; elements = sum of V*H*W."""
        cfg = small()
        assert cfg.n_latent_variates == 4 + 3 * 2 + 2 * 3
        assert cfg.n_latent_elements == 4 * 1 + 2 * 3 * 16 + 3 * 2 * 64

    def test_dims_per_image_uses_unpadded_crop(self):
        """nats/dim divides by C * (image_size - 2 pad)^2."""
        cfg = ModelConfig(image_size=32, channels=1, output="bernoulli", pad=2, resolutions=(1, 4, 8, 16, 32),
                          up_blocks=1, down_blocks=1, widths=8, variates=2)
        assert cfg.loss_size == 28
        assert cfg.dims_per_image == 28 * 28
        rgb = small(channels=3)
        assert rgb.dims_per_image == 3 * 8 * 8

    def test_mid_width_is_width_times_bottleneck(self):
        """The residual cells' middle width is floor(width * bottleneck), at least 1."""
        cfg = small(widths=(32, 32, 16), bottleneck=(0.25, 0.5, 0.01))
        assert [cfg.mid_width(i) for i in range(3)] == [8, 16, 1]


BAD_CONFIGS = [
    # (field changes, field the message must name)
    (dict(widths=(32, 0, 16)), "widths"),
    (dict(widths=(32, -4, 16)), "widths"),
    (dict(widths=-1), "widths"),
    (dict(skip_widths=(8, 0, 8)), "skip_widths"),
    (dict(variates=0), "variates"),
    (dict(variates=(4, -1, 2)), "variates"),
    (dict(up_blocks=(1, -1, 1)), "up_blocks"),
    (dict(up_blocks=(0, 0, 0)), "up_blocks"),
    (dict(down_blocks=(1, 1, -2)), "down_blocks"),
    (dict(resolutions=(1, 3, 8)), "resolutions"),         # 3 does not divide 8
    (dict(resolutions=(1, 4, 16)), "resolutions"),        # does not end at image_size 8
    (dict(resolutions=(4, 1, 8)), "resolutions"),         # not increasing
    (dict(resolutions=(1, 4, 4, 8), up_blocks=1, down_blocks=1, widths=8, variates=2, bottleneck=1.0),
     "resolutions"),                                      # repeated resolution
    (dict(resolutions=(0, 4, 8)), "resolutions"),
    (dict(resolutions=()), "resolutions"),
    (dict(widths=(32, 16)), "widths"),                    # wrong-length tuples
    (dict(variates=(1, 2, 3, 4)), "variates"),
    (dict(up_blocks=(1, 1)), "up_blocks"),
    (dict(down_blocks=(1, 1, 1, 1)), "down_blocks"),
    (dict(bottleneck=(0.5, 0.5)), "bottleneck"),
    (dict(skip_widths=(8, 8)), "skip_widths"),
    (dict(bottleneck=0.0), "bottleneck"),
    (dict(bottleneck=(0.5, 5.0, 0.5)), "bottleneck"),
    (dict(architecture="resnet"), "architecture"),
    (dict(output="gaussian"), "output"),
    (dict(activation="relu"), "activation"),
    (dict(architecture="vdvae", widths=(16, 32, 32)), "widths"),  # vdvae cannot widen toward high res
    (dict(bit_reduction="floor"), "bit_reduction"),
    (dict(input_scale=0.0), "input_scale"),
    (dict(input_shift=float("nan")), "input_scale"),
    (dict(channels=2), "channels"),
    (dict(n_bits=0), "n_bits"),
    (dict(n_bits=9), "n_bits"),
    (dict(n_mixtures=0), "n_mixtures"),
    (dict(pad=-1), "pad"),
    (dict(pad=4), "pad"),                                 # nothing left inside an 8x8 image
    (dict(image_size=0, resolutions=(1,), up_blocks=1, down_blocks=1, widths=8, variates=1, bottleneck=1.0),
     "image_size"),
    (dict(latent_beta=0.0), "latent_beta"),
    (dict(output_beta=-1.0), "output_beta"),
    (dict(output="bernoulli", n_bits=5), "n_bits"),
]


class TestInvalidConfigsAreRejected:
    """Every invalid config raises ConfigError (a ValueError) whose message names the field."""

    @pytest.mark.parametrize("changes,field", BAD_CONFIGS, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD_CONFIGS)])
    def test_bad_field_raises_config_error_naming_it(self, changes, field):
        with pytest.raises(ConfigError) as info:
            small(**changes)
        assert f"'{field}'" in str(info.value)

    def test_config_error_is_a_user_error_and_value_error(self):
        """The CLI maps UserError to exit 2; library callers can catch ValueError."""
        assert issubclass(ConfigError, UserError)
        assert issubclass(ConfigError, ValueError)

    def test_vdvae_widths_may_shrink_toward_high_resolutions(self):
        """vdvae takes a constant width, or widths that narrow toward the image (openai's custom widths)."""
        assert small(architecture="vdvae", widths=16).widths == (16, 16, 16)
        assert small(architecture="vdvae", widths=(32, 32, 16)).widths == (32, 32, 16)
        assert small(architecture="efficient", widths=(64, 32, 16)).widths == (64, 32, 16)

    def test_replace_revalidates(self):
        """replace() builds a new validated config instead of bypassing the checks."""
        with pytest.raises(ConfigError, match="'variates'"):
            small().replace(variates=0)


class TestSerialisationRoundTrip:
    """to_dict/from_dict reproduce the config exactly, through JSON too."""

    @pytest.mark.parametrize("cfg", [
        small(),
        small(name="named", architecture="vdvae", widths=16, activation="gelu", mol_bounded=True),
        ModelConfig(image_size=8, channels=1, output="bernoulli", pad=1, resolutions=(1, 4, 8), up_blocks=(1, 1, 2),
                    down_blocks=(1, 0, 1), widths=(16, 16, 8), skip_widths=(3, 4, 5), bottleneck=0.5, variates=2),
        ModelConfig(),
    ], ids=["mol", "vdvae", "bernoulli-pad", "defaults"])
    def test_round_trip_through_json(self, cfg):
        data = json.loads(json.dumps(cfg.to_dict()))
        back = ModelConfig.from_dict(data)
        assert back == cfg
        assert back.name == cfg.name
        assert back.to_dict() == cfg.to_dict()

    def test_to_dict_has_every_field_and_plain_lists(self):
        """The dict lists every dataclass field; sequences are lists (JSON/TOML friendly)."""
        d = small().to_dict()
        assert set(d) == {f.name for f in dataclasses.fields(ModelConfig)}
        assert d["widths"] == [32, 32, 16] and isinstance(d["widths"], list)

    def test_from_dict_rejects_unknown_field(self):
        """A typo in a stored config is named, not silently dropped."""
        data = small().to_dict()
        data["widht"] = 3
        with pytest.raises(ConfigError, match="'widht'"):
            ModelConfig.from_dict(data)

    def test_from_dict_fills_missing_fields_with_defaults(self):
        """Only the fields given change; the rest keep their defaults."""
        cfg = ModelConfig.from_dict({"channels": 1, "n_bits": 5})
        assert cfg.channels == 1 and cfg.n_bits == 5
        assert cfg == ModelConfig(channels=1, n_bits=5)
        assert cfg.widths == ModelConfig().widths


class TestOverrides:
    """with_overrides parses ``--set key=value`` strings by each field's type."""

    def test_parses_int_float_bool_str(self):
        cfg = small().with_overrides({"n_mixtures": "7", "latent_beta": "1", "mol_bounded": "true",
                                      "activation": "gelu", "name": "mine"})
        assert cfg.n_mixtures == 7 and isinstance(cfg.n_mixtures, int)
        assert cfg.latent_beta == 1.0 and isinstance(cfg.latent_beta, float)
        assert cfg.mol_bounded is True
        assert cfg.activation == "gelu"
        assert cfg.name == "mine"

    @pytest.mark.parametrize("raw,value", [("true", True), ("True", True), ("yes", True), ("1", True),
                                           ("false", False), ("No", False), ("0", False)])
    def test_bool_spellings(self, raw, value):
        assert small(mol_bounded=not value).with_overrides({"mol_bounded": raw}).mol_bounded is value

    @pytest.mark.parametrize("raw", ["8,8,4", "[8, 8, 4]", "(8,8,4)", " 8 , 8 , 4 "])
    def test_parses_lists(self, raw):
        """Per-resolution lists in any of the usual spellings."""
        assert small().with_overrides({"widths": raw}).widths == (8, 8, 4)

    def test_parses_float_lists(self):
        assert small().with_overrides({"bottleneck": "0.25,1,2"}).bottleneck == (0.25, 1.0, 2.0)

    def test_changes_several_fields_together(self):
        """Fields that must change together (schedule + image size) can be set in one call."""
        cfg = small().with_overrides({"image_size": "16", "resolutions": "1,4,16"})
        assert cfg.image_size == 16 and cfg.resolutions == (1, 4, 16)
        assert cfg.layer_shapes()[-1] == (2, 16, 16)

    @pytest.mark.parametrize("field,raw,expected", [
        ("variates", "8", (8, 8, 8)),
        ("widths", "64", (64, 64, 64)),
        ("bottleneck", "0.5", (0.5, 0.5, 0.5)),
    ])
    def test_single_value_broadcasts_to_every_resolution(self, field, raw, expected):
        """``--set variates=8`` means 8 at every resolution, as ModelConfig(variates=8) does."""
        assert getattr(small().with_overrides({field: raw}), field) == expected

    def test_original_is_unchanged(self):
        cfg = small()
        cfg.with_overrides({"n_mixtures": "9"})
        assert cfg.n_mixtures == 3

    def test_unknown_field_is_named(self):
        with pytest.raises(ConfigError, match="'depth'"):
            small().with_overrides({"depth": "3"})

    @pytest.mark.parametrize("field,raw", [("n_mixtures", "many"), ("latent_beta", "fast"), ("mol_bounded", "maybe"),
                                           ("widths", "a,b,c"), ("image_size", "8.5")])
    def test_unparseable_value_names_field_and_value(self, field, raw):
        with pytest.raises(ConfigError) as info:
            small().with_overrides({field: raw})
        assert f"'{field}'" in str(info.value) and raw in str(info.value)

    @pytest.mark.parametrize("field,raw", [("widths", "-1,-1,-1"), ("widths", "-1"), ("variates", "0"),
                                           ("architecture", "unet"), ("pad", "-2")])
    def test_parsed_but_invalid_value_names_field(self, field, raw):
        """A value that parses but breaks validation is reported against its field."""
        with pytest.raises(ConfigError, match=f"'{field}'"):
            small().with_overrides({field: raw})

    def test_override_keeps_math_defaults(self):
        """Untouched float fields survive exactly (no string round trip)."""
        cfg = small().with_overrides({"n_mixtures": "2"})
        assert cfg.latent_beta == math.log(2.0)
