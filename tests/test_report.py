"""`vdvl report`: one self-contained HTML page per run, checked as a reader gets it.

1. What the page holds: every section from the files given, both KL conventions of the sweep,
   figures embedded, nothing fetched (the library call and the command).
2. Bad input: a run without checkpoints, a JSON of the wrong kind, an OOD file off its schema,
   an --out that cannot be written -> exit 2 and one sentence, before any heavy work; the page
   is written atomically.
3. In a real browser: headless Chromium opens the page, every figure has a natural size, the
   console stays silent, and a screenshot is kept (skipped, saying why, without Chromium).

Everything is made from the session's 30-step tiny run (tests/conftest.py): an active set of
32 training images with a two-point sweep (on 32 test images), a store of the 180 test images, a one-baseline probe;
the full page is written once, by the command.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from helpers import assert_one_line_error, run_cli
from vdvae_latents.cli import main
from vdvae_latents.report import read_metrics, write_report

ROOT = Path(__file__).resolve().parents[1]
OOD_ROWS = [{"score": "elbo", "ood_set": "fashion-mnist", "auroc": 0.91, "auprc": 0.88, "fpr80": 0.12},
            {"score": "likelihood ratio", "ood_set": "fashion-mnist", "auroc": 0.97, "auprc": 0.95, "fpr80": 0.03}]


@pytest.fixture(scope="module")
def inputs(tiny_digits_run, tmp_path_factory) -> dict:
    """Every input of a full report, made by the library calls the commands make (the probe is a
    k-NN: its fits take a fraction of logistic regression's, and the page reads any model's report)."""
    from vdvae_latents.downstream.probe import run_probe
    from vdvae_latents.latents.analyze import analyze_checkpoint
    from vdvae_latents.stores.encode import encode_to_store

    folder = tmp_path_factory.mktemp("report")
    active = folder / "active.json"
    analyze_checkpoint(tiny_digits_run, "digits", out=active, keep="10%", split="train", limit=32,
                       granularity="element", sweep=[10.0, 100.0], device="cpu")
    store = folder / "test.zarr"
    encode_to_store(tiny_digits_run, "digits", store, split="test", active_file=active, chunk_rows=64, device="cpu")
    probe = folder / "probe.json"
    probe.write_text(json.dumps(run_probe(store, baselines="pixels", model="knn", seeds=2, cv=2)))
    ood = folder / "ood.json"
    ood.write_text(json.dumps(OOD_ROWS))
    return {"run": tiny_digits_run, "active": active, "store": store, "probe": probe, "ood": ood, "folder": folder}


@pytest.fixture(scope="module")
def page(inputs) -> tuple[Path, dict]:
    """The full report, written once by `vdvl report --json`: the page and what the command printed."""
    out = inputs["folder"] / "report.html"
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        code = main(["report", str(inputs["run"]), "--active", str(inputs["active"]), "--store", str(inputs["store"]),
                     "--probe", str(inputs["probe"]), "--ood", str(inputs["ood"]), "--out", str(out), "--json"])
    assert code == 0
    return out, json.loads(printed.getvalue())


# ----------------------------------------------------------------------------- 1. what the page holds


def test_the_page_holds_every_section_with_its_figures_embedded(page, inputs):
    path, result = page
    assert result == {"out": str(path), "bytes": path.stat().st_size, "sections": ["model", "kl", "stores", "probe",
                      "ood"], "figures": 5, "checkpoint": result["checkpoint"], "stores_ok": True}
    html = path.read_text()
    # The training curve, the KL figure, the sweep, the store sizes and the probe: all inline PNGs.
    images = re.findall(r'<img src="([^"]*)"', html)
    assert len(images) == 5 and all(src.startswith("data:image/png;base64,") for src in images)
    for heading in ("Model", "KL analysis", "Pruning sweep", "Stores", "Probes", "Out-of-distribution"):
        assert f"<h2>{heading}" in html
    assert "tiny at step 30 on digits" in html  # the title: preset, step, data
    # Nothing is fetched: no external URL anywhere, and a policy that forbids it.
    assert not re.search(r"(src|href)=\"(https?:)?//", html) and "default-src 'none'" in html
    # The sweep's table has both KL conventions; the 100% row is the test negative ELBO.
    sweep = json.loads(inputs["active"].read_text())["sweep"]
    full = next(r for r in sweep["rows"] if r["keep_pct"] == 100)
    assert f"{full['bits_per_dim']:.4f} bits/dim" in html and "all KL charged" in html
    assert "likelihood ratio" in html and "intact" in html


def test_the_run_alone_makes_a_page_that_says_where_the_rest_comes_from(capsys, inputs, tmp_path):
    out = tmp_path / "new" / "folder" / "r.html"  # missing folders are created, as for every output
    code, stdout, err = run_cli(capsys, "report", inputs["run"], "--out", out)
    assert code == 0, err
    assert "1 figure; sections: model)" in " ".join(stdout.split())
    # Without an active set's sweep, the page says where a test negative ELBO would come from.
    assert "No test negative ELBO is recorded" in out.read_text()


def test_training_metrics_of_a_resumed_run_keep_the_later_record_of_a_step(tmp_path):
    lines = [{"step": 10, "bits_per_dim": 5.0}, {"step": 20, "bits_per_dim": 4.0}, {"step": 20, "validation": {}},
             {"step": 20, "bits_per_dim": 3.9}]  # resumed from step 10: step 20 logged again
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + '\n{"step": 30, "bits_per')  # killed mid-line
    train, val = read_metrics(path)
    assert [(r["step"], r["bits_per_dim"]) for r in train] == [(10, 5.0), (20, 3.9)] and len(val) == 1


# ----------------------------------------------------------------------------- 2. bad input


@pytest.mark.parametrize("change, needle", [
    ({"run": "{empty_run}"}, "no checkpoints"),
    ({"--active": "{probe}"}, "--active"),
    ({"--probe": "{active}"}, "--probe"),
    ({"--ood": "{probe}"}, "--ood"),
    ({"--ood": "{bad_ood}"}, "fpr80"),
    ({"--active": "{folder}/missing.json"}, "missing.json"),
    ({"--store": "{active}"}, "active.json"),
    ({"--out": "{active}/r.html"}, "is a file, not a folder"),
    ({"--out": "{folder}"}, "is a folder"),
])
def test_bad_input_is_one_sentence_and_exit_2(capsys, inputs, tmp_path, change, needle):
    bad_ood = tmp_path / "bad_ood.json"
    bad_ood.write_text(json.dumps([{**OOD_ROWS[0], "fpr80": 1.5}]))
    (tmp_path / "empty_run").mkdir()
    names = {**{k: str(v) for k, v in inputs.items()}, "empty_run": str(tmp_path / "empty_run"),
             "bad_ood": str(bad_ood)}
    argv = {"run": inputs["run"], "--active": inputs["active"], "--store": inputs["store"], "--probe": inputs["probe"],
            "--out": tmp_path / "r.html"}
    argv.update({k: v.format(**names) for k, v in change.items()})
    code, _, err = run_cli(capsys, "report", argv.pop("run"), *[x for kv in argv.items() for x in kv])
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "r.html").exists()


def test_wrong_files_are_refused_before_anything_heavy_is_imported(inputs, tmp_path):
    # One fresh interpreter: a JSON of the wrong kind and an --out that cannot be written stop the command
    # before torch, numpy or the store libraries are imported (so before any model or store work).
    argvs = [["report", str(inputs["run"]), "--active", str(inputs["probe"]), "--out", str(tmp_path / "a.html")],
             ["report", str(inputs["run"]), "--ood", str(inputs["active"]), "--out", str(tmp_path / "b.html")],
             ["report", str(inputs["run"]), "--out", str(inputs["active"] / "c.html")]]
    script = f"""
