"""The resolved run config: model, training settings, data and preset, read from and written to TOML."""

from __future__ import annotations

import math
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError
from ..model.config import ModelConfig, parse_setting
from .config import TrainConfig
from .presets import get_preset

# Settings that change the optimisation trajectory: a resumed run must keep them.
TRAJECTORY_FIELDS = ("batch_size", "seed", "optimizer", "lr", "min_lr", "lr_schedule", "warmup_steps", "decay_start",
                     "decay_steps", "beta1", "beta2", "eps", "weight_decay", "ema_decay", "ema_warmup",
                     "grad_skip_threshold", "grad_clip", "kl_warmup_steps", "kl_warmup_start", "kl_weight_min",
                     "kl_balance_steps", "kl_balance_scaled", "flip")


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
        base = replace(base, **p.recipe.settings)
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
        train_values[key] = parse_setting(key, raw, train_values[key])
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
