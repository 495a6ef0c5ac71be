"""The safe reader of official hparams .cfg files: literals and list arithmetic, never code.

Expected values are what Python itself gives for these literal expressions, written out.
(tests/test_conformance.py compares the reader with the authors' library on every
egs/*.cfg when VDVL_REF_EFFICIENT is set.)
"""

from __future__ import annotations

import builtins

import pytest

from vdvae_latents.core.errors import ConfigError
from vdvae_latents.interop.hparams_cfg import MAX_SEQUENCE, parse_hparams, parse_value, read_hparams


@pytest.mark.parametrize("text,expected", [
    ("[1] * 11 + [2]", [1] * 11 + [2]),
    ("[0.25] * 2 + [0.5] * 1 + [1.] * 3", [0.25, 0.25, 0.5, 1.0, 1.0, 1.0]),
    ("[2] + [1, 2] + [1] * 2", [2, 1, 2, 1, 1]),
    ("(1, 1)", (1, 1)),
    ("'cifar-10'", "cifar-10"),
    ("8.", 8.0),
    ("-250.", -250.0),
    ("1e-3", 0.001),
    ("32 * 2", 64),
    ("2 ** 8 - 1", 255),
    ("1 / 4", 0.25),
    ("True", True),
    ("None", None),
    ("[0.8, ('linear', 0.7, 0.9)]", [0.8, ("linear", 0.7, 0.9)]),
    ("Adamax", "Adamax"),  # a bare word reads as itself, as the authors' library does
    ("  [3]*2  ", [3, 3]),
    ("2 * [1]", [1, 1]),
])
def test_literal_expressions(text, expected):
    value = parse_value(text)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("text", [
    "__import__('os').system('true')",
    "open('/etc/passwd')",
    "[x for x in range(3)]",
    "lambda: 1",
    "{'a': 1}",
    "1 if True else 2",
    "a.b",
    "[1] + (2,)",
    "'ab' * 3",
    "[1] * 2.0",
    "[1] * True",
    "-'a'",
    "not True",
    "b'bytes'",
    "1 < 2",
])
def test_everything_else_is_refused_with_the_key(text):
    with pytest.raises(ConfigError, match="'model.key'"):
        parse_value(text, key="model.key")


@pytest.mark.parametrize("text", [f"[0] * {MAX_SEQUENCE + 1}", "[0] * 10 ** 12", "2 ** 100000", "1 / 0",
                                  "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["
                                  "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["
                                  "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
                                  "[1, 2"])
def test_resource_bombs_and_broken_text_are_refused(text):
    with pytest.raises(ConfigError, match="'v'"):
        parse_value(text, key="v")


def test_never_calls_eval(monkeypatch):
    """The reader works with eval and exec gone."""
    def forbidden(*args, **kwargs):
        raise AssertionError("eval/exec called")

    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    assert parse_value("[1] * 3 + [4]") == [1, 1, 1, 4]


CFG = """
# a comment
[run]
name = my_run-1 + 2

[model]
; another comment
up_strides = [1, 1,
    2]
Use_1x1_Conv = True
input_kernel_size = (1, 1)

[loss]
min_mol_logscale = -14.
"""


def test_sections_keys_and_multiline_values():
    assert parse_hparams(CFG) == {
        "run": {"name": "my_run-1 + 2"},  # the run name is never parsed as an expression
        "model": {"up_strides": [1, 1, 2], "use_1x1_conv": True, "input_kernel_size": (1, 1)},
        "loss": {"min_mol_logscale": -14.0},
    }


@pytest.mark.parametrize("text,what", [
    ("no section header = 1\n", "not a valid .cfg"),
    ("[a]\nx = 1\nx = 2\n", "not a valid .cfg"),
    ("[a]\n[a]\n", "not a valid .cfg"),
    ("[model]\nwidth = open('x')\n", "'model.width'"),
])
def test_bad_files_raise_one_config_error(text, what):
    with pytest.raises(ConfigError, match=what):
        parse_hparams(text, source="x.cfg")


def test_read_hparams_names_missing_and_binary_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_hparams(tmp_path / "nope.cfg")
    (tmp_path / "bin.cfg").write_bytes(b"\xff\xfe\x00[run]")
    with pytest.raises(ConfigError, match="cannot be read as text"):
        read_hparams(tmp_path / "bin.cfg")
    (tmp_path / "ok.cfg").write_text(CFG)
    assert read_hparams(tmp_path / "ok.cfg")["loss"] == {"min_mol_logscale": -14.0}
