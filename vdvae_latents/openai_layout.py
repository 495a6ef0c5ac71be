"""openai/vdvae's models as vdvl configurations, and how their weights map onto vdvl's.

openai/vdvae (MIT licence) describes each model by a few hyper-parameters in its
``hps.py`` and per-data-set input constants in its ``data.py``. The facts are restated
here (numbers only) so that vdvl can build the same networks: :func:`openai_config`
turns one of its hyper-parameter sets into a :class:`~vdvae_latents.config.ModelConfig`
(the ``<data>-vdvae`` presets use it), and :func:`openai_key_map` says which tensor of
openai's state dict becomes which tensor of :class:`~vdvae_latents.vae.VAE`'s.

The block strings are openai's own notation: comma-separated entries ``RxN`` (N
blocks at resolution R), ``RdF`` (a block at R followed by average pooling by F) in
the bottom-up path, and ``RmS`` (the first block at R, fed with the upsampled state of
resolution S) in the top-down path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from .config import ModelConfig
from .errors import ConfigError
from .vae import VDVAE_NO_BIAS_ABOVE as NO_BIAS_ABOVE  # openai's no_bias_above, the same in every hps


@dataclass(frozen=True)
class OpenAIHps:
    """One of openai/vdvae's hyper-parameter sets (``--hps NAME``), the parts that shape the model.

    ``input_shift``/``input_scale`` are data.py's constants: the encoder reads
    ``(u + shift) * scale`` where ``u`` is the 8-bit value divided by ``pixel_unit``
    (255 for FFHQ-1024, whose images arrive in [0, 1]; 1 otherwise).
    """

    name: str
    dataset: str
    image_size: int
    enc_blocks: str
    dec_blocks: str
    width: int
    input_shift: float
    input_scale: float
    custom_widths: dict[int, int] = field(default_factory=dict)
    zdim: int = 16
    bottleneck: float = 0.25
    num_mixtures: int = 10
    low_bit: bool = False  # 5-bit targets (FFHQ-256)
    pixel_unit: float = 1.0

    def width_at(self, res: int) -> int:
        return self.custom_widths.get(res, self.width)

    def as_dict(self) -> dict:
        """Plain values for provenance records."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["custom_widths"] = {str(k): v for k, v in self.custom_widths.items()}
        return out


_I64_ENC = "64x11,64d2,32x20,32d2,16x9,16d2,8x8,8d2,4x7,4d4,1x5"
OPENAI_HPS: dict[str, OpenAIHps] = {h.name: h for h in (
    OpenAIHps("cifar10", "cifar10", 32, "32x11,32d2,16x6,16d2,8x6,8d2,4x3,4d4,1x3",
              "1x1,4m1,4x2,8m4,8x5,16m8,16x10,32m16,32x21", 384, -120.63838, 1 / 64.16736),
    OpenAIHps("imagenet32", "imagenet32", 32, "32x15,32d2,16x9,16d2,8x8,8d2,4x6,4d4,1x6",
              "1x2,4m1,4x4,8m4,8x9,16m8,16x19,32m16,32x40", 512, -116.2373, 1 / 69.37404),
    OpenAIHps("imagenet64", "imagenet64", 64, _I64_ENC,
              "1x2,4m1,4x3,8m4,8x7,16m8,16x15,32m16,32x31,64m32,64x12", 512, -115.92961967, 1 / 69.37404),
    OpenAIHps("ffhq256", "ffhq_256", 256,
              "256x3,256d2,128x8,128d2,64x12,64d2,32x17,32d2,16x7,16d2,8x5,8d2,4x5,4d4,1x4",
              "1x2,4m1,4x3,8m4,8x4,16m8,16x9,32m16,32x21,64m32,64x13,128m64,128x7,256m128",
              512, -112.8666757481, 1 / 69.84780273, low_bit=True),
    OpenAIHps("ffhq1024", "ffhq_1024", 1024,
              "1024x1,1024d2,512x3,512d2,256x5,256d2,128x7,128d2,64x10,64d2,32x14,32d2,16x7,16d2,"
              "8x5,8d2,4x5,4d4,1x4",
              "1x2,4m1,4x3,8m4,8x4,16m8,16x9,32m16,32x20,64m32,64x14,128m64,128x7,256m128,256x2,"
              "512m256,1024m512",
              16, -0.4387, 1 / 0.2743, num_mixtures=2, pixel_unit=255.0,
              custom_widths={512: 32, 256: 64, 128: 512, 64: 512, 32: 512, 16: 512, 8: 512, 4: 512, 1: 512}),
)}


