"""The official Efficient-VDVAE inference paths, timed and sized beside vdvl's (issue 22).

Runs the authors' own PyTorch code from a checkout (``VDVL_REF_EFFICIENT`` or
``--checkout``; the hparams library from ``VDVL_REF_HPARAMS`` or an installed one) on a
randomly initialised model of their ``egs/cifar10_C1.cfg``, the same model vdvl imports
with ``vdvl import efficient-vdvae``. Three jobs, each as their ``synthesize.py`` does it
(that file itself needs CUDA and TensorFlow at import, so its three loops are followed
call for call with their model and loss functions imported, nothing of them copied):

* ``kl``: ``compute_per_dimension_divergence_stats``: their model's forward and their
  ``KLDivergenceStats`` per batch, summed into div_stats (layers x variates, bits);
* ``encode``: ``encoding_mode``: their ``get_variate_masks`` at the cfg's 3% quantile,
  their ``reconstruction_step(..., mode='encode')`` per batch and the kept layers'
  posterior (mean, std) gathered per image as NumPy arrays;
* ``eval``: their ``reconstruction_step`` (forward, their ``compute_loss`` and the output
  sample it returns), the negative ELBO summed per batch.

Environment shims as in ``benchmarks/official_train_step.py``: the unpool bias, the
posterior noise, ``Tensor.cuda`` and the output sampler's one-hot stay on the CPU; and
``synthesis.variates_masks_quantile = 0.03``, the name their code reads, is added to the
cfg (their cfg files spell it ``variate_masks_quantile``: 3%). Each
measurement is a fresh process (``--one``) so its peak RSS is its own; ``--rounds``
interleaves them with ``benchmarks/inference.py``'s vdvl measurements of the same model::

    python benchmarks/official_inference.py --rounds 2 --tag cpu

Results: benchmarks/results/inference-official-<tag>.json and .md (``--results`` elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # inference.py: vdvl's measurements and the machine description

JOBS = ("kl", "encode", "eval")


def _load(checkout: Path, cfg: Path, batch: int, hparams_lib: str | None):
    """Their modules configured by ``cfg`` (batch sizes set to ``batch``), with the CPU shims."""
    sys.path.insert(0, str(ROOT / "tests"))
    from efficient_reference import load_reference  # the conformance tests' loader

    from official_train_step import _calculate_z_on_device, _cfg_with_batch, _one_hot_on_device

    sys.modules.setdefault("torch_optimizer", types.ModuleType("torch_optimizer"))
    copy = _cfg_with_batch(cfg, batch)
    # Their get_variate_masks reads `variates_masks_quantile`; their cfg files spell it `variate_masks_quantile`.
    copy.write_text(copy.read_text().replace("[synthesis]", "[synthesis]\nvariates_masks_quantile = 0.03", 1))
    ref = load_reference(checkout, copy, hparams_lib)
    ref.hp.synthesis.batch_size = batch
    ref.hp.val.batch_size = batch
    cwd = os.getcwd()
    os.chdir(ref.work)
    try:
        ref.model = __import__("model.model", fromlist=["reconstruction_step"])
        ref.div_stats = __import__("model.div_stats_utils", fromlist=["KLDivergenceStats"])
        ref.utils = __import__("utils.utils", fromlist=["get_variate_masks"])
    finally:
        os.chdir(cwd)
    ref.latent_layers.calculate_z = torch.jit.script(_calculate_z_on_device)
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    sys.modules["model.autoencoder"].one_hot = _one_hot_on_device
    return ref


def make_model(checkout: Path, cfg: Path, out: Path, hparams_lib: str | None) -> None:
    """A randomly initialised official model saved as their checkpoint file, and its cfg."""
    ref = _load(checkout, cfg, 32, hparams_lib)
    hp = ref.hp
    torch.manual_seed(0)
    net = ref.def_model.UniversalAutoEncoder()
    with torch.no_grad():  # creates the unpools' lazily made scale_bias, as their trainer's first batch does
        net(torch.zeros(1, hp.data.channels, hp.data.target_res, hp.data.target_res))
    state = net.state_dict()
    torch.save({"global_step": 0, "model_state_dict": state, "ema_model_state_dict": state,
                "optimizer_state_dict": {"state": {}, "param_groups": []}, "scheduler_state_dict": {"last_epoch": 0}},
               out / f"checkpoints-{hp.run.name}")
    (out / f"hparams-{hp.run.name}.cfg").write_text(cfg.read_text())


def prepare(work: Path, checkout: Path, cfg: Path, n_images: int, hparams_lib: str | None) -> dict:
    """Images, the official checkpoint and its vdvl import under ``work`` (made once, then reused)."""
    work.mkdir(parents=True, exist_ok=True)
    images = work / "images.npy"
    if not images.exists():
        rng = np.random.default_rng(0)
        np.save(images, rng.integers(0, 256, (n_images, 32, 32, 3), dtype=np.uint8))
    official = work / "official"
    if not official.exists():
        official.mkdir()
        cmd = [sys.executable, __file__, "--make-model", str(official), "--checkout", str(checkout), "--cfg", str(cfg)]
        if hparams_lib:
            cmd += ["--hparams-lib", hparams_lib]
        subprocess.run(cmd, check=True)
    run = work / "run"
    if not run.exists():
        ckpt = next(official.glob("checkpoints-*"))
        subprocess.run([str(Path(sys.executable).with_name("vdvl")), "import", "efficient-vdvae", str(ckpt),
                        "--config", str(next(official.glob("hparams-*.cfg"))), "--run-dir", str(run)], check=True,
                       stdout=subprocess.DEVNULL)
    return {"images": str(images), "official": str(official), "run": str(run)}


def _batches(images: np.ndarray, batch: int):
    """Their loaders' input: float images in [-1, 1], NCHW, ``batch`` at a time."""
    for lo in range(0, len(images), batch):
        yield torch.from_numpy(np.array(images[lo:lo + batch])).permute(0, 3, 1, 2).float() / 127.5 - 1


