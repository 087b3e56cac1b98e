"""Linear layers through oneDNN on x86 CPUs, for everything that runs a model without gradients
(decoding in the engine, scoring in eval).

`F.linear` on CPU calls MKL's GEMM. On the AMD EPYC machine our benchmarks ran on
(benchmarks/bench_linear.py, BENCHMARKS.md), MKL took 1.6x oneDNN's time for a GPT-2 layer
scoring 2048 tokens and 1.7x for its head, 1.6x for the 32-row products of a batched decoding
step of the `small` model, and 1.5x for one row (where the whole weight must be read). oneDNN's fused linear
(`torch.ops.mkldnn._linear_pointwise`) is the kernel torch.compile's CPU backend emits for the
same layers. Results agree to float32 rounding (~1e-5 relative, as between batch sizes).

Training is unchanged: the operator has no backward, so whenever a gradient is needed the
layer calls `F.linear` as usual.
"""

from __future__ import annotations

import platform
import types

import torch
import torch.nn as nn
import torch.nn.functional as F

# x86 builds with oneDNN have the operator; ARM builds route it through other libraries (not
# measured, not used).
ONEDNN_LINEAR = (platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()
                 and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def route_linears_through_onednn(model: nn.Module) -> bool:
    """Make `model`'s float32 CPU Linear layers compute through oneDNN when no gradient is
    needed (the model is otherwise unchanged, and still trains). False where the operator is
    missing (nothing changed)."""
    if not ONEDNN_LINEAR:
        return False
    for module in model.modules():
        if type(module) is nn.Linear:
            module.forward = types.MethodType(_linear_without_grad, module)
    return True


def _linear_without_grad(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if (x.dtype != torch.float32 or not x.is_cpu
            or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))):
        return F.linear(x, self.weight, self.bias)
    return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
