"""Fuzzing the parsers of command-line text: data specs (--data), --set key=value, --rows,
--keep and --threshold, and the official Efficient-VDVAE .cfg text.

Every input gives a result or a UserError with one plain line (tests/fuzzing.py); parsers with
a format also give back what was formatted (round trips).
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, fields
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from fuzzing import assert_one_sentence, outcome, refused
from vdvae_latents.cli.common import parse_sets
from vdvae_latents.core.errors import ConfigError, DataError, UserError
from vdvae_latents.data.splits import SPLITS, open_images
from vdvae_latents.interop.hparams_cfg import parse_hparams, parse_value
from vdvae_latents.latents.active_set import parse_keep, select_dimensions
from vdvae_latents.latents.stats import DimTable
from vdvae_latents.model.config import ModelConfig, parse_setting
from vdvae_latents.stores.decode import _parse_rows
from vdvae_latents.train.config import TrainConfig
from vdvae_latents.train.run_config import resolve_run_config

# ----------------------------------------------------------------------------- data specs

# What the spec fuzzer's working folder holds: one source of each kind, and things that are not.
SPEC_NAMES = ["images.npy", "pair.npz", "arrays.h5", "faces", "mnist", "mnist/train-images-idx3-ubyte",
              "notes.txt", "empty", "digits", "fashion-mnist", "missing.npy", "missing.h5", "x.zarr"]


@pytest.fixture(scope="module")
def spec_folder(tmp_path_factory) -> Path:
    """A folder four levels down (so a few '..' stay in small folders) with one source of each kind."""
    folder = tmp_path_factory.mktemp("specs") / "a" / "b" / "c" / "data"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 8, 8), dtype=np.uint8)
    np.save(folder / "images.npy", images)
    np.savez(folder / "pair.npz", images=images, labels=np.arange(6))
    with h5py.File(folder / "arrays.h5", "w") as f:
        f["images"], f["labels"], f["x"], f["y"] = images, np.arange(6), images[:3], np.arange(3)
        f["floats"] = images.astype(np.float32)
    (folder / "faces" / "a").mkdir(parents=True)
    (folder / "faces" / "b").mkdir()
    for i in range(3):
        Image.fromarray(images[i]).save(folder / "faces" / "ab"[i % 2] / f"{i}.png")
    (folder / "mnist").mkdir()
    header = bytes([0, 0, 8, 3]) + (6).to_bytes(4, "big") + (8).to_bytes(4, "big") * 2
    (folder / "mnist" / "train-images-idx3-ubyte").write_bytes(header + images.tobytes())
    (folder / "notes.txt").write_text("not data\n")
    (folder / "empty").mkdir()
    return folder


# No '/' or '~' outside the joins: an absolute path or the home folder would have the fuzzer scan whole
# file systems for images (an existing folder is read as an image folder).
segment = st.one_of(st.sampled_from(SPEC_NAMES + [".", ".."]),
                    st.text(st.characters(blacklist_characters="/~", blacklist_categories=("Cs",)), max_size=6))
array_names = st.sampled_from(["", ":", ":images", ":images,labels", ":x,y", ":floats", ":labels", ":images,",
                               ":,labels", ":a,b,c", ": images , labels ", "/:images", ":nothing"])
specs = st.one_of(
    st.builds(lambda parts, tail: "/".join(parts) + tail, st.lists(segment, min_size=1, max_size=3), array_names),
    st.text(st.characters(blacklist_characters="/~", blacklist_categories=("Cs",)), max_size=20),
)


def _at_most_three_levels_up(spec: str) -> bool:
    return spec.split("/").count("..") <= 3


@given(spec=specs, split=st.one_of(st.sampled_from(SPLITS), st.text(max_size=5)))
@settings(max_examples=200)
@example(spec="", split="train")
@example(spec="images.npy", split="all")
@example(spec="arrays.h5:x,y", split="test")
def test_any_data_spec_opens_a_readable_split_or_is_refused_in_one_sentence(spec_folder, spec, split):
    assume(_at_most_three_levels_up(spec))
    with contextlib.chdir(spec_folder):
        result = outcome(lambda: open_images(spec, split))
        if not refused(result):
            first = result.read([0])
            assert first.dtype == np.uint8 and first.shape == (1, *result.shape) and len(result) > 0


array_name = st.text(st.characters(whitelist_categories=("L", "N"), whitelist_characters="_-"), min_size=1,
                     max_size=8)


@given(image_name=array_name, label_name=st.one_of(st.none(), array_name), suffix=st.sampled_from([".h5", ".hdf5"]))
@settings(max_examples=40)
def test_an_hdf5_spec_reads_back_the_arrays_it_names(tmp_path_factory, image_name, label_name, suffix):
    assume(image_name != label_name)
    path = tmp_path_factory.mktemp("h5spec") / f"named{suffix}"
    images = np.arange(4 * 2 * 2, dtype=np.uint8).reshape(4, 2, 2)
    with h5py.File(path, "w") as f:
        f[image_name] = images
        if label_name is not None:
            f[label_name] = np.array([3, 1, 4, 1])
    spec = f"{path}:{image_name}" + ("" if label_name is None else f",{label_name}")
    split = open_images(spec, "all")
    assert np.array_equal(split.read(), images[..., None])
    assert (split.labels is None) == (label_name is None)
    if label_name is not None:
        assert split.labels.tolist() == [3, 1, 4, 1]


# ----------------------------------------------------------------------------- --set key=value

MODEL_FIELDS = [f.name for f in fields(ModelConfig)]
TRAIN_FIELDS = [f.name for f in fields(TrainConfig)]
set_keys = st.one_of(st.sampled_from(MODEL_FIELDS), st.sampled_from(TRAIN_FIELDS).map("train.{}".format),
                     st.sampled_from(MODEL_FIELDS).map("model.{}".format), st.text(max_size=10))
numbers = st.one_of(st.integers(-(10 ** 30), 10 ** 30), st.floats(allow_nan=True, allow_infinity=True))
set_values = st.one_of(
    st.text(max_size=12),
    numbers.map(str),
    st.lists(numbers, max_size=4).map(lambda v: ",".join(map(str, v))),
    st.lists(numbers, max_size=4).map(str),
    st.sampled_from(["none", "None", "true", "no", "[]", "[[1], [2]]", "[[1e400]]", "[[NaN]]", "[1, [2]]",
                     "{}", "1e400", "-inf", "nan", "0x10", "1_000", "efficient", "gelu", "(1,2,3)"]),
    st.recursive(st.one_of(st.integers(-3, 40), st.floats(), st.booleans(), st.none()),
                 lambda inner: st.lists(inner, max_size=3), max_leaves=6).map(json.dumps),
    # skip groups: one list per resolution of the tiny preset (3), of anything JSON has
    st.lists(st.lists(st.one_of(st.integers(-1, 3), st.floats(), st.text(max_size=2)), max_size=3), min_size=3,
             max_size=3).map(json.dumps),
)


@given(item=st.one_of(st.text(max_size=15), st.builds("{}={}".format, st.text(max_size=6), st.text(max_size=6))))
@settings(max_examples=100)
@example(item="=3")
@example(item="a==b")
def test_any_set_item_splits_at_its_first_equals_sign_or_is_refused(item):
    result = outcome(lambda: parse_sets([item]))
    if not refused(result):
        key, _, value = item.partition("=")
        assert result == {key.strip(): value.strip()} and key.strip()


def _finite_numbers(config) -> bool:
    """Whether every number of a config (nested in lists too) is finite."""
    def finite(value) -> bool:
        if isinstance(value, (list, tuple)):
            return all(finite(v) for v in value)
        return not isinstance(value, float) or math.isfinite(value)
    return all(finite(v) for v in (config.to_dict() if hasattr(config, "to_dict") else asdict(config)).values())


@given(key=set_keys, value=set_values)
@settings(max_examples=200)
@example(key="up_skip_groups", value="[[1e400], [1], [1]]")
@example(key="latent_beta", value="inf")
@example(key="train.lr", value="nan")
def test_any_set_option_gives_a_valid_finite_config_or_one_sentence(key, value):
    result = outcome(lambda: resolve_run_config(preset="tiny", overrides={key: value}))
    if not refused(result):
        assert _finite_numbers(result.model) and _finite_numbers(result.train), (key, value)


@pytest.mark.parametrize("groups", ["[[1e400], [1], [1]]", "[[1.5], [1], [1]]", "[[NaN], [1], [1]]"])
def test_skip_groups_of_infinite_or_fractional_sizes_are_refused(groups):
    with pytest.raises(ConfigError, match="must hold integers only"):
        resolve_run_config(preset="tiny", overrides={"up_skip_groups": groups, "down_skip_groups": "[[1], [1], [1]]"})


def _formatted(value) -> str:
    """A config value written the way a user would type it after --set key=."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        if value and isinstance(value[0], (list, tuple)):
            return json.dumps([list(v) for v in value])
        return "[" + ", ".join(map(str, value)) + "]"
    return str(value)


