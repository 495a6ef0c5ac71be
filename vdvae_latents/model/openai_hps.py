"""openai/vdvae's models as vdvl configurations, and how their weights map onto vdvl's.

openai/vdvae (MIT licence) describes each model by a few hyper-parameters in its
``hps.py`` and per-data-set input constants in its ``data.py``. The facts are restated
here (numbers only) so that vdvl can build the same networks: :func:`openai_config`
turns one of its hyper-parameter sets into a :class:`~vdvae_latents.model.config.ModelConfig`
(the ``<data>-vdvae`` presets use it), and :func:`openai_key_map` says which tensor of
openai's state dict becomes which tensor of :class:`~vdvae_latents.model.vae.VAE`'s.

The block strings are openai's own notation: comma-separated entries ``RxN`` (N
blocks at resolution R), ``RdF`` (a block at R followed by average pooling by F) in
the bottom-up path, and ``RmS`` (the first block at R, fed with the upsampled state of
resolution S) in the top-down path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..core.errors import ConfigError
from .config import (
    VDVAE_NO_BIAS_ABOVE as NO_BIAS_ABOVE,  # openai's no_bias_above, the same in every hps
)
from .config import ModelConfig


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


def openai_layout(h: OpenAIHps) -> tuple[tuple[int, ...], list[int], list[int]]:
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
    res, up, down = openai_layout(h)
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


__all__ = ["OpenAIHps", "OPENAI_HPS", "get_openai_hps", "parse_blocks", "openai_layout", "openai_config",
           "NO_BIAS_ABOVE"]
