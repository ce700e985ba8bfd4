"""Spikformer-style multi-head Spiking Self-Attention (SSA) and its non-spiking twin."""

from __future__ import annotations

import torch
from torch import nn

from spikgpt.snn.neuron import LIF


def activation(spiking: bool, *, tau: float = 2.0, v_threshold: float = 1.0) -> nn.Module:
    """A LIF neuron, or its real-valued stand-in (ReLU) for the non-spiking twin."""
    return LIF(tau=tau, v_threshold=v_threshold) if spiking else nn.ReLU()


def linear_bn(x: torch.Tensor, linear: nn.Linear, bn: nn.BatchNorm1d) -> torch.Tensor:
    """Apply ``linear`` then ``bn`` to ``[..., D]`` inputs, folding all leading axes into the batch."""
    y = linear(x)
    return bn(y.reshape(-1, y.shape[-1])).reshape(y.shape)


class SpikingSelfAttention(nn.Module):
    """Multi-head Spiking Self-Attention over inputs shaped ``[T, B, N, D]``.

    With ``spiking=True`` (Spikformer): Q, K, V = LIF(BN(Linear(x))) are spike tensors and the
    attention is ``Q Kᵀ V · scale`` with no softmax, followed by a LIF (threshold 0.5), a
    linear projection and BatchNorm. With ``spiking=False`` (the twin): real-valued Q, K, V and
    ``softmax(Q Kᵀ / √d) V``.

    Parameters
    ----------
    dim
        Token width ``D``; must divide by ``heads``.
    heads
        Number of attention heads.
    spiking
        Spiking (True) or the non-spiking twin (False).
    scale
        Fixed scale of the spike product (Spikformer uses 0.125).
    tau
        Membrane time constant of the LIF neurons.
    """

    def __init__(self, dim: int, heads: int, *, spiking: bool = True, scale: float = 0.125, tau: float = 2.0) -> None:
        super().__init__()
        if dim % heads:
            msg = f"dim ({dim}) must be divisible by heads ({heads})."
            raise ValueError(msg)
        self.heads, self.scale, self.spiking = heads, scale, spiking
        self.q, self.k, self.v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.q_bn, self.k_bn, self.v_bn = (nn.BatchNorm1d(dim) for _ in range(3))
        qkv_act = (lambda: LIF(tau=tau)) if spiking else nn.Identity
        self.q_lif, self.k_lif, self.v_lif = qkv_act(), qkv_act(), qkv_act()
        self.attn_lif = LIF(tau=tau, v_threshold=0.5) if spiking else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.proj_bn = nn.BatchNorm1d(dim)
        self.last_attention: torch.Tensor | None = None
        self.record_attention = False

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        T, B, N, D = x.shape
        return x.reshape(T, B, N, self.heads, D // self.heads).transpose(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend over the N tokens of ``x`` ``[T, B, N, D]``; returns the same shape."""
        T, B, N, D = x.shape
        q = self._heads(self.q_lif(linear_bn(x, self.q, self.q_bn)))
        k = self._heads(self.k_lif(linear_bn(x, self.k, self.k_bn)))
        v = self._heads(self.v_lif(linear_bn(x, self.v, self.v_bn)))
        scores = q @ k.transpose(-2, -1)  # [T, B, H, N, N]
        if self.spiking:
            attn = scores * self.scale
        else:
            attn = torch.softmax(scores / (D // self.heads) ** 0.5, dim=-1)
        if self.record_attention:
            self.last_attention = attn.detach()
        out = (attn @ v).transpose(2, 3).reshape(T, B, N, D)
        return linear_bn(self.attn_lif(out), self.proj, self.proj_bn)