@pytest.mark.parametrize("preset", ["tiny", "cifar10-c1"])
def test_every_setting_typed_back_as_it_reads_gives_the_same_config(preset):
    run = resolve_run_config(preset=preset)
    model, train = run.model.to_dict(), asdict(run.train)
    for key, value in model.items():
        again = resolve_run_config(preset=preset, overrides={key: _formatted(value)})
        assert again.model.to_dict()[key] == value, key
    for key, value in train.items():
        again = resolve_run_config(preset=preset, overrides={f"train.{key}": _formatted(value)})
        assert asdict(again.train)[key] == value, key


@given(st.integers(-(10 ** 20), 10 ** 20), st.floats(allow_nan=False), st.booleans(),
       st.lists(st.integers(-(10 ** 9), 10 ** 9), min_size=2, max_size=5),
       st.lists(st.floats(allow_nan=False), min_size=2, max_size=5))
@settings(max_examples=100)
def test_set_values_parse_to_the_type_of_the_setting(number, real, flag, ints, reals):
    assert parse_setting("k", str(number), 1) == number
    assert parse_setting("k", repr(real), 1.0) == real
    assert parse_setting("k", str(flag), False) is flag
    assert parse_setting("k", ",".join(map(str, ints)), [1]) == ints
    assert parse_setting("k", str(reals), [0.5]) == reals
    assert parse_setting("k", str(number), [1]) == number  # one value is broadcast later, not a list


