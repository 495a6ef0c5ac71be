"""Training configuration and the resolved run config (TOML).

A run is fully described by a :class:`RunConfig`: the model (:class:`ModelConfig`), the
optimisation (:class:`TrainConfig`), the data spec and the preset it started from.
It is resolved from ``--preset`` or ``--config FILE.toml`` plus ``--set key=value``
overrides, and written to ``RUN_DIR/config.toml`` so a run can be read and resumed.

A config file looks like::

    preset = "fashion-mnist-cpu"      # optional base preset
    data = "fashion-mnist"
    [model]                           # any ModelConfig field
    variates = 8
    [train]                           # any TrainConfig field
    steps = 5000
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .config import ModelConfig, _parse_value
from .errors import ConfigError
from .presets import get_preset


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (defaults follow the paper and its public code)."""

    steps: int = 1000                 # total optimisation steps (the cosine schedule spans them)
    batch_size: int = 16              # global batch (split across DDP ranks)
    optimizer: str = "adamax"         # "adamax" (Efficient-VDVAE) | "adamw" (VDVAE) | "adam"
    lr: float = 1e-3
    min_lr: float = 2e-4              # floor of the cosine decay
    warmup_steps: int = 100           # linear warm-up from 0
    decay_start: int = 0              # cosine decay starts here (after warm-up) ...
    decay_steps: int = 0              # ... and lasts this long; 0 = until `steps`
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    ema_decay: float = 0.9999
    grad_skip_threshold: float = 800.0  # skip the update when the grad norm is NaN or >= this (0 = never)
    grad_clip: float = 0.0            # clip the grad norm to this (0 = no clipping)
    kl_warmup_steps: int = 0          # linear KL weight 0 -> 1 over these steps (NVAE-style; 0 = off)
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    eval_every: int = 0               # validation every N steps (0 = only at the end)
    val_limit: int = 2000             # images of the val split used for validation (0 = all)
    flip: bool = False                # random horizontal flips
    device: str = "auto"              # auto | cpu | cuda
    bf16: bool = True                 # bf16 autocast on CUDA
    compile: bool = False             # torch.compile the model (CUDA)
    channels_last: bool = True        # channels_last memory format on CUDA
    num_workers: int = -1             # DataLoader worker processes per rank (-1 = auto: data.resolve_workers)

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"train setting '{name}' {why}.")

        for name in ("steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise bad(name, f"must be at least 1, not {getattr(self, name)}")
        for name in ("warmup_steps", "decay_start", "decay_steps", "kl_warmup_steps", "eval_every", "val_limit",
                     "grad_clip", "grad_skip_threshold", "weight_decay", "min_lr"):
            if getattr(self, name) < 0:
                raise bad(name, f"must be non-negative, not {getattr(self, name)}")
        if self.num_workers < -1:
            raise bad("num_workers", f"must be -1 (auto) or a number of processes, not {self.num_workers}")
        if not self.lr > 0:
            raise bad("lr", f"must be positive, not {self.lr}")
        if self.min_lr > self.lr:
            raise bad("min_lr", f"must not exceed lr ({self.lr}), not {self.min_lr}")
        if not 0 <= self.ema_decay < 1:
            raise bad("ema_decay", f"must be in [0, 1), not {self.ema_decay}")
        if self.optimizer not in ("adamax", "adamw", "adam"):
            raise bad("optimizer", f"must be adamax, adamw or adam, not '{self.optimizer}'")
        if self.device not in ("auto", "cpu", "cuda"):
            raise bad("device", f"must be auto, cpu or cuda, not '{self.device}'")

    def lr_at(self, step: int) -> float:
        """Learning rate for update ``step`` (0-based): linear warm-up, then cosine to ``min_lr``.

        The cosine is measured from its own start (``decay_start``, or the end of the
        warm-up if later), so a warm-up does not eat into the decay.
        """
        if self.warmup_steps and step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        start = max(self.decay_start, self.warmup_steps)
        length = self.decay_steps or max(1, self.steps - start)
        t = min(max(step - start, 0) / length, 1.0)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * t))

    def kl_weight_at(self, step: int) -> float:
        if not self.kl_warmup_steps:
            return 1.0
        return min(1.0, (step + 1) / self.kl_warmup_steps)


