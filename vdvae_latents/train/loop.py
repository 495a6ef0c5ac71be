"""Training: the optimisation loop, EMA, update skipping, checkpoints and resumption.

Reproducibility is by construction: every source of randomness in step ``s`` comes
from a generator seeded with ``(seed, s, rank)`` (dynamic binarisation, flips, posterior
samples) or, for the data order, ``(seed, epoch)`` (:class:`~vdvae_latents.data.TrainOrder`,
which the streaming :class:`~vdvae_latents.data.TrainLoader` follows whatever its number
of worker processes). So a run that is interrupted and resumed from its checkpoint
takes exactly the same steps as one that was not, and on the CPU ends with
bit-identical weights.

Multi-GPU (and multi-process CPU) training runs under ``torchrun``: DDP with NCCL on
GPUs, gloo on CPUs; rank 0 writes the run directory.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from ..core.atomic import write_text
from ..core.errors import ConfigError
from ..core.runtime import DistEnv, auto_device, join_processes
from ..core.writer_lock import writing_run_dir
from ..data import LazyImages, TrainLoader, open_images, resolve_workers
from ..model import checkpoints as ckpt
from ..model.inputs import check_images_fit, evaluation_images, prepare_batch
from ..model.vae import VAE
from .run_config import RunConfig, dump_toml, load_run_config
from .step import EMA, TrainStep, build_model

CONFIG_NAME = "config.toml"
METRICS_NAME = "metrics.jsonl"


def step_generator(seed: int, step: int, rank: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator for everything random in one step on one rank."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step) * 1_009 + rank)
    return g


# ----------------------------------------------------------------------------- results
@dataclass
class TrainResult:
    run_dir: Path
    step: int
    skips: int
    interrupted: bool
    checkpoint: Path | None
    last_metrics: dict = field(default_factory=dict)
    validation: dict | None = None
    model: VAE | None = field(default=None, repr=False)   # the trained (raw, not EMA) model
    ema: "EMA | None" = field(default=None, repr=False)

    def summary(self) -> dict:
        """Plain values for JSON (what `vdvl train --json` prints)."""
        return {"run_dir": str(self.run_dir), "step": self.step, "skips": self.skips, "interrupted": self.interrupted,
                "checkpoint": str(self.checkpoint) if self.checkpoint else None,
                "last_metrics": self.last_metrics, "validation": self.validation}


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop checkpoints and exits at the next step boundary."""

    def __init__(self) -> None:
        self.stop = False
        self.signal = None
        self._old: dict = {}

    def __enter__(self) -> "_StopFlag":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no signal handling
                pass
        return self

    def _handle(self, signum, frame) -> None:
        self.stop, self.signal = True, signum

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