# ----------------------------------------------------------------------------- --rows


@given(text=st.one_of(st.text(max_size=12), st.builds("{}:{}".format, st.integers(-5, 40), st.integers(-5, 40)),
                      st.sampled_from([":", "3:", ":7", "", " 2 : 5 ", "1:2:3", "٣:٧", "1_0:20", "0x1:4"])),
       n=st.integers(0, 30))
@settings(max_examples=200)
def test_any_rows_text_gives_rows_inside_the_store_or_one_sentence(text, n):
    result = outcome(lambda: _parse_rows(text, n))
    if not refused(result):
        lo, hi = result
        assert 0 <= lo < hi <= n


@given(n=st.integers(1, 10 ** 6), data=st.data())
@settings(max_examples=100)
def test_rows_lo_hi_read_back_as_written(n, data):
    lo = data.draw(st.integers(0, n - 1))
    hi = data.draw(st.integers(lo + 1, n))
    assert _parse_rows(f"{lo}:{hi}", n) == (lo, hi)
    assert _parse_rows(f":{hi}", n) == (0, hi)
    assert _parse_rows(f"{lo}:", n) == (lo, n)


# ----------------------------------------------------------------------------- --keep and --threshold


@given(st.one_of(st.text(max_size=10), st.floats().map(str), st.floats().map("{}%".format), st.floats(),
                 st.integers(-(10 ** 400), 10 ** 400).map(str)))
@settings(max_examples=200)
@example("1e400%")
@example("nan")
def test_any_keep_text_is_a_fraction_in_0_1_or_one_sentence(text):
    result = outcome(lambda: parse_keep(text))
    if not refused(result):
        assert 0 < result <= 1


@given(st.floats(min_value=1e-300, max_value=100))  # 5e-324% is 0 in floats, and refused
@settings(max_examples=100)
def test_keep_percent_reads_as_its_fraction(percent):
    assert math.isclose(parse_keep(f"{percent!r}%"), percent / 100, rel_tol=1e-12)
    if percent <= 1:
        assert parse_keep(repr(percent)) == percent  # a number up to 1 is a fraction


def test_keep_examples_from_the_help():
    assert parse_keep("3%") == pytest.approx(0.03) and parse_keep("0.03") == 0.03 and parse_keep("7") == 0.07


def _table(avg_kl: list[float]) -> DimTable:
    n = len(avg_kl)
    zeros = np.zeros(n, dtype=np.int32)
    return DimTable(layer=zeros, variate=np.arange(n, dtype=np.int32), y=zeros - 1, x=zeros - 1, resolution=zeros + 1,
                    avg_kl=np.asarray(avg_kl, dtype=np.float64), active_units=np.zeros(n))


kl_values = st.lists(st.floats(0, 50), min_size=1, max_size=30)


