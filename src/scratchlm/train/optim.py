"""Optimizers written out: AdamW, Muon (+AdamW for the rest), and global-norm clipping.

Both optimizers subclass `torch.optim.Optimizer` only to inherit its bookkeeping
(param_groups, state_dict/load_state_dict); the update rules are written here.
Every group carries `base_lr`; the schedule scales `lr` by one factor for all groups. Muon's
update is scaled to AdamW's update size, so all groups share one learning rate and one decay.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from scratchlm.train.config import OptimizerSection


def adamw_update_(param: torch.Tensor, grad: torch.Tensor, state: dict, lr: float,
                  beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """One AdamW step on one tensor, in place (Loshchilov & Hutter 2019).

    Decoupled weight decay: the parameter shrinks by lr*wd directly instead of adding wd*p
    to the gradient, so decay does not pass through Adam's per-coordinate scaling.
    """
    if not state:
        state["step"] = torch.zeros((), dtype=torch.float32)
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    state["step"] += 1
    step = state["step"].item()
    m, v = state["exp_avg"], state["exp_avg_sq"]
    param.mul_(1 - lr * weight_decay)
    m.lerp_(grad, 1 - beta1)  # m = beta1*m + (1-beta1)*g
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    # Bias correction: m and v start at zero, so early averages are too small by these factors.
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    denom = (v.sqrt() / math.sqrt(bias_correction2)).add_(eps)
    param.addcdiv_(m, denom, value=-lr / bias_correction1)


class AdamW(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01) -> None:
        defaults = dict(lr=lr, base_lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ARG002 - the torch.optim signature
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is not None:
                    adamw_update_(p, p.grad, self.state[p], group["lr"], beta1, beta2,
                                  group["eps"], group["weight_decay"])


# Coefficients of the quintic iteration from Keller Jordan's Muon: chosen to push all singular
# values towards 1 as fast as possible from the normalised start, at the cost of converging
# to roughly [0.7, 1.2] instead of exactly 1 (which is enough for an update direction).
_NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz_orthogonalize(grad: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximate U V^T of G = U S V^T with a few matrix products (no SVD).

    `grad` is one matrix or a stack of same-shaped matrices (..., rows, cols): a stack is
    orthogonalised matrix by matrix in one batched product per iteration, so a model's
    many equal-shaped weights cost a few large launches instead of many small ones."""
    a, b, c = _NS_COEFFS
    # bf16 halves the matmul cost on GPU and the iteration is robust to it; CPUs without
    # fast bf16 matmuls run it in fp32.
    dtype = torch.bfloat16 if grad.is_cuda else torch.float32
    x = grad.to(dtype)
    transposed = x.size(-2) > x.size(-1)
    if transposed:  # iterate on the smaller Gram matrix X X^T
        x = x.mT
    # Each matrix's spectral norm <= its Frobenius norm = 1: inside the basin.
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + 1e-7)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    if transposed:
        x = x.mT
    return x.to(grad.dtype)


# Per-element RMS that Moonlight gives Muon's update to match AdamW's (arXiv:2502.16982,
# sec. 2.2); its 0.2*sqrt(max(rows, cols)) factor is applied in Muon._muon_update.
_MOONLIGHT_RMS = 0.2


class Muon(torch.optim.Optimizer):
    """Muon for hidden 2-D weights (groups with use_muon=True), AdamW for every other group.

    Muon: SGD momentum (Nesterov), then the update is replaced by its orthogonalisation, so
    every direction of the weight matrix moves by a similar amount.

    Update scale follows Moonlight (Liu et al. 2025, "Muon is Scalable for LLM Training",
    arXiv:2502.16982, sec. 2.2, "consistent update RMS"): an orthogonal rows x cols matrix has
    per-element RMS 1/sqrt(max(rows, cols)), so multiplying by 0.2*sqrt(max(rows, cols)) gives
    RMS ~0.2, the size of a typical AdamW update. With updates of the same size, Muon matrices
    take the AdamW groups' learning rate and decoupled weight decay (p *= 1 - lr*wd) unchanged;
    torch.optim.Muon(adjust_lr_fn="match_rms_adamw") applies the same rule. Keller Jordan's
    original scaling (sqrt(max(1, rows/cols)), RMS ~1/sqrt(cols)) needs its own lr (~0.02), and
    decoupled decay at that lr shrank weights 67x faster per step than the AdamW groups at 3e-4.
    """

    def __init__(self, param_groups: list[dict], lr: float, momentum: float, ns_steps: int,
                 betas: tuple[float, float], eps: float, weight_decay: float) -> None:
        defaults = dict(lr=lr, base_lr=lr, momentum=momentum, ns_steps=ns_steps, betas=betas,
                        eps=eps, weight_decay=weight_decay, use_muon=False)
        super().__init__(param_groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ARG002
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if group["use_muon"]:
                for same_shape in _by_shape(params):
                    self._muon_update(same_shape, group)
                continue
            beta1, beta2 = group["betas"]
            for p in params:
                adamw_update_(p, p.grad, self.state[p], group["lr"], beta1, beta2,
                              group["eps"], group["weight_decay"])

    def _muon_update(self, params: list[torch.Tensor], group: dict) -> None:
        """One Muon step for same-shaped matrices: orthogonalised together as one stack, the
        elementwise parts as multi-tensor (foreach) kernels."""
        for p in params:
            if not self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)
        grads = [p.grad for p in params]
        buffers, momentum = [self.state[p]["momentum_buffer"] for p in params], group["momentum"]
        torch._foreach_lerp_(buffers, grads, 1 - momentum)
        updates = torch._foreach_lerp(grads, buffers, momentum)  # Nesterov: look one momentum step ahead
        orthogonal = newton_schulz_orthogonalize(torch.stack(updates), group["ns_steps"])
        rows, cols = params[0].shape
        orthogonal *= _MOONLIGHT_RMS * max(rows, cols) ** 0.5  # RMS ~0.2, like AdamW
        torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
        torch._foreach_add_(params, list(orthogonal.unbind()), alpha=-group["lr"])