def get_openai_hps(name: str | OpenAIHps) -> OpenAIHps:
    """One of openai's published hyper-parameter sets by name (an :class:`OpenAIHps` passes through:
    weights trained with other hyper-parameters import with a hand-made one)."""
    if isinstance(name, OpenAIHps):
        return name
    try:
        return OPENAI_HPS[name]
    except KeyError:
        raise ConfigError(f"--hps must be one of {', '.join(OPENAI_HPS)}, not '{name}'.") from None


# --------------------------------------------------------------------------- block strings

_ENTRY = re.compile(r"(\d+)(?:([xmd])(\d+))?")


def parse_blocks(spec: str) -> list[tuple[int, str, int]]:
    """``"32x2,32d2,16m8"`` -> one ``(resolution, kind, arg)`` per block.

    kind is ``"x"`` (a plain block), ``"d"`` (a block then pooling by ``arg``) or ``"m"``
    (a block fed with the upsampled state of resolution ``arg``); ``RxN`` expands to N
    plain blocks.
    """
    blocks = []
    for entry in spec.split(","):
        match = _ENTRY.fullmatch(entry.strip())
        if not match:
            raise ConfigError(f"block string entry '{entry}' is not RxN, RdF, RmS or R.")
        res, kind, arg = int(match.group(1)), match.group(2) or "x", int(match.group(3) or 1)
        blocks += [(res, "x", 0)] * arg if kind == "x" else [(res, kind, arg)]
    return blocks


def _layout(h: OpenAIHps) -> tuple[tuple[int, ...], list[int], list[int]]:
    """(resolutions lowest first, up blocks, down blocks), checking vdvl can express the strings."""
    runs: list[tuple[int, list[tuple[str, int]]]] = []  # top-down: (resolution, its blocks)
    for r, kind, arg in parse_blocks(h.dec_blocks):
        if runs and runs[-1][0] == r:
            runs[-1][1].append((kind, arg))
        else:
            runs.append((r, [(kind, arg)]))
    res = [r for r, _ in runs]
    for i, (r, blocks) in enumerate(runs):
        first = ("x", 0) if i == 0 else ("m", res[i - 1])
        if res[:i + 1] != sorted(set(res[:i + 1])) or blocks[0] != first or any(b != ("x", 0) for b in blocks[1:]):
            raise ConfigError(f"dec_blocks '{h.dec_blocks}' is not a layout vdvl can express (at resolution {r}).")
    up = [len(blocks) for _, blocks in runs]
    enc = parse_blocks(h.enc_blocks)
    down = [0] * len(res)
    order = []  # resolutions as the bottom-up path visits them
    for k, (r, kind, arg) in enumerate(enc):
        if r not in res or kind == "m":
            raise ConfigError(f"enc_blocks '{h.enc_blocks}' is not a layout vdvl can express (block {k}).")
        i = res.index(r)
        if not order or order[-1] != r:
            order.append(r)
        if kind == "x":
            down[i] += 1
        elif i == 0 or r // arg != res[i - 1] or (k + 1 < len(enc) and enc[k + 1][0] != res[i - 1]):
            raise ConfigError(f"enc_blocks '{h.enc_blocks}' pools from {r} by {arg}, not to the next resolution.")
    if order != res[::-1] or sum(kind == "d" for _, kind, _ in enc) != len(res) - 1:
        raise ConfigError(f"enc_blocks '{h.enc_blocks}' does not visit the resolutions {res} once each.")
    return tuple(res), up, down


def openai_config(name: str | OpenAIHps) -> ModelConfig:
    """The vdvl configuration that builds exactly openai/vdvae's model ``--hps name``."""
    h = get_openai_hps(name)
    res, up, down = _layout(h)
    if h.width_at(h.image_size) != h.width:
        raise ConfigError(f"hps '{h.name}' has a custom width at the image resolution, which openai/vdvae cannot run.")
    # openai: enc(u) with u = 8-bit value / pixel_unit; vdvl's input is x = v / 127.5 - 1.
    return ModelConfig(
        image_size=h.image_size, channels=3, n_bits=5 if h.low_bit else 8,
        bit_reduction="truncate" if h.low_bit else "rescale", output="mol", n_mixtures=h.num_mixtures,
        mol_bounded=True, mol_tail="pixelcnn", resolutions=res, up_blocks=up, down_blocks=down,
        widths=[h.width_at(r) for r in res], bottleneck=h.bottleneck, variates=h.zdim,
        architecture="vdvae", activation="gelu",
        input_shift=1.0 + h.input_shift * h.pixel_unit / 127.5, input_scale=127.5 * h.input_scale / h.pixel_unit,
        name=f"{h.name}-vdvae")


# --------------------------------------------------------------------------- weights

_CELL = ("c1", "c2", "c3", "c4")


