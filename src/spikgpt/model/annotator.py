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
from spikgpt.openset.novelty import (
    DEFAULT_COMBINATION,
    DEFAULT_QUERY_NEIGHBOURS,
    CellOutputs,
    NoveltyScorer,
    query_neighbours,
)
from spikgpt.snn import LIF

FORMAT = "spikgpt-model"
FORMAT_VERSION = 2  # 2: class Gaussians and query-neighbourhood novelty
CONFIG_FILE, WEIGHTS_FILE, EMBEDDER_FILE = "config.json", "weights.safetensors", "embedder.safetensors"
NOVELTY_FILE = "novelty.safetensors"


@dataclass
class Prediction:
    """Outputs of :meth:`SpikGPTModel.predict` for n cells."""

    embedding: np.ndarray  # [n, d] embedder output (NaN rows: could not embed)
    probs: np.ndarray  # [n, C]
    confidence: np.ndarray  # [n]
    raw_label: np.ndarray  # [n] class names, before rejection
    embedded: np.ndarray  # [n] bool
    novelty: np.ndarray  # [n] in [0, 1]; 1 for cells that could not be embedded
    reason: np.ndarray  # [n] the novelty score responsible ("not_embedded" where so)
    outputs: CellOutputs


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
    novelty: NoveltyScorer | None = None
    novelty_method: str = "combined"
    novelty_components: tuple[str, ...] = DEFAULT_COMBINATION
    novelty_neighbours: int = DEFAULT_QUERY_NEIGHBOURS

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
    def outputs(self, E: np.ndarray, batch_size: int = 4096) -> CellOutputs:
        """Logits, latent, standardised embedding and per-layer firing rates for embeddings ``E``."""
        Z = self.standardise(E)
        net = self.network.eval()
        acts = [m for m in net.modules() if isinstance(m, LIF | torch.nn.ReLU)]
        rates: list[list[torch.Tensor]] = [[] for _ in acts]
        hooks = [
            m.register_forward_hook(lambda _m, _i, o, r=r: r.append((o > 0).float().transpose(0, 1).flatten(1).mean(1)))
            for m, r in zip(acts, rates, strict=True)
        ]
        logits, latent = [], []
        try:
            for s in range(0, len(Z), batch_size):
                feats = net.features(torch.as_tensor(Z[s : s + batch_size]))
                logits.append(net.head(feats))
                latent.append(feats.mean(0))
        finally:
            for h in hooks:
                h.remove()
        T, C, D = net.time_steps, len(self.classes), net.cfg.dim
        return CellOutputs(
            logits=torch.cat(logits, dim=1) if logits else torch.zeros(T, 0, C),
            latent=torch.cat(latent).numpy() if latent else np.zeros((0, D), np.float32),
            embedding=Z,
            firing=torch.stack([torch.cat(r) for r in rates], dim=1).numpy() if logits else np.zeros((0, len(acts))),
        )

    def unknown_threshold(self, method: str | None = None) -> float:
        """The calibrated novelty threshold of ``method`` (the model's default when ``None``)."""
        method = method or self.novelty_method
        if method == self.novelty_method or self.novelty is None:
            return self.threshold
        return self.novelty.threshold(method, self.novelty_components, self.target_frr)

    def predict(self, cells: Cells, *, novelty: str | None = None, neighbours: int | None = None) -> Prediction:
        """Embed and classify ``cells`` and score their novelty (see :func:`spikgpt.annotate`)."""
        E = self.embedder.transform(cells)
        embedded = np.isfinite(E).all(axis=1)
        out = self.outputs(E)
        probs = out.probs
        conf = probs.max(axis=1)
        conf = np.where(embedded, conf, 0.0)
        raw = np.asarray(self.classes, dtype=object)[probs.argmax(axis=1)]
        if self.novelty is not None:
            method = novelty or self.novelty_method
            k = self.novelty_neighbours if neighbours is None else neighbours
            graph = query_neighbours(out.embedding[embedded], k)
            raw_scores = self.novelty.raw_scores(
                out.subset(embedded), self.novelty.names_of(method, self.novelty_components)
            )
            nov, reason = np.ones(len(conf)), np.full(len(conf), "not_embedded", dtype=object)
            nov[embedded], reason[embedded] = self.novelty.combine(raw_scores, method, self.novelty_components, graph)
        else:  # uncalibrated model: max-probability only
            nov, reason = 1 - conf, np.full(len(conf), "max_prob", dtype=object)
        nov = np.where(embedded, nov, 1.0)
        reason = np.where(embedded, reason, "not_embedded")
        return Prediction(E, probs, conf, raw, embedded, nov, reason, out)

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
            "novelty": {
                "method": self.novelty_method,
                "components": list(self.novelty_components),
                "calibrated": self.novelty is not None,
                "max_reference_cells": self.novelty.max_reference_cells if self.novelty else None,
                "k": self.novelty.k if self.novelty else None,
                "neighbours": self.novelty_neighbours,
            },
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
            if self.novelty is not None:
                save_numpy({k: np.ascontiguousarray(v) for k, v in self.novelty.arrays().items()}, tmp / NOVELTY_FILE)
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        return path

    @classmethod
    def coerce(cls, model: SpikGPTModel | str | os.PathLike) -> SpikGPTModel:
        """``model`` itself, or the model loaded from the folder it names."""
        return model if isinstance(model, cls) else cls.load(model)

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
        if cfg.get("format_version", 0) < FORMAT_VERSION:
            msg = (
                f"{path} has model format {cfg.get('format_version')} (spikgpt {cfg.get('spikgpt_version')}), "
                f"whose novelty statistics this spikgpt {__version__} no longer reads. "
                "Re-train it with `spikgpt train`."
            )
            raise ModelFormatError(msg)
        try:
            state = load_torch(path / WEIGHTS_FILE)
            arrays = load_numpy(path / EMBEDDER_FILE)
            net = SpikingTransformer(NetworkConfig.from_dict(cfg["network"]))
            mean, std = state.pop("input_mean").numpy(), state.pop("input_std").numpy()
            net.load_state_dict(state, strict=True)
            embedder = embedder_from_config(cfg["embedder"], arrays)
            nov_cfg = cfg["novelty"]
            scorer = None
            if nov_cfg["calibrated"]:
                scorer = NoveltyScorer.from_arrays(
                    load_numpy(path / NOVELTY_FILE), nov_cfg["max_reference_cells"], nov_cfg["k"]
                )
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
                novelty=scorer,
                novelty_method=nov_cfg["method"],
                novelty_components=tuple(nov_cfg["components"]),
                novelty_neighbours=int(nov_cfg["neighbours"]),
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