@given(avg_kl=kl_values, threshold=st.floats())
@settings(max_examples=150)
def test_any_threshold_keeps_exactly_the_dimensions_above_it_or_one_sentence(avg_kl, threshold):
    result = outcome(lambda: select_dimensions(_table(avg_kl), threshold=threshold))
    if not refused(result):
        assert result.tolist() == [i for i, kl in enumerate(avg_kl) if kl > threshold]


@given(avg_kl=kl_values, keep=st.floats(0, 1, exclude_min=True))
@settings(max_examples=150)
def test_keep_chooses_the_top_ceil_fraction_by_kl(avg_kl, keep):
    chosen = select_dimensions(_table(avg_kl), keep=keep)
    k = len(chosen)
    assert k == max(1, math.ceil(keep * len(avg_kl) - 1e-9))
    rest = np.delete(np.asarray(avg_kl), chosen)
    assert not rest.size or min(avg_kl[i] for i in chosen) >= rest.max()


# ----------------------------------------------------------------------------- .cfg text

CANARY = "vdvl-fuzz-canary"

leaf = st.one_of(st.integers(-(10 ** 6), 10 ** 6), st.floats(allow_nan=False, allow_infinity=False),
                 st.booleans(), st.none(), st.text(max_size=4))


def _expressions(inner):
    ops = st.sampled_from(["+", "-", "*", "/", "//", "%", "**", "<<", "&", "@"])
    return st.one_of(
        st.builds("({} {} {})".format, inner, ops, inner),
        st.lists(inner, max_size=3).map(lambda v: "[" + ", ".join(v) + "]"),
        st.lists(inner, max_size=3).map(lambda v: "(" + "".join(x + ", " for x in v) + ")"),
        inner.map("-{}".format),
        inner.map("({}) ** 64".format),
    )


expressions = st.recursive(leaf.map(repr), _expressions, max_leaves=12)
code = st.sampled_from([f"open({CANARY!r}, 'w')", f"__import__('os').mkdir({CANARY!r})", "[x for x in [1]]",
                        "{'a': 1}", "print", "a.b", "lambda: 1", "f'{1}'", "...", "b'x'"])


@given(expressions)
@settings(max_examples=200)
@example("((((9 ** 64) ** 64) ** 64) ** 64) ** 64")
@example("[0] * 10 ** 12")
def test_a_cfg_value_is_what_python_computes_or_refused(text):
    result = outcome(lambda: parse_value(text, key="model.k"))
    if not refused(result):  # the text is trusted here: the test wrote it
        assert _same(result, eval(text, {"__builtins__": {}})), text


def _same(a, b) -> bool:
    """Equal, with NaN equal to itself (arithmetic on infinities makes NaNs)."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b and type(a) is type(b)


cfg_lines = st.lists(st.one_of(
    st.builds("{} = {}".format, st.sampled_from(["name", "up_strides", "k", "seed"]), st.one_of(expressions, code)),
    st.sampled_from(["[model]", "[data]", "[run]", "[model]", "# comment", "", "  continued", "= 3", "[", "k: 1",
                     "%(k)s", "[DEFAULT]"]),
    st.text(max_size=15),
), max_size=8)


@given(lines=cfg_lines)
@settings(max_examples=150)
@example(lines=["[model]", f"k = open({CANARY!r}, 'w')"])
def test_any_cfg_text_parses_to_plain_values_or_one_sentence_and_runs_nothing(tmp_path_factory, lines):
    folder = tmp_path_factory.mktemp("cfg")
    with contextlib.chdir(folder):
        result = outcome(lambda: parse_hparams("\n".join(lines), source="hparams-fuzz.cfg"))
        assert not (folder / CANARY).exists()
    if refused(result):
        assert isinstance(result, ConfigError)
    else:
        assert all(isinstance(values, dict) for values in result.values())


def test_a_line_break_from_the_input_is_escaped_in_the_message():
    err = DataError("data spec 'a\nb\r\u2028' is not a known dataset")
    assert str(err) == "data spec 'a\\nb\\r\\u2028' is not a known dataset"
    assert_one_sentence(err)


def test_the_one_sentence_check_can_fail():
    err = UserError("one line")
    err.args = ("two\nlines",)  # what UserError itself would have escaped
    with pytest.raises(AssertionError):
        assert_one_sentence(err)
    with pytest.raises(AssertionError):
        assert_one_sentence(UserError("file a.npy is bad"), names="b.npy")
