"""Conformance with the reference implementations, run from checkouts named by environment variables.

Nothing of the reference code is in this repository: each test imports it from a
checkout and skips (saying why) when the variable is unset.

* ``VDVL_REF_EFFICIENT``: a checkout of Rayhane-mamah/Efficient-VDVAE; its ``hparams``
  library comes from ``VDVL_REF_HPARAMS`` (a checkout of Rayhane-mamah/hparams) or an
  installed ``hparams`` package.

Tolerances (issue 10): relative difference <= 1e-9 in float64 and <= 1e-4 in float32.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# ============================================================== Efficient-VDVAE (official code)

from vdvae_latents.checkpoints import load_model
from vdvae_latents.hparams_cfg import read_hparams
from vdvae_latents.import_efficient import _mol_permutation, config_from_hparams, import_efficient_vdvae
from vdvae_latents.presets import get_preset
from vdvae_latents.vae import count_parameters

EFFICIENT_HARNESS = Path(__file__).with_name("efficient_reference.py")
EFFICIENT_CONFIGS = ["cifar10_C1", "imagenet32_C1", "binarized_mnist_baseline"]
# The egs config each c1/c2 preset is (see vdvae_latents/presets.py).
EFFICIENT_PRESET_CONFIGS = {
    "cifar10-c1": "cifar10_C1", "cifar10-c2": "cifar10_baseline",
    "imagenet32-c1": "imagenet32_C1", "imagenet32-c2": "imagenet32_baseline",
    "imagenet64-c1": "imagenet64_C1", "imagenet64-c2": "imagenet64_baseline",
    "celeba64-c1": "celebA64_compact", "celeba64-c2": "celebA64_baseline",
    "ffhq256-c1": "ffhq256_5bits_C1", "ffhq256-c2": "ffhq256_5bits_baseline",
    "celebahq256-c1": "celebAHQ256_8bits_compact", "celebahq256-c2": "celebAHQ256_8bits_baseline",
    "ffhq1024-c1": "ffhq1024_baseline", "celebahq1024-c1": "celebAHQ1024_baseline",
    "mnist-c1": "binarized_mnist_baseline",
}
EFFICIENT_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}


def _efficient_checkout() -> Path:
    root = os.environ.get("VDVL_REF_EFFICIENT")
    if not root:
        pytest.skip("VDVL_REF_EFFICIENT is not set (a checkout of Rayhane-mamah/Efficient-VDVAE)")
    path = Path(root)
    if not (path / "efficient_vdvae_torch" / "model" / "def_model.py").is_file():
        pytest.skip(f"VDVL_REF_EFFICIENT={root} is not an Efficient-VDVAE checkout (no efficient_vdvae_torch/)")
    return path


def _efficient_hparams_lib() -> str | None:
    """The hparams library's checkout for sys.path, or None when it is installed."""
    root = os.environ.get("VDVL_REF_HPARAMS")
    if root and (Path(root) / "hparams" / "hparams.py").is_file():
        return root
    if importlib.util.find_spec("hparams") is not None:
        return None
    pytest.skip("the official code needs its hparams library: set VDVL_REF_HPARAMS to a checkout of "
                "Rayhane-mamah/hparams (or install it)")


def _efficient_harness(job: str, *args: str) -> str:
    command = [sys.executable, str(EFFICIENT_HARNESS), job, "--checkout", str(_efficient_checkout()), *args]
    lib = _efficient_hparams_lib()
    if lib:
        command += ["--hparams-lib", lib]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _egs(name: str) -> Path:
    return _efficient_checkout() / "egs" / f"{name}.cfg"


def _relative(ours: torch.Tensor, theirs: torch.Tensor, *, elementwise: bool) -> float:
    """Largest relative difference: per element (positive sums) or against the largest magnitude."""
    diff = (ours.double() - theirs.double()).abs()
    if elementwise:
        return (diff / theirs.double().abs().clamp_min(1e-300)).max().item()
    return (diff.max() / theirs.double().abs().max()).item()


