"""The GPU-side training paths, checked on the CPU: the fused AdamW the loop uses on CUDA
against our per-tensor AdamW, its on-device skip of non-finite steps, Muon's batched
Newton-Schulz against the one-matrix iteration, the batch prefetcher, TF32 flags, the
meta-device initialisation and FSDP2 with a bf16 MixedPrecisionPolicy (one gloo process)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from scratchlm.model import ModelConfig, Transformer
from scratchlm.train.config import OptimizerSection
from scratchlm.train.distributed import DistContext, allow_tf32, fully_shard_model, materialize
from scratchlm.train.optim import (AdamW, Muon, build_optimizer, newton_schulz_orthogonalize,
                                   step_unless_non_finite)
from scratchlm.train.prefetch import Prefetcher
from tests.test_train_fixtures import single_thread, tiny_config, train_corpus  # noqa: F401

TINY = dict(vocab_size=96, context_length=16, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2)


def _model(preset: str = "llama-124m") -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_preset(preset, **TINY))


def _backward(model: Transformer, gen: torch.Generator) -> None:
    idx = torch.randint(0, TINY["vocab_size"], (4, TINY["context_length"] + 1), generator=gen)
    model(idx[:, :-1], idx[:, 1:]).backward()


def test_fused_adamw_matches_our_adamw_over_steps_with_the_projects_groups():
    """build_optimizer's CUDA choice (torch's fused AdamW; its CPU kernel runs here) against
    our per-tensor AdamW with the same decay/no-decay groups and a changing learning rate,
    fed the same gradients (taken at our weights) for 10 steps. Tolerance 1e-6 absolute on
    weights of scale 0.02-1: the two differ only in fp32 rounding (bias correction computed
    in another order)."""
    cfg = OptimizerSection(lr=1e-2, weight_decay=0.1)
    ours, fused = _model("gpt2-124m"), _model("gpt2-124m")  # biases and LayerNorms: both groups used
    opt_ours, opt_fused = build_optimizer(ours, cfg, "cpu"), build_optimizer(fused, cfg, "cuda")
    assert isinstance(opt_ours, AdamW) and opt_fused.defaults["fused"]
    assert [len(g["params"]) for g in opt_ours.param_groups] == [len(g["params"]) for g in opt_fused.param_groups]
    assert [g["weight_decay"] for g in opt_fused.param_groups] == [0.1, 0.0]
    gen = torch.Generator().manual_seed(1)
    for step in range(10):
        opt_ours.zero_grad(set_to_none=True)
        _backward(ours, gen)
        for p, q in zip(ours.parameters(), fused.parameters()):
            q.grad = p.grad.clone()
        for opt in (opt_ours, opt_fused):
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * (step + 1) / 10
            step_unless_non_finite(opt, torch.zeros(()))
    for (name, p), q in zip(ours.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize("name", ["adamw", "torch-adamw", "muon"])
def test_a_non_finite_step_leaves_weights_and_state_untouched(name):
    """step_unless_non_finite with found_inf=1: on the device for the fused optimizer, on
    the host for ours; either way the next finite step continues as if the bad one never
    happened (same weights as a run without it)."""
    cfg = OptimizerSection(name=name, lr=1e-2)
    skipping, clean = _model(), _model()
    opt_skip, opt_clean = build_optimizer(skipping, cfg, "cpu"), build_optimizer(clean, cfg, "cpu")
    gen = torch.Generator().manual_seed(2)
    _backward(skipping, copy.deepcopy(gen))
    _backward(clean, copy.deepcopy(gen))
    step_unless_non_finite(opt_skip, torch.zeros(()))
    step_unless_non_finite(opt_clean, torch.zeros(()))
    for p in skipping.parameters():  # a poisoned step: must change nothing
        p.grad = torch.full_like(p, float("nan"))
    step_unless_non_finite(opt_skip, torch.ones(()))
    for model, opt in ((skipping, opt_skip), (clean, opt_clean)):
        opt.zero_grad(set_to_none=True)
        _backward(model, copy.deepcopy(gen))
        step_unless_non_finite(opt, torch.zeros(()))
    for p, q in zip(skipping.parameters(), clean.parameters()):
        assert torch.equal(p, q)


def test_batched_newton_schulz_equals_one_matrix_at_a_time():
    """Tolerance 1e-5 (fp32): a batched product may sum in another order than single ones."""
    gen = torch.Generator().manual_seed(3)
    for shape in ((4, 24, 40), (3, 40, 24)):  # wide and tall (the transposed branch)
        grads = torch.randn(shape, generator=gen)
        batched = newton_schulz_orthogonalize(grads)
        for grad, got in zip(grads, batched):
            torch.testing.assert_close(got, newton_schulz_orthogonalize(grad), atol=1e-5, rtol=0)


def test_muon_batched_step_equals_per_matrix_reference():
    """Muon's step (same-shaped matrices orthogonalised as one stack) against the update
    written out per matrix (Nesterov momentum, Newton-Schulz, Moonlight scale, decay)."""
    model = _model()
    cfg = OptimizerSection(name="muon", lr=1e-2, weight_decay=0.1)
    opt = build_optimizer(model, cfg, "cpu")
    assert isinstance(opt, Muon)
    muon_group = next(g for g in opt.param_groups if g["use_muon"])
    assert len({p.shape for p in muon_group["params"]}) < len(muon_group["params"])  # stacks form
    expected, buffers = {}, {}
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        _backward(model, gen)
        for p in muon_group["params"]:
            buf = buffers.setdefault(p, torch.zeros_like(p)).lerp_(p.grad, 1 - cfg.muon_momentum)
            update = newton_schulz_orthogonalize(p.grad.lerp(buf, cfg.muon_momentum), cfg.muon_ns_steps)
            update = update * 0.2 * max(p.shape) ** 0.5
            expected[p] = p.detach() * (1 - cfg.lr * cfg.weight_decay) - cfg.lr * update
        opt.step()
        for p in muon_group["params"]:
            torch.testing.assert_close(p.detach(), expected[p], atol=1e-6, rtol=0)


def test_prefetcher_yields_the_same_batches_in_order_and_checkpoints_the_unconsumed_state():
    class Counter:  # a loader whose state is how many batches it gave
        def __init__(self):
            self.given = 0

        def draw(self):
            self.given += 1
            return [(torch.full((2, 3), self.given), torch.full((2, 3), -self.given))]

        def state(self):
            return {"given": self.given}

    plain, ahead = Counter(), Counter()
    prefetcher = Prefetcher(ahead.draw, ahead.state, torch.device("cpu"))
    assert not prefetcher._pin  # pinned memory only for CUDA
    assert Prefetcher(ahead.draw, ahead.state, torch.device("cuda"))._pin
    for _ in range(5):
        expected, (host, got) = plain.draw(), prefetcher.next()
        for batches in (host, got):
            assert all(torch.equal(a, b) for e, g in zip(expected, batches) for a, b in zip(e, g))
        # The loader has drawn one step further; a checkpoint gets the state of what was used.
        assert ahead.given == plain.given + 1 and prefetcher.state_dict() == plain.state()


def test_tf32_is_enabled_for_cuda_only():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        allow_tf32(torch.device("cpu"))
        assert not torch.backends.cuda.matmul.allow_tf32
        allow_tf32(torch.device("cuda"))  # sets flags only: no GPU needed
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _meta_model(preset: str) -> Transformer:
    with torch.device("meta"):
        return Transformer(ModelConfig.from_preset(preset, **TINY))


def _initialised(preset: str, seed: int) -> dict[str, torch.Tensor]:
    """The reference: a meta model given weights by init_weights on the CPU, unsharded."""
    model = _meta_model(preset)
    materialize(model, torch.device("cpu"), seed)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def one_process_group(tmp_path):
    """A gloo group of one process, as FSDP2 needs (the benchmark's FSDP2 smoke test uses
    the same)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield DistContext(0, 0, 1, torch.device("cpu"))
    dist.destroy_process_group()


