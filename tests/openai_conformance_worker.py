"""One openai/vdvae conformance comparison, run in its own process by tests/test_conformance.py.

    python tests/openai_conformance_worker.py REF_CHECKOUT HPS BATCH WORK_DIR

Builds openai/vdvae's model from the checkout's own ``hps.py`` and ``vae.py`` (copied to
WORK_DIR first; nothing of it is in this repository), gives every parameter random
values, saves the weights as openai's trainer does (``-model.th`` from the DDP wrapper,
keys prefixed ``module.``; ``-model-ema.th`` without), imports them with ``vdvl import
openai-vdvae`` and compares, for the same random 8-bit images, the decoder output, every
layer's KL map and the reconstruction NLL: with posterior means and with the same
posterior noise, in float64 and float32. Prints one JSON line of relative differences
(``max |vdvl - ref| / max |ref|`` per tensor; per layer for the KL maps, the worst layer
reported), timings and the peak RSS. One model is in memory at a time.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from vdvae_latents.cli import main as vdvl  # noqa: E402
from vdvae_latents.model.checkpoints import load_model  # noqa: E402
from vdvae_latents.model.openai_hps import get_openai_hps
from vdvae_latents.interop.openai import openai_to_vdvl  # noqa: E402

NOISE_SEED = 1234


def load_reference(checkout: Path, work: Path):
    """The checkout's hps and vae modules, imported from a copy of its Python files."""
    copy = work / "reference"
    copy.mkdir(parents=True, exist_ok=True)
    for name in ("hps.py", "vae.py", "vae_helpers.py"):
        shutil.copy(checkout / name, copy / name)
    sys.path.insert(0, str(copy))
    import hps as ref_hps  # noqa: PLC0415 - the reference's own modules
    import vae as ref_vae  # noqa: PLC0415
    return ref_hps, ref_vae


def reference_hparams(ref_hps, name: str):
    """H as openai's train.py builds it for ``--hps name``, plus what its data.py sets."""
    H = ref_hps.Hyperparams()
    parser = ref_hps.add_vae_arguments(argparse.ArgumentParser())
    ref_hps.parse_args_and_update_hparams(H, parser, s=["--hps", name])
    H.image_size, H.image_channels = get_openai_hps(name).image_size, 3
    return H


def build_reference(ref_vae, H, state=None):
    """openai's VAE; with ``state``, built on the meta device and given those tensors."""
    if state is None:
        return ref_vae.VAE(H)
    with torch.device("meta"):
        model = ref_vae.VAE(H)
    model.load_state_dict(state, assign=True)
    return model.eval()


def randomise(model: torch.nn.Module, gen: torch.Generator, scale: float) -> None:
    """Perturb every parameter so that zero-initialised ones (prior outputs, biases, bias_xs) matter too."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def reference_pass(ref_vae, model, inp, target, noise: bool):
    """Decoder output, per-layer KL maps and NLL per image (nats) from openai's own forward code."""
    if noise:
        gen = torch.Generator().manual_seed(NOISE_SEED)
        ref_vae.draw_gaussian_diag_samples = (
            lambda mu, logsigma: torch.exp(logsigma) * torch.randn(mu.shape, generator=gen, dtype=mu.dtype) + mu)
    else:
        ref_vae.draw_gaussian_diag_samples = lambda mu, logsigma: mu
    # Its encoder pads channels (custom widths) with tensors of torch's default dtype.
    default = torch.get_default_dtype()
    torch.set_default_dtype(inp.dtype)
    try:
        with torch.no_grad():
            px_z, stats = model.decoder.forward(model.encoder.forward(inp))
            nll = model.decoder.out_net.nll(px_z, target) * np.prod(target.shape[1:])  # it returns nats per dim
    finally:
        torch.set_default_dtype(default)
    return px_z, [s["kl"] for s in stats], nll


def vdvl_pass(model, x, noise: bool):
    with torch.no_grad():
        if noise:
            out = model(x, posterior="sample", generator=torch.Generator().manual_seed(NOISE_SEED))
        else:
            out = model(x, posterior="mean")
    return out.features, out.kl, out.nll


