"""`scratchlm plan`: Chinchilla sizing checked against hand-computed numbers."""

from __future__ import annotations

import math

import pytest

from scratchlm.cli import main
from scratchlm.errors import ScratchLMError
from scratchlm.model import count_params, plan
from scratchlm.model.plan import fitted_loss, fitted_optimum
from scratchlm.model.report import parse_quantity

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
