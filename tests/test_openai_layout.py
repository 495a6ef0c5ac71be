"""openai/vdvae's hyper-parameter sets as vdvl configs, the key map and the MoL channel order.

The exact parameter counts below were taken by building openai/vdvae's own ``VAE`` from
its ``hps.py`` (random weights, meta device); they are written out here, not computed.
"""

from __future__ import annotations

import pytest
import torch

from vdvae_latents.model.config import ModelConfig
from vdvae_latents.core.errors import ConfigError
from vdvae_latents.model.heads import MixtureOfLogisticsHead
from vdvae_latents.model.openai_hps import OPENAI_HPS, OpenAIHps, get_openai_hps, openai_config, parse_blocks
from vdvae_latents.interop.openai import mol_channel_order, openai_key_map, openai_to_vdvl, vdvl_to_openai
from vdvae_latents.train.presets import get_preset
from vdvae_latents.model.vae import VAE, count_parameters, meta_model

OPENAI_PARAMETERS = {
    "cifar10": 39_145_700, "imagenet32": 119_280_868, "imagenet64": 125_005_860,
    "ffhq256": 114_874_852, "ffhq1024": 109_366_904,
}


@pytest.mark.parametrize("name", sorted(OPENAI_PARAMETERS))
def test_vdvae_presets_are_openais_models(name):
    """`<data>-vdvae` has exactly openai's parameter count (meta device: nothing allocated)."""
    cfg = get_preset(f"{name}-vdvae").config
    assert cfg == openai_config(name)
    assert count_parameters(cfg) == OPENAI_PARAMETERS[name]


def test_layouts_read_from_the_block_strings():
    """Hand-counted from hps.py: CIFAR-10's top-down 1:1, 4:3, 8:6, 16:11, 32:22 and so on."""
    c = openai_config("cifar10")
    assert c.resolutions == (1, 4, 8, 16, 32) and c.up_blocks == (1, 3, 6, 11, 22)
    assert c.down_blocks == (3, 3, 6, 6, 11) and c.widths == (384,) * 5 and c.variates == (16,) * 5
    assert (c.architecture, c.activation, c.mol_bounded, c.mol_tail) == ("vdvae", "gelu", True, "pixelcnn")
    assert c.input_shift == pytest.approx(1 - 120.63838 / 127.5) and c.input_scale == pytest.approx(127.5 / 64.16736)
    f = openai_config("ffhq256")
    assert (f.n_bits, f.bit_reduction, f.image_size) == (5, "truncate", 256)
    k = openai_config("ffhq1024")
    assert k.widths == (512,) * 7 + (64, 32, 16) and k.n_mixtures == 2 and k.n_bits == 8
    assert k.up_blocks == (2, 4, 5, 10, 21, 15, 8, 3, 1, 1)
    # ffhq1024's input constants are for [0, 1] pixels: (v / 255 - 0.4387) / 0.2743.
    v = torch.tensor([0.0, 100.0, 255.0], dtype=torch.float64)
    x = (v - 127.5) / 127.5
    torch.testing.assert_close((x + k.input_shift) * k.input_scale, (v / 255 - 0.4387) / 0.2743)


def test_parse_blocks():
    assert parse_blocks("32x2,32d2,16m8,4") == [(32, "x", 0), (32, "x", 0), (32, "d", 2), (16, "m", 8), (4, "x", 0)]
    with pytest.raises(ConfigError, match="'32y2'"):
        parse_blocks("32x2,32y2")


@pytest.mark.parametrize("enc,dec", [
    ("8x1,8d2,4x1,4d4,1x1", "1x1,4x1,8m4"),          # 4x4 not fed from 1x1
    ("8x1,8d2,4x1,4d4,1x1", "1x1,4m1,8m4,4x1"),      # back to a lower resolution
    ("8x1,8d2,4x1,1x1", "1x1,4m1,8m4"),              # no pool from 4 to 1
    ("8x1,8d4,4x1,4d4,1x1", "1x1,4m1,8m4"),          # pools 8 -> 2
    ("8x1,8d2,4x1,4d4,1x1,4x1", "1x1,4m1,8m4"),      # revisits 4x4
])
def test_layouts_vdvl_cannot_express_are_refused(enc, dec):
    h = OpenAIHps("odd", "cifar10", 8, enc, dec, 8, 0.0, 1.0)
    with pytest.raises(ConfigError):
        openai_config(h)


def test_unknown_hps_is_a_user_error():
    with pytest.raises(ConfigError, match="'cifar100'"):
        get_openai_hps("cifar100")


@pytest.mark.parametrize("name", sorted(OPENAI_HPS))
def test_key_map_is_one_to_one_onto_the_state_dict(name):
    state = meta_model(openai_config(name)).state_dict()
    pairs = openai_key_map(name)
    assert sorted(dst for _, dst in pairs) == sorted(state)
    assert len({src for src, _ in pairs}) == len(pairs)


def pixelcnn_params(raw: torch.Tensor, m: int) -> dict[str, torch.Tensor]:
    """Split a PixelCNN++-layout output (B, 10 M, H, W), written from the layout's description:
    M logits, then for colour c = 0, 1, 2 a block of 3 M: M means, M log-scales, M coefficients."""
    block = lambda c, j: raw[:, m + 3 * m * c + j * m: m + 3 * m * c + (j + 1) * m]  # noqa: E731
    return dict(logit_weights=raw[:, :m],
                means=torch.stack([block(c, 0) for c in range(3)], 2),
                scales=torch.exp(torch.stack([block(c, 1) for c in range(3)], 2).clamp(min=-7)),
                coeffs=torch.tanh(torch.stack([block(c, 2) for c in range(3)], 2)))


@pytest.mark.parametrize("m", [1, 2, 10])
def test_mol_channel_order_turns_pixelcnn_layout_into_vdvls(m):
    """A head whose output conv takes the reference channels through the order sees the reference's parameters."""
    cfg = ModelConfig(image_size=4, channels=3, n_mixtures=m, resolutions=(4,), up_blocks=1, down_blocks=0,
                      widths=8, variates=1, architecture="vdvae", mol_bounded=True)
    head = MixtureOfLogisticsHead(cfg, 10 * m).double()
    order = mol_channel_order(m)
    assert sorted(order.tolist()) == list(range(10 * m))
    with torch.no_grad():
        head.out.weight.copy_(torch.eye(10 * m, dtype=torch.float64)[order].reshape(10 * m, 10 * m, 1, 1))
        head.out.bias.zero_()
    raw = torch.randn(2, 10 * m, 4, 4, dtype=torch.float64)
    got, expected = head.params(raw), pixelcnn_params(raw, m)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)


def test_weights_map_there_and_back_exactly():
    h = OpenAIHps("tiny", "cifar10", 8, "8x1,8d2,4x1,4d4,1x1", "1x1,4m1,4x1,8m4", 8, -120.0, 1 / 64.0,
                  custom_widths={4: 16, 1: 24}, zdim=2, num_mixtures=2)
    torch.manual_seed(0)
    state = VAE(openai_config(h)).state_dict()
    theirs = vdvl_to_openai(state, h)
    assert "decoder.dec_blocks.1.enc.c1.weight" in theirs and "decoder.bias_xs.2" in theirs
    back = openai_to_vdvl(theirs, h)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)
    assert not torch.equal(theirs["decoder.out_net.out_conv.weight"], state["head.out.weight"])