@pytest.mark.parametrize("preset", ["llama-124m", "gpt2-124m"])
def test_sharded_meta_init_equals_unsharded_init_bit_for_bit(one_process_group, preset):
    """FSDP2 parameters filled by materialize: each tensor drawn whole on the CPU from the
    same seed, so the values equal the unsharded model's exactly (tied embeddings too)."""
    expected = _initialised(preset, seed=7)
    model = fully_shard_model(_meta_model(preset), one_process_group)
    materialize(model, torch.device("cpu"), seed=7)
    assert not any(p.is_meta for p in model.parameters())
    got = {k: v.full_tensor() for k, v in model.state_dict().items()}
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    assert (model.lm_head.weight is model.tok_emb.weight) == model.config.tie_embeddings


def test_fsdp2_step_with_bf16_mixed_precision_policy(one_process_group):
    """A training step through FSDP2 with MixedPrecisionPolicy(bf16 compute, fp32 reduce):
    the forward runs in bf16, the sharded master weights and their gradients stay fp32, the
    loss matches the same step of an unsharded bf16 copy to bf16 precision (2e-2), and the
    fused AdamW skips a non-finite step on the sharded (DTensor) weights."""
    model = fully_shard_model(_meta_model("llama-124m"), one_process_group, param_dtype=torch.bfloat16)
    materialize(model, torch.device("cpu"), seed=0)
    reference = _meta_model("llama-124m")
    materialize(reference, torch.device("cpu"), seed=0)
    opt = build_optimizer(model, OptimizerSection(), "cuda")  # the GPU's choice: fused, on DTensors
    idx = torch.randint(0, TINY["vocab_size"], (2, TINY["context_length"] + 1), generator=torch.Generator().manual_seed(5))
    loss = model(idx[:, :-1], idx[:, 1:])
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    expected = reference.to(torch.bfloat16)(idx[:, :-1], idx[:, 1:])
    torch.testing.assert_close(loss, expected.float(), atol=2e-2, rtol=0)
    before = model.lm_head.weight.full_tensor().clone()
    step_unless_non_finite(opt, torch.ones(()))  # skipped on the device: the sharded weights stay
    assert torch.equal(model.lm_head.weight.full_tensor(), before)
    step_unless_non_finite(opt, torch.zeros(()))
    assert not torch.equal(model.lm_head.weight.full_tensor(), before)


