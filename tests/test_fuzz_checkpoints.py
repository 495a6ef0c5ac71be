"""Fuzzing the importers of foreign checkpoints: openai/vdvae weight files and official
Efficient-VDVAE checkpoints (with their .cfg), with tensors missing, extra, mis-shaped or mis-typed,
entries that are not tensors, and damaged files.

Small valid checkpoints are built the way tests/test_import_openai.py and
tests/test_import_efficient.py build theirs (a random vdvl model through the inverse key map);
hypothesis then changes them. For any input: the import path returns the weights, exactly the
tensors it was given under vdvl's names (checked by mapping them back), or a CheckpointError /
ConfigError with one plain line naming the file (tests/fuzzing.py).
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fuzzing import assert_one_sentence, outcome, refused, truncated_or_flipped, unique
from test_import_efficient import TINY_CFG, tiny_hparams
from test_import_openai import TINY, random_state
from vdvae_latents.interop.efficient import (
    import_efficient_vdvae, official_layout, official_weight_map, to_official_state,
)
from vdvae_latents.interop.openai import import_openai_vdvae, openai_weight_map, read_tensor_file, vdvl_to_openai
from vdvae_latents.interop.run_dir import meta_state_dict
from vdvae_latents.interop.weights import from_vdvl, strip_ddp, to_vdvl
from vdvae_latents.model.checkpoints import load_model


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzzckpt")


# ----------------------------------------------------------------------------- state-dict damage

def random_state_of(cfg) -> dict[str, torch.Tensor]:
    """A random vdvl state dict for ``cfg`` (every tensor, zero-initialised ones too, random)."""
    gen = torch.Generator().manual_seed(1)
    return {k: 0.2 * torch.randn(v.shape, generator=gen) for k, v in meta_state_dict(cfg).items()}


OPENAI_MAP = openai_weight_map(TINY)
OPENAI_STATE = vdvl_to_openai(random_state(0), TINY)
EFFICIENT_LAYOUT = official_layout(tiny_hparams())
EFFICIENT_MAP = official_weight_map(EFFICIENT_LAYOUT)
EFFICIENT_STATE = to_official_state(random_state_of(EFFICIENT_LAYOUT.cfg), EFFICIENT_LAYOUT)

not_tensors = st.one_of(st.none(), st.integers(), st.floats(), st.text(max_size=4), st.lists(st.integers(), max_size=3),
                        st.just({"weight": 1}))
dtypes = st.sampled_from([torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int8, torch.bool,
                          torch.complex64, torch.uint8])


KINDS = ["drop", "extra", "reshape", "retype", "not a tensor", "prefix", "key type", "layout", "values"]
shapes = st.one_of(st.lists(st.integers(0, 4), max_size=4), st.sampled_from(["flat", "reversed"]))
changes = st.tuples(st.sampled_from(KINDS), st.integers(0, 10 ** 6), st.one_of(
    shapes, dtypes, not_tensors, st.sampled_from(["meta", "sparse", "strided view", math.nan, math.inf, 1e30]),
    st.text(max_size=8)))


def _small_shape(param) -> list[int]:
    """``param`` as a tensor shape when it is a list of small sizes (the test's own allocations stay small)."""
    return param if isinstance(param, list) and all(type(d) is int and 0 <= d <= 8 for d in param) else [2]


def damaged(state: dict[str, torch.Tensor], damage: list[tuple]) -> dict:
    """``state`` with each (kind, which key, parameter) change of ``damage`` made, as a user's file might have them."""
    state = dict(state)
    for kind, which, param in damage:
        keys = sorted(k for k in state if isinstance(k, str))
        key = keys[which % len(keys)] if keys else "none"
        value = state.get(key)
        tensor = isinstance(value, torch.Tensor)
        if kind == "drop":
            state.pop(key, None)
        elif kind == "extra":
            state[f"decoder.{param}"] = torch.zeros(_small_shape(param))
        elif kind == "reshape" and tensor:
            if param == "flat":
                shape = [value.numel()]
            elif param == "reversed":
                shape = list(value.shape)[::-1]
            else:
                shape = _small_shape(param)
            state[key] = torch.zeros(shape)
        elif kind == "retype" and tensor and isinstance(param, torch.dtype):
            state[key] = value.to(param)
        elif kind == "not a tensor" and not isinstance(param, (list, torch.dtype)):
            state[key] = param
        elif kind == "prefix":  # DistributedDataParallel's prefix on some keys only
            state["module." + key] = state.pop(key)
        elif kind == "key type":
            state[which] = torch.zeros(1)
        elif kind == "layout" and tensor and param == "meta":
            state[key] = value.to("meta")
        elif kind == "layout" and tensor and param == "sparse":
            state[key] = value.to_sparse()
        elif kind == "layout" and tensor and param == "strided view":
            state[key] = torch.zeros(*value.shape, 2)[..., 0]
        elif kind == "values" and tensor and isinstance(param, float):
            state[key] = torch.full_like(value, param)
    return state


def assert_weights_are_the_tensors_given(result, mapping, given_state) -> None:
    """An accepted state dict comes back unchanged when mapped back: every tensor, its values, nothing else."""
    weights, filled = result
    assert all(t.layout == torch.strided and t.device.type == "cpu" for t in weights.values())
    back = from_vdvl(weights, mapping)
    given_state = strip_ddp(given_state)
    assert set(back) == set(given_state) | set(filled)
    for key, tensor in given_state.items():
        assert torch.equal(back[key], tensor), key


@given(damage=st.lists(changes, min_size=1, max_size=3))
@settings(max_examples=150)
@example(damage=[("layout", 0, "meta")])
def test_any_openai_state_dict_maps_exactly_or_is_refused_naming_the_file(damage):
    state = damaged(OPENAI_STATE, damage)
    result = outcome(lambda: to_vdvl(state, OPENAI_MAP, "weight file fuzzed-model.th"))
    if refused(result):
        assert_one_sentence(result, names="fuzzed-model.th")
    else:
        assert_weights_are_the_tensors_given(result, OPENAI_MAP, state)


@given(damage=st.lists(changes, min_size=1, max_size=3))
@settings(max_examples=150)
def test_any_official_state_dict_maps_exactly_or_is_refused_naming_the_file(damage):
    state = damaged(EFFICIENT_STATE, damage)
    result = outcome(lambda: to_vdvl(state, EFFICIENT_MAP, "Checkpoint file checkpoints-fuzzed", "model tensor"))
    if refused(result):
        assert_one_sentence(result, names="checkpoints-fuzzed")
    else:
        assert_weights_are_the_tensors_given(result, EFFICIENT_MAP, state)


# ----------------------------------------------------------------------------- whole files


def _saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


OPENAI_FILE = _saved({"module." + k: v for k, v in OPENAI_STATE.items()})


@st.composite
def damaged_files(draw, data: bytes) -> bytes:
    return truncated_or_flipped(data, draw)


openai_payloads = st.one_of(
    damaged_files(OPENAI_FILE),
    st.sampled_from([[1, 2], torch.zeros(3), {"state": {}, "param_groups": []}, {1: torch.zeros(1)}, "text",
                     {"decoder.gain": torch.zeros(1)}]).map(_saved),
    st.binary(max_size=200),
)


@given(data=openai_payloads)
@settings(max_examples=60)
def test_any_openai_weight_file_reads_as_named_tensors_or_is_refused_naming_it(folder, data):
    path = unique(folder, "-model.th")
    path.write_bytes(data)
    result = outcome(lambda: read_tensor_file(path))
    if refused(result):
        assert_one_sentence(result, names=path.name)
    else:
        assert all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in result.items())


