"""Conformance with the reference implementations, run only where their checkouts are given.

Each reference model is built from the reference's own code (imported from the checkout
named by an environment variable, never copied here) with random weights, saved in the
reference's native format, imported with ``vdvl import`` and compared on the same images.
Tolerances (relative): float64 <= 1e-9, float32 <= 1e-4.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TOLERANCE = {"float64": 1e-9, "float32": 1e-4}

# ---------------------------------------------------------------- openai/vdvae

OPENAI_REF = os.environ.get("VDVL_REF_OPENAI")
OPENAI_WORKER = Path(__file__).with_name("openai_conformance_worker.py")
# Batch sizes keep each comparison (one float64 model and its activations) under ~6 GB.
OPENAI_CASES = [("cifar10", 4), ("imagenet32", 4), ("imagenet64", 2), ("ffhq256", 1), ("ffhq1024", 1)]
openai_reference = pytest.mark.skipif(
    not OPENAI_REF, reason="set VDVL_REF_OPENAI to a checkout of openai/vdvae to compare with its own code")


@openai_reference
@pytest.mark.parametrize("hps,batch", OPENAI_CASES, ids=[c[0] for c in OPENAI_CASES])
def test_openai_vdvae_import_matches_the_reference(hps, batch, tmp_path):
    """Decoder output, per-layer KL and NLL of an imported openai/vdvae model equal the reference's."""
    proc = subprocess.run([sys.executable, str(OPENAI_WORKER), OPENAI_REF, hps, str(batch), str(tmp_path)],
                          capture_output=True, text=True, timeout=3 * 3600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(report))  # kept by `pytest -s` for benchmarks/results/conformance-openai.md
    assert report["weights_equal"]
    for dtype, tol in TOLERANCE.items():
        for mode in ("mean", "noise"):
            r = report["results"][dtype][mode]
            assert r["layers_match"], (dtype, mode)
            for key in ("decoder_output", "kl_worst_layer", "kl_total", "nll"):
                assert r[key] <= tol, (dtype, mode, key, r[key])


def _openai_module(name: str, tmp_path: Path):
    """A module of the openai/vdvae checkout, imported from a copy under its own name."""
    import importlib.util
    import shutil

    copy = tmp_path / f"openai_{name}.py"
    shutil.copy(Path(OPENAI_REF) / f"{name}.py", copy)
    spec = importlib.util.spec_from_file_location(f"openai_{name}", copy)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@openai_reference
@pytest.mark.parametrize("low_bit", [False, True], ids=["8bit", "5bit"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_openai_mol_likelihood_matches_the_reference_where_it_falls_back(low_bit, dtype, tmp_path):
    """openai's discretized_mix_logistic_loss on sharp components (many bins below 1e-5 use its
    density fallback) equals vdvl's head on the reordered channels, for 8-bit and 5-bit FFHQ targets."""
    import torch

    from vdvae_latents.config import ModelConfig
    from vdvae_latents.heads import MixtureOfLogisticsHead
    from vdvae_latents.openai_layout import mol_channel_order

    helpers = _openai_module("vae_helpers", tmp_path)
    dt, m, b, s = getattr(torch, dtype), 10, 2, 16
    gen = torch.Generator().manual_seed(7)
    raw = torch.randn(b, 10 * m, s, s, generator=gen, dtype=torch.float64)
    for c in range(3):  # PixelCNN++ layout: log-scales of colour c from -7 (below the floor) to 0
        block = slice(m + 3 * m * c + m, m + 3 * m * c + 2 * m)
        raw[:, block] = -7.5 + 7.5 * torch.rand(b, m, s, s, generator=gen, dtype=torch.float64)
    raw = raw.to(dt)
    v = torch.randint(0, 256, (b, s, s, 3), generator=gen).to(dt)
    kept = torch.floor(v / 8) * 8 if low_bit else v
    target = (kept - 127.5) * (1 / 127.5)  # data.py's loss scaling
    with torch.no_grad():
        ref = helpers.discretized_mix_logistic_loss(target, raw.permute(0, 2, 3, 1), low_bit=low_bit) * (3 * s * s)

    cfg = ModelConfig(image_size=s, channels=3, n_bits=5 if low_bit else 8, bit_reduction="truncate",
                      n_mixtures=m, mol_bounded=True, mol_density_fallback=True, resolutions=(s,), up_blocks=1,
                      down_blocks=0, widths=8, variates=1, architecture="vdvae")
    head = MixtureOfLogisticsHead(cfg, 10 * m).to(dt)
    with torch.no_grad():
        head.out.weight.copy_(torch.eye(10 * m, dtype=dt)[mol_channel_order(m)].reshape(10 * m, 10 * m, 1, 1))
        head.out.bias.zero_()
        x = ((v - 127.5) / 127.5).permute(0, 3, 1, 2)  # the 8-bit image: the head truncates it itself
        mine = -head.log_prob(raw, x)
        head.density_fallback = False
        exact = -head.log_prob(raw, x)
    difference = ((mine - ref).abs() / ref.abs()).max().item()
    print(json.dumps({"mol_likelihood": "5bit" if low_bit else "8bit", "dtype": dtype, "relative_difference": difference,
                      "fallback_effect": ((mine - exact).abs() / exact.abs()).max().item()}))
    assert not torch.allclose(exact, mine, rtol=1e-6, atol=0)  # the fallback did apply somewhere
    assert difference <= TOLERANCE[dtype]
