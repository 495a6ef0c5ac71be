"""The model configuration: one validated dataclass, as in nanoGPT.

Per-resolution fields are tuples ordered from the LOWEST resolution to the highest,
the order in which the top-down (generative) path visits them. For example the paper's
CIFAR-10 C1 model has ``resolutions=(1, 4, 8, 16, 32)`` and
``up_blocks=(3, 4, 7, 11, 22)`` (Table 6): 3 latent layers at 1x1, ..., 22 at 32x32.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from typing import Any

from ..core.errors import ConfigError

ARCHITECTURES = ("efficient", "vdvae")
OUTPUTS = ("mol", "bernoulli")
ACTIVATIONS = ("silu", "gelu")
MOL_SCALES = ("softplus", "exp", "logstd")
MOL_TAILS = ("exact", "pixelcnn")
INITS = ("pytorch", "xavier")
BIT_REDUCTIONS = ("rescale", "truncate", "truncate-all")
VDVAE_LOG_SCALE_FLOOR = -7.0  # VDVAE's lower bound on the MoL log-scale ("bounded")
UNBOUNDED_LOG_SCALE_FLOOR = -80.0  # "unbounded": only where exp() stays a normal float32
VDVAE_NO_BIAS_ABOVE = 64  # VDVAE's `no_bias_above`: no per-resolution trainable state above 64x64


def _as_groups(value: Any, n: int, name: str) -> tuple[tuple[int, ...], ...] | None:
    """Normalise a per-resolution list of group sizes (lists of ints) to nested tuples."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != n or not all(isinstance(g, (list, tuple)) for g in value):
        raise ConfigError(f"config field '{name}' must list the group sizes of each of the {n} resolutions "
                          f"(a list of {n} lists of integers).")
    try:
        if any(isinstance(v, float) and not v.is_integer() for g in value for v in g):
            raise ValueError
        return tuple(tuple(int(v) for v in g) for g in value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"config field '{name}' must hold integers only.") from None