def test_the_loop_reads_figures_back_only_at_log_eval_and_checkpoint_steps(train_corpus, tmp_path, monkeypatch):  # noqa: F811
    """With the fused optimizer (the CUDA choice), a training step calls neither .item() nor
    .tolist(): nothing in it waits for the device. Figures come back at step 1, at log,
    evaluation and checkpoint steps and at the end only, and the logged records are those
    steps' own losses as before."""
    from scratchlm.train.config import config_from_dict
    from scratchlm.train.loop import Trainer, train

    reads, in_step = [], {"now": False}
    for name in ("item", "tolist"):
        original = getattr(torch.Tensor, name)

        def guarded(self, *args, _original=original, _name=name):
            assert not in_step["now"], f"train_step called .{_name}()"
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, guarded)
    train_step, read_back = Trainer.train_step, Trainer._read_back

    def step_watched(self):
        in_step["now"] = True
        try:
            return train_step(self)
        finally:
            in_step["now"] = False

    def read_back_watched(self, session):
        if session.pending is not None:
            reads.append(self.step)
        read_back(self, session)

    monkeypatch.setattr(Trainer, "train_step", step_watched)
    monkeypatch.setattr(Trainer, "_read_back", read_back_watched)
    config = config_from_dict(tiny_config(train_corpus, optimizer={"name": "torch-adamw"}, run={
        "max_steps": 13, "log_every": 5, "eval_every": 6, "checkpoint_every": 4, "sample_tokens": 0}))
    train(config, tmp_path)
    assert reads == [1, 4, 5, 6, 8, 10, 12, 13]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 5, 10]
    assert all(math.isfinite(r["loss"]) for r in records if r["kind"] == "train")
