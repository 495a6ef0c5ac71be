"""Run the official Efficient-VDVAE PyTorch code (from a checkout) for the conformance tests.

Nothing of the official code is copied here: it is imported from the checkout named on
the command line, with the hparams library from its own checkout (or an installed
one). Only environment shims are applied, all in this process:

* stub modules for packages the model does not need (gcsfs for the hparams library,
  tensorboard and prettytable for the official ``utils``), when they are missing;
* the unpool's lazily created ``scale_bias`` is made on the input's device and dtype
  (the official code puts it on CUDA);
* the posterior sampler (a TorchScript function that draws on CUDA) is replaced by one
  that draws from a seeded CPU generator, or returns the mean, so that vdvl can be fed
  the very same noise.

Each run builds one config in a fresh process (the official modules read their
hyper-parameters once, at import time). Usage::

    python tests/efficient_reference.py count --checkout DIR --cfg FILE
    python tests/efficient_reference.py run --checkout DIR --cfg FILE --images X.pt --out DIR

``count`` prints the official model's parameter count (built on the meta device, after
the first forward pass that creates the unpool biases). ``run`` builds the model with
random weights, saves ``checkpoints-<run>`` in the official format, and writes
``reference.pt`` with the decoder output, per-layer KL and reconstruction NLL per image
in float64 and float32, with posterior means and with seeded noise.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys
import tempfile
import types
from pathlib import Path

import torch

NOISE_SEED = 1234


def _stub_missing(name: str, **attributes) -> None:
    try:
        importlib.import_module(name)
    except ImportError:
        module = types.ModuleType(name)
        module.__dict__.update(attributes)
        sys.modules[name] = module


def load_reference(checkout: Path, cfg: Path, hparams_lib: str | None):
    """Import the official model code configured by ``cfg``; returns its module namespace."""
    code = checkout / "efficient_vdvae_torch"
    if hparams_lib:
        sys.path.insert(0, hparams_lib)
    sys.path.insert(0, str(code))
    _stub_missing("gcsfs", GCSFileSystem=object)
    _stub_missing("prettytable", PrettyTable=object)
    try:
        importlib.import_module("torch.utils.tensorboard")
    except ImportError:
        sys.modules["torch.utils.tensorboard"] = types.SimpleNamespace(SummaryWriter=object)
    from hparams import HParams

    work = Path(tempfile.mkdtemp(prefix="vdvl-ref-"))
    shutil.copy(cfg, work / "hparams.cfg")
    cwd = os.getcwd()
    os.chdir(work)  # the hparams library writes logs-<run>/ beside the .cfg
    try:
        hp = HParams(str(work), name="efficient_vdvae")
        def_model = importlib.import_module("model.def_model")
        layers = importlib.import_module("model.layers")
        latent_layers = importlib.import_module("model.latent_layers")
        losses = importlib.import_module("model.losses")
    finally:
        os.chdir(cwd)

    def reset_parameters(self, inputs):  # the official one allocates on CUDA
        self.scale_bias = torch.nn.Parameter(torch.zeros((1, *inputs.shape[1:]), dtype=inputs.dtype,
                                                         device=inputs.device))

    layers.Unpoolayer.reset_parameters = reset_parameters
    return types.SimpleNamespace(hp=hp, def_model=def_model, latent_layers=latent_layers, losses=losses, work=work)


def set_noise(ref, mode: str) -> None:
    """Posterior draws: the mean (``mode="mean"``) or seeded CPU noise (``"noise"``)."""
    generator = torch.Generator().manual_seed(NOISE_SEED)

    def calculate_z(mean, std):
        if mode == "mean":
            return mean, mean, std
        eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
        return eps * std + mean, mean, std

    ref.latent_layers.calculate_z = calculate_z


def count(args) -> None:
    ref = load_reference(Path(args.checkout), Path(args.cfg), args.hparams_lib)
    hp = ref.hp
    set_noise(ref, "mean")
    with torch.device("meta"):
        model = ref.def_model.UniversalAutoEncoder()
        x = torch.zeros(1, hp.data.channels, hp.data.target_res, hp.data.target_res)
        with torch.no_grad():
            model(x)
    print(json.dumps({"parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}))
    shutil.rmtree(ref.work, ignore_errors=True)


def _perturb(model: torch.nn.Module, generator: torch.Generator, scale: float) -> None:
    """Random offsets on every tensor, so zero-initialised biases and states are checked too."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))


def _outputs(ref, model, x: torch.Tensor) -> dict:
    """Decoder output, per-layer KL (B, L) and NLL (B,) of the official code, per image."""
    hp = ref.hp
    with torch.no_grad():
        logits, posteriors, priors = model(x)
    kl = torch.stack([ref.losses.calculate_std_loss(p, q).flatten(1).sum(1) for p, q in zip(posteriors, priors)], 1)
    binary = hp.data.dataset_source == "binarized_mnist"
    loss = ref.losses.BernoulliLoss() if binary else ref.losses.DiscMixLogistic()
    nll = []
    for i in range(x.shape[0]):  # the official losses average over the batch; one image at a time
        per_dim, per_image, _, _ = loss(targets=x[i:i + 1], logits=logits[i:i + 1], global_batch_size=1)
        # MoL: the first value is nats per dimension of the image; Bernoulli: the second is nats per image
        nll.append(per_image if binary else per_dim * x[0].numel())
    return {"logits": logits, "kl": kl, "nll": torch.stack([torch.as_tensor(v, dtype=x.dtype) for v in nll])}


def run(args) -> None:
    ref = load_reference(Path(args.checkout), Path(args.cfg), args.hparams_lib)
    out = Path(args.out)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = ref.def_model.UniversalAutoEncoder()
    images = torch.load(args.images, weights_only=True)
    set_noise(ref, "mean")
    with torch.no_grad():
        model(images[:1].float())  # creates the unpool biases, as the official train.py does
    _perturb(model, generator, 0.02)
    ema = ref.def_model.UniversalAutoEncoder()
    with torch.no_grad():
        ema(images[:1].float())
    ema.load_state_dict(model.state_dict())
    _perturb(ema, generator, 0.02)

    optimizer = torch.optim.Adamax(model.parameters(), lr=1e-3)
    torch.save({"global_step": 1234, "model_state_dict": model.state_dict(), "ema_model_state_dict": ema.state_dict(),
                "optimizer_state_dict": optimizer.state_dict(), "scheduler_state_dict": {"last_epoch": 1234}},
               out / f"checkpoints-{ref.hp.run.name}")

    results = {}
    for dtype in (torch.float64, torch.float32):
        model.to(dtype)
        x = images.to(dtype)
        for mode in ("mean", "noise"):
            set_noise(ref, mode)
            results[f"{mode}-{str(dtype).split('.')[-1]}"] = _outputs(ref, model, x)
    torch.save(results, out / "reference.pt")
    shutil.rmtree(ref.work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job", choices=["count", "run"])
    parser.add_argument("--checkout", required=True)
    parser.add_argument("--cfg", required=True)
    parser.add_argument("--hparams-lib", default=None)
    parser.add_argument("--images")
    parser.add_argument("--out")
    args = parser.parse_args()
    count(args) if args.job == "count" else run(args)


if __name__ == "__main__":
    main()
