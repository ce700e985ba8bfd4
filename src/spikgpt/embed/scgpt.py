"""``scgpt:PATH`` placeholder (implemented in the scGPT embedder change)."""

from __future__ import annotations

from spikgpt.embed.base import Embedder


class ScGPTEmbedder(Embedder):  # pragma: no cover - replaced below
    """scGPT cell embeddings."""

    kind = "scgpt"