def _kl_job(ref, net, images, batch, work: Path) -> None:
    """compute_per_dimension_divergence_stats: forward + KLDivergenceStats per batch, averaged."""
    kl_stats = ref.div_stats.KLDivergenceStats()
    per_dim = None
    steps = 0
    with torch.no_grad():
        for inputs in _batches(images, batch):
            _, posterior_dist_list, prior_kl_dist_list = net(inputs)
            kl = kl_stats(posterior_dist_list, prior_kl_dist_list, batch)
            per_dim = kl if per_dim is None else per_dim + kl
            steps += 1
    np.save(work / "div_stats.npy", (per_dim / steps).cpu().numpy())


def _encode_job(ref, net, images, batch, work: Path) -> None:
    """encoding_mode: masked reconstruction_step(mode='encode'); kept layers' (mean, std) per image."""
    masks = ref.utils.get_variate_masks(np.load(work / "div_stats.npy"))
    codes: dict[int, list[np.ndarray]] = {}
    net.eval()
    for inputs in _batches(images, batch):
        posteriors = ref.model.reconstruction_step(net, inputs, variates_masks=masks, mode="encode")
        for i, (dist, mask) in enumerate(zip(posteriors, masks)):
            if mask.any():  # (2, B, V, H, W) -> kept variates -> (B, H, W, V_kept, 2), as their reshape does
                kept = torch.stack(list(dist), 0)[:, :, torch.from_numpy(mask)]
                codes.setdefault(i, []).extend(list(kept.permute(1, 3, 4, 2, 0).cpu().numpy()))


def _eval_job(ref, net, images, batch, work: Path) -> float:
    """reconstruction_step: forward, their loss and output sample; the mean negative ELBO (bits/dim)."""
    total, steps = 0.0, 0
    for inputs in _batches(images, batch):
        _, nll, kl = ref.model.reconstruction_step(net, inputs)
        total += float(nll + kl)
        steps += 1
    return total / steps


