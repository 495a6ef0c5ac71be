"""The run commands end to end on the tiny preset: train -> eval / sample / reconstruct / info,
and their exit-code contract on bad input."""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image

from vdvae_latents.cli import main
from vdvae_latents.data.grids import read_grid
from helpers import run_cli


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    code = main(["train", "--preset", "tiny", "--data", "digits", "--run-dir", str(run_dir), "--steps", "4",
                 "--batch-size", "16", "--set", "train.val_limit=32", "--set", "train.log_every=2", "--quiet"])
    assert code == 0
    return run_dir


class TestTrainCommand:
    def test_json_result(self, capsys, tmp_path):
        code, out, err = run_cli(capsys, "train", "--preset", "tiny", "--data", "digits", "--run-dir",
                                 str(tmp_path / "r"), "--steps", "2", "--batch-size", "16", "--json",
                                 "--set", "train.val_limit=16")
        assert code == 0, err
        result = json.loads(out)
        assert result["step"] == 2 and result["interrupted"] is False
        assert math.isfinite(result["validation"]["bits_per_dim"])

    def test_rerun_of_a_finished_run_resumes_and_does_nothing(self, capsys, trained_run):
        code, out, err = run_cli(capsys, "train", "--preset", "tiny", "--data", "digits", "--run-dir",
                                 str(trained_run), "--steps", "4", "--batch-size", "16", "--json",
                                 "--set", "train.val_limit=32", "--set", "train.log_every=2")
        assert code == 0, err
        assert json.loads(out)["step"] == 4

    @pytest.mark.parametrize("argv,needle", [
        (["--preset", "tiny", "--config", "x.toml"], "--preset or --config"),
        (["--preset", "tiny", "--set", "bogus=1"], "bogus"),
        (["--preset", "tiny", "--set", "train.stepz=1"], "stepz"),
        (["--preset", "tiny", "--set", "novalue"], "--set"),
        (["--preset", "tiny", "--data", "fashion-mnist-nope"], "fashion-mnist-nope"),
        (["--preset", "cifar10-c1", "--data", "digits"], "digits"),
        (["--preset", "tiny", "--steps", "0"], "steps"),
    ])
    def test_bad_input_exits_2_with_one_sentence(self, capsys, tmp_path, argv, needle):
        code, out, err = run_cli(capsys, "train", "--run-dir", str(tmp_path / "r"), "--quiet", *argv)
        assert code == 2
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err


class TestRunCommands:
    def test_eval_json(self, capsys, trained_run):
        code, out, err = run_cli(capsys, "eval", str(trained_run), "--data", "digits", "--split", "test",
                                 "--iw", "2", "--json")
        assert code == 0, err
        r = json.loads(out)
        assert r["n_images"] == 180 and r["split"] == "test" and r["step"] == 4
        assert r["bits_per_dim"] == pytest.approx(r["recon_bits_per_dim"] + r["kl_bits_per_dim"])
        assert math.isfinite(r["iw_bits_per_dim"]) and r["iw_samples"] == 2

    def test_sample_and_reconstruct_write_pngs(self, capsys, trained_run, tmp_path):
        assert run_cli(capsys, "sample", str(trained_run), "--n", "9", "--out", str(tmp_path / "s.png"))[0] == 0
        assert run_cli(capsys, "reconstruct", str(trained_run), "--data", "digits", "--n", "6",
                       "--out", str(tmp_path / "r.png"))[0] == 0
        for name in ("s.png", "r.png"):
            with Image.open(tmp_path / name) as im:
                assert im.mode == "L" and im.width > 32

    def test_first_k_grid(self, capsys, trained_run, tmp_path):
        code, out, err = run_cli(capsys, "first-k", str(trained_run), "--data", "digits", "--k", "0,2,5",
                                 "--n", "4", "--out", str(tmp_path / "k.png"), "--json")
        assert code == 0, err
        r = json.loads(out)
        assert r["ks"] == [0, 2, 5] and r["n_layers"] == 5 and r["n"] == 4
        grid = read_grid(tmp_path / "k.png")  # the images, without the title and the K labels around them
        assert grid.ndim == 2 and grid.shape[0] > grid.shape[1] / 4 * 3  # 4 rows (originals + 3 K) of 4 columns
        with Image.open(tmp_path / "k.png") as im:
            assert im.mode == "L" and im.height > grid.shape[0] and im.width > grid.shape[1]

    def test_info_json(self, capsys, trained_run):
        code, out, _ = run_cli(capsys, "info", str(trained_run), "--json")
        assert code == 0
        r = json.loads(out)
        assert r["step"] == 4 and r["preset"] == "tiny" and r["parameters"] > 0

    @pytest.mark.parametrize("argv,needle", [
        (["eval", "{missing}", "--data", "digits"], "missing"),
        (["eval", "{run}", "--data", "fashion-mnist", "--limit", "4"], "fashion-mnist"),
        (["eval", "{run}", "--data", "digits", "--split", "nope"], "nope"),
        (["sample", "{run}", "--out", "{file}/x.png"], "x.png"),  # a file where its folder should be
        (["reconstruct", "{run}", "--data", "digits", "--out", "{tmp}/r.png", "--n", "0"], "--n"),
        (["info", "{missing}"], "missing"),
        (["first-k", "{run}", "--data", "digits", "--k", "6", "--out", "{tmp}/k.png"], "--k"),
        (["first-k", "{run}", "--data", "digits", "--k", "a,b", "--out", "{tmp}/k.png"], "--k"),
        (["first-k", "{run}", "--data", "digits", "--k", "1", "--posterior", "mode", "--out", "{tmp}/k.png"],
         "--posterior"),
    ])
    def test_bad_input_exits_2(self, capsys, trained_run, tmp_path, argv, needle):
        (tmp_path / "file").write_text("not a folder")
        subs = {"{run}": str(trained_run), "{missing}": str(tmp_path / "missing"), "{tmp}": str(tmp_path),
                "{file}": str(tmp_path / "file")}
        argv = [subs.get(a, a) if a in subs
                else a.replace("{missing}", subs["{missing}"]).replace("{file}", subs["{file}"]) for a in argv]
        code, _, err = run_cli(capsys, *argv)
        assert code == 2
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err
