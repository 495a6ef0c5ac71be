"""The `vdvl` CLI's exit-code contract and its `presets` / `model` commands.

Contract: exit 0 on success; exit 2 with ONE plain sentence on stderr (no traceback)
for bad usage or bad input. Most tests call ``vdvae_latents.cli.main(argv)`` in-process; one
class runs real processes to check the exit status the shell sees.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest

from background import subprocess_fixture
from vdvae_latents.cli import main
from vdvae_latents.train.presets import PRESETS

REPO = Path(__file__).resolve().parents[1]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_sentence(err: str, *must_contain: str) -> str:
    """stderr is exactly one non-empty line, no traceback, naming what it must."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {err!r}"
    assert "Traceback" not in err
    line = lines[0]
    for word in must_contain:
        assert word in line, f"{word!r} not in {line!r}"
    return line


class TestHelp:
    """Help output lists the commands and succeeds."""

    def test_help_lists_commands(self, capsys):
        code, out, err = run(capsys, "--help")
        assert code == 0
        assert "presets" in out and "model" in out
        assert "Traceback" not in err

    def test_command_help(self, capsys):
        code, out, _ = run(capsys, "model", "--help")
        assert code == 0
        for flag in ("--preset", "--data", "--set", "--json"):
            assert flag in out

    def test_no_arguments_shows_help_without_an_empty_error(self, capsys):
        """`vdvl` alone prints the help; if it exits non-zero, stderr still carries a real sentence."""
        code, out, err = run(capsys)
        assert "presets" in out and "model" in out
        assert "Traceback" not in err
        if code != 0:
            line = assert_one_sentence(err)
            assert line.replace("vdvl:", "").replace("(see --help).", "").strip(), f"empty message: {line!r}"


class TestPresetsCommand:
    """`vdvl presets` lists every preset with its parameter count."""

    def test_json_has_a_row_per_preset_with_parameters(self, presets_json):
        # A real `python -m vdvae_latents presets --json`, run once per session in the background (conftest.py).
        code, out = presets_json.returncode, presets_json.stdout
        assert code == 0
        rows = json.loads(out)
        assert [r["name"] for r in rows] == list(PRESETS)
        for row in rows:
            assert isinstance(row["parameters"], int) and row["parameters"] > 0
            assert row["latent_layers"] >= 1
        by_name = {r["name"]: r for r in rows}
        assert by_name["tiny"]["image_shape"] == [1, 8, 8]
        assert by_name["cifar10-c1"]["paper_parameters_m"] == 18

    def test_unknown_option_exits_2_with_one_line(self, capsys):
        code, out, err = run(capsys, "presets", "--bogus")
        assert code == 2
        assert_one_sentence(err, "--bogus")


class TestModelCommand:
    """`vdvl model` describes a preset, scores data with --data, and rejects bad input with exit 2."""

    def test_describe_tiny_as_json(self, capsys):
        code, out, _ = run(capsys, "model", "--preset", "tiny", "--json")
        assert code == 0
        result = json.loads(out)
        assert result["latent_layers"] == 5 and result["parameters"] > 0
        assert "forward" not in result

    def test_forward_on_digits_gives_finite_bits_per_dim(self, capsys):
        code, out, _ = run(capsys, "model", "--preset", "tiny", "--data", "digits", "--n", "16", "--json")
        assert code == 0
        forward = json.loads(out)["forward"]
        assert forward["data"] == "digits" and forward["images"] == 16
        assert math.isfinite(forward["bits_per_dim"]) and forward["bits_per_dim"] > 0
        assert forward["bits_per_dim"] == pytest.approx(forward["recon_bits_per_dim"] + forward["kl_bits_per_dim"])

    def test_text_output(self, capsys):
        code, out, _ = run(capsys, "model", "--preset", "tiny")
        assert code == 0
        assert "tiny" in out and "parameters" in out

    def test_unknown_preset_exits_2_naming_it(self, capsys):
        code, _, err = run(capsys, "model", "--preset", "nope")
        assert code == 2
        assert_one_sentence(err, "nope")

    def test_data_that_does_not_fit_exits_2_naming_it(self, capsys):
        code, _, err = run(capsys, "model", "--preset", "cifar10-c1", "--data", "digits")
        assert code == 2
        assert_one_sentence(err, "digits")

    @pytest.mark.parametrize("assignment,field", [
        ("widths=-1", "widths"),
        ("widths=-1,-1,-1", "widths"),
        ("variates=zero", "variates"),
        ("bogus=1", "bogus"),
    ])
    def test_bad_set_exits_2_naming_the_field(self, capsys, assignment, field):
        code, _, err = run(capsys, "model", "--set", assignment)
        assert code == 2
        assert_one_sentence(err, f"'{field}'")

    def test_set_without_equals_exits_2(self, capsys):
        code, _, err = run(capsys, "model", "--set", "widths")
        assert code == 2
        assert_one_sentence(err, "--set")

    def test_set_changes_the_model(self, capsys):
        code, out, _ = run(capsys, "model", "--set", "variates=8", "--json")
        assert code == 0
        result = json.loads(out)
        assert result["config"]["variates"] == [8, 8, 8]
        assert result["latent_variates"] == 8 * 5


def real_process(name: str, *argv: str):
    """`python -m vdvae_latents ARGV` as a subprocess fixture called ``name`` (tests/background.py): it
    runs in the background while the in-process tests run."""
    def prepare(request):
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        return [sys.executable, "-m", "vdvae_latents", *argv], REPO, env, 120, {}
    return subprocess_fixture(prepare, name)


bad_option_process = real_process("bad_option_process", "presets", "--bogus")
unknown_preset_process = real_process("unknown_preset_process", "model", "--preset", "nope")
model_tiny_process = real_process("model_tiny_process", "model", "--preset", "tiny", "--json")


class TestRealProcess:
    """A real process exits with the contract's status codes."""

    def test_bad_option_exit_status_is_2(self, bad_option_process):
        proc = bad_option_process
        assert proc.returncode == 2
        assert_one_sentence(proc.stderr, "--bogus")

    def test_unknown_preset_exit_status_is_2(self, unknown_preset_process):
        proc = unknown_preset_process
        assert proc.returncode == 2
        assert_one_sentence(proc.stderr, "nope")

    def test_success_exit_status_is_0(self, model_tiny_process):
        proc = model_tiny_process
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["preset"] == "tiny"
