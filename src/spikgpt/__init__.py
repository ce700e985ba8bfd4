"""spikgpt: cell-type annotation with a spiking transformer and calibrated "Unknown"."""

import logging

__version__ = "0.27.0"

logging.getLogger("spikgpt").addHandler(logging.NullHandler())

from spikgpt.api import annotate, embed_scgpt, train  # noqa: E402
from spikgpt.energy import energy_report as energy  # noqa: E402
from spikgpt.explain import explain  # noqa: E402
from spikgpt.model import SpikGPTModel  # noqa: E402
from spikgpt.streaming import annotate_file  # noqa: E402

load_model = SpikGPTModel.load

__all__ = [
    "SpikGPTModel",
    "__version__",
    "annotate",
    "annotate_file",
    "embed_scgpt",
    "energy",
    "explain",
    "load_model",
    "train",
]
