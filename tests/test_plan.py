"""`scratchlm plan`: Chinchilla sizing checked against hand-computed numbers."""

from __future__ import annotations

import math

import pytest

from scratchlm.cli import main
from scratchlm.errors import ScratchLMError
from scratchlm.model import count_params, plan
from scratchlm.model.plan import SHAPE_TOLERANCE, fitted_loss, fitted_optimum
from scratchlm.model.report import parse_quantity, plan_table, significant

CHINCHILLA_FLOPS = 6 * 70e9 * 1.4e12  # = 5.88e23: Chinchilla's own 70B params x 1.4T tokens


def test_chinchilla_point_with_the_20_tokens_rule():
    p = plan(flops=CHINCHILLA_FLOPS)
    assert p.compute_flops == pytest.approx(5.88e23)
    assert p.chinchilla_params == pytest.approx(70e9, rel=1e-9)
    assert p.chinchilla_tokens == pytest.approx(1.4e12, rel=1e-9)


def test_fitted_law_optimum_by_hand_and_by_search():
    # By hand: G = (0.34 * 406.4 / (0.28 * 410.7))^(1/0.62) = 1.3448;
    # N = G * (9.8e22)^(0.28/0.62) = 3.249e10, D = C / (6 N) = 3.016e12.
    n_opt, d_opt = fitted_optimum(CHINCHILLA_FLOPS)
    assert n_opt == pytest.approx(3.249e10, rel=1e-3)
    assert d_opt == pytest.approx(3.016e12, rel=1e-3)
    # Independently: scan N on a fine log grid along C = 6 N D for the smallest fitted loss.
    grid = [10 ** (9 + i / 2000) for i in range(4001)]  # 1e9 .. 1e11
    best = min(grid, key=lambda n: fitted_loss(n, CHINCHILLA_FLOPS / (6 * n)))
    assert n_opt == pytest.approx(best, rel=2e-3)
    # E + A/N^a + B/D^b at the optimum.
    expected_loss = 1.69 + 406.4 / n_opt ** 0.34 + 410.7 / d_opt ** 0.28
    assert plan(flops=CHINCHILLA_FLOPS).fitted_loss == pytest.approx(expected_loss)


def test_budget_from_gpu_hours_and_training_time():
    # 1000 H100-hours at 40% MFU: 1000 * 3600 s * 989.4e12 FLOP/s * 0.4.
    p = plan(gpu_hours=1000, gpu="H100", mfu=0.4, gpus=8)
    assert p.compute_flops == pytest.approx(1000 * 3600 * 989.4e12 * 0.4)
    assert p.training_seconds == pytest.approx(1000 * 3600 / 8)  # the same hours over 8 GPUs
    assert p.chinchilla_params == pytest.approx(math.sqrt(p.compute_flops / 120))


def test_budget_from_model_size():
    p = plan(params=124e6, gpu="A100", mfu=0.5, gpus=1)
    assert p.compute_flops == pytest.approx(6 * 124e6 * 2.48e9)
    assert p.chinchilla_tokens == pytest.approx(2.48e9)
    assert p.training_seconds == pytest.approx(6 * 124e6 * 2.48e9 / (312e12 * 0.5))
    # The shape used for memory is GPT-2-small-like: 12 layers of width 768.
    assert (p.model_shape.n_layers, p.model_shape.d_model) == (12, 768)
    assert count_params(p.model_shape).total == pytest.approx(124e6, rel=0.05)


def test_fsdp_shards_the_model_states():
    p = plan(params=7e9, gpus=8, micro_batch=1)
    for name in ("weights", "gradients", "optimizer"):
        assert p.memory_fsdp[name] == pytest.approx(p.memory_ddp[name] / 8)
    n = count_params(p.model_shape).total
    assert p.memory_ddp["weights"] + p.memory_ddp["gradients"] + p.memory_ddp["optimizer"] == 16 * n
    assert p.memory_ddp["total"] > p.gpu_memory_bytes > p.memory_fsdp["total"]  # 7B: only FSDP fits an H100


@pytest.mark.parametrize("kwargs, message", [
    (dict(flops=1e20, params=1e9), "exactly one"),
    (dict(), "exactly one"),
    (dict(flops=-1.0), "flops must be > 0"),
    (dict(flops=1e20, mfu=1.5), "mfu"),
    (dict(flops=1e20, gpu="abacus"), "unknown GPU"),
])
def test_bad_plans_are_rejected(kwargs, message):
    with pytest.raises(ScratchLMError, match=message):
        plan(**kwargs)


def test_quantities():
    assert parse_quantity("5.88e23", "x") == 5.88e23
    assert parse_quantity("124M", "x") == 124e6
    assert parse_quantity("1.4t", "x") == 1.4e12
    with pytest.raises(ScratchLMError, match="--flops: cannot read"):
        parse_quantity("lots", "--flops")