def _by_shape(params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """`params` grouped by shape, each group in its original order."""
    groups: dict[torch.Size, list[torch.Tensor]] = {}
    for p in params:
        groups.setdefault(p.shape, []).append(p)
    return list(groups.values())


def split_decay_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(decay, no_decay): matrices decay; norms, biases and embeddings do not.

    Decaying a norm's gain or a bias pulls it towards 0, which is not a simpler model; an
    embedding row only gets gradient when its token appears, so decay would erase rare tokens.
    A tied output head shares the embedding tensor and is counted once, as an embedding.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if p.dim() < 2 or id(p) in embeddings else decay).append(p)
    return decay, no_decay


def hidden_matrices(model: nn.Module) -> set[int]:
    """ids of the 2-D weights inside the transformer blocks: the ones Muon handles.
    Embeddings and the output head stay with AdamW (Muon's orthogonal update suits
    hidden linear maps, not lookup tables or the logit projection), and so do LoRA's
    low-rank factors (an orthogonalised update of a rank-r factor is not LoRA's method)."""
    from scratchlm.model.lora import is_adapter_key

    return {id(p) for name, p in model.blocks.named_parameters() if p.dim() == 2 and not is_adapter_key(name)}


def build_optimizer(model: nn.Module, cfg: OptimizerSection, device_type: str
                    ) -> torch.optim.Optimizer:
    decay, no_decay = split_decay_params(model)
    betas = (cfg.beta1, cfg.beta2)
    if cfg.name == "muon":
        muon_ids = hidden_matrices(model)
        groups = [
            dict(params=[p for p in decay if id(p) in muon_ids], use_muon=True),
            dict(params=[p for p in decay if id(p) not in muon_ids]),
            dict(params=no_decay, weight_decay=0.0),
        ]
        return Muon([g for g in groups if g["params"]], lr=cfg.lr, momentum=cfg.muon_momentum,
                    ns_steps=cfg.muon_ns_steps, betas=betas, eps=cfg.eps,
                    weight_decay=cfg.weight_decay)
    groups = [dict(params=decay), dict(params=no_decay, weight_decay=0.0)]
    if cfg.name == "torch-adamw" or device_type == "cuda":
        # torch's fused kernel (CUDA and CPU): one launch for all tensors instead of ~10 per
        # tensor, the same update rule as AdamW above (tests/test_train_optim.py compares
        # them), and it can skip a non-finite step on the device (step_unless_non_finite).
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps,
                                weight_decay=cfg.weight_decay, fused=True)
        for group in opt.param_groups:
            group["base_lr"] = cfg.lr
        return opt
    return AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


def step_unless_non_finite(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor) -> None:
    """Apply the update unless `found_inf` (a 0-d float tensor, 1 for a non-finite loss or
    gradient norm) is set. torch's fused optimizers read it on the device (GradScaler's
    protocol: the `found_inf` attribute), so the step needs no host sync; the others are
    decided on the host, a sync that costs nothing on a CPU (no queued device work), and
    Muon's per-step price on a GPU."""
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = found_inf
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif not found_inf.item():
        optimizer.step()


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale all gradients so their global L2 norm is at most max_norm; return the norm
    before clipping (non-finite if any gradient is).

    Same rule as torch.nn.utils.clip_grad_norm_ (coefficient max_norm / (norm + 1e-6),
    capped at 1). FSDP2 gradients are DTensor shards that partition each tensor, so the
    local sums of squares add up across processes with one all-reduce.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    local = [_local(g) for g in grads]
    # foreach: one multi-tensor kernel for all the norms, one for all the scalings.
    norms = torch._foreach_norm(local, dtype=torch.float32)
    norm_sq = torch.stack(norms).pow(2).sum()
    if _is_sharded(grads[0]):
        torch.distributed.all_reduce(norm_sq)
    total = norm_sq.sqrt()
    if max_norm > 0:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        torch._foreach_mul_(local, coef.to(local[0].device))
    return total


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if _is_sharded(t) else t


def _is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)
