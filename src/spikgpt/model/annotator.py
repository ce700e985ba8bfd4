""":class:`SpikGPTModel`: a fitted embedder, the spiking classifier and the rejection threshold.

Saved as a folder of ``config.json`` and safetensors files; nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file as load_torch
from safetensors.torch import save_file as save_torch

from spikgpt import __version__
from spikgpt.data import Cells
from spikgpt.embed import Embedder, embedder_from_config
from spikgpt.errors import ModelFormatError
from spikgpt.model.network import NetworkConfig, SpikingTransformer
from spikgpt.model.training import TrainConfig
from spikgpt.openset import confidence_from_logits

FORMAT = "spikgpt-model"
FORMAT_VERSION = 1
CONFIG_FILE, WEIGHTS_FILE, EMBEDDER_FILE = "config.json", "weights.safetensors", "embedder.safetensors"


@dataclass
class Prediction:
    """Outputs of :meth:`SpikGPTModel.predict` for n cells."""

    embedding: np.ndarray  # [n, d] embedder output (NaN rows: could not embed)
    probs: np.ndarray  # [n, C]
    confidence: np.ndarray  # [n]
    raw_label: np.ndarray  # [n] class names, before rejection
    embedded: np.ndarray  # [n] bool


@dataclass
class SpikGPTModel:
    """A trained annotator. Build one with :func:`spikgpt.train`, restore with :meth:`load`."""

    embedder: Embedder
    network: SpikingTransformer
    classes: list[str]
    input_mean: np.ndarray
    input_std: np.ndarray
    threshold: float
    target_frr: float
    train_config: TrainConfig
    summary: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        cfg = self.network.cfg
        kind = "spiking" if cfg.spiking else "non-spiking twin"
        return (
            f"SpikGPTModel({len(self.classes)} cell types, embedder={self.embedder.spec!r}, "
            f"{kind} T={self.network.time_steps} L={cfg.depth} D={cfg.dim} N={cfg.n_tokens} "
            f"({cfg.tokenization}), threshold={self.threshold:.3f} at {self.target_frr:.0%} FRR, "
            f"trained on {self.summary.get('n_cells', '?')} cells)"
        )

    # ---------------------------------------------------------------- inference
    def standardise(self, E: np.ndarray) -> np.ndarray:
        """Scale an embedding with the reference's moments (NaN rows set to 0)."""
        Z = (E - self.input_mean) / self.input_std
        return np.nan_to_num(Z, nan=0.0).astype(np.float32)

    @torch.inference_mode()
    def logits(self, E: np.ndarray, batch_size: int = 4096) -> torch.Tensor:
        """Logits per time step ``[T, n, C]`` for embedder outputs ``E``."""
        Z = torch.as_tensor(self.standardise(E))
        self.network.eval()
        out = [self.network(Z[s : s + batch_size]) for s in range(0, len(Z), batch_size)]
        if not out:
            return torch.zeros(self.network.time_steps, 0, len(self.classes))
        return torch.cat(out, dim=1)

    def predict(self, cells: Cells) -> Prediction:
        """Embed and classify ``cells`` (no rejection; see :func:`spikgpt.annotate`)."""
        E = self.embedder.transform(cells)
        embedded = np.isfinite(E).all(axis=1)
        probs, conf = confidence_from_logits(self.logits(E))
        conf = np.where(embedded, conf, 0.0)
        raw = np.asarray(self.classes, dtype=object)[probs.argmax(axis=1)]
        return Prediction(E, probs, conf, raw, embedded)

    # ---------------------------------------------------------------- save / load
    def config(self) -> dict:
        """Everything but the arrays, as saved to ``config.json``."""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "spikgpt_version": __version__,
            "classes": list(self.classes),
            "threshold": self.threshold,
            "target_frr": self.target_frr,
            "embedder": self.embedder.config(),
            "network": self.network.cfg.to_dict(),
            "train": self.train_config.to_dict(),
            "summary": self.summary,
        }

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the model folder atomically (a temporary folder, then a rename).

        Parameters
        ----------
        path
            Destination folder.
        overwrite
            Replace an existing folder; without it an existing folder is an error.

        Returns
        -------
        The folder.
        """
        path = Path(path)
        if path.exists() and not overwrite:
            msg = f"{path} exists. Choose another folder or pass overwrite=True (--overwrite)."
            raise FileExistsError(msg)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            (tmp / CONFIG_FILE).write_text(json.dumps(self.config(), indent=1))
            state = {k: v.contiguous() for k, v in self.network.state_dict().items()}
            state["input_mean"] = torch.as_tensor(self.input_mean)
            state["input_std"] = torch.as_tensor(self.input_std)
            save_torch(state, tmp / WEIGHTS_FILE)
            arrays = {k: np.ascontiguousarray(v) for k, v in self.embedder.arrays().items()}
            save_numpy(arrays, tmp / EMBEDDER_FILE)
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> SpikGPTModel:
        """Load a model folder written by :meth:`save`.

        Parameters
        ----------
        path
            The folder.

        Returns
        -------
        The model, in eval mode.
        """
        path = Path(path)
        cfg_file = path / CONFIG_FILE
        if not cfg_file.is_file():
            msg = f"{path} is not a spikgpt model folder (no {CONFIG_FILE}). Train one with `spikgpt train`."
            raise ModelFormatError(msg)
        try:
            cfg = json.loads(cfg_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            msg = f"{cfg_file} is corrupted ({err}). Re-train or restore the model folder."
            raise ModelFormatError(msg) from err
        if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
            msg = f"{cfg_file} is not a spikgpt model config (foreign file). Point at a folder from `spikgpt train`."
            raise ModelFormatError(msg)
        if cfg.get("format_version", 0) > FORMAT_VERSION:
            msg = (
                f"{path} has model format {cfg['format_version']} (spikgpt {cfg.get('spikgpt_version')}); "
                f"this spikgpt {__version__} reads up to {FORMAT_VERSION}. Upgrade spikgpt."
            )
            raise ModelFormatError(msg)
        try:
            state = load_torch(path / WEIGHTS_FILE)
            arrays = load_numpy(path / EMBEDDER_FILE)
            net = SpikingTransformer(NetworkConfig.from_dict(cfg["network"]))
            mean, std = state.pop("input_mean").numpy(), state.pop("input_std").numpy()
            net.load_state_dict(state, strict=True)
            embedder = embedder_from_config(cfg["embedder"], arrays)
            model = cls(
                embedder=embedder,
                network=net.eval(),
                classes=list(cfg["classes"]),
                input_mean=mean,
                input_std=std,
                threshold=float(cfg["threshold"]),
                target_frr=float(cfg["target_frr"]),
                train_config=TrainConfig.from_dict(cfg["train"]),
                summary=cfg.get("summary", {}),
            )
        except ModelFormatError:
            raise
        except Exception as err:  # safetensors/torch raise many types for damaged files
            msg = (
                f"Could not load the model in {path}: {type(err).__name__}: {err}. "
                "The folder is damaged or incomplete; re-train it."
            )
            raise ModelFormatError(msg) from err
        return model