def main() -> None:
    checkout, name, batch, work = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
    h = get_openai_hps(name)
    ref_hps, ref_vae = load_reference(checkout, work)
    H = reference_hparams(ref_hps, name)
    timings = {}

    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    ref = ref_vae.VAE(H)
    randomise(ref, gen, 0.02)
    n_params = sum(p.numel() for p in ref.parameters())
    ddp_like = torch.nn.Module()
    ddp_like.module = ref  # a DistributedDataParallel wrapper's state dict: keys prefixed 'module.'
    model_file, ema_file = work / f"{name}-iter-1000-model.th", work / f"{name}-iter-1000-model-ema.th"
    torch.save(ddp_like.state_dict(), model_file)
    randomise(ref, gen, 0.005)  # the EMA weights differ a little from the model's
    torch.save(ref.state_dict(), ema_file)
    del ref, ddp_like
    gc.collect()
    timings["build_and_save_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    run = work / "run"
    code = vdvl(["import", "openai-vdvae", str(model_file), "--ema", str(ema_file), "--hps", name,
                 "--run-dir", str(run), "--json"])
    if code != 0:
        raise SystemExit(f"vdvl import exited {code}")
    timings["import_s"] = time.perf_counter() - t0
    # The raw (non-EMA) weights must arrive unchanged too.
    raw = {k[len("module."):]: v for k, v in torch.load(model_file, weights_only=True).items()}
    imported, _ = load_model(run, ema=False)
    expected = openai_to_vdvl(raw, name)
    weights_equal = all(torch.equal(v, expected[k]) for k, v in imported.state_dict().items())
    del raw, imported, expected
    gc.collect()

    pixels = torch.randint(0, 256, (batch, h.image_size, h.image_size, 3), generator=torch.Generator().manual_seed(5))
    results = {}
    for dtype in (torch.float64, torch.float32):
        v = pixels.to(dtype)
        inp = (v / h.pixel_unit + h.input_shift) * h.input_scale  # openai's data.py, NHWC
        kept = torch.floor(v / 8) * 8 if h.low_bit else v
        shift_loss, scale_loss = (-0.5, 2.0) if h.pixel_unit == 255 else (-127.5, 1 / 127.5)  # data.py's
        target = (kept / h.pixel_unit + shift_loss) * scale_loss
        x = ((v - 127.5) / 127.5).permute(0, 3, 1, 2).contiguous()  # vdvl's input: the 8-bit image in [-1, 1]
        per_mode = {}
        for noise in (False, True):
            t0 = time.perf_counter()
            state = {k: t.to(dtype) for k, t in torch.load(ema_file, weights_only=True).items()}
            ref = build_reference(ref_vae, H, state)
            del state
            ref_out = reference_pass(ref_vae, ref, inp, target, noise)
            del ref
            gc.collect()
            t1 = time.perf_counter()
            model, _ = load_model(run, ema=True)
            model = model.to(dtype)
            mine = vdvl_pass(model, x, noise)
            del model
            gc.collect()
            t2 = time.perf_counter()
            per_layer = [rel(a, b) for a, b in zip(mine[1], ref_out[1])]
            if not noise and dtype == torch.float64:
                truth = ref_out  # float64 reference with posterior means: float32's rounding is measured against it
            elif not noise:
                per_mode["float32_error_vs_float64_reference"] = {
                    who: {"decoder_output": rel(out[0], truth[0]), "nll": rel(out[2], truth[2]),
                          "kl_worst_layer": max(rel(a, b) for a, b in zip(out[1], truth[1]))}
                    for who, out in (("vdvl", mine), ("reference", ref_out))}
            per_mode["noise" if noise else "mean"] = {
                "decoder_output": rel(mine[0], ref_out[0]),
                "kl_worst_layer": max(per_layer),
                "kl_total": rel(sum(k.sum((1, 2, 3)) for k in mine[1]), sum(k.sum((1, 2, 3)) for k in ref_out[1])),
                "nll": rel(mine[2], ref_out[2]),
                "layers": len(per_layer), "layers_match": len(mine[1]) == len(ref_out[1]),
                "ref_nll_nats": ref_out[2].tolist(), "ref_kl_nats": sum(k.sum((1, 2, 3)) for k in ref_out[1]).tolist(),
                "reference_s": t1 - t0, "vdvl_s": t2 - t1,
            }
            del ref_out, mine  # (truth keeps the float64 reference's outputs)
            gc.collect()
        results[str(dtype).removeprefix("torch.")] = per_mode

    try:
        commit = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    print(json.dumps({
        "hps": name, "batch": batch, "parameters": n_params, "weights_equal": weights_equal, "results": results,
        "timings": timings, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
        "reference_commit": commit, "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
