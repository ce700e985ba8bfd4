"""Synaptic-operation accounting and energy estimates against the non-spiking twin."""

from spikgpt.energy.counting import E_AC_PJ, E_MAC_PJ, OpCounter, count_ops, energy, linear_ops
from spikgpt.energy.report import energy_report, markdown

__all__ = ["E_AC_PJ", "E_MAC_PJ", "OpCounter", "count_ops", "energy", "energy_report", "linear_ops", "markdown"]