def run_one(job: str, checkout: Path, cfg: Path, work: Path, batch: int, hparams_lib: str | None) -> dict:
    start = time.perf_counter()
    ref = _load(checkout, cfg, batch, hparams_lib)
    official = work / "official"
    net = ref.def_model.UniversalAutoEncoder()
    with torch.no_grad():
        net(torch.zeros(1, 3, 32, 32))
    payload = torch.load(next(official.glob("checkpoints-*")), weights_only=True)
    net.load_state_dict(payload["ema_model_state_dict"])  # synthesize.py's load_ema_weights = True
    net.eval()
    images = np.load(work / "images.npy", mmap_mode="r")
    job_start = time.perf_counter()
    value = {"kl": _kl_job, "encode": _encode_job, "eval": _eval_job}[job](ref, net, images, batch, work)
    seconds = time.perf_counter() - job_start
    return {"impl": "official", "job": job, "precision": "fp32", "images": len(images), "batch": batch,
            "seconds": seconds, "images_per_s": len(images) / seconds,
            "process_seconds": time.perf_counter() - start, "nelbo_bits_per_dim": value,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "threads": torch.get_num_threads()}


def measure_official(job: str, args, paths: dict) -> dict:
    cmd = [sys.executable, __file__, "--one", job, "--checkout", str(args.checkout), "--cfg", str(args.cfg),
           "--work", str(args.work), "--batch", str(args.batch)]
    if args.hparams_lib:
        cmd += ["--hparams-lib", args.hparams_lib]
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        return {"impl": "official", "job": job, "error": out.stderr.strip().splitlines()[-1] if out.stderr else "failed"}
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["command_seconds"] = time.perf_counter() - start
    row["command_images_per_s"] = row["images"] / row["command_seconds"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for flag, env, what in (("--checkout", "VDVL_REF_EFFICIENT", "Efficient-VDVAE checkout"),
                            ("--hparams-lib", "VDVL_REF_HPARAMS", "hparams library checkout, else the installed one")):
        ap.add_argument(flag, default=os.environ.get(env), help=f"{what} (default: ${env})")
    ap.add_argument("--cfg", type=Path, default=Path("egs/cifar10_C1.cfg"), help="config, relative to the checkout")
    ap.add_argument("--work", type=Path, default=None, help="folder for the images, checkpoints and outputs")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--jobs", nargs="*", default=list(JOBS), choices=JOBS)
    ap.add_argument("--vdvl", nargs="*", default=["library", "cli"], help="vdvl paths to interleave (inference.py)")
    ap.add_argument("--precisions", nargs="*", default=["fp32", "auto"], help="vdvl precisions to interleave")
    ap.add_argument("--tag", default="cpu")
    ap.add_argument("--note", default="")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--dry-run", action="store_true", help="8 images, 1 round, results to a temporary folder")
    ap.add_argument("--one", choices=JOBS, help=argparse.SUPPRESS)
    ap.add_argument("--make-model", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not args.checkout:
        raise SystemExit("give --checkout or set VDVL_REF_EFFICIENT to an Efficient-VDVAE checkout.")
    args.checkout = Path(args.checkout)
    args.cfg = args.cfg if args.cfg.is_absolute() else args.checkout / args.cfg
    torch.set_num_threads(int(os.environ.get("VDVL_BENCH_THREADS", "2")))
    if args.make_model:
        make_model(args.checkout, args.cfg, args.make_model, args.hparams_lib)
        return
    if args.one:
        print(json.dumps(run_one(args.one, args.checkout, args.cfg, args.work, args.batch, args.hparams_lib)))
        return
    if args.dry_run:
        args.images, args.rounds, args.results = 8, 1, Path(tempfile.mkdtemp(prefix="vdvl-inference-dry-"))
    args.work = args.work or Path(tempfile.mkdtemp(prefix="vdvl-inference-"))
    paths = prepare(args.work, args.checkout, args.cfg, args.images, args.hparams_lib)
    import inference  # vdvl's side: one fresh process per measurement

    rows = []
    for r in range(args.rounds):
        for job in args.jobs:
            rows.append({"round": r, **measure_official(job, args, paths)})
            print(json.dumps(rows[-1]), flush=True)
            for path in args.vdvl:
                for precision in args.precisions if job != "eval" else ["fp32"]:  # eval is fp32 unless asked
                    row = inference.measure(inference.VDVL_JOB[job], path, precision, paths, args.work, args.batch)
                    rows.append({"round": r, **row})
                    print(json.dumps(rows[-1]), flush=True)
    commit = subprocess.run(["git", "-C", str(args.checkout), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    inference.write_results(args.results, f"official-{args.tag}", rows, note=args.note,
                            extra={"official_commit": commit, "cfg": args.cfg.name})


if __name__ == "__main__":
    main()
