"""Multi-step leaky integrate-and-fire (LIF) neuron.

Our own ~80 lines instead of a dependency: spikingjelly 2.0.0 pulls torchvision, torchaudio,
tensorboard and a CUDA build of torch; snntorch is light but steps one time step per call and
keeps hidden state on the module, which must then be reset between batches. Here a call takes
the whole ``[T, ...]`` sequence and starts every sequence from a fresh membrane, so no state
survives a call and there is nothing to reset.

Dynamics (spikingjelly's ``LIFNode`` with ``decay_input=True``, hard reset):

    H[t] = V[t-1] + (X[t] - (V[t-1] - V_reset)) / tau     charge
    S[t] = Θ(H[t] - V_th)                                 fire
    V[t] = H[t] · (1 - S[t]) + V_reset · S[t]             reset
"""

from __future__ import annotations

import torch
from torch import nn

from spikgpt.snn.surrogate import heaviside


class LIF(nn.Module):
    """Leaky integrate-and-fire neurons over inputs shaped ``[T, ...]``.

    Parameters
    ----------
    tau
        Membrane time constant (> 1); the membrane keeps ``1 - 1/tau`` of its charge a step.
    v_threshold
        Firing threshold.
    v_reset
        Membrane potential after a spike.
    alpha
        Sharpness of the sigmoid surrogate gradient.
    detach_reset
        Do not back-propagate through the reset (as Spikformer does).
    """

    def __init__(
        self,
        tau: float = 2.0,
        v_threshold: float = 1.0,
        v_reset: float = 0.0,
        alpha: float = 4.0,
        detach_reset: bool = True,
    ) -> None:
        super().__init__()
        if tau <= 1:
            msg = f"tau must be > 1, got {tau}."
            raise ValueError(msg)
        self.tau, self.v_threshold, self.v_reset = tau, v_threshold, v_reset
        self.alpha, self.detach_reset = alpha, detach_reset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return spikes (0/1, same shape and dtype as ``x``) for the input currents ``x``."""
        if not (torch.is_grad_enabled() and x.requires_grad):
            return simulate(self, x)
        v = torch.full_like(x[0], self.v_reset)
        spikes = []
        for x_t in x:
            h = v + (x_t - (v - self.v_reset)) / self.tau
            s = heaviside(h - self.v_threshold, self.alpha)
            s_reset = s.detach() if self.detach_reset else s
            v = h * (1 - s_reset) + self.v_reset * s_reset
            spikes.append(s)
        return torch.stack(spikes)

    def extra_repr(self) -> str:  # noqa: D102
        return f"tau={self.tau}, v_threshold={self.v_threshold}, v_reset={self.v_reset}"


def simulate(lif: LIF, x: torch.Tensor) -> torch.Tensor:
    """:meth:`LIF.forward` without autograd: the spikes of ``lif`` for currents ``x`` ``[T, ...]``.

    No autograd, preallocated buffers: a fresh tensor per operation and time step dominated
    the run time. Spikes are written as floats and the reset is a product with ``1 − S``:
    boolean masks (``masked_fill_``, bool → float copies) ran 3–8× slower per element on the
    CPU. ``S`` is exactly 0 or 1, so every product is exact and the spikes are those of the
    equations in the module docstring, bit for bit.
    """
    spikes = torch.empty_like(x)
    v, h, keep = torch.full_like(x[0], lif.v_reset), torch.empty_like(x[0]), torch.empty_like(x[0])
    with torch.no_grad():
        for t in range(len(x)):
            if lif.v_reset:
                torch.sub(v, lif.v_reset, out=h)
                torch.sub(x[t], h, out=h)
            else:
                torch.sub(x[t], v, out=h)  # V − V_reset is V exactly
            h.div_(lif.tau).add_(v)  # H = V + (X − (V − V_reset)) / tau
            torch.ge(h, lif.v_threshold, out=spikes[t])  # S = Θ(H − V_th)
            torch.lt(h, lif.v_threshold, out=keep)  # 1 − S
            torch.mul(h, keep, out=v)  # H·(1 − S)
            if lif.v_reset:
                v.add_(spikes[t], alpha=lif.v_reset)  # + V_reset·S
    return spikes
