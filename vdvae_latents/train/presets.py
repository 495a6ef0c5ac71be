"""Named model configurations.

Paper presets are named ``<dataset>-<config>``: ``c1`` (widths that grow toward the low
resolutions), ``c2`` (a constant width; the paper: "C1 is only different from C2 in the
use of incremental filter width") and ``vdvae`` (the original architecture: exactly
openai/vdvae's models, built by :func:`~vdvae_latents.model.openai_hps.openai_config` from its
hyper-parameter sets, input normalisation and 5-bit handling included, so its published
weights import onto them).

Sources: the c1/c2 presets are the official Efficient-VDVAE example configs (``egs/``),
with their per-block skips, output scale, betas and initialisation, so official
checkpoints of them import tensor for tensor; the vdvae presets follow the public VDVAE
hyper-parameters. The tests check exact parameter counts and Table 3 within 15%.
Per-resolution tuples run from the lowest resolution to the highest.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.errors import ConfigError
from ..model.config import ModelConfig
from ..model.openai_hps import openai_config
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


OFFICIAL_BETA = 0.6931472  # the official .cfg files' gradient smoothing beta (ln 2 to 7 digits)
Groups = list[int | tuple[int, dict[int, int]]]


def _groups(spec: int | tuple[int, dict[int, int]]) -> list[int]:
    """``n`` skip groups of one block (or cell) each; ``(n, {k: size})`` widens group k."""
    n, wider = spec if isinstance(spec, tuple) else (spec, {})
    return [wider.get(k, 1) for k in range(n)]


def _official(image_size: int, res: tuple[int, ...], widths, bottleneck, variates: int, up: Groups, down: Groups, *,
              n_bits: int = 8, beta: float = OFFICIAL_BETA, output_beta: float = OFFICIAL_BETA,
              mol_scale: str = "softplus", floor: float = -250.0, bernoulli: bool = False) -> ModelConfig:
    """An official egs config: one skip per encoder block (``up``/``down`` per resolution, see
    ``ModelConfig.up_skip_groups``), no output gain, the official initialisation and output scale."""
    up_groups, down_groups = [_groups(g) for g in up], [_groups(g) for g in down]
    # The official code feeds binary images as {0, 1} and truncates 5-bit images for both
    # encoder and target (see import_efficient); vdvl's data are {-1, 1} and 8-bit.
    output = dict(channels=1, output="bernoulli", pad=2, input_shift=1.0, input_scale=0.5) if bernoulli else dict(
        channels=3, mol_scale=mol_scale, mol_log_scale_floor=floor, output_beta=output_beta,
        bit_reduction="truncate-all" if n_bits < 8 else "rescale")
    return ModelConfig(image_size=image_size, n_bits=n_bits, resolutions=res, up_blocks=[sum(g) for g in up_groups],
                       down_blocks=[sum(g) for g in down_groups], widths=widths, skip_widths=widths,
                       bottleneck=bottleneck, variates=variates, latent_beta=beta, up_skip_groups=up_groups,
                       down_skip_groups=down_groups, output_gain=False, init="xavier", **output)


def _paper_presets() -> dict[str, Preset]:
    p: dict[str, Preset] = {}

    def add(name: str, cfg: ModelConfig, desc: str, batch: int, lr: float = 1e-3) -> None:
        p[name] = Preset(name, cfg.replace(name=name), desc, batch, lr)

    # The c1/c2 presets are the official egs configs (Rayhane-mamah/Efficient-VDVAE/egs/*.cfg)
    # tensor for tensor: c1 the incremental-width config (`*_C1`; for datasets without one, the
    # only incremental-width config: `compact`, or `baseline` for MNIST and 1024x1024), c2 the
    # constant-width `baseline` (Table 3's C2: exactly its count for ImageNet 64 and FFHQ 256;
    # for CIFAR-10 and ImageNet 32 no released config has Table 3's 51M / 156M).
    r5 = (1, 4, 8, 16, 32)
    r6 = (1, 4, 8, 16, 32, 64)
    r8 = (1, 4, 8, 16, 32, 64, 128, 256)
    r10 = (1, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

    # ---- CIFAR-10, 32x32x3, 8-bit
    up, down = [3, 4, 7, (7, {1: 5}), (12, {1: 11})], [3, 4, 7, 7, 12]
    add("cifar10-c1", _official(32, r5, (384, 384, 192, 96, 48), (0.25, 0.25, 0.25, 0.5, 1.0), 16, up, down),
        "CIFAR-10 C1 (egs/cifar10_C1.cfg): 47 latent layers, widths 384 -> 48", 16)
    add("cifar10-c2", _official(32, r5, 384, 0.25, 32, up, down),
        "CIFAR-10 C2 (egs/cifar10_baseline.cfg): 47 latent layers at width 384", 16)
    add("cifar10-vdvae", openai_config("cifar10"), "CIFAR-10 original VDVAE (43 layers, width 384)", 32, 2e-4)

    # ---- ImageNet 32x32
    up, down = [6, 7, (9, {0: 11}), (10, {0: 16}), 16], [6, 7, 9, 10, 16]
    add("imagenet32-c1", _official(32, r5, (512, 512, 256, 128, 64), (0.25, 0.25, 0.25, 0.5, 1.0), 48, up, down,
                                   mol_scale="logstd", output_beta=1.0),
        "ImageNet 32x32 C1 (egs/imagenet32_C1.cfg): 73 latent layers, widths 512 -> 64", 64)
    add("imagenet32-c2", _official(32, r5, 512, 0.25, 32, up, down),
        "ImageNet 32x32 C2 (egs/imagenet32_baseline.cfg): 73 latent layers at width 512", 64)
    add("imagenet32-vdvae", openai_config("imagenet32"), "ImageNet 32x32 original VDVAE (78 layers, width 512)",
        256, 1.5e-4)

    # ---- ImageNet 64x64
    up, down = [6, 7, (9, {0: 11}), (10, {0: 16}), 16, (5, {0: 7})], [6, 7, 9, 10, 16, 5]
    add("imagenet64-c1", _official(64, r6, (512, 512, 256, 256, 64, 64), (0.25, 0.25, 0.25, 0.25, 0.5, 1.0), 64,
                                   up, down, mol_scale="logstd", output_beta=1.0),
        "ImageNet 64x64 C1 (egs/imagenet64_C1.cfg): 84 latent layers, widths 512 -> 64", 32)
    add("imagenet64-c2", _official(64, r6, 512, 0.25, 32, up, down),
        "ImageNet 64x64 C2 (egs/imagenet64_baseline.cfg): 84 latent layers at width 512", 32)
    add("imagenet64-vdvae", openai_config("imagenet64"), "ImageNet 64x64 original VDVAE (75 layers, width 512)",
        128, 1.5e-4)

    # ---- CelebA 64x64
    up, down = [2, 4, 7, (7, {0: 5}), (9, {0: 8}), (12, {0: 11})], [2, 4, 7, 7, 9, 12]
    add("celeba64-c1", _official(64, r6, (512, 512, 256, 128, 64, 32), (0.25, 0.25, 0.25, 0.25, 0.5, 1.0), 32,
                                 up, down),
        "CelebA 64x64 incremental widths (egs/celebA64_compact.cfg): 62 latent layers, widths 512 -> 32", 32)
    add("celeba64-c2", _official(64, r6, 512, 0.25, 32, up, down),
        "CelebA 64x64 (egs/celebA64_baseline.cfg): 62 latent layers at width 512", 32)

    # ---- FFHQ 256x256, 5-bit (Table 3's FFHQ row)
    up = [2, 4, 5, (8, {0: 3}), (18, {0: 5}), (13, {0: 2}), 8, 1]
    down = [(2, {1: 3}), (4, {3: 3}), (5, {4: 2}), 8, 18, 13, (8, {7: 2}), (1, {0: 4})]
    add("ffhq256-c1", _official(256, r8, (512, 512, 512, 256, 256, 128, 128, 128), (0.25,) * 6 + (0.5, 1.0), 32,
                                up, down, n_bits=5, mol_scale="logstd", output_beta=1.0, floor=-14.0),
        "FFHQ 256x256 (5-bit) C1 (egs/ffhq256_5bits_C1.cfg): 66 latent layers, widths 512 -> 128", 16)
    add("ffhq256-c2", _official(256, r8, 512, 0.25, 32, up, down, n_bits=5, floor=-14.0),
        "FFHQ 256x256 (5-bit) C2 (egs/ffhq256_5bits_baseline.cfg): 66 latent layers at width 512", 16)
    add("ffhq256-vdvae", openai_config("ffhq256"),
        "FFHQ 256x256 (5-bit, 8-bit input) original VDVAE (66 layers, width 512)", 32, 1.5e-4)

    # ---- CelebA-HQ 256x256, 8-bit
    up = [2, 4, 5, (8, {0: 3}), (12, {0: 5}), 13, 13, 6]
    down = [(2, {1: 3}), (4, {3: 3}), (5, {4: 2}), 8, 12, 13, 13, 6]
    add("celebahq256-c1", _official(256, r8, (512, 512, 512, 512, 256, 128, 64, 32), (0.25,) * 6 + (0.5, 1.0), 64,
                                    up, down),
        "CelebA-HQ 256x256 (8-bit) incremental widths (egs/celebAHQ256_8bits_compact.cfg): 69 latent layers", 16)
    add("celebahq256-c2", _official(256, r8, 512, 0.25, 64, up, down),
        "CelebA-HQ 256x256 (8-bit) (egs/celebAHQ256_8bits_baseline.cfg): 69 latent layers at width 512", 16)

    # ---- 1024x1024: one released config (incremental widths), the same for FFHQ and CelebA-HQ
    up = [2, 4, 5, 8, 12, (7, {0: 7}), (5, {0: 9}), (3, {0: 4}), (2, {0: 4}), (1, {0: 4})]
    down = [2, 4, 5, 8, 12, 7, 5, 3, 2, 1]
    hq = _official(1024, r10, (512, 512, 512, 512, 256, 128, 64, 32, 16, 8), (0.25,) * 7 + (0.5, 1.0, 1.0), 64,
                   up, down, beta=0.4, output_beta=0.4)
    add("ffhq1024-vdvae", openai_config("ffhq1024"),
        "FFHQ 1024x1024 (8-bit) original VDVAE (70 layers, widths 512 -> 16, 2 mixtures)", 32, 7e-5)
    for ds, cfg_file in (("ffhq1024", "ffhq1024_baseline"), ("celebahq1024", "celebAHQ1024_baseline")):
        add(f"{ds}-c1", hq, f"{ds} (8-bit) (egs/{cfg_file}.cfg): 72 latent layers, widths 512 -> 8", 8)

    # ---- Binarized MNIST: padded 28 -> 32, Bernoulli, scored on the 28x28 crop
    add("mnist-c1", _official(32, r5, (512, 256, 128, 64, 32), 1.0, 32, [5, 5, 10, 2, 1], [5, 5, 10, 2, 1],
                              bernoulli=True),
        "Binarized MNIST (egs/binarized_mnist_baseline.cfg): 23 latent layers, widths 512 -> 32, Bernoulli", 32)
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
    # The paper's shape at CPU scale (issue 19): many latent layers of many variates (20 x 32 = 640),
    # so that the top 3% is a real set of 19 variates. No latent layer or cell at 28x28: the bottom
    # layers there switched off in fashion-mnist-cpu runs and cost the most per image.
    fashion_deep = ModelConfig(image_size=28, channels=1, n_mixtures=5, resolutions=(1, 7, 14, 28),
                               up_blocks=(4, 8, 8, 0), down_blocks=(2, 4, 4, 0), widths=(96, 96, 48, 24),
                               bottleneck=0.5, variates=32, name="fashion-mnist-deep")
    # 64x64 RGB at CPU speed: no latent layer or cell at 64x64 (the cost there is per pixel), an 8x pool.
    tiny64 = ModelConfig(image_size=64, channels=3, n_mixtures=1, resolutions=(1, 8, 64), up_blocks=(1, 2, 0),
                         down_blocks=(1, 1, 0), widths=(16, 16, 4), bottleneck=0.5, variates=4, name="tiny64")
    return {
        "tiny": Preset("tiny", tiny, "8x8 grayscale toy model for tests and the digits quickstart", 64),
        "tiny64": Preset("tiny64", tiny64, "64x64 RGB toy model for streaming and memory benchmarks on a CPU", 16),
        "digits-cpu": Preset("digits-cpu", digits, "8x8 grayscale model for the digits quickstart "
                             "(96 latent variates, so 3% keeps a few)", 64),
        "fashion-mnist-cpu": Preset("fashion-mnist-cpu", fashion,
                                    "28x28 grayscale 8-bit MoL model sized for Fashion-MNIST on a 2-core CPU", 32),
        "fashion-mnist-deep": Preset("fashion-mnist-deep", fashion_deep,
                                     "28x28 grayscale: 20 latent layers x 32 variates (640), for the paper's "
                                     "polarized regime on a 2-core CPU", 32),
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
    from ..model.vae import count_parameters

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
