"""Normalisation layers: ``RMSNorm`` with a fast CPU path, and ``make_norm`` (RMSNorm or LayerNorm).

A module of its own so that ``attention.py`` (whose QK-norm defaults to RMSNorm) and ``layers.py``
(whose blocks use both norms) import it in one direction, without an import cycle between them.
The official InternVideo2 vision encoder uses RMSNorm with eps 1e-6 (arXiv 2403.15377, Sec. 3.1).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.autograd.function import once_differentiable

NormKind = Literal["rmsnorm", "layernorm"]


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm with a hand-written backward, for CPU tensors.

    torch has a fused RMSNorm kernel only on CUDA; on the CPU ``F.rms_norm`` is composite, about a
    dozen full-size elementwise passes forward and backward, each of them a parallel region, and it
    keeps two width-sized tensors per call for the backward pass. Here the forward is one reduction
    (``vector_norm``) and two multiplies, the backward seven passes (one a matrix-vector product), and
    only the input (plus one scalar per row) is kept, as a fused kernel does.
    The backward is not itself differentiable (``once_differentiable``: a double backward raises
    instead of returning a wrong second derivative). Measured in ``benchmarks/run.py``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
        d = x.shape[-1]
        rstd = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(d).add_(eps).rsqrt_()
        ctx.save_for_backward(x, rstd, weight)
        xhat = x * rstd
        return xhat if weight is None else xhat.mul_(weight)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, rstd, weight = ctx.saved_tensors
        d = x.shape[-1]
        xhat = x * rstd
        grad_weight = None
        if weight is None:
            # d/dx of x*rstd: rstd * (g - xhat * mean(g * xhat))
            dot = (grad * xhat).sum(dim=-1, keepdim=True)
            gw = grad.clone()
        else:
            gx_hat = grad * xhat
            dot = (gx_hat.reshape(-1, d) @ weight).reshape(*xhat.shape[:-1], 1)
            if ctx.needs_input_grad[1]:
                grad_weight = gx_hat.reshape(-1, d).sum(dim=0)
            gw = grad * weight
        grad_x = gw.addcmul_(xhat, dot, value=-1.0 / d).mul_(rstd)
        return grad_x, grad_weight, None


class RMSNorm(nn.RMSNorm):
    """``torch.nn.RMSNorm`` (same parameters and state dict) with a faster CPU path.

    float32/float64 tensors on the CPU go through :class:`_RMSNormFunction`; everything else
    (CUDA, where torch has a fused kernel; bf16/fp16, which the composite kernel computes in fp32)
    through torch's own implementation. Set ``RMSNorm.fast = False`` to compare the two.
    """

    fast: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            self.fast
            and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.float64)
            and (self.weight is None or self.weight.dtype == x.dtype)
            and len(self.normalized_shape) == 1
        ):
            eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
            return _RMSNormFunction.apply(x, self.weight, eps)
        return super().forward(x)


def make_norm(kind: NormKind, dim: int, eps: float | None = None) -> nn.Module:
    """RMSNorm (official large models, eps 1e-6) or LayerNorm (small models, eps 1e-6)."""
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps or 1e-6)
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps or 1e-6)
    raise ValueError(f"norm must be 'rmsnorm' or 'layernorm'; got {kind!r}")
