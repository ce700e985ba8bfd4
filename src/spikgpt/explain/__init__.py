"""Explanations: gene attributions through the whole path, spike-attention maps, firing rates."""

from spikgpt.explain.attribution import gene_attributions
from spikgpt.explain.report import explain

__all__ = ["explain", "gene_attributions"]
