"""The embedder interface and the spec → embedder registry.

An embedder is fitted on the reference, turns any cells into a fixed-size float32 matrix and
round-trips through ``config()`` (JSON) plus ``arrays()`` (saved as safetensors). A row of NaN
marks a cell that could not be embedded; annotation calls such cells ``Unknown``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np

from spikgpt.data import Cells
from spikgpt.errors import InputError, ModelFormatError


class Embedder(ABC):
    """Turns cells into a dense ``[n_cells, dim]`` float32 embedding."""

    kind: ClassVar[str]
    #: Whether fitting learns from the reference (genes, scaling, PCA). When not (a pretrained
    #: model, a precomputed ``obsm`` key), models fitted on different reference cells embed any
    #: cell alike, and cross-fitted fold models reuse the model's embedding of the query.
    learns_from_reference: ClassVar[bool] = True

    @abstractmethod
    def fit(self, cells: Cells, *, seed: int = 0, labels: np.ndarray | None = None) -> Embedder:
        """Fit on reference cells (``labels``: their cell types, for embedders that use them); returns self."""

    @abstractmethod
    def transform(self, cells: Cells) -> np.ndarray:
        """Embed ``cells``: float32 ``[n_obs, dim]``; NaN rows for cells that cannot be embedded."""

    def residual(self, cells: Cells) -> np.ndarray | None:
        """Per cell, what the embedding cannot represent (``None`` when the embedder has no such measure)."""
        return None

    def embed(self, cells: Cells) -> tuple[np.ndarray, np.ndarray | None]:
        """:meth:`transform` and :meth:`residual` together (one pass where the embedder allows it)."""
        return self.transform(cells), self.residual(cells)

    @property
    @abstractmethod
    def dim(self) -> int:
        """Width of the embedding."""

    @property
    def spec(self) -> str:
        """The string that builds this embedder (``default``, ``obsm:KEY``, ``scgpt:PATH``)."""
        return self.kind

    @abstractmethod
    def config(self) -> dict:
        """JSON-ready settings and small state."""

    def arrays(self) -> dict[str, np.ndarray]:
        """Fitted numeric state, saved as safetensors."""
        return {}

    @classmethod
    @abstractmethod
    def from_state(cls, config: dict, arrays: dict[str, np.ndarray]) -> Embedder:
        """Rebuild a fitted embedder from :meth:`config` and :meth:`arrays`."""


def _registry() -> dict[str, type[Embedder]]:
    from spikgpt.embed.default import DefaultEmbedder
    from spikgpt.embed.obsm import ObsmEmbedder
    from spikgpt.embed.scgpt import ScGPTEmbedder

    return {cls.kind: cls for cls in (DefaultEmbedder, ObsmEmbedder, ScGPTEmbedder)}


#: Highly variable genes of ``default:hvg`` (``default:log,hvg`` is the default embedder of spikgpt ≤ 0.5).
HVG_ONLY_GENES = 2000


def make_embedder(spec: str | Embedder) -> Embedder:
    """Build an unfitted embedder from a spec string.

    Parameters
    ----------
    spec
        ``"default"``, optionally with comma-separated options (``"default:log"``: log
        expression instead of per-cell ranks; ``"default:hvg"``: 2,000 highly variable genes, no
        marker genes; ``"default:log,hvg"``: the default of spikgpt ≤ 0.5; see
        :class:`~spikgpt.embed.default.DefaultEmbedder`), ``"obsm:KEY"`` (a precomputed ``obsm``
        embedding) or ``"scgpt:PATH"`` (an official scGPT checkpoint folder); an :class:`Embedder`
        is returned as is.

    Returns
    -------
    The embedder.
    """
    if isinstance(spec, Embedder):
        return spec
    kind, _, arg = spec.partition(":")
    registry = _registry()
    if kind not in registry:
        msg = (
            f"Unknown embedder {spec!r}. Use 'default', 'obsm:KEY' (e.g. obsm:X_scGPT) or "
            "'scgpt:PATH' (an scGPT checkpoint folder)."
        )
        raise InputError(msg)
    cls = registry[kind]
    if kind == "default":
        options = set(filter(None, arg.split(",")))
        if not options <= {"log", "rank", "hvg"} or {"log", "rank"} <= options:
            msg = (
                "The default embedder takes 'default' plus optional ':' options, comma-separated: "
                f"'log' or 'rank', and 'hvg' (e.g. 'default:rank,hvg'); got {spec!r}."
            )
            raise InputError(msg)
        values = "log" if "log" in options else "rank"
        if "hvg" in options:
            return cls(n_genes=HVG_ONLY_GENES, markers_per_pair=0, values=values)
        return cls(values=values)
    if not arg:
        msg = f"Embedder {kind!r} needs an argument: '{kind}:...'."
        raise InputError(msg)
    return cls(arg)


def embedder_from_config(config: dict, arrays: dict[str, np.ndarray]) -> Embedder:
    """Rebuild a saved embedder (see :meth:`Embedder.config`)."""
    registry = _registry()
    kind = config.get("kind")
    if kind not in registry:
        msg = f"Model folder names an unknown embedder kind {kind!r}."
        raise ModelFormatError(msg)
    return registry[kind].from_state(config, arrays)
