"""The classifier network, its training loop and the AnnData-facing :class:`SpikGPTModel`."""

from spikgpt.model.annotator import SpikGPTModel
from spikgpt.model.network import NetworkConfig, SpikingEnsemble, SpikingTransformer
from spikgpt.model.training import TrainConfig

__all__ = ["NetworkConfig", "SpikGPTModel", "SpikingEnsemble", "SpikingTransformer", "TrainConfig"]
