"""`vdvl analyze-kl` end to end on a 4-step tiny checkpoint: the JSON summary, the saved
active set, both granularities and rules, the pruning sweep against `vdvl eval`, the
figure, and the exit-code contract on bad input."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from vdvae_latents import load_images
from vdvae_latents.latents.active_set import ActiveSet
from vdvae_latents.train.run_config import resolve_run_config
from vdvae_latents.train.loop import train
from helpers import rewrite_checkpoint, run_cli

N_VARIATES = 20          # tiny: 5 layers x 4 variates
N_ELEMENTS = 644         # 4*1 + 2*4*16 + 2*4*64
TINY_LAYERS = {1: 1, 4: 2, 8: 2}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("analyze") / "run"
    run = resolve_run_config(preset="tiny", data="digits")
    run = replace(run, train=replace(run.train, steps=4, batch_size=16, val_limit=16, device="cpu"))
    result = train(run_dir, run, quiet=True)
    assert result.step == 4 and result.checkpoint is not None
    # Without the optimizer state, which analyze-kl never reads, each command loads it ~3x faster.
    rewrite_checkpoint(result.checkpoint, drop_optimizer=True)
    return run_dir


@pytest.fixture(scope="module")
def n_train() -> int:
    return len(load_images("digits", split="train"))


def analyze(capsys, run_dir, out: Path, *extra: str) -> dict:
    code, stdout, err = run_cli(capsys, "analyze-kl", run_dir, "--data", "digits", "--out", out, "--device", "cpu",
                                "--json", *extra)
    assert code == 0, err
    return json.loads(stdout)


class TestKeepVariate:
    def test_json_summary(self, capsys, run_dir, tmp_path, n_train):
        r = analyze(capsys, run_dir, tmp_path / "A.json", "--keep", "3%")
        assert r["granularity"] == "variate" and r["rule"] == "keep" and r["value"] == pytest.approx(0.03)
        assert r["n_dims"] == N_VARIATES and r["n_active"] == 1  # ceil(0.03 * 20)
        assert r["n_images"] == n_train and r["step"] == 4
        assert 0 < r["kl_share_active"] <= 1 and r["total_avg_kl_nats"] > 0
        assert r["pct_active"] == pytest.approx(5.0)
        assert [(x["resolution"], x["layers"], x["dims"]) for x in r["resolutions"]] == \
            [(res, n, 4 * n) for res, n in TINY_LAYERS.items()]
        assert sum(x["active"] for x in r["resolutions"]) == 1
        assert sum(x["kl_nats"] for x in r["resolutions"]) == pytest.approx(r["total_avg_kl_nats"])
        assert r["total_scalars_per_image"] == N_ELEMENTS
        assert r["kept_scalars_per_image"] in (1, 16, 64)  # one variate at 1x1, 4x4 or 8x8
        assert Path(r["out"]) == tmp_path / "A.json"

    def test_saved_active_set_agrees_with_the_summary(self, capsys, run_dir, tmp_path, n_train):
        r = analyze(capsys, run_dir, tmp_path / "A.json", "--keep", "0.03")
        a = ActiveSet.load(tmp_path / "A.json")
        assert (a.granularity, a.rule, a.n_images, a.data, a.split) == ("variate", "keep", n_train, "digits", "train")
        assert a.value == pytest.approx(0.03) and a.n_dims == N_VARIATES and a.n_active == 1
        assert len(a.checkpoint_sha256) == 64
        kl = a.table.avg_kl
        assert a.selected.tolist() == [int(np.argmax(kl))]  # the top dimension
        assert r["kl_share_active"] == pytest.approx(kl.max() / kl.sum(), rel=1e-12)
        assert r["total_avg_kl_nats"] == pytest.approx(kl.sum(), rel=1e-12)

    def test_bare_number_is_a_percentage(self, capsys, run_dir, tmp_path):
        r = analyze(capsys, run_dir, tmp_path / "A.json", "--keep", "25", "--limit", "32")
        assert r["n_active"] == 5 and r["value"] == pytest.approx(0.25) and r["n_images"] == 32

    def test_human_output(self, capsys, run_dir, tmp_path):
        code, out, err = run_cli(capsys, "analyze-kl", run_dir, "--data", "digits", "--out", tmp_path / "A.json",
                                 "--keep", "10%", "--limit", "32", "--device", "cpu")
        assert code == 0, err
        assert "20 variate dimensions" in out and "wrote" in out and (tmp_path / "A.json").exists()


class TestOfficialUnits:
    def test_bits_and_the_official_div_stats_file(self, capsys, run_dir, tmp_path):
        r = analyze(capsys, run_dir, tmp_path / "A.json", "--keep", "3%", "--limit", "32", "--units", "bits",
                    "--div-stats", tmp_path / "div_stats.npy")
        assert r["total_avg_kl_bits"] == pytest.approx(r["total_avg_kl_nats"] / math.log(2), rel=1e-12)
        assert all(x["kl_bits"] == pytest.approx(x["kl_nats"] / math.log(2)) for x in r["resolutions"])
        stats = np.load(tmp_path / "div_stats.npy")
        a = ActiveSet.load(tmp_path / "A.json")
        assert stats.shape == (5, 4)  # (layers, variates), as the official code stacks them
        for layer, variate, kl in zip(a.table.layer, a.table.variate, a.table.avg_kl):
            assert stats[layer, variate] == pytest.approx(kl / math.log(2), rel=1e-12)


class TestGranularityAndThreshold:
    def test_element_granularity(self, capsys, run_dir, tmp_path):
        r = analyze(capsys, run_dir, tmp_path / "E.json", "--keep", "3%", "--granularity", "element")
        assert r["granularity"] == "element" and r["n_dims"] == N_ELEMENTS
        assert r["n_active"] == math.ceil(0.03 * N_ELEMENTS) == 20
        assert r["kept_scalars_per_image"] == 20
        assert [x["dims"] for x in r["resolutions"]] == [4, 2 * 4 * 16, 2 * 4 * 64]
        a = ActiveSet.load(tmp_path / "E.json")
        kl = a.table.avg_kl
        assert kl[a.selected].min() >= np.sort(kl)[-20]

    def test_threshold_zero_keeps_every_positive_kl(self, capsys, run_dir, tmp_path):
        r = analyze(capsys, run_dir, tmp_path / "T.json", "--threshold", "0")
        a = ActiveSet.load(tmp_path / "T.json")
        assert r["rule"] == "threshold" and r["value"] == 0.0
        assert a.selected.tolist() == np.flatnonzero(a.table.avg_kl > 0).tolist()
        assert r["n_active"] == len(a.selected) > 0

    def test_threshold_between_values(self, capsys, run_dir, tmp_path):
        analyze(capsys, run_dir, tmp_path / "T.json", "--threshold", "0", "--limit", "64")
        kl = np.sort(ActiveSet.load(tmp_path / "T.json").table.avg_kl)
        cut = float((kl[-3] + kl[-4]) / 2)
        r = analyze(capsys, run_dir, tmp_path / "T2.json", "--threshold", repr(cut), "--limit", "64")
        assert r["n_active"] == 3


class TestSweepAndPlot:
    def test_sweep_100_row_equals_vdvl_eval(self, capsys, run_dir, tmp_path):
        r = analyze(capsys, run_dir, tmp_path / "S.json", "--keep", "3%", "--sweep", "3,100")
        sweep = r["sweep"]
        assert sweep["split"] == "test" and sweep["n_images"] == 180
        rows = sweep["rows"]
        assert [row["keep_pct"] for row in rows] == [3.0, 100.0]
        assert rows[0]["n_active"] == 1 and rows[1]["n_active"] == N_VARIATES
        assert rows[1]["kl_share_active"] == pytest.approx(1.0)
        assert rows[1]["encoded_bytes_float32"] == 180 * N_ELEMENTS * 4
        assert rows[0]["encoded_bytes_float16"] == 180 * rows[0]["kept_scalars_per_image"] * 2
        # Official convention: the pruned dims' KL(q || p) is charged too; without pruning both agree.
        assert rows[0]["kl_all_bits_per_dim"] > rows[0]["kl_bits_per_dim"]
        assert rows[1]["kl_all_bits_per_dim"] == rows[1]["kl_bits_per_dim"]
        code, out, err = run_cli(capsys, "eval", run_dir, "--data", "digits", "--split", "test", "--device", "cpu",
                                 "--json")
        assert code == 0, err
        ev = json.loads(out)
        for key in ("n_images", "bits_per_dim", "recon_bits_per_dim", "kl_bits_per_dim", "nats_per_dim"):
            assert rows[1][key] == ev[key], key
        saved = ActiveSet.load(tmp_path / "S.json")
        assert saved.extra["sweep"]["rows"][1]["bits_per_dim"] == ev["bits_per_dim"]

    def test_plot_writes_a_png(self, capsys, run_dir, tmp_path):
        pytest.importorskip("matplotlib")
        from PIL import Image

        r = analyze(capsys, run_dir, tmp_path / "A.json", "--keep", "3%", "--limit", "64",
                    "--plot", tmp_path / "kl.png")
        assert Path(r["plot"]) == tmp_path / "kl.png"
        with Image.open(tmp_path / "kl.png") as im:
            assert im.format == "PNG" and im.width > 100


FASHION = Path("/usr/share/datasets/fashion-mnist")


class TestBadInput:
    @pytest.mark.parametrize("argv,needle", [
        (["--keep", "0"], "--keep"),
        (["--keep", "0%"], "--keep"),
        (["--keep", "150%"], "--keep"),
        (["--keep", "-1"], "--keep"),
        (["--keep", "abc"], "--keep"),
        (["--keep", "3%", "--threshold", "0.1"], "--threshold"),
        ([], "--keep"),
        (["--threshold", "1e9", "--limit", "16"], "--threshold"),
        (["--keep", "3%", "--granularity", "bogus"], "--granularity"),
        (["--keep", "3%", "--sweep", "0,200"], "--sweep"),
        (["--keep", "3%", "--sweep", "a,b"], "--sweep"),
        (["--keep", "3%", "--split", "nope"], "nope"),
        (["--keep", "3%", "--data", "no-such-data-spec"], "no-such-data-spec"),
        (["--keep", "3%", "--limit", "0"], "--limit"),
        (["--keep", "3%", "--units", "furlongs"], "--units"),
        (["--keep", "3%", "--granularity", "element", "--div-stats", "d.npy"], "--div-stats"),
    ])
    def test_exits_2_with_one_sentence(self, capsys, run_dir, tmp_path, argv, needle):
        argv = ["--data", "digits", *argv] if "--data" not in argv else argv
        code, out, err = run_cli(capsys, "analyze-kl", run_dir, "--out", tmp_path / "A.json", "--device", "cpu",
                                 *argv)
        assert code == 2, err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1, err
        assert needle in lines[0] and "Traceback" not in err
        assert not (tmp_path / "A.json").exists()

    def test_threshold_keeping_nothing_names_the_largest_kl(self, capsys, run_dir, tmp_path):
        code, _, err = run_cli(capsys, "analyze-kl", run_dir, "--data", "digits", "--out", tmp_path / "A.json",
                               "--threshold", "1e9", "--limit", "16", "--device", "cpu")
        assert code == 2 and "largest average KL" in err

    def test_missing_checkpoint(self, capsys, tmp_path):
        code, _, err = run_cli(capsys, "analyze-kl", tmp_path / "missing", "--data", "digits",
                               "--out", tmp_path / "A.json", "--keep", "3%")
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and "missing" in lines[0]

    def test_unwritable_out(self, capsys, run_dir, tmp_path):
        (tmp_path / "a-file").write_text("not a folder")
        code, _, err = run_cli(capsys, "analyze-kl", run_dir, "--data", "digits", "--keep", "3%", "--limit", "16",
                               "--out", tmp_path / "a-file" / "A.json", "--device", "cpu")
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and "A.json" in lines[0] and "Traceback" not in err

    @pytest.mark.skipif(not FASHION.is_dir(), reason="the dataset-fashion-mnist Debian package is not installed")
    def test_data_that_does_not_fit_the_model(self, capsys, run_dir, tmp_path):
        code, _, err = run_cli(capsys, "analyze-kl", run_dir, "--data", "fashion-mnist", "--limit", "8",
                               "--keep", "3%", "--out", tmp_path / "A.json", "--device", "cpu")
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1, err
        assert "fashion-mnist" in lines[0] and "Traceback" not in err