# ----------------------------------------------------------------------------- the loop
def train(run_dir: str | Path, run: RunConfig, *, quiet: bool = False, stop_after: int | None = None,
          on_step: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Train (or resume) the run in ``run_dir``. Returns when ``run.train.steps`` are done,
    after ``stop_after`` more steps (tests), or on SIGINT/SIGTERM — always with a checkpoint.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run directory '{run_dir}' is a file, not a directory.")
    device, env = join_processes(auto_device(run.train.device, setting="train setting 'device'"))
    # One writer per run: a second `vdvl train` (or `vdvl import`) here stops now, before it
    # reads a checkpoint it would then overwrite. Under torchrun, rank 0 holds it for the job.
    with writing_run_dir(run_dir) if env.is_main else contextlib.nullcontext():
        return _train_locked(run_dir, run, device, env, quiet=quiet, stop_after=stop_after, on_step=on_step)


def _train_locked(run_dir: Path, run: RunConfig, device: torch.device, env: DistEnv, *, quiet: bool,
                  stop_after: int | None, on_step: Callable[[int, dict], None] | None) -> TrainResult:
    tcfg, mcfg = run.train, run.model
    if tcfg.batch_size % env.world_size:
        raise ConfigError(f"train setting 'batch_size' ({tcfg.batch_size}) must divide evenly across "
                          f"{env.world_size} processes.")

    # --- data: streamed (nothing held in memory); each rank reads only its slice of each batch
    train_set = open_images(run.data, split="train", seed=tcfg.seed)
    check_images_fit(mcfg, train_set.shape, run.data)
    n_images = len(train_set)
    if n_images < tcfg.batch_size:
        raise ConfigError(f"train setting 'batch_size' ({tcfg.batch_size}) exceeds the {n_images} training images "
                          f"of '{run.data}'.")
    loader = TrainLoader(train_set, batch_size=tcfg.batch_size, seed=tcfg.seed, rank=env.rank,
                         world_size=env.world_size, workers=resolve_workers(tcfg.num_workers, train_set, device.type,
                                                                           env.world_size),
                         pin_memory=device.type == "cuda")
    batches_per_epoch = loader.batches_per_epoch  # the last partial batch of an epoch is dropped

    # --- model, optimiser, EMA (same init on every rank: seeded)
    model, ema, optimizer = build_model(run, device)

    # --- resume
    start_step, skips = 0, 0
    latest = ckpt.latest_checkpoint(run_dir) if run_dir.exists() else None
    config_path = run_dir / CONFIG_NAME
    if latest is not None or config_path.exists():
        previous = load_run_config(config_path) if config_path.exists() else None
        if latest is not None:
            payload = ckpt.load_checkpoint(latest, map_location=device)
            saved = RunConfig.from_dict({"model": payload["model_config"], "train": payload["train_config"],
                                         "data": payload.get("data", run.data)})
            previous = saved
        problems = run.incompatibilities(previous) if previous is not None else []
        if latest is not None:
            problems += loader.resume_problems(payload.get("data_position"))  # the data order must continue
        if problems:
            raise ConfigError(f"run directory '{run_dir}' holds a different run and cannot be resumed: "
                              f"{problems[0]}.")
        if latest is not None:
            model.load_state_dict(payload["model"])
            ema.load_state_dict(payload["ema"])
            ema.updates = int(payload.get("ema_updates", 0))
            optimizer.load_state_dict(payload["optimizer"])
            start_step, skips = int(payload["step"]), int(payload.get("skips", 0))
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text(config_path, dump_toml(run.to_dict()), what="run config")

    train_step = TrainStep(model, ema, optimizer, run, device, env.world_size)
    logger = _MetricsLogger(run_dir, enabled=env.is_main, resume_step=start_step)
    progress = _Progress(total=tcfg.steps, start=start_step, quiet=quiet or not env.is_main)
    window = _Window()
    step = start_step
    last_ckpt: Path | None = latest
    end = tcfg.steps if stop_after is None else min(tcfg.steps, start_step + stop_after)
    interrupted = False

    # The loader's order is a function of the step alone (data.TrainOrder): resuming at `step`
    # reads what an uninterrupted run would. closing() stops its worker processes on exit.
    with _StopFlag() as flag, contextlib.closing(iter(loader.steps(start_step, end))) as batches:
        while step < end:
            epoch = step // batches_per_epoch
            window.begin()
            g = step_generator(tcfg.seed, step, env.rank)
            images = next(batches).images
            if tcfg.flip:
                flip = torch.rand(len(images), generator=g) < 0.5
                images = torch.where(flip[:, None, None, None], images.flip(-1), images)
            x = prepare_batch(mcfg, images, dynamic_binarize=True, generator=g, device=device)

            stats = train_step(x, step, generator=step_generator(tcfg.seed, step, env.rank, device))
            skips += int(stats.skipped)
            step += 1
            window.add(stats, images=tcfg.batch_size)

            stop_now = flag.stop
            if env.world_size > 1:  # all ranks stop together when any rank was signalled
                t = torch.tensor([1.0 if stop_now else 0.0], device=device)
                dist.all_reduce(t)
                stop_now = bool(t.item() > 0)

            if step % tcfg.log_every == 0 or step == end or stop_now:
                metrics = window.flush(step=step, lr=tcfg.lr_at(step - 1), skips=skips, dims=mcfg.dims_per_image,
                                       binary=mcfg.output == "bernoulli", epoch=epoch)
                logger.log(metrics)
                progress.update(step, metrics)
            else:
                metrics = None
                progress.update(step, None)
            if on_step:
                on_step(step, metrics)
            if step % tcfg.checkpoint_every == 0 or step == end or stop_now:
                last_ckpt = _save(run_dir, env, run, model, ema, optimizer, step, skips, loader.position(step))
            if stop_now:
                interrupted = True
                break
            if tcfg.eval_every and step % tcfg.eval_every == 0 and step != end:
                logger.log({"step": step, "validation": validate(model, ema, run, env, device, train_set)})
    progress.close()

    validation = None
    if not interrupted and step >= tcfg.steps and tcfg.steps > start_step:
        validation = validate(model, ema, run, env, device, train_set)
        logger.log({"step": step, "validation": validation})
    logger.close()
    train_step.close()
    return TrainResult(run_dir, step, skips, interrupted, last_ckpt, window.last, validation, model, ema)


def _save(run_dir, env, run, model, ema, optimizer, step, skips, data_position) -> Path | None:
    path = None
    if env.is_main:
        payload = {
            "step": step,
            "preset": run.preset,
            "data": run.data,
            "model_config": run.model.to_dict(),
            "train_config": asdict(run.train),
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "ema": {k: v.detach().cpu() for k, v in ema.state_dict().items()},
            "optimizer": _to_cpu(optimizer.state_dict()),
            "scheduler": {"kind": run.train.lr_schedule, "step": step},
            "rng": {"torch": torch.get_rng_state()},
            "data_position": data_position,
            "skips": skips,
            "ema_updates": ema.updates,
            "world_size": env.world_size,
        }
        path = ckpt.save_checkpoint(ckpt.checkpoint_path(run_dir, step), payload)
        ckpt.prune_checkpoints(run_dir, run.train.keep_checkpoints)
    if env.world_size > 1:
        dist.barrier()
    return path


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


@torch.no_grad()
def validate(model: VAE, ema: EMA, run: RunConfig, env: DistEnv, device: torch.device,
             train_set: LazyImages | None = None) -> dict:
    """Negative ELBO on the val split with the EMA weights, summed exactly over all ranks
    (``train_set``: the run's train split, whose reader the val split shares)."""
    from ..model.evaluation import evaluate

    val_options = dict(split="val", seed=run.train.seed, limit=run.train.val_limit or None)
    val = open_images(run.data, **val_options) if train_set is None else train_set.split_as(**val_options)
    shard = val.shard(env.rank, env.world_size).batches(max(1, run.train.batch_size), pin_memory=device.type == "cuda")
    shard = evaluation_images(run.model, shard, run.train.eval_binarization, rank=env.rank, world_size=env.world_size)
    backup = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(ema.state_dict())
    try:
        result = evaluate(model, shard, seed=run.train.seed + env.rank, device=device)
    finally:
        model.load_state_dict(backup)
        model.train()
    sums = torch.tensor([result.nll_nats * result.n_images, result.kl_nats * result.n_images, result.n_images],
                        dtype=torch.float64, device=device)
    if env.world_size > 1:
        dist.all_reduce(sums)
    nll, kl, n = (sums[0] / sums[2]).item(), (sums[1] / sums[2]).item(), int(sums[2].item())
    d = run.model.dims_per_image
    out = {"images": n, "bits_per_dim": (nll + kl) / d / math.log(2), "recon_bits_per_dim": nll / d / math.log(2),
           "kl_bits_per_dim": kl / d / math.log(2)}
    if run.model.output == "bernoulli":
        out.update(nats_per_image=nll + kl, recon_nats_per_image=nll, kl_nats_per_image=kl)
    return out


# ----------------------------------------------------------------------------- logging
class _Window:
    """Averages the per-step numbers between two log lines.

    The loss values stay on the device until a log line needs them, so logging is the
    only host synchronisation besides the step's skip decision. The wall time runs from
    the first step of the window (data included) to the flush.
    """

    def __init__(self) -> None:
        self.reset()
        self.last: dict = {}

    def reset(self) -> None:
        self.n, self.nll, self.kl, self.gn, self.images, self.t0 = 0, 0.0, 0.0, 0.0, 0, None

    def begin(self) -> None:
        if self.t0 is None:
            self.t0 = time.perf_counter()

    def add(self, stats, *, images) -> None:
        self.n += 1
        self.nll = self.nll + stats.nll
        self.kl = self.kl + stats.kl
        self.gn = max(self.gn, stats.grad_norm) if math.isfinite(stats.grad_norm) else float("nan")
        self.images += images

    def flush(self, *, step, lr, skips, dims, binary, epoch) -> dict:
        n = max(self.n, 1)
        nll, kl = float(self.nll) / n, float(self.kl) / n
        seconds = time.perf_counter() - self.t0 if self.t0 is not None else 0.0
        ln2 = math.log(2)
        m = {"step": step, "epoch": epoch, "loss": (nll + kl) / dims, "nats_per_dim": (nll + kl) / dims,
             "bits_per_dim": (nll + kl) / dims / ln2, "recon_bits_per_dim": nll / dims / ln2,
             "kl_bits_per_dim": kl / dims / ln2, "grad_norm": self.gn, "lr": lr, "skips": skips,
             "images_per_s": self.images / seconds if seconds > 0 else 0.0, "time": time.time()}
        if binary:
            m.update(nats_per_image=nll + kl, recon_nats_per_image=nll, kl_nats_per_image=kl)
        self.last = m
        self.reset()
        return m


def _drop_lines_after(path: Path, step: int) -> None:
    """Drop the lines of ``path`` logged after ``step``, the checkpoint a run resumes from.

    A run stopped between two checkpoints (kill -9, a full disk, a crash) logged steps that it
    now does again; without this the history would hold those steps twice. A torn last line
    (a kill in the middle of a write) is dropped too.
    """
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if _logged_step(line) <= step]
    if len(kept) < len(lines):
        write_text(path, "".join(kept), what="metrics log")


