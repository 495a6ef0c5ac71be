"""Training behaviour: schedule, EMA, update skipping, exact resumption, signals, DDP."""

from __future__ import annotations

import json
import math
import os
import signal
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from vdvae_latents.model import checkpoints as ckpt
from vdvae_latents.train import step as train_step
from vdvae_latents.core.errors import ConfigError
from vdvae_latents.train.run_config import RunConfig, dump_toml, load_run_config, resolve_run_config
from vdvae_latents.train.config import TrainConfig
from vdvae_latents.train.step import EMA
from vdvae_latents.train.loop import train

def tiny_run(**train_changes) -> RunConfig:
    run = resolve_run_config(preset="tiny", data="digits")
    settings = dict(steps=6, batch_size=16, warmup_steps=2, log_every=2, checkpoint_every=100,
                    val_limit=32, seed=3)
    settings.update(train_changes)
    return replace(run, train=replace(run.train, **settings))


def final_state(run_dir: Path) -> dict:
    payload = ckpt.load_checkpoint(ckpt.latest_checkpoint(run_dir))
    return payload


def assert_same_weights(a: dict, b: dict) -> None:
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs"


class TestSchedule:
    def test_warmup_is_linear_then_cosine_reaches_floor(self):
        cfg = TrainConfig(steps=1000, lr=1e-3, min_lr=1e-4, warmup_steps=100)
        assert cfg.lr_at(0) == pytest.approx(1e-5)
        assert cfg.lr_at(49) == pytest.approx(5e-4)
        assert cfg.lr_at(100) == pytest.approx(1e-3)  # decay measured from its own start
        assert cfg.lr_at(550) == pytest.approx(1e-4 + 0.5 * 9e-4)
        assert cfg.lr_at(1000) == pytest.approx(1e-4)
        assert cfg.lr_at(5000) == pytest.approx(1e-4)

    def test_explicit_decay_window(self):
        cfg = TrainConfig(steps=1000, lr=1.0, min_lr=0.0, warmup_steps=0, decay_start=200, decay_steps=400)
        assert cfg.lr_at(100) == pytest.approx(1.0)
        assert cfg.lr_at(400) == pytest.approx(0.5)
        assert cfg.lr_at(600) == pytest.approx(0.0, abs=1e-12)

    def test_kl_warmup(self):
        cfg = TrainConfig(kl_warmup_steps=10)
        assert [cfg.kl_weight_at(s) for s in (0, 5, 10, 20)] == pytest.approx([0.0, 0.5, 1.0, 1.0])
        assert TrainConfig().kl_weight_at(0) == 1.0

    def test_official_kl_ramp(self):
        # Efficient-VDVAE's LinearBetaSchedule: clamp((s - start) / (start + steps), min, 1).
        cfg = TrainConfig(kl_warmup_start=21, kl_warmup_steps=5000, kl_weight_min=1e-4)
        assert cfg.kl_weight_at(0) == pytest.approx(1e-4) and cfg.kl_weight_at(21) == pytest.approx(1e-4)
        assert cfg.kl_weight_at(21 + 5021 // 2) == pytest.approx(0.5, abs=1e-3)
        assert cfg.kl_weight_at(5042) == pytest.approx(1.0) and cfg.kl_weight_at(10**6) == 1.0

    def test_official_lr_schedule_follows_torch_cosine_recursion(self):
        # Brute force: torch's CosineAnnealingLR recursion, stepped once per update from the
        # rate the warm-up left, with the floor after T (see TrainConfig.lr_at).
        w, start, period, base, floor = 10, 40, 300, 1e-3, 2e-4
        cfg = TrainConfig(steps=400, lr=base, min_lr=floor, lr_schedule="official", warmup_steps=w,
                          decay_start=start, decay_steps=period)
        lr = None
        for s in range(400):
            if s < start:
                lr = base * min(1.0, s / w)
            elif s <= period:
                ratio = (1 + math.cos(math.pi * s / period)) / (1 + math.cos(math.pi * (s - 1) / period))
                lr = floor + (lr - floor) * ratio
            else:
                lr = floor
            assert cfg.lr_at(s) == pytest.approx(lr, rel=1e-9, abs=1e-15), s
        assert cfg.lr_at(0) == 0.0 and cfg.lr_at(5) == pytest.approx(base / 2)

    def test_official_schedule_without_decay_is_warmup_then_constant(self):
        cfg = TrainConfig(lr=2e-4, min_lr=2e-4, lr_schedule="official", warmup_steps=100, decay_steps=0)
        assert [cfg.lr_at(s) for s in (0, 50, 100, 10**6)] == pytest.approx([0.0, 1e-4, 2e-4, 2e-4])

    def test_kl_balancing_window(self):
        cfg = TrainConfig(kl_balance_steps=3)
        assert [cfg.kl_balance_at(s) for s in range(5)] == [True, True, True, True, False]
        assert not TrainConfig().kl_balance_at(0)

    @pytest.mark.parametrize("field,value", [("steps", 0), ("lr", -1.0), ("ema_decay", 1.0), ("optimizer", "sgd"),
                                             ("device", "tpu"), ("min_lr", 1.0), ("lr_schedule", "step"),
                                             ("eval_binarization", "coin"), ("kl_weight_min", 2.0)])
    def test_bad_settings_name_the_field(self, field, value):
        with pytest.raises(ConfigError, match=field):
            TrainConfig(**{field: value})


class TestEMA:
    def test_closed_form_after_updates(self):
        model = torch.nn.Linear(1, 1, bias=False)
        torch.nn.init.zeros_(model.weight)
        ema = EMA(model, decay=0.5)
        expected = 0.0
        for value in (1.0, 2.0, 3.0):
            with torch.no_grad():
                model.weight.fill_(value)
            d = ema.current_decay()
            ema.update(model)
            expected = d * expected + (1 - d) * value
        assert ema.shadow["weight"].item() == pytest.approx(expected)
        assert EMA(model, 0.9999).current_decay() == pytest.approx(0.1)  # warm-up: (1+0)/(10+0)


class TestRunConfig:
    def test_toml_round_trip(self, tmp_path):
        run = tiny_run()
        path = tmp_path / "config.toml"
        path.write_text(dump_toml(run.to_dict()))
        again = load_run_config(path)
        assert again.model == run.model and again.train == run.train and again.data == run.data

    def test_set_overrides_model_and_train(self):
        run = resolve_run_config(preset="tiny", overrides={"variates": "2", "train.ema_decay": "0.99"})
        assert run.model.variates == (2, 2, 2) and run.train.ema_decay == 0.99

    def test_exactly_one_of_preset_or_config(self, tmp_path):
        with pytest.raises(ConfigError, match="--preset or --config"):
            resolve_run_config()
        with pytest.raises(ConfigError, match="does not exist"):
            resolve_run_config(config_file=tmp_path / "nope.toml")

    def test_config_file_with_unknown_train_setting(self, tmp_path):
        f = tmp_path / "c.toml"
        f.write_text('preset = "tiny"\n[train]\nstepz = 3\n')
        with pytest.raises(ConfigError, match="stepz"):
            resolve_run_config(config_file=f)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """(run directory, result) of tiny_run() trained to its end in one go, shared by the tests below,
    which only read it. Read-only."""
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    return run_dir, train(run_dir, tiny_run(), quiet=True)


class TestTrainLoop:
    def test_writes_config_metrics_checkpoint(self, uninterrupted):
        run_dir, result = uninterrupted
        assert result.step == 6 and not result.interrupted
        assert load_run_config(run_dir / "config.toml").model == tiny_run().model
        lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        train_lines = [m for m in lines if "loss" in m]
        assert [m["step"] for m in train_lines] == [2, 4, 6]
        for m in train_lines:
            assert math.isfinite(m["loss"]) and m["bits_per_dim"] == pytest.approx(m["loss"] / math.log(2))
            assert {"grad_norm", "lr", "skips", "images_per_s", "kl_bits_per_dim"} <= m.keys()
        assert "validation" in lines[-1] and math.isfinite(lines[-1]["validation"]["bits_per_dim"])
        payload = final_state(run_dir)
        assert payload["step"] == 6 and payload["format_version"] >= 1

    def test_keeps_last_k_checkpoints(self, tmp_path):
        train(tmp_path / "r", tiny_run(checkpoint_every=1, keep_checkpoints=2), quiet=True)
        assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "r")] == [5, 6]

    def test_interrupted_and_resumed_run_equals_uninterrupted(self, tmp_path, uninterrupted):
        run, whole = tiny_run(), uninterrupted[0]
        first = train(tmp_path / "b", run, quiet=True, stop_after=3)
        assert first.step == 3 and ckpt.latest_checkpoint(tmp_path / "b").name == "ckpt-00000003.pt"
        second = train(tmp_path / "b", run, quiet=True)
        assert second.step == 6
        assert_same_weights(final_state(whole), final_state(tmp_path / "b"))
        a_opt, b_opt = final_state(whole)["optimizer"], final_state(tmp_path / "b")["optimizer"]
        for k, state in a_opt["state"].items():
            for name, value in state.items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(b_opt["state"][k][name]))

    def test_sigint_saves_checkpoint_and_resume_matches(self, tmp_path, uninterrupted):
        run, whole = tiny_run(), uninterrupted[0]

        def interrupt(step, metrics):
            if step == 2:
                os.kill(os.getpid(), signal.SIGINT)

        result = train(tmp_path / "b", run, quiet=True, on_step=interrupt)
        # The flag is honoured at the next step boundary after the signal.
        assert result.interrupted and 2 <= result.step < 6
        assert ckpt.latest_checkpoint(tmp_path / "b") == ckpt.checkpoint_path(tmp_path / "b", result.step)
        train(tmp_path / "b", run, quiet=True)
        assert_same_weights(final_state(whole), final_state(tmp_path / "b"))

    def test_resume_with_incompatible_config_is_refused(self, tmp_path):
        train(tmp_path / "r", tiny_run(), quiet=True, stop_after=2)
        with pytest.raises(ConfigError, match="batch_size"):
            train(tmp_path / "r", tiny_run(batch_size=8), quiet=True)
        other_model = replace(tiny_run(), model=tiny_run().model.replace(variates=2))
        with pytest.raises(ConfigError, match="variates"):
            train(tmp_path / "r", other_model, quiet=True)

    def test_longer_steps_extend_a_finished_run(self, tmp_path):
        train(tmp_path / "r", tiny_run(steps=4), quiet=True)
        result = train(tmp_path / "r", tiny_run(steps=6), quiet=True)
        assert result.step == 6

    def test_batch_larger_than_data_is_refused(self, tmp_path):
        with pytest.raises(ConfigError, match="batch_size"):
            train(tmp_path / "r", tiny_run(batch_size=5000), quiet=True)


