"""Spiking building blocks: LIF neurons, surrogate gradients, spiking self-attention (torch only)."""

from spikgpt.snn.attention import SpikingSelfAttention
from spikgpt.snn.neuron import LIF
from spikgpt.snn.surrogate import SigmoidSurrogate, heaviside

__all__ = ["LIF", "SigmoidSurrogate", "SpikingSelfAttention", "heaviside"]