import json, sys
from vdvae_latents.cli import main
codes = [main(argv) for argv in {json.dumps(argvs)}]
print(json.dumps({{"codes": codes, "heavy": sorted({{m.split('.')[0] for m in sys.modules}}
                                                & {{"torch", "numpy", "zarr", "h5py", "matplotlib"}})}}))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"codes": [2, 2, 2], "heavy": []}, proc.stderr
    assert "is a probe report, not an active set" in proc.stderr


def test_a_write_that_fails_midway_leaves_the_previous_report_and_no_partial_file(inputs, tmp_path, monkeypatch):
    import vdvae_latents.report.page as page_module

    out = tmp_path / "r.html"
    out.write_text("the previous report")
    # A page that cannot be encoded fails inside the atomic write, after its first bytes.
    monkeypatch.setattr(page_module, "render", lambda context: "<html>" + "x" * 100_000 + "\ud800")
    with pytest.raises(UnicodeEncodeError):
        write_report(inputs["run"], out=out)
    assert out.read_text() == "the previous report" and [p.name for p in tmp_path.iterdir()] == ["r.html"]


# ----------------------------------------------------------------------------- 3. in a real browser

CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(name)), None)
# Added to a copy of the page: once it has loaded, write each figure's natural size into the DOM
# (in a hidden element, so the screenshot shows the page as a reader sees it).
MEASURE = """<script>
window.addEventListener("load", () => {
  const pre = document.createElement("pre");
  pre.id = "measured";
  pre.style.display = "none";
  pre.textContent = JSON.stringify({height: document.documentElement.scrollHeight,
    images: [...document.images].map(i => ({alt: i.alt, width: i.naturalWidth, height: i.naturalHeight}))});
  document.body.appendChild(pre);
});
</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium; .ci/run does)")
def test_headless_chromium_shows_every_figure_and_no_console_error(page, tmp_path):
    # The measuring copy allows its one inline script; the page itself allows none.
    measured = tmp_path / "measured.html"
    measured.write_text(page[0].read_text().replace("default-src 'none';", "default-src 'none'; script-src 'unsafe-inline';")
                        .replace("</body>", MEASURE + "</body>"))
    shot = tmp_path / "report.png"  # kept in this test's tmp folder
    # One launch, offline (every host name fails to resolve), console messages on stderr.
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--user-data-dir={tmp_path / 'profile'}", "--host-resolver-rules=MAP * ~NOTFOUND",
                           "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", "--window-size=1280,4000",
                           f"--screenshot={shot}", "--dump-dom", measured.as_uri()],
                          capture_output=True, text=True, timeout=90)
    found = re.search(r'<pre id="measured"[^>]*>(.*?)</pre>', proc.stdout, re.S)
    assert found, proc.stderr[-2000:]
    dom = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert len(dom["images"]) == 5 and dom["height"] > 2000
    assert all(img["width"] > 0 and img["height"] > 0 for img in dom["images"]), dom["images"]
    assert not [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    with Image.open(shot) as im:
        assert im.size == (1280, 4000)