def test_efficient_parser_agrees_with_the_hparams_library():
    """Every egs/*.cfg parses to exactly what the authors' library evaluates (the files are trusted here)."""
    lib = _efficient_hparams_lib()
    if lib:
        sys.path.insert(0, lib)
    sys.modules.setdefault("gcsfs", type(sys)("gcsfs"))  # imported by the library's cloud backup only
    from hparams.localconfig import LocalConfig

    files = sorted((_efficient_checkout() / "egs").glob("*.cfg"))
    assert files
    for path in files:
        theirs = LocalConfig(last_source=str(path))  # reads the file at construction
        assert read_hparams(path) == theirs.to_dict(), path.name


def test_efficient_egs_parameter_counts():
    """The official code's parameter count of every egs config equals vdvl's; the presets are those configs."""
    counts = {}
    for path in sorted((_efficient_checkout() / "egs").glob("*.cfg")):
        theirs = json.loads(_efficient_harness("count", "--cfg", str(path)).strip().splitlines()[-1])["parameters"]
        ours = count_parameters(config_from_hparams(read_hparams(path)))
        counts[path.stem] = (theirs, ours)
    assert all(theirs == ours for theirs, ours in counts.values()), counts
    for preset, egs in EFFICIENT_PRESET_CONFIGS.items():
        official = config_from_hparams(read_hparams(_egs(egs)))
        # the presets keep vdvl's exact MoL bin masses; imports use the reference's approximation
        assert get_preset(preset).config == official.replace(mol_tail="exact"), preset


def _efficient_images(binary: bool, n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """(official input, vdvl input): 8-bit RGB in [-1, 1] for both, or binary MNIST padded 28 -> 32."""
    g = torch.Generator().manual_seed(7)
    if binary:
        bits = (torch.rand(n, 1, 28, 28, generator=g) < 0.3).double()
        theirs = torch.nn.functional.pad(bits, (2, 2, 2, 2), value=0.0)
        return theirs, theirs * 2 - 1
    x = (torch.randint(0, 256, (n, 3, 32, 32), generator=g).double() - 127.5) / 127.5
    return x, x


@pytest.mark.parametrize("cfg_name", EFFICIENT_CONFIGS)
def test_efficient_import_matches_the_official_model(cfg_name, tmp_path):
    """Random official weights, imported: same decoder output, per-layer KL and NLL (means and same noise)."""
    cfg_path = _egs(cfg_name)
    binary = cfg_name.startswith("binarized_mnist")
    theirs_x, ours_x = _efficient_images(binary)
    torch.save(theirs_x.float(), tmp_path / "images.pt")
    _efficient_harness("run", "--cfg", str(cfg_path), "--images", str(tmp_path / "images.pt"), "--out", str(tmp_path))
    reference = torch.load(tmp_path / "reference.pt", weights_only=True)
    checkpoint = next(tmp_path.glob("checkpoints-*"))
    import_efficient_vdvae(checkpoint, cfg_path, tmp_path / "run")
    model, _ = load_model(tmp_path / "run", ema=False)

    report = {}
    for dtype, tolerance in EFFICIENT_TOLERANCE.items():
        model.to(dtype)
        x = ours_x.float().to(dtype)  # the images the reference saw (stored as float32, exact on the grid)
        for mode in ("mean", "noise"):
            generator = torch.Generator().manual_seed(1234)  # efficient_reference.NOISE_SEED
            with torch.no_grad():
                out = model(x, posterior=mode if mode == "mean" else "sample", generator=generator)
                logits = model.head.out(out.features)
            if not binary:  # vdvl's head channels -> the official PixelCNN++ order
                official = torch.empty_like(logits)
                official[:, _mol_permutation(model.cfg.n_mixtures, model.cfg.channels)] = logits
                logits = official
            ref = reference[f"{mode}-{str(dtype).split('.')[-1]}"]
            kl = torch.stack([k.flatten(1).sum(1) for k in out.kl], 1)
            diffs = {"decoder output": _relative(logits, ref["logits"], elementwise=False),
                     "per-layer KL": _relative(kl, ref["kl"], elementwise=True),
                     "NLL": _relative(out.nll, ref["nll"], elementwise=True)}
            report[f"{mode}-{dtype}"] = diffs
            assert max(diffs.values()) <= tolerance, (mode, dtype, diffs)
    print(f"\nconformance {cfg_name}: " + json.dumps(report))