def test_cli_prints_the_table(capsys):
    assert main(["plan", "--flops", "5.88e23", "--gpus", "64"]) == 0
    out = capsys.readouterr().out
    assert "N = 70B params, D = 1.4T tokens" in out
    assert "FSDP x64" in out
    assert main(["plan", "--params", "big"]) == 1
    assert "scratchlm: error: --params: cannot read 'big'" in capsys.readouterr().err


def test_a_size_below_the_embedding_alone_is_rejected(capsys):
    # 1M parameters with GPT-2's vocabulary: the smallest shape (1 layer, d_model 64) already has
    # 50,257 x 64 = 3.2M embedding parameters (tied), 3.27M in all.
    message = ("no model shape near 1M parameters with a 50,257-token vocabulary: the smallest "
               "(1 layer, d_model 64) has 3.27M, mostly embedding; lower --vocab-size")
    with pytest.raises(ScratchLMError) as excinfo:
        plan(params=1e6)
    assert str(excinfo.value) == message
    assert main(["plan", "--params", "1M"]) == 1
    assert capsys.readouterr().err == f"scratchlm: error: {message}\n"
    # With a smaller vocabulary the same size is reachable, and the shape is about that size.
    p = plan(params=1e6, vocab_size=4096)
    assert count_params(p.model_shape).total == pytest.approx(1e6, rel=SHAPE_TOLERANCE)


def test_a_size_beyond_the_largest_shape_is_rejected():
    with pytest.raises(ScratchLMError, match=r"near 100T parameters .* the closest \(256 layers, d_model 16384\)"):
        plan(params=100e12)


@pytest.mark.parametrize("n_params, vocab_size", [(4.6e6, 50257), (5e6, 50257), (3e6, 32000),
                                                   (300e3, 2048), (200e3, 256)])
def test_small_sizes_between_the_preferred_shapes_get_a_near_shape(n_params, vocab_size):
    # The d_model = 64 * n_layers line jumps 3.27M -> 6.86M at 50,257 tokens and 70K -> 459K at
    # 256 tokens; these sizes fall in such gaps and are met by the finer fallback grid.
    shape = plan(params=n_params, vocab_size=vocab_size).model_shape
    assert count_params(shape).total == pytest.approx(n_params, rel=SHAPE_TOLERANCE)
    assert 16 <= shape.d_model / shape.n_layers <= 256


def test_tiny_budgets_show_significant_figures(capsys):
    # 5M params x 100M tokens: C = 3e15 FLOPs; on 8 H100s at 40% MFU that is
    # 3e15 / (8 x 989.4e12 x 0.4) = 0.948 s, i.e. 0.948 x 8 / 3600 = 0.00211 GPU-hours.
    table = plan_table(plan(params=5e6, gpus=8))
    assert "0.948 seconds on 8 x H100 at 40% MFU (0.00211 GPU-hours)" in table
    assert main(["plan", "--params", "5M"]) == 0
    assert "(0.00211 GPU-hours)" in capsys.readouterr().out
    assert [significant(x) for x in (0.0, 0.002106, 2.5, 99.94, 267.4, 1234.0, 412_919.7)] == [
        "0", "0.00211", "2.5", "99.9", "267", "1,230", "413,000"]


@pytest.mark.parametrize("argv", [["--gpu-hours", "-5"], ["--gpu-hours=-5"]])
def test_negative_budgets_name_the_option(argv, capsys):
    assert parse_quantity("-5", "--gpu-hours") == -5.0
    assert parse_quantity("+1.5K", "--flops") == 1500.0
    with pytest.raises(ScratchLMError, match=r"^--gpu-hours must be > 0, got -5$"):
        plan(gpu_hours=-5.0)
    assert main(["plan", *argv]) == 1
    assert capsys.readouterr().err == "scratchlm: error: --gpu-hours must be > 0, got -5\n"


@pytest.mark.parametrize("argv, message", [
    (["--params", "0"], "--params must be > 0, got 0"),
    # "=": argparse takes "-1e20" after a space for an option (only plain "-5" reads as a number).
    (["--flops=-1e20"], "--flops must be > 0, got -1e+20"),
    (["--params", "124M", "--micro-batch", "0"], "--micro-batch must be >= 1, got 0"),
    (["--params", "124M", "--gpus", "0"], "--gpus must be >= 1, got 0"),
    (["--params", "124M", "--mfu", "1.5"], "--mfu must be in (0, 1], got 1.5"),
])
def test_out_of_range_options_are_named(argv, message, capsys):
    assert main(["plan", *argv]) == 1
    assert capsys.readouterr().err == f"scratchlm: error: {message}\n"
