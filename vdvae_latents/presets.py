"""Named model configurations.

Paper presets are named ``<dataset>-<config>``: ``c1`` (widths that grow toward the low
resolutions), ``c2`` (the same layout at a constant width; the paper: "C1 is only
different from C2 in the use of incremental filter width") and ``vdvae`` (the original
architecture, for the datasets where the paper's Table 3 has a VDVAE column).

Sources: layers per resolution from Table 6; widths, bottlenecks, variates and
bottom-up depths from the public Efficient-VDVAE example configs (C1) and the public
VDVAE hyper-parameters. Parameter counts are checked against Table 3 by the tests.
Per-resolution tuples run from the lowest resolution to the highest.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig
from .errors import ConfigError
from .recipes import Recipe, recipe_for_preset

# Table 3 parameter counts (millions) that the presets are tested against.
PAPER_PARAMETERS_M = {
    "cifar10-c1": 18, "cifar10-c2": 51, "cifar10-vdvae": 39,
    "imagenet32-c1": 52, "imagenet32-c2": 156, "imagenet32-vdvae": 119,
    "imagenet64-c1": 57, "imagenet64-c2": 168, "imagenet64-vdvae": 125,
    "ffhq256-c1": 66, "ffhq256-c2": 198, "ffhq256-vdvae": 115,
}


@dataclass(frozen=True)
class Preset:
    name: str
    config: ModelConfig
    description: str
    # Training defaults that go with the model (used by `vdvl train`).
    batch_size: int = 16
    lr: float = 1e-3

    @property
    def recipe(self) -> Recipe:
        """The rest of the training defaults: the official recipe for paper presets (recipes.py)."""
        return recipe_for_preset(self.name)


def _c1(image_size, channels, n_bits, res, up, down, widths, bottleneck, variates, **kw) -> ModelConfig:
    return ModelConfig(image_size=image_size, channels=channels, n_bits=n_bits, resolutions=res,
                       up_blocks=up, down_blocks=down, widths=widths, bottleneck=bottleneck,
                       variates=variates, **kw)


def _c2_from(c1: ModelConfig, width: int, bottleneck: float = 0.25) -> ModelConfig:
    """C2: the C1 layout at one constant width and bottleneck (VDVAE's 0.25)."""
    n = len(c1.resolutions)
    return c1.replace(widths=[width] * n, skip_widths=[width] * n, bottleneck=[bottleneck] * n)


def _vdvae(image_size, channels, n_bits, res, up, down, width, variates) -> ModelConfig:
    return ModelConfig(image_size=image_size, channels=channels, n_bits=n_bits, resolutions=res,
                       up_blocks=up, down_blocks=down, widths=width, bottleneck=0.25, variates=variates,
                       architecture="vdvae", activation="gelu", mol_bounded=True)


def _paper_presets() -> dict[str, Preset]:
    p: dict[str, Preset] = {}

    def add(name: str, cfg: ModelConfig, desc: str, batch: int, lr: float = 1e-3) -> None:
        p[name] = Preset(name, cfg.replace(name=name), desc, batch, lr)

    # ---- CIFAR-10, 32x32x3, 8-bit
    r5 = (1, 4, 8, 16, 32)
    c1 = _c1(32, 3, 8, r5, (3, 4, 7, 11, 22), (3, 4, 7, 7, 12), (384, 384, 192, 96, 48),
             (0.25, 0.25, 0.25, 0.5, 1.0), 16)
    add("cifar10-c1", c1, "CIFAR-10 C1: 47 latent layers, widths 384 -> 48", 16)
    add("cifar10-c2", _c2_from(c1, 384), "CIFAR-10 C2: C1 layout at width 384", 16)
    add("cifar10-vdvae", _vdvae(32, 3, 8, r5, (1, 3, 6, 11, 22), (3, 3, 6, 6, 11), 384, 16),
        "CIFAR-10 original VDVAE (43 layers, width 384)", 32, 2e-4)

    # ---- ImageNet 32x32
    c1 = _c1(32, 3, 8, r5, (6, 7, 19, 25, 16), (6, 7, 9, 10, 16), (512, 512, 256, 128, 64),
             (0.25, 0.25, 0.25, 0.5, 1.0), 48)
    add("imagenet32-c1", c1, "ImageNet 32x32 C1: 73 latent layers, widths 512 -> 64", 64)
    add("imagenet32-c2", _c2_from(c1, 512), "ImageNet 32x32 C2: C1 layout at width 512", 64)
    add("imagenet32-vdvae", _vdvae(32, 3, 8, r5, (2, 5, 10, 20, 41), (6, 6, 8, 9, 15), 512, 16),
        "ImageNet 32x32 original VDVAE (78 layers, width 512)", 256, 1.5e-4)

    # ---- ImageNet 64x64 (and CelebA 64x64 with the same layout)
    r6 = (1, 4, 8, 16, 32, 64)
    c1 = _c1(64, 3, 8, r6, (6, 7, 19, 25, 16, 11), (6, 7, 9, 10, 16, 5), (512, 512, 256, 256, 64, 64),
             (0.25, 0.25, 0.25, 0.25, 0.5, 1.0), 64)
    add("imagenet64-c1", c1, "ImageNet 64x64 C1: 84 latent layers, widths 512 -> 64", 32)
    add("imagenet64-c2", _c2_from(c1, 512), "ImageNet 64x64 C2: C1 layout at width 512", 32)
    add("imagenet64-vdvae", _vdvae(64, 3, 8, r6, (2, 4, 8, 16, 32, 13), (5, 7, 8, 9, 20, 11), 512, 16),
        "ImageNet 64x64 original VDVAE (75 layers, width 512)", 128, 1.5e-4)
    add("celeba64-c1", c1, "CelebA 64x64 C1 (ImageNet 64 C1 layout)", 32)
    add("celeba64-c2", _c2_from(c1, 512), "CelebA 64x64 C2 (ImageNet 64 C2 layout)", 32)

    # ---- FFHQ / CelebA-HQ 256x256 (Table 3's FFHQ row is 5-bit)
    r8 = (1, 4, 8, 16, 32, 64, 128, 256)
    up8 = (2, 4, 5, 10, 22, 14, 8, 1)
    c1_256 = _c1(256, 3, 5, r8, up8, (4, 6, 6, 8, 18, 13, 9, 4), (512, 512, 512, 256, 256, 128, 128, 128),
                 (0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.5, 1.0), 32)
    add("ffhq256-c1", c1_256, "FFHQ 256x256 (5-bit) C1: 66 latent layers, widths 512 -> 128", 16)
    add("ffhq256-c2", _c2_from(c1_256, 512), "FFHQ 256x256 (5-bit) C2: C1 layout at width 512", 16)
    add("ffhq256-vdvae", _vdvae(256, 3, 5, r8, up8, (4, 5, 5, 7, 17, 12, 8, 3), 512, 16),
        "FFHQ 256x256 (5-bit) original VDVAE (66 layers, width 512)", 32, 1.5e-4)
    c1_hq = c1_256.replace(n_bits=8)
    add("celebahq256-c1", c1_hq, "CelebA-HQ 256x256 (8-bit) C1 (FFHQ 256 layout)", 16)
    add("celebahq256-c2", _c2_from(c1_hq, 512), "CelebA-HQ 256x256 (8-bit) C2 (FFHQ 256 layout)", 16)

    # ---- 1024x1024 (layers per resolution follow VDVAE's FFHQ-1024 decoder)
    r10 = (1, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
    c1_1k = _c1(1024, 3, 8, r10, (2, 4, 5, 10, 21, 15, 8, 3, 1, 1), (4, 5, 6, 8, 15, 11, 8, 6, 4, 2),
                (512, 512, 512, 256, 256, 128, 128, 64, 32, 16),
                (0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.5, 1.0, 1.0, 1.0), 32)
    for ds in ("ffhq1024", "celebahq1024"):
        add(f"{ds}-c1", c1_1k, f"{ds} (8-bit) C1: 70 latent layers, widths 512 -> 16", 8)
        add(f"{ds}-c2", _c2_from(c1_1k, 128), f"{ds} (8-bit) C2: C1 layout at constant width 128 "
            "(a constant 512 would not fit in memory at 1024x1024)", 8)

    # ---- Binarized MNIST: padded 28 -> 32, Bernoulli, scored on the 28x28 crop
    mnist = ModelConfig(image_size=32, channels=1, output="bernoulli", pad=2, resolutions=r5,
                        up_blocks=(5, 5, 10, 2, 1), down_blocks=(5, 5, 10, 2, 1),
                        widths=(512, 256, 128, 64, 32), bottleneck=1.0, variates=32)
    add("mnist-c1", mnist, "Binarized MNIST C1: 23 latent layers, widths 512 -> 32, Bernoulli", 32)
    add("mnist-c2", _c2_from(mnist, 128, bottleneck=0.5),
        "Binarized MNIST C2: C1 layout at constant width 128, bottleneck 0.5", 32)
    return p


def _cpu_presets() -> dict[str, Preset]:
    tiny = ModelConfig(image_size=8, channels=1, n_mixtures=3, resolutions=(1, 4, 8), up_blocks=(1, 2, 2),
                       down_blocks=(1, 1, 1), widths=(32, 32, 16), bottleneck=(0.5, 0.5, 1.0), variates=4,
                       name="tiny")
    digits = ModelConfig(image_size=8, channels=1, n_mixtures=5, resolutions=(1, 4, 8), up_blocks=(2, 2, 2),
                         down_blocks=(1, 1, 1), widths=(48, 48, 24), bottleneck=(0.5, 0.5, 1.0), variates=16,
                         name="digits-cpu")
    fashion = ModelConfig(image_size=28, channels=1, n_mixtures=5, resolutions=(1, 7, 14, 28),
                          up_blocks=(2, 4, 4, 2), down_blocks=(1, 2, 2, 1), widths=(96, 96, 48, 24),
                          bottleneck=0.5, variates=8, name="fashion-mnist-cpu")
    return {
        "tiny": Preset("tiny", tiny, "8x8 grayscale toy model for tests and the digits quickstart", 64),
        "digits-cpu": Preset("digits-cpu", digits, "8x8 grayscale model for the digits quickstart "
                             "(96 latent variates, so 3% keeps a few)", 64),
        "fashion-mnist-cpu": Preset("fashion-mnist-cpu", fashion,
                                    "28x28 grayscale 8-bit MoL model sized for Fashion-MNIST on a 2-core CPU", 32),
    }


PRESETS: dict[str, Preset] = {**_cpu_presets(), **_paper_presets()}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        close = [n for n in PRESETS if n.split("-")[0] == name.split("-")[0]]
        hint = f" (did you mean {', '.join(close)}?)" if close else " (run `vdvl presets` to list them)"
        raise ConfigError(f"unknown preset '{name}'{hint}.") from None


def preset_names() -> list[str]:
    return list(PRESETS)


def describe(preset: Preset) -> dict:
    """Summary row for `vdvl presets`: counts without allocating weights."""
    from .vae import count_parameters

    cfg = preset.config
    n_params = count_parameters(cfg)
    row = {
        "name": preset.name,
        "parameters": n_params,
        "image_shape": [cfg.channels, cfg.image_size, cfg.image_size],
        "latent_layers": cfg.n_layers,
        "latent_variates": cfg.n_latent_variates,
        "latent_elements": cfg.n_latent_elements,
        "architecture": cfg.architecture,
        "output": cfg.output,
        "n_bits": cfg.n_bits,
        "description": preset.description,
        "recipe": preset.recipe.name,
    }
    if preset.name in PAPER_PARAMETERS_M:
        row["paper_parameters_m"] = PAPER_PARAMETERS_M[preset.name]
    return row


__all__ = ["Preset", "PRESETS", "PAPER_PARAMETERS_M", "get_preset", "preset_names", "describe"]
