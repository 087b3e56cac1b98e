"""Optimizers, clipping and schedules against independent references."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from scratchlm.model import ModelConfig, Transformer
from scratchlm.train.config import OptimizerSection, ScheduleSection
from scratchlm.train.optim import (AdamW, build_optimizer, clip_grad_norm_,
                                   newton_schulz_orthogonalize, split_decay_params)
from scratchlm.train.schedule import lr_factor
from tests.test_train_fixtures import single_thread  # noqa: F401 (autouse fixture)

TINY = dict(vocab_size=96, context_length=16, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 3))


@pytest.mark.parametrize("weight_decay, betas", [(0.1, (0.9, 0.95)), (0.0, (0.8, 0.999))])
def test_adamw_matches_torch_step_for_step(weight_decay, betas):
    ours, ref = _net(), _net()
    kw = dict(lr=1e-2, betas=betas, eps=1e-8, weight_decay=weight_decay)
    opt_ours, opt_ref = AdamW(ours.parameters(), **kw), torch.optim.AdamW(ref.parameters(), **kw)
    gen = torch.Generator().manual_seed(1)
    for _ in range(30):
        idx = torch.randint(0, 10, (6,), generator=gen)
        for model, opt in ((ours, opt_ours), (ref, opt_ref)):
            opt.zero_grad()
            model(idx).pow(2).mean().backward()
            opt.step()
        for p, q in zip(ours.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


def test_adamw_state_dict_round_trip_continues_identically():
    a, b = _net(), _net()
    opt_a = AdamW(a.parameters(), lr=1e-2)
    idx = torch.arange(6) % 10
    for _ in range(3):
        opt_a.zero_grad(); a(idx).sum().backward(); opt_a.step()  # noqa: E702
    b.load_state_dict(a.state_dict())
    opt_b = AdamW(b.parameters(), lr=1e-2)
    # deepcopy: torch's load_state_dict keeps the very tensors it is given (a file has none).
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    for model, opt in ((a, opt_a), (b, opt_b)):
        opt.zero_grad(); model(idx).sum().backward(); opt.step()  # noqa: E702
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_no_decay_on_norms_biases_and_embeddings():
    model = Transformer(ModelConfig.from_preset("gpt2-124m", **TINY))  # has biases, LayerNorm
    decay, no_decay = split_decay_params(model)
    names = {id(p): n for n, p in model.named_parameters()}  # tied head listed once
    assert all(p.dim() == 2 and "emb" not in names[id(p)] for p in decay)
    assert {names[id(p)] for p in no_decay} >= {"tok_emb.weight", "pos_emb.weight",
                                                 "norm.weight", "norm.bias"}
    assert len(decay) + len(no_decay) == len(list(model.parameters()))


def test_newton_schulz_orthogonalizes_like_svd():
    g = torch.randn(48, 24, generator=torch.Generator().manual_seed(0))
    x = newton_schulz_orthogonalize(g)
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    core = u.T @ x @ vh.T  # U^T X V: diagonal iff X shares G's singular vectors
    assert (core - torch.diag(torch.diagonal(core))).abs().max() < 1e-4
    # The quintic trades exactness for speed: singular values land in about [0.68, 1.13].
    singular = torch.linalg.svdvals(x)
    assert singular.min() > 0.6 and singular.max() < 1.2


def _tiny_untied() -> Transformer:
    torch.manual_seed(0)
    # Untied head: a decayed matrix outside the blocks, so Muon leaves it to AdamW.
    return Transformer(ModelConfig.from_preset("tiny", **TINY, tie_embeddings=False))


def test_muon_weight_decay_is_the_adamw_groups_decay():
    """Zero gradients make the Muon update exactly 0 (momentum 0, and the orthogonalisation of
    a zero matrix is 0), so one step is pure decoupled decay: every Muon matrix shrinks by
    1 - lr*wd, the same factor as the AdamW-handled head. (Muon's own lr 0.02 decayed by 2e-3.)"""
    assert torch.equal(newton_schulz_orthogonalize(torch.zeros(48, 24)), torch.zeros(48, 24))
    lr, wd = 1e-3, 0.1
    model = _tiny_untied()
    opt = build_optimizer(model, OptimizerSection(name="muon", lr=lr, weight_decay=wd), "cpu")
    muon = {id(p) for g in opt.param_groups if g["use_muon"] for p in g["params"]}
    matrices = {n: p for n, p in model.named_parameters() if p.dim() == 2 and "emb" not in n}
    assert id(matrices["lm_head.weight"]) not in muon and len(muon) == len(matrices) - 1
    before = {n: p.detach().clone() for n, p in matrices.items()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in matrices.items():
        assert torch.equal(p, before[n] * (1 - lr * wd)), n


def test_muon_update_rms_matches_adamw_scale():
    """Moonlight's scaling (arXiv:2502.16982, sec. 2.2): the change of a Muon matrix has
    per-element RMS 0.2*lr, whatever its shape. Newton-Schulz leaves singular values in about
    [0.7, 1.2] instead of 1, so the RMS is 0.2*lr*sqrt(mean(s^2)): accept 0.13..0.26 * lr.
    (The old scaling with Muon's own lr 0.02 gave ~0.0032 = 3.2*lr here.)"""
    lr = 1e-3
    model = _tiny_untied()
    opt = build_optimizer(model, OptimizerSection(name="muon", lr=lr, weight_decay=0.0), "cpu")
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)
    params = dict(model.named_parameters())
    names = ["blocks.0.attn.out.weight", "blocks.0.attn.qkv.weight",  # 32x32, 64x32
             "blocks.0.mlp.gate.weight", "blocks.0.mlp.proj.weight"]  # 384x32, 32x384
    assert len({params[n].shape for n in names}) == 4
    before = {n: params[n].detach().clone() for n in names}
    opt.step()
    for n in names:
        rms = (params[n] - before[n]).pow(2).mean().sqrt().item()
        assert 0.13 * lr < rms < 0.26 * lr, (n, rms / lr)


@pytest.mark.parametrize("name", ["adamw", "muon", "torch-adamw"])
def test_tiny_model_overfits_one_batch(name):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny", **TINY))
    opt = build_optimizer(model, OptimizerSection(name=name, lr=1e-2, weight_decay=0.0), "cpu")
    if name == "muon":  # Muon takes exactly the blocks' matrices; AdamW the rest
        muon = {id(p) for g in opt.param_groups if g["use_muon"] for p in g["params"]}
        assert muon == {id(p) for n, p in model.named_parameters()
                        if n.startswith("blocks.") and p.dim() == 2}
    x = torch.randint(0, 96, (4, 17), generator=torch.Generator().manual_seed(0))
    for _ in range(60):
        loss = model(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    assert loss.item() < 0.02


@pytest.mark.parametrize("max_norm", [0.05, 1e6])
def test_clipping_matches_torch(max_norm):
    ours, ref = _net(), _net()
    idx = torch.arange(6) % 10
    for model in (ours, ref):
        model(idx).pow(2).sum().backward()
    norm_ours = clip_grad_norm_(ours.parameters(), max_norm)
    norm_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
    torch.testing.assert_close(norm_ours, norm_ref, atol=1e-6, rtol=1e-6)
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-7, rtol=1e-6)


def test_cosine_schedule_values():
    cfg = ScheduleSection(kind="cosine", warmup_steps=10, min_lr_ratio=0.1)
    total = 110
    f = lambda step: lr_factor(cfg, step, step / total, 10 / total)  # noqa: E731
    assert f(0) == pytest.approx(0.1)  # 1/10 of the way up
    assert f(9) == pytest.approx(1.0)  # warmup ends at the peak
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay: cos(pi/2)=0
    assert f(35) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)  # after the end


def test_wsd_schedule_values():
    cfg = ScheduleSection(kind="wsd", warmup_steps=4, min_lr_ratio=0.0, decay_fraction=0.2)
    f = lambda step: lr_factor(cfg, step, step / 100, 0.04)  # noqa: E731
    assert [f(s) for s in (1, 3)] == pytest.approx([0.5, 1.0])
    assert f(50) == 1.0 and f(80) == 1.0  # stable until the last 20%
    assert f(90) == pytest.approx(0.5) and f(100) == pytest.approx(0.0) and f(130) == 0.0


def test_time_budget_schedule_decays_to_min_at_the_end():
    """With a wall-clock budget progress is elapsed/budget, so min_lr is reached exactly
    when time runs out, whatever the step count by then."""
    cfg = ScheduleSection(kind="cosine", warmup_steps=5, min_lr_ratio=0.2)
    warmup_end = 0.013  # progress measured when the 5th step finished
    assert lr_factor(cfg, 5, warmup_end, warmup_end) == pytest.approx(1.0)
    assert lr_factor(cfg, 777, 1.0, warmup_end) == pytest.approx(0.2)
    assert 0.2 < lr_factor(cfg, 300, 0.5, warmup_end) < 1.0