def test_a_whole_openai_import_of_a_mistyped_file_is_refused_and_a_good_one_loads(folder):
    good = unique(folder, "-model.th")
    good.write_bytes(OPENAI_FILE)
    run = unique(folder, "-run")
    import_openai_vdvae(good, hps=TINY, run_dir=run)
    load_model(run)
    bad = unique(folder, "-model.th")
    torch.save({**OPENAI_STATE, "decoder.gain": OPENAI_STATE["decoder.gain"].to(torch.int64)}, bad)
    result = outcome(lambda: import_openai_vdvae(bad, hps=TINY, run_dir=unique(folder, "-run")))
    assert refused(result) and bad.name in str(result)


# ----------------------------------------------------------------------------- official checkpoints and .cfg


def official_payload(**changes) -> dict:
    payload = {"global_step": 4321, "model_state_dict": EFFICIENT_STATE, "ema_model_state_dict": EFFICIENT_STATE,
               "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0]}]}}
    payload.update(changes)
    return {k: v for k, v in payload.items() if not (isinstance(v, str) and v == "<deleted>")}


@pytest.mark.parametrize("key,value", [
    ("global_step", math.nan), ("global_step", torch.tensor(math.inf)), ("global_step", 2 ** 70),
    ("global_step", torch.tensor([1, 2])), ("global_step", "12"), ("model_state_dict", "<deleted>"),
    ("model_state_dict", [1, 2]), ("ema_model_state_dict", {"a": torch.zeros(1)}), ("ema_model_state_dict", None),
])
def test_an_official_checkpoint_with_any_entry_mistyped_imports_or_is_refused_naming_it(folder, key, value):
    cfg = unique(folder, ".cfg")
    cfg.write_text(TINY_CFG)
    checkpoint = unique(folder, "-checkpoint")
    torch.save(official_payload(**{key: value}), checkpoint)
    run = unique(folder, "-run")
    result = outcome(lambda: import_efficient_vdvae(checkpoint, cfg, run))
    if refused(result):
        assert_one_sentence(result, names=checkpoint.name)
    else:
        assert result["step"] >= 0 and load_model(run)[1]["step"] == result["step"]


CFG_KEYS = sorted(tiny_hparams()["model"]) + ["data.target_res", "data.channels", "data.num_bits",
                                             "data.dataset_source", "loss.min_mol_logscale"]
literals = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-3, 40), st.sampled_from([2 ** 70, -(2 ** 70)]),
                                  st.floats(), st.text(max_size=4)),
                        lambda inner: st.one_of(st.lists(inner, max_size=6), st.tuples(inner, inner)), max_leaves=10)


@given(key=st.sampled_from(CFG_KEYS), value=st.one_of(literals, st.just("<deleted>")))
@settings(max_examples=200)
@example(key="gradient_smoothing_beta", value=2 ** 1100)
@example(key="down_mid_filters_ratio", value=[2 ** 1100] * 6)
def test_any_cfg_setting_gives_a_model_or_one_sentence_naming_it(key, value):
    hp = tiny_hparams()
    section, _, name = key.rpartition(".")
    values = hp[section or "model"]
    if value == "<deleted>":
        values.pop(name, None)
    else:
        values[name] = value
    result = outcome(lambda: official_layout(hp))
    if not refused(result):  # every official block has its place in the vdvl model
        assert sum(size for _, _, size in result.up) == result.cfg.n_layers
        assert sum(cells for *_, cells in result.down) == sum(result.cfg.down_blocks)