class TestUpdateSkipping:
    def test_threshold_skips_every_update_and_keeps_weights(self, tmp_path):
        run = tiny_run(grad_skip_threshold=1e-12, steps=3)
        result = train(tmp_path / "r", run, quiet=True)
        assert result.skips == 3
        torch.manual_seed(run.train.seed)
        from vdvae_latents.model.vae import VAE

        init = VAE(run.model).state_dict()
        payload = final_state(tmp_path / "r")
        for k, v in init.items():
            assert torch.equal(payload["model"][k], v)

    def test_nan_gradient_norm_is_skipped_and_counted(self, tmp_path, monkeypatch):
        real = train_step.gradient_norm
        calls = {"n": 0}

        def flaky(params, max_norm):
            calls["n"] += 1
            norm = real(params, max_norm)
            return torch.tensor(float("nan")) if calls["n"] == 2 else norm

        monkeypatch.setattr(train_step, "gradient_norm", flaky)
        result = train(tmp_path / "r", tiny_run(steps=4), quiet=True)
        assert result.skips == 1
        lines = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
        assert [m["skips"] for m in lines if "loss" in m] == [1, 1]

    def test_clipping_bounds_the_update(self, tmp_path):
        result = train(tmp_path / "r", tiny_run(grad_clip=1e-6, steps=2), quiet=True)
        assert result.skips == 0


@pytest.mark.slow
class TestDistributed:
    def test_two_process_gloo_ranks_end_identical(self, torchrun_session):
        """tests/ddp_worker.py, run as a part of the session's one torchrun launch (tests/torchrun_worker.py)."""
        run_dir = torchrun_session.out / "train"
        assert (torchrun_session.out / "train.ok").exists(), torchrun_session.stderr[-3000:]
        digests = [(run_dir / f"rank{r}.json").read_text() for r in range(2)]
        assert json.loads(digests[0]) == json.loads(digests[1])
        payload = final_state(run_dir)
        assert payload["step"] == 4 and payload["world_size"] == 2