def _as_tuple(value: Any, n: int, name: str, kind: type) -> tuple:
    """Broadcast a scalar to ``n`` entries, or check a sequence has ``n`` entries."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ConfigError(
                f"config field '{name}' has {len(value)} entries but there are {n} resolutions."
            )
        return tuple(kind(v) for v in value)
    return tuple(kind(value) for _ in range(n))


@dataclass(frozen=True)
class ModelConfig:
    """Everything that determines the network's shape and its likelihoods.

    Attributes:
        image_size: height = width of the model's input (after any padding).
        channels: 1 (grayscale / binary) or 3 (RGB).
        n_bits: bits per pixel value of the discretised data (8, or 5 for the
            5-bit benchmarks).
        bit_reduction: how an 8-bit image becomes ``n_bits``-bit data (no effect at 8
            bits). ``"rescale"``: the model reads and scores the reduced image, whose
            ``2**n_bits`` levels span [-1, 1]. ``"truncate"`` (openai/vdvae's FFHQ-256):
            the model reads the full 8-bit image and scores its value with the low
            ``8 - n_bits`` bits cleared, on the 8-bit scale (levels -1 .. 0.945 at 5
            bits, half bin ``1/(2**n_bits - 1)``); see :mod:`~vdvae_latents.model.likelihoods`.
            ``"truncate-all"`` (the official Efficient-VDVAE code's 5-bit models): the
            same grid, but the encoder reads the truncated image too and the highest
            level's bin extends to +inf.
        input_shift, input_scale: the bottom-up path reads ``(x + input_shift) *
            input_scale`` instead of the [-1, 1] image ``x`` (openai/vdvae normalises its
            input with per-data-set constants); the likelihood still scores ``x``.
            The defaults (0, 1) leave the input untouched.
        output: ``"mol"`` (discretised mixture of logistics) or ``"bernoulli"``.
        n_mixtures: number of logistic components (MoL only).
        mol_bounded: floor the MoL log-scale at -7 as VDVAE does; ``False`` is the
            paper's unbounded variant.
        mol_log_scale_floor: an explicit floor for the MoL log-scale (the official
            code's ``min_mol_logscale``: -14 for its 5-bit models, -250 = none); None
            takes the floor that ``mol_bounded`` chooses. Not together with mol_bounded.
        mol_scale: how the MoL scales are parametrised: ``"softplus"`` (softplus with
            ``output_beta``, the official code's 'std' base), ``"exp"`` (exp of the raw
            output, VDVAE's) or ``"logstd"`` (exp(output_beta * raw), the official
            code's 'logstd' base). None: softplus for efficient, exp for vdvae.
        mol_tail: ``"exact"`` (vdvl's stable bin masses) or ``"pixelcnn"`` (the
            reference codes' approximation for bins of mass below 1e-5; see
            :func:`~vdvae_latents.model.likelihoods.discretized_mol_log_prob`).
        pad: pixels of padding on each side added by the data pipeline (MNIST is
            padded 28 -> 32); the likelihood is computed on the un-padded centre.
        resolutions: latent resolutions, lowest first; the last equals image_size
            and each divides the next.
        up_blocks: top-down blocks (= latent layers) per resolution.
        down_blocks: bottom-up residual cells per resolution.
        widths: channels of the residual stream per resolution. For vdvae they may not
            grow toward the high resolutions (openai/vdvae's ``custom_width_str``: the
            bottom-up path zero-pads channels after each pool, the top-down path keeps
            the first channels before each upsampling).
        skip_widths: width of the bottom-up skip handed to the posterior branch,
            per resolution (efficient only; defaults to ``widths``).
        up_skip_groups, down_skip_groups: the skip layout (efficient only). None (both):
            one skip per resolution, read by all of its top-down blocks. Otherwise, per
            resolution, ``up_skip_groups[i]`` lists how many consecutive top-down blocks
            read each skip (top-down order; sums to ``up_blocks[i]``) and
            ``down_skip_groups[i]`` how many bottom-up residual cells run before each of
            those skips is projected (same order, sums to ``down_blocks[i]``). The
            bottom-up path runs the groups last to first, so the deepest skip feeds the
            first top-down group: the official configs' layout, where every encoder
            block has its own skip, is all-ones groups (plus the blocks that re-use one).
        bottleneck: middle width of the residual cells as a fraction of their width
            (one value or one per resolution; C1 uses 1.0 at 32x32, 0.5 at 16x16).
        variates: latent channels per layer (one value or one per resolution).
        latent_beta: softplus beta for the latent std (ln 2 by default; 1.0 means
            plain softplus, i.e. no gradient smoothing).
        output_beta: softplus beta for the MoL scales.
        architecture: ``"efficient"`` (trainable strided-conv pool, 1x1-conv unpool,
            skip projections, softplus std) or ``"vdvae"`` (average pool, constant
            width, exp(log sigma), bounded MoL, zero-initialised prior output).
        activation: ``"silu"`` (Efficient-VDVAE code) or ``"gelu"`` (VDVAE).
        output_gain: a trainable per-channel gain and bias on the last top-down state
            before the output head (VDVAE has them; the official Efficient-VDVAE code
            does not).
        init: ``"pytorch"`` (PyTorch's default weights, zero biases) or ``"xavier"``
            (efficient only; the official code's: Xavier-uniform weights and zero biases
            for every conv but each residual cell's first 1x1, which keeps PyTorch's
            default, and a Kaiming-uniform initial state). The sqrt(1/L) scalings apply
            on top of either.
    """

    image_size: int = 32
    channels: int = 3
    n_bits: int = 8
    bit_reduction: str = "rescale"
    output: str = "mol"
    n_mixtures: int = 10
    mol_bounded: bool = False
    pad: int = 0
    resolutions: tuple[int, ...] = (1, 4, 8, 16, 32)
    up_blocks: tuple[int, ...] = (3, 4, 7, 11, 22)
    down_blocks: tuple[int, ...] = (3, 4, 7, 11, 22)
    widths: tuple[int, ...] = (384, 384, 384, 384, 384)
    skip_widths: tuple[int, ...] | None = None
    bottleneck: tuple[float, ...] | float = 0.25
    variates: tuple[int, ...] | int = 16
    latent_beta: float = math.log(2.0)
    output_beta: float = math.log(2.0)
    architecture: str = "efficient"
    activation: str = "silu"
    up_skip_groups: tuple[tuple[int, ...], ...] | None = None
    down_skip_groups: tuple[tuple[int, ...], ...] | None = None
    mol_scale: str | None = None
    mol_log_scale_floor: float | None = None
    mol_tail: str = "exact"
    output_gain: bool = True
    init: str = "pytorch"
    input_shift: float = 0.0
    input_scale: float = 1.0
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        n = len(self.resolutions) if isinstance(self.resolutions, (list, tuple)) else 0
        if n == 0:
            raise ConfigError("config field 'resolutions' must list at least one resolution.")
        # Normalise sequences to tuples (TOML/JSON give lists) before validating.
        set_ = object.__setattr__
        set_(self, "resolutions", tuple(int(r) for r in self.resolutions))
        for name in ("up_blocks", "down_blocks", "widths", "variates"):
            set_(self, name, _as_tuple(getattr(self, name), n, name, int))
        skip = self.widths if self.skip_widths is None else self.skip_widths
        set_(self, "skip_widths", _as_tuple(skip, n, "skip_widths", int))
        set_(self, "bottleneck", _as_tuple(self.bottleneck, n, "bottleneck", float))
        for name in ("up_skip_groups", "down_skip_groups"):
            set_(self, name, _as_groups(getattr(self, name), n, name))
        if self.mol_log_scale_floor is not None:
            set_(self, "mol_log_scale_floor", float(self.mol_log_scale_floor))
        check_values(self)
        check_skip_layout(self)

    # ----------------------------------------------------------------- derived
    def skip_groups(self, i: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(top-down blocks per skip, bottom-up cells per skip) at resolution index ``i``."""
        if self.up_skip_groups is None:
            return (self.up_blocks[i],), (self.down_blocks[i],)
        return self.up_skip_groups[i], self.down_skip_groups[i]  # type: ignore[index]

    @property
    def n_skips(self) -> int:
        """Number of bottom-up skips handed to the top-down path."""
        return sum(len(self.skip_groups(i)[0]) for i in range(len(self.resolutions)))

    @property
    def mol_scale_kind(self) -> str:
        """The MoL scale parametrisation in effect (resolves ``mol_scale=None``)."""
        if self.mol_scale is not None:
            return self.mol_scale
        return "exp" if self.architecture == "vdvae" else "softplus"

    @property
    def mol_floor(self) -> float:
        """The lower bound on the MoL log-scale in effect."""
        if self.mol_log_scale_floor is not None:
            return self.mol_log_scale_floor
        return VDVAE_LOG_SCALE_FLOOR if self.mol_bounded else UNBOUNDED_LOG_SCALE_FLOOR

    @property
    def n_layers(self) -> int:
        """Number of latent layers L (top-down blocks)."""
        return sum(self.up_blocks)

    def mid_width(self, i: int) -> int:
        """Middle (bottleneck) width of the residual cells at resolution index ``i``."""
        return max(1, int(self.widths[i] * self.bottleneck[i]))

    def layer_shapes(self) -> list[tuple[int, int, int]]:
        """(V, H, W) of every latent layer, in top-down order."""
        shapes = []
        for res, n, v in zip(self.resolutions, self.up_blocks, self.variates):
            shapes += [(v, res, res)] * n
        return shapes

    @property
    def n_latent_variates(self) -> int:
        """Total latent variates (channels) over all layers: the 'variate' dimensions."""
        return sum(v for v, _, _ in self.layer_shapes())

    @property
    def n_latent_elements(self) -> int:
        """Total latent scalars per image: the 'element' dimensions."""
        return sum(v * h * w for v, h, w in self.layer_shapes())

    @property
    def image_bits(self) -> int:
        """Bits per pixel value of the images the model reads and writes: ``n_bits``, or 8
        when the model reads full 8-bit images (``bit_reduction="truncate"``, binary data)."""
        if self.output == "bernoulli" or self.bit_reduction in ("truncate", "truncate-all"):
            return 8
        return self.n_bits

    @property
    def normalises_input(self) -> bool:
        """Whether the bottom-up path applies ``(x + input_shift) * input_scale``."""
        return (self.input_shift, self.input_scale) != (0.0, 1.0)

    @property
    def loss_size(self) -> int:
        """Pixels of the likelihood region (the un-padded centre)."""
        return self.image_size - 2 * self.pad

    @property
    def dims_per_image(self) -> int:
        """C * H * W of the likelihood region: the denominator of nats/dim."""
        return self.channels * self.loss_size**2

    # ----------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = [list(x) if isinstance(x, tuple) else x for x in v] if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"config field '{unknown[0]}' is not a model setting (known: {', '.join(sorted(known))}).")
        return cls(**data)

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed (re-validated)."""
        return self.from_dict({**self.to_dict(), **changes})

    def with_overrides(self, assignments: dict[str, str]) -> "ModelConfig":
        """Apply ``key=value`` strings (from ``--set``), parsing values by field type."""
        changes: dict[str, Any] = {}
        current = self.to_dict()
        for key, raw in assignments.items():
            if key not in current:
                raise ConfigError(f"config field '{key}' is not a model setting.")
            changes[key] = parse_setting(key, raw, current[key])
        return self.replace(**changes)


# ----------------------------------------------------------------------------- validation
# Module functions rather than methods: ModelConfig stays a readable list of fields and what
# follows from them; every rule a config must satisfy is here, each raising one ConfigError
# sentence that names the field.

# Fields that take one of a few names, and the names (mol_scale may also be None).
CHOICES = {"architecture": ARCHITECTURES, "output": OUTPUTS, "activation": ACTIVATIONS, "mol_scale": MOL_SCALES,
           "mol_tail": MOL_TAILS, "init": INITS, "bit_reduction": BIT_REDUCTIONS}


def _bad(name: str, why: str) -> ConfigError:
    return ConfigError(f"config field '{name}' {why}.")


def _check_choice(cfg: ModelConfig, name: str) -> None:
    value = getattr(cfg, name)
    if value not in CHOICES[name] and not (name == "mol_scale" and value is None):
        raise _bad(name, f"must be one of {', '.join(CHOICES[name])}, not '{value}'")


def check_values(cfg: ModelConfig) -> None:
    """Raise :class:`ConfigError` for the first field of ``cfg`` that is out of range or inconsistent."""
    for name in ("architecture", "output", "activation"):
        _check_choice(cfg, name)
    if cfg.channels not in (1, 3):
        raise _bad("channels", f"must be 1 or 3, not {cfg.channels}")
    if not 1 <= cfg.n_bits <= 8:
        raise _bad("n_bits", f"must be between 1 and 8, not {cfg.n_bits}")
    if cfg.n_mixtures < 1:
        raise _bad("n_mixtures", f"must be at least 1, not {cfg.n_mixtures}")
    if cfg.image_size < 1:
        raise _bad("image_size", f"must be positive, not {cfg.image_size}")
    if cfg.pad < 0 or 2 * cfg.pad >= cfg.image_size:
        raise _bad("pad", f"must be >= 0 and leave some image inside, not {cfg.pad}")
    _check_resolutions(cfg)
    _check_widths(cfg)
    for name in ("latent_beta", "output_beta"):
        if not getattr(cfg, name) > 0:
            raise _bad(name, f"must be positive, not {getattr(cfg, name)}")
    for name in ("mol_scale", "mol_tail"):
        _check_choice(cfg, name)
    if cfg.mol_bounded and cfg.mol_log_scale_floor is not None:
        raise _bad("mol_log_scale_floor", "cannot be set together with mol_bounded (which means a floor of -7)")
    _check_choice(cfg, "init")
    if cfg.init != "pytorch" and cfg.architecture != "efficient":
        raise _bad("init", f"'{cfg.init}' is the official Efficient-VDVAE scheme; it needs architecture efficient")
    _check_choice(cfg, "bit_reduction")
    if not (math.isfinite(cfg.input_shift) and math.isfinite(cfg.input_scale) and cfg.input_scale != 0):
        raise _bad("input_scale", f"and input_shift must be finite with a non-zero scale, got "
                   f"{cfg.input_shift} and {cfg.input_scale}")
    if cfg.output == "bernoulli" and cfg.n_bits != 8:
        # Binary data has no bit depth; keep the field at its default to avoid confusion.
        raise _bad("n_bits", "must stay 8 with the bernoulli output (binary data has no bit depth)")
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if any(isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, tuple) else [value])):
            raise _bad(f.name, f"must be finite, not {value}")


def _check_resolutions(cfg: ModelConfig) -> None:
    res = cfg.resolutions
    if any(r < 1 for r in res):
        raise _bad("resolutions", f"must be positive, got {list(res)}")
    if list(res) != sorted(set(res)):
        raise _bad("resolutions", f"must be strictly increasing (lowest first), got {list(res)}")
    if res[-1] != cfg.image_size:
        raise _bad("resolutions", f"must end at image_size {cfg.image_size}, got {list(res)}")
    for lo, hi in zip(res, res[1:]):
        if hi % lo:
            raise _bad("resolutions", f"must each divide the next, but {lo} does not divide {hi}")


def _check_widths(cfg: ModelConfig) -> None:
    """Block counts, widths, variates and bottlenecks per resolution."""
    for name in ("up_blocks", "down_blocks"):
        if any(b < 0 for b in getattr(cfg, name)):
            raise _bad(name, f"must be non-negative, got {list(getattr(cfg, name))}")
    if sum(cfg.up_blocks) < 1:
        raise _bad("up_blocks", "must give at least one latent layer")
    for name in ("widths", "skip_widths", "variates"):
        if any(v < 1 for v in getattr(cfg, name)):
            raise _bad(name, f"must be positive, got {list(getattr(cfg, name))}")
    if cfg.architecture == "vdvae" and any(lo < hi for lo, hi in zip(cfg.widths, cfg.widths[1:])):
        raise _bad("widths", "must not grow toward the high resolutions for the vdvae architecture "
                   f"(its pools pad channels and its upsampling drops them), got {list(cfg.widths)}")
    if any(not 0 < b <= 4 for b in cfg.bottleneck):
        raise _bad("bottleneck", f"must be in (0, 4], got {list(cfg.bottleneck)}")


def check_skip_layout(cfg: ModelConfig) -> None:
    """Raise :class:`ConfigError` unless the skip groups (if any) fit the block counts."""
    up, down = cfg.up_skip_groups, cfg.down_skip_groups
    if up is None and down is None:
        return
    if up is None or down is None:
        missing = "up_skip_groups" if up is None else "down_skip_groups"
        raise ConfigError(f"config field '{missing}' must be given too: a skip layout needs both group lists.")
    if cfg.architecture != "efficient":
        raise ConfigError("config field 'up_skip_groups' needs architecture efficient (VDVAE has one skip per resolution).")
    for i, (res, ups, downs) in enumerate(zip(cfg.resolutions, up, down)):
        where = f"at resolution {res}"
        if len(ups) != len(downs):
            raise ConfigError(f"config fields 'up_skip_groups' and 'down_skip_groups' have {len(ups)} and "
                              f"{len(downs)} groups {where}; every skip needs both.")
        if not ups:
            raise ConfigError(f"config field 'up_skip_groups' has no group {where}.")
        if any(b < 1 for b in ups) or any(c < 0 for c in downs):
            raise ConfigError(f"config field 'up_skip_groups' needs at least one top-down block per group and "
                              f"'down_skip_groups' non-negative cell counts {where}.")
        if sum(ups) != cfg.up_blocks[i]:
            raise ConfigError(f"config field 'up_skip_groups' sums to {sum(ups)} {where} but up_blocks has "
                              f"{cfg.up_blocks[i]}.")
        if sum(downs) != cfg.down_blocks[i]:
            raise ConfigError(f"config field 'down_skip_groups' sums to {sum(downs)} {where} but down_blocks has "
                              f"{cfg.down_blocks[i]}.")


# Fields that may be None: how to parse a --set value for them ("none" resets them).
_OPTIONAL_KINDS: dict[str, Any] = {"up_skip_groups": "groups", "down_skip_groups": "groups",
                                   "mol_log_scale_floor": float, "mol_scale": str}


def parse_setting(key: str, raw: str, like: Any) -> Any:
    """Parse a ``--set`` value using the current value's type as the guide."""
    kind = _OPTIONAL_KINDS.get(key)
    if kind is not None:
        if raw.strip().lower() == "none":
            return None
        if kind == "groups":
            try:
                return json.loads(raw)
            except json.JSONDecodeError:
                raise ConfigError(f"config field '{key}' takes a JSON list of lists, such as [[1, 1], [2]].") from None
        like = kind(0) if kind is float else ""
    try:
        if isinstance(like, bool):
            if raw.lower() in ("true", "1", "yes"):
                return True
            if raw.lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if isinstance(like, list):
            kind = float if any(isinstance(v, float) for v in like) else int
            values = [kind(p) for p in raw.replace(" ", "").strip("[]()").split(",") if p]
            return values[0] if len(values) == 1 and raw.strip()[:1] not in "[(" else values  # scalar: broadcast
        if isinstance(like, int):
            return int(raw)
        if isinstance(like, float):
            return float(raw)
        return raw
    except ValueError:
        raise ConfigError(f"config field '{key}' cannot take the value '{raw}'.") from None


__all__ = ["ModelConfig", "ARCHITECTURES", "OUTPUTS", "MOL_SCALES", "MOL_TAILS", "INITS", "BIT_REDUCTIONS",
           "VDVAE_LOG_SCALE_FLOOR", "UNBOUNDED_LOG_SCALE_FLOOR"]
