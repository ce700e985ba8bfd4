"""Surrogate gradients: a Heaviside step forward, a smooth derivative backward."""

from __future__ import annotations

import torch


class SigmoidSurrogate(torch.autograd.Function):
    """Heaviside step whose backward pass is the derivative of ``sigmoid(alpha * x)``.

    The forward output is exactly 0 or 1; the backward pass uses
    ``alpha * s * (1 - s)`` with ``s = sigmoid(alpha * x)`` (spikingjelly's default with
    ``alpha = 4``).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, alpha: float) -> torch.Tensor:  # noqa: D102
        ctx.save_for_backward(x)
        ctx.alpha = alpha
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: D102
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(ctx.alpha * x)
        return grad_out * ctx.alpha * s * (1 - s), None


def heaviside(x: torch.Tensor, alpha: float = 4.0) -> torch.Tensor:
    """Spike where ``x >= 0``; gradients flow through the sigmoid surrogate."""
    return SigmoidSurrogate.apply(x, alpha)
