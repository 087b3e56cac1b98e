"""Linear layers through oneDNN without gradients (scratchlm.model.onednn): the operator that
runs in each mode, outputs within float32 rounding of F.linear's, training untouched."""

from __future__ import annotations

import pytest
import torch

from scratchlm.model import ModelConfig, Transformer
from scratchlm.model.onednn import ONEDNN_LINEAR, route_linears_through_onednn

pytestmark = pytest.mark.skipif(not ONEDNN_LINEAR, reason="this PyTorch build has no oneDNN linear "
                                                          "(not x86, or built without oneDNN)")


def _operators(run) -> set[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    return {event.name for event in prof.events()}


def _model(bias: bool) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_preset("tiny", vocab_size=97, context_length=16, d_model=32, n_layers=2,
                                               n_heads=4, n_kv_heads=2, d_ff=64, bias=bias, mlp="gelu" if bias
                                               else "swiglu"))


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_without_gradients_the_linears_run_in_onednn_with_the_same_outputs(bias):
    model = _model(bias)
    ids = torch.randint(0, 97, (3, 16))
    with torch.no_grad():
        reference = model(ids)
    assert route_linears_through_onednn(model)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            names = _operators(lambda: model(ids))
            logits = model(ids)
        assert "mkldnn::_linear_pointwise" in names and "aten::linear" not in names
        torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)  # float32 summation order


def test_training_the_routed_model_is_training_the_plain_one():
    plain, routed = _model(False), _model(False)
    route_linears_through_onednn(routed)
    ids, targets = torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16))
    names = _operators(lambda: routed(ids, targets=targets).backward())
    assert "aten::linear" in names and "mkldnn::_linear_pointwise" not in names
    plain(ids, targets=targets).backward()
    for (name, a), b in zip(plain.named_parameters(), routed.parameters()):
        assert torch.equal(a.grad, b.grad), name  # the very same kernels: identical gradients
