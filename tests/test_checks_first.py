"""Every command checks its inputs and outputs before it loads a model or reads data.

No finished computation is lost to a check that could have come first: a missing input, an
output under a file, an existing store without --resume/--overwrite are refused before the
model loads (here: loading the model fails the test), and outputs in folders that do not
exist yet are written there (the folders are created).
"""

from __future__ import annotations

import json

import pytest

from helpers import assert_one_line_error, run_cli


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: what is checked must be checked before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs and outputs were checked")

    import vdvae_latents.latents.analyze as analyze
    import vdvae_latents.model.generate as generate
    import vdvae_latents.stores.decode as decode
    import vdvae_latents.stores.encode as encode

    for module in (analyze, encode, generate, decode):
        monkeypatch.setattr(module, "load_model", refuse)


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "a-file"
    path.write_text("not a folder")
    return path


def bad_outputs(run, a_file, tmp_path):
    """(argv, the name its one-sentence error must contain) for outputs that cannot be written."""
    data = ("--data", "digits", "--device", "cpu")
    return [
        (("analyze-kl", run, *data, "--keep", "3%", "--out", a_file / "A.json"), "A.json"),
        (("analyze-kl", run, *data, "--keep", "3%", "--out", tmp_path / "A.npz"), "A.npz"),
        (("analyze-kl", run, *data, "--keep", "3%", "--out", tmp_path / "A.json", "--plot", a_file / "kl.png"),
         "kl.png"),
        (("analyze-kl", run, *data, "--keep", "3%", "--out", tmp_path / "A.json", "--div-stats", tmp_path),
         str(tmp_path)),
        (("encode", run, *data, "--keep", "3%", "--out", a_file / "enc.zarr"), "enc.zarr"),
        (("encode", run, *data, "--keep", "3%", "--out", a_file), "a-file"),  # a file where a Zarr folder goes
        (("encode", run, *data, "--active", tmp_path / "missing.json", "--out", tmp_path / "e.zarr"), "missing.json"),
        (("encode", run, *data, "--keep", "3%", "--out", tmp_path / "e.h5", "--codec", "nonsense"), "--codec"),
        (("encode", run, "--data", "no-such-data", "--keep", "3%", "--out", tmp_path / "e.zarr"), "no-such-data"),
        (("sample", run, "--out", a_file / "s.png"), "s.png"),
        (("reconstruct", run, "--data", "digits", "--out", tmp_path), str(tmp_path)),
        (("first-k", run, "--data", "digits", "--k", "1", "--out", a_file / "f.png"), "f.png"),
        (("pack", "digits", "--out", a_file / "d.zarr"), "d.zarr"),
        (("import", "openai-vdvae", tmp_path / "missing.th", "--hps", "cifar10", "--run-dir", tmp_path / "r"),
         "missing.th"),
        (("import", "openai-vdvae", a_file, "--hps", "cifar10", "--run-dir", a_file), "a-file"),
    ]


def test_bad_inputs_and_outputs_are_refused_before_the_model_loads(capsys, no_model, tiny_digits_run, a_file,
                                                                     tmp_path):
    for argv, needle in bad_outputs(tiny_digits_run, a_file, tmp_path):
        code, _, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err, needle)
    assert not (tmp_path / "r").exists()  # a refused import leaves no run directory


def test_an_existing_store_is_refused_before_the_model_loads(capsys, no_model, tiny_digits_run, tmp_path):
    (tmp_path / "e.zarr").mkdir()
    code, _, err = run_cli(capsys, "encode", tiny_digits_run, "--data", "digits", "--keep", "3%",
                           "--out", tmp_path / "e.zarr", "--device", "cpu")
    assert_one_line_error(code, err, "--resume")


def test_outputs_in_new_folders_are_written(capsys, tiny_digits_run, tmp_path):
    new = tmp_path / "new" / "folders"
    code, out, err = run_cli(capsys, "analyze-kl", tiny_digits_run, "--data", "digits", "--split", "val",
                             "--limit", "32", "--keep", "50%", "--out", new / "A.json", "--json", "--device", "cpu")
    assert code == 0, err
    assert json.loads((new / "A.json").read_text())["schema"] == "vdvl-active-set"
    code, out, err = run_cli(capsys, "encode", tiny_digits_run, "--data", "digits", "--split", "val",
                             "--active", new / "A.json", "--out", new / "more" / "e.zarr", "--json",
                             "--device", "cpu")
    assert code == 0, err
    assert (new / "more" / "e.zarr").is_dir()
    code, out, err = run_cli(capsys, "sample", tiny_digits_run, "--n", "2", "--out", new / "grids" / "s.png",
                             "--device", "cpu")
    assert code == 0 and (new / "grids" / "s.png").is_file(), err