def _logged_step(line: str) -> float:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


class _MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool, resume_step: int = 0) -> None:
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        _drop_lines_after(run_dir / METRICS_NAME, resume_step)
        self.file = open(run_dir / METRICS_NAME, "a", encoding="utf-8")
        try:  # TensorBoard events when tensorboard is installed; never required
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        except Exception:
            self.tb = None

    def log(self, metrics: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(metrics, allow_nan=True) + "\n")
        self.file.flush()
        if self.tb is not None:
            prefix = "val/" if "validation" in metrics else "train/"
            flat = metrics.get("validation", metrics)
            for k, v in flat.items():
                if isinstance(v, (int, float)) and k not in ("step", "time"):
                    self.tb.add_scalar(prefix + k, v, metrics["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


class _Progress:
    """A rich progress bar on a terminal, plain log lines otherwise, nothing with quiet."""

    def __init__(self, total: int, start: int, quiet: bool) -> None:
        self.quiet = quiet
        self.bar = None
        if quiet:
            return
        if sys.stderr.isatty():
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                TextColumn("{task.fields[info]}"), transient=False)
            self.bar.start()
            self.task = self.bar.add_task("train", total=total, completed=start, info="")

    def update(self, step: int, metrics: dict | None) -> None:
        if self.quiet:
            return
        info = None
        if metrics is not None:
            info = (f"loss {metrics['loss']:.4f}  {metrics['bits_per_dim']:.3f} bits/dim  "
                    f"skips {metrics['skips']}  {metrics['images_per_s']:.0f} img/s")
        if self.bar is not None:
            self.bar.update(self.task, completed=step, **({"info": info} if info else {}))
        elif info:
            print(f"step {step}: {info}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