def _cell_pairs(src: str, dst: str) -> list[tuple[str, str]]:
    return [(f"{src}.{c}.{p}", f"{dst}.{c}.{p}") for c in _CELL for p in ("weight", "bias")]


def openai_key_map(name: str | OpenAIHps) -> list[tuple[str, str]]:
    """``(openai key, vdvl key)`` for every tensor, in openai's state-dict order.

    openai keys have no ``module.`` prefix. The output conv (``decoder.out_net.out_conv``)
    also needs its channels reordered: see :func:`mol_channel_order`.
    """
    h = get_openai_hps(name)
    res, _, _ = _layout(h)
    pairs = [("encoder.in_conv.weight", "input_conv.weight"), ("encoder.in_conv.bias", "input_conv.bias")]
    seen = [0] * len(res)
    for k, (r, kind, _) in enumerate(parse_blocks(h.enc_blocks)):
        i = res.index(r)
        dst = f"pools.{i}.cell" if kind == "d" else f"down_cells.{i}.{seen[i]}"
        seen[i] += kind == "x"
        pairs += _cell_pairs(f"encoder.enc_blocks.{k}", dst)
    seen = [0] * len(res)
    for k, (r, _, _) in enumerate(parse_blocks(h.dec_blocks)):
        i = res.index(r)
        src, dst = f"decoder.dec_blocks.{k}", f"up_blocks.{i}.{seen[i]}"
        seen[i] += 1
        pairs += _cell_pairs(f"{src}.enc", f"{dst}.posterior") + _cell_pairs(f"{src}.prior", f"{dst}.prior")
        pairs += [(f"{src}.z_proj.{p}", f"{dst}.z_proj.{p}") for p in ("weight", "bias")]
        pairs += _cell_pairs(f"{src}.resnet", f"{dst}.cell")
    biased = [i for i, r in enumerate(res) if r <= NO_BIAS_ABOVE]
    pairs += [(f"decoder.bias_xs.{n}", "initial_state" if i == 0 else f"res_bias_{i}") for n, i in enumerate(biased)]
    pairs += [("decoder.out_net.out_conv.weight", "head.out.weight"), ("decoder.out_net.out_conv.bias", "head.out.bias")]
    pairs += [("decoder.gain", "final_gain"), ("decoder.bias", "final_bias")]
    return pairs


def mol_channel_order(n_mixtures: int, channels: int = 3) -> torch.Tensor:
    """For each output channel of vdvl's MoL head, the reference channel it takes.

    vdvl's head emits [logits (M) | means (M x C) | scales (M x C) | coeffs (M x 3)],
    mixture-major; openai/vdvae and Efficient-VDVAE emit PixelCNN++'s [logits (M) |
    per colour c: means (M), log-scales (M), coeffs (M)], where colour c's coefficient
    block is vdvl's coefficient c. ``vdvl_out = reference_out[order]``.
    """
    if channels != 3:
        raise ValueError("the PixelCNN++ channel layout is defined for RGB only")
    m = n_mixtures
    order = list(range(m))
    order += [m + c * 3 * m + j for j in range(m) for c in range(3)]            # means
    order += [m + c * 3 * m + m + j for j in range(m) for c in range(3)]        # log-scales
    order += [m + k * 3 * m + 2 * m + j for j in range(m) for k in range(3)]    # coeffs
    return torch.tensor(order)


def openai_to_vdvl(state: dict[str, torch.Tensor], name: str | OpenAIHps) -> dict[str, torch.Tensor]:
    """openai/vdvae weights (no ``module.`` prefix, names and shapes already checked) as vdvl's."""
    order = mol_channel_order(get_openai_hps(name).num_mixtures)
    out = {}
    for src, dst in openai_key_map(name):
        t = state[src]
        out[dst] = t[order].contiguous() if src.startswith("decoder.out_net.") else t
    return out


def vdvl_to_openai(state: dict[str, torch.Tensor], name: str | OpenAIHps) -> dict[str, torch.Tensor]:
    """The inverse of :func:`openai_to_vdvl`: a vdvl state dict in openai/vdvae's names and layout."""
    inverse = torch.argsort(mol_channel_order(get_openai_hps(name).num_mixtures))
    out = {}
    for src, dst in openai_key_map(name):
        t = state[dst]
        out[src] = t[inverse].contiguous() if src.startswith("decoder.out_net.") else t
    return out


__all__ = ["OpenAIHps", "OPENAI_HPS", "get_openai_hps", "parse_blocks", "openai_config", "openai_key_map",
           "mol_channel_order", "openai_to_vdvl", "vdvl_to_openai", "NO_BIAS_ABOVE"]
