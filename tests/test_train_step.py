"""The training step and the official recipe: KL balancing, EMA, recipes, fixed binarisation,
activation checkpointing (exact gradients)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vdvae_latents.model.inputs import evaluation_images, fixed_binarization, prepare_batch
from vdvae_latents.train.presets import get_preset
from vdvae_latents.train.recipes import RECIPES, recipe_for_preset
from vdvae_latents.train.run_config import resolve_run_config
from vdvae_latents.train.step import EMA, TrainStep, balanced_kl, build_model
from vdvae_latents.model.vae import VAE


class TestBalancedKL:
    def test_closed_form_weights(self):
        kl = torch.tensor([1.0, 3.0], requires_grad=True)
        total = balanced_kl(kl, torch.tensor([1.0, 1.0]))
        # a = (1, 3): alpha = 2 * a / 4 = (0.5, 1.5); 0.5 * 1 + 1.5 * 3 = 5
        assert total.item() == pytest.approx(5.0)
        total.backward()
        assert kl.grad.tolist() == pytest.approx([0.5, 1.5])  # the weights are constants

    def test_scaled_uses_kl_per_element(self):
        kl = torch.tensor([4.0, 4.0])
        # per element: (4/4, 4/1) = (1, 4) -> alpha = (0.4, 1.6) -> 0.4 * 4 + 1.6 * 4 = 8
        assert balanced_kl(kl, torch.tensor([4.0, 1.0])).item() == pytest.approx(8.0)
        assert balanced_kl(kl, None).item() == pytest.approx(8.0)  # equal layer KLs: plain sum

    def test_equal_rates_give_the_plain_sum_and_zero_kl_gives_zero(self):
        kl = torch.tensor([2.0, 4.0, 6.0])
        assert balanced_kl(kl, torch.tensor([1.0, 2.0, 3.0])).item() == pytest.approx(12.0)
        assert balanced_kl(torch.zeros(3), torch.ones(3)).item() == 0.0


def test_ema_without_warmup_uses_the_plain_decay():
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = EMA(model, decay=0.9, warmup=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)
    assert ema.shadow["weight"].item() == pytest.approx(0.1)


class TestRecipes:
    def test_paper_presets_take_the_official_values(self):
        t = resolve_run_config(preset="cifar10-c1").train
        assert (t.lr_schedule, t.warmup_steps, t.decay_start, t.decay_steps, t.min_lr) == ("official", 100, 50_000,
                                                                                           750_000, 2e-4)
        assert (t.kl_warmup_start, t.kl_warmup_steps, t.kl_weight_min, t.kl_balance_steps) == (21, 5000, 1e-4, 10_000)
        assert (t.grad_clip, t.grad_skip_threshold, t.ema_decay, t.ema_warmup, t.flip) == (0.0, 800.0, 0.9999, False,
                                                                                           True)
        f = resolve_run_config(preset="ffhq256-c1").train
        assert (f.grad_clip, f.grad_skip_threshold, f.min_lr) == (20.0, 1000.0, 1e-4)
        m = resolve_run_config(preset="mnist-c1").train
        assert (m.kl_warmup_steps, m.kl_balance_steps, m.decay_start, m.eval_binarization, m.flip) == (
            500, 1000, 5000, "sampled", False)
        v = resolve_run_config(preset="cifar10-vdvae").train
        assert (v.optimizer, v.beta2, v.weight_decay, v.grad_clip, v.grad_skip_threshold, v.lr) == (
            "adamw", 0.9, 0.01, 200.0, 400.0, 2e-4)

    def test_cpu_presets_keep_the_project_recipe_and_sets_override(self):
        t = resolve_run_config(preset="fashion-mnist-cpu").train
        assert t.lr_schedule == "cosine" and t.ema_warmup and t.kl_balance_steps == 0
        assert recipe_for_preset("tiny") is RECIPES["cpu"] and get_preset("tiny").recipe is RECIPES["cpu"]
        from vdvae_latents.train.presets import describe

        assert describe(get_preset("cifar10-c2"))["recipe"] == "cifar10"
        assert describe(get_preset("ffhq256-vdvae"))["recipe"] == "ffhq256-vdvae"
        t = resolve_run_config(preset="cifar10-c1", overrides={"train.kl_balance_steps": "0",
                                                               "train.grad_skip_threshold": "500.5"}).train
        assert t.kl_balance_steps == 0 and t.grad_skip_threshold == 500.5

    def test_every_recipe_is_a_valid_train_config(self):
        from dataclasses import replace

        from vdvae_latents.train.config import TrainConfig

        for recipe in RECIPES.values():
            replace(TrainConfig(), **recipe.settings)


class TestFixedBinarization:
    def test_fixed_draws_per_position_with_the_right_rate(self):
        grey = np.full((40, 28, 28, 1), 77, dtype=np.uint8)  # p = 77/255
        a, b = fixed_binarization(grey), fixed_binarization(grey[:10])
        assert set(np.unique(a)) <= {0, 255} and np.array_equal(a[:10], b)  # same bits whatever the length
        assert (a == 255).mean() == pytest.approx(77 / 255, abs=0.02)
        assert not np.array_equal(a[0], a[1])  # independent draws per image
        edges = np.concatenate([np.zeros((1, 4, 4, 1)), np.full((1, 4, 4, 1), 255)]).astype(np.uint8)
        assert np.array_equal(fixed_binarization(edges), edges)

    def test_only_binary_models_with_sampled_binarisation_change(self):
        grey = np.random.default_rng(0).integers(0, 256, (8, 28, 28, 1), dtype=np.uint8)
        mnist, fashion = get_preset("mnist-c1").config, get_preset("fashion-mnist-cpu").config
        assert evaluation_images(fashion, grey, "sampled") is grey
        assert evaluation_images(mnist, grey, "threshold") is grey
        bits = evaluation_images(mnist, grey, "sampled")
        x = prepare_batch(mnist, bits)  # the evaluation threshold keeps the drawn bits
        assert torch.equal(x[:, :, 2:30, 2:30] > 0, torch.from_numpy(bits == 255).permute(0, 3, 1, 2))


    def test_streamed_and_sharded_splits_get_the_in_memory_bits(self, tmp_path):
        from vdvae_latents.data import open_images

        grey = np.random.default_rng(1).integers(0, 256, (23, 28, 28, 1), dtype=np.uint8)
        np.save(tmp_path / "grey.npy", grey[..., 0])
        mnist = get_preset("mnist-c1").config
        lazy = open_images(str(tmp_path / "grey.npy"), "all")
        expected = torch.from_numpy(fixed_binarization(grey)).permute(0, 3, 1, 2)
        streamed = torch.cat(list(evaluation_images(mnist, lazy, "sampled", batch_size=5)))
        assert torch.equal(streamed, expected)
        assert len(evaluation_images(mnist, lazy, "sampled")) == 23  # what the pruning sweep sizes by
        for world in (2, 3):  # each rank streams its shard: every image keeps its split's bits
            for rank in range(world):
                loader = lazy.shard(rank, world).batches(4)
                got = torch.cat(list(evaluation_images(mnist, loader, "sampled", rank=rank, world_size=world)))
                assert torch.equal(got, expected[rank::world])


def _grads(model: VAE) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


class TestActivationCheckpointing:
    @pytest.mark.parametrize("explicit_generator", [True, False])
    def test_gradients_equal_the_plain_path(self, explicit_generator):
        cfg = get_preset("tiny").config
        torch.manual_seed(0)
        model = VAE(cfg)
        x = torch.rand(6, cfg.channels, cfg.image_size, cfg.image_size) * 2 - 1
        results = []
        for ckpt in (False, True):
            model.zero_grad(set_to_none=True)
            model.checkpoint_activations = ckpt
            torch.manual_seed(1)
            g = torch.Generator().manual_seed(7) if explicit_generator else None
            out = model(x, generator=g)
            out.loss.backward()
            results.append((out.loss.detach(), _grads(model), None if g is None else g.get_state()))
        (loss_a, grads_a, gen_a), (loss_b, grads_b, gen_b) = results
        assert torch.equal(loss_a, loss_b) and grads_a.keys() == grads_b.keys()
        for name in grads_a:  # recomputation draws the same noise, so gradients agree exactly
            torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-6, atol=1e-7, msg=name)
        if explicit_generator:  # the generator ends where the plain forward pass left it
            assert torch.equal(gen_a, gen_b)

    def test_no_effect_without_gradients(self):
        cfg = get_preset("tiny").config
        model = VAE(cfg)
        model.checkpoint_activations = True
        x = torch.zeros(2, cfg.channels, cfg.image_size, cfg.image_size)
        with torch.no_grad():
            out = model(x, posterior="mean")
        assert torch.isfinite(out.loss)


def test_train_step_balances_kl_only_in_its_window():
    run = resolve_run_config(preset="tiny", overrides={"train.kl_balance_steps": "1"},
                             train_overrides={"batch_size": 8})
    model, ema, opt = build_model(run, torch.device("cpu"))
    step = TrainStep(model, ema, opt, run, torch.device("cpu"))
    x = torch.rand(8, 1, 8, 8) * 2 - 1
    out = model(x, generator=torch.Generator().manual_seed(0))
    kl_layers = torch.stack([k.flatten(1).sum(1) for k in out.kl], 1).mean(0)
    per_element = kl_layers / step.elements
    alpha = len(kl_layers) * per_element / per_element.sum()
    dims = run.model.dims_per_image
    balanced, _, _ = step.loss(out, 1)
    plain, _, _ = step.loss(out, 2)
    assert balanced.item() == pytest.approx(((out.nll.mean() + (alpha * kl_layers).sum()) / dims).item(), rel=1e-5)
    assert plain.item() == pytest.approx(out.loss.item(), rel=1e-6)


class TestActConv:
    @pytest.mark.parametrize("activation", ["silu", "gelu"])
    @pytest.mark.parametrize("bf16", [False, True])
    @pytest.mark.parametrize("channels_last", [False, True])
    def test_matches_autograd_of_the_plain_path(self, activation, bf16, channels_last):
        from vdvae_latents.model.act_conv import act_conv
        from vdvae_latents.model.blocks import activation_fn

        torch.manual_seed(0)
        conv = torch.nn.Conv2d(6, 5, 3, padding=1)
        x0 = torch.randn(3, 6, 7, 7)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        conv = conv.to(memory_format=fmt)
        grads = []
        for fused in (False, True):
            conv.zero_grad(set_to_none=True)
            x = x0.contiguous(memory_format=fmt).requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                y = act_conv(conv, x, activation) if fused else conv(activation_fn(activation)(x))
            (y.float() * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
            grads.append((y.detach().float(), x.grad, conv.weight.grad, conv.bias.grad))
        for plain, fused in zip(*grads):
            assert plain.dtype == fused.dtype
            torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)

    def test_keeps_only_the_input(self):
        from vdvae_latents.model.act_conv import act_conv

        conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        x = torch.randn(2, 4, 8, 8, requires_grad=True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            act_conv(conv, x, "silu")
        assert [t.shape for t in saved if not isinstance(t, torch.nn.Parameter)] == [x.shape]


def test_compile_failure_falls_back_to_the_same_eager_step(monkeypatch):
    def broken_compile(net):
        def run(*args, **kwargs):
            kwargs["generator"].manual_seed(999)  # a failed attempt may consume the generator
            raise RuntimeError("no C++ compiler")
        return run

    def one_step(compile_flag: bool):
        run = resolve_run_config(preset="tiny", overrides={"train.compile": str(compile_flag)},
                                 train_overrides={"batch_size": 8})
        model, ema, opt = build_model(run, torch.device("cpu"))
        step = TrainStep(model, ema, opt, run, torch.device("cpu"))
        x = torch.rand(8, 1, 8, 8) * 2 - 1
        stats = step(x, 0, torch.Generator().manual_seed(5))
        return stats, model.state_dict()

    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        compiled, w_compiled = one_step(True)
    eager, w_eager = one_step(False)
    assert torch.equal(compiled.nll, eager.nll) and compiled.grad_norm == eager.grad_norm
    assert all(torch.equal(w_compiled[k], w_eager[k]) for k in w_eager)


class TestCpuBf16Default:
    """bf16 autocast is the CPU default only where the CPU computes bf16 natively."""

    def _autocast(self, monkeypatch, machine: str, avx512_bf16: bool, amx: bool, **train):
        import platform

        from vdvae_latents.train import step as train_step
        from vdvae_latents.train.config import TrainConfig

        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
        monkeypatch.setattr(platform, "machine", lambda: machine)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
        return train_step.autocast_for(torch.device("cpu"), TrainConfig(**train))

    def test_on_by_default_with_avx512_bf16_or_amx(self, monkeypatch):
        for avx512_bf16, amx in ((True, False), (False, True)):
            ctx = self._autocast(monkeypatch, "x86_64", avx512_bf16, amx)
            assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16

    def test_plain_avx512_keeps_fp32(self, monkeypatch):
        # oneDNN would accept bf16 here but emulate it, slower than fp32
        ctx = self._autocast(monkeypatch, "x86_64", False, False)
        assert not isinstance(ctx, torch.autocast)

    def test_can_be_switched_off(self, monkeypatch):
        ctx = self._autocast(monkeypatch, "x86_64", True, True, cpu_bf16=False)
        assert not isinstance(ctx, torch.autocast)