# Settings that change the optimisation trajectory: a resumed run must keep them.
TRAJECTORY_FIELDS = ("batch_size", "seed", "optimizer", "lr", "min_lr", "warmup_steps", "decay_start",
                     "decay_steps", "beta1", "beta2", "eps", "weight_decay", "ema_decay", "grad_skip_threshold",
                     "grad_clip", "kl_warmup_steps", "flip")


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    data: str = "digits"
    preset: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"data": self.data}
        if self.preset:
            out["preset"] = self.preset
        out["model"] = self.model.to_dict()
        out["train"] = asdict(self.train)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> "RunConfig":
        unknown = sorted(set(data) - {"data", "preset", "model", "train"})
        if unknown:
            raise ConfigError(f"{source} has an unknown key '{unknown[0]}' (expected preset, data, [model], [train]).")
        preset = data.get("preset")
        model = get_preset(preset).config if preset else ModelConfig()
        if data.get("model"):
            model = model.replace(**data["model"])
        train = _train_from(data.get("train", {}), preset)
        return cls(model=model, train=train, data=str(data.get("data", "digits")), preset=preset)

    def incompatibilities(self, other: "RunConfig") -> list[str]:
        """Why a run saved with ``other`` cannot be resumed with ``self`` (empty if it can)."""
        problems = []
        mine, theirs = self.model.to_dict(), other.model.to_dict()
        for key in mine:
            if key != "name" and mine[key] != theirs.get(key):
                problems.append(f"model field '{key}' is {mine[key]} here but {theirs.get(key)} in the run")
        for key in TRAJECTORY_FIELDS:
            a, b = getattr(self.train, key), getattr(other.train, key)
            if a != b:
                problems.append(f"train setting '{key}' is {a} here but {b} in the run")
        if self.data != other.data:
            problems.append(f"data is '{self.data}' here but '{other.data}' in the run")
        return problems


def _train_from(values: dict[str, Any], preset: str | None) -> TrainConfig:
    base = TrainConfig()
    if preset:
        p = get_preset(preset)
        base = replace(base, batch_size=p.batch_size, lr=p.lr, min_lr=min(base.min_lr, p.lr))
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"train setting '{unknown[0]}' does not exist.")
    return replace(base, **values)


def resolve_run_config(*, preset: str | None = None, config_file: str | Path | None = None,
                       data: str | None = None, overrides: dict[str, str] | None = None,
                       train_overrides: dict[str, Any] | None = None) -> RunConfig:
    """Build the run config from a preset or a TOML file, then apply overrides.

    ``overrides`` are ``--set`` strings: ``key=value`` for a model field, or
    ``train.key=value`` for a training setting. ``train_overrides`` are typed values
    from dedicated flags (``--steps``, ``--lr``, ...).
    """
    if (preset is None) == (config_file is None):
        raise ConfigError("give exactly one of --preset or --config.")
    if config_file is not None:
        path = Path(config_file)
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file '{path}' does not exist.") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"config file '{path}' is not valid TOML ({err}).") from None
        run = RunConfig.from_dict(raw, source=f"config file '{path}'")
    else:
        run = RunConfig(model=get_preset(preset).config, train=_train_from({}, preset), preset=preset)
    model_sets, train_sets = {}, {}
    for key, value in (overrides or {}).items():
        if key.startswith("train."):
            train_sets[key[len("train."):]] = value
        else:
            model_sets[key.removeprefix("model.")] = value
    model = run.model.with_overrides(model_sets) if model_sets else run.model
    train_values = asdict(run.train)
    for key, raw in train_sets.items():
        if key not in train_values:
            raise ConfigError(f"train setting '{key}' does not exist.")
        train_values[key] = _parse_value(key, raw, train_values[key])
    train_values.update({k: v for k, v in (train_overrides or {}).items() if v is not None})
    return RunConfig(model=model, train=TrainConfig(**train_values), data=data or run.data, preset=run.preset)


def load_run_config(path: str | Path) -> RunConfig:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"run config '{path}' cannot be read ({err}).") from None
    return RunConfig.from_dict(raw, source=f"run config '{path}'")


# ---------------------------------------------------------------------------- TOML writing
def dump_toml(data: dict[str, Any]) -> str:
    """Write a dict of scalars, lists and one level of tables as TOML (enough for RunConfig)."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict) and v is not None]
    for key, table in data.items():
        if isinstance(table, dict):
            lines += ["", f"[{key}]"]
            lines += [f"{k} = {_toml_value(v)}" for k, v in table.items() if v is not None]
    return "\n".join(lines) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v) if math.isfinite(v) else ("inf" if v > 0 else "-inf") if not math.isnan(v) else "nan"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")
