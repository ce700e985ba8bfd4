"""Embedders behind one interface: ``default`` (built in), ``obsm:KEY``, ``scgpt:PATH``."""

from spikgpt.embed.base import Embedder, embedder_from_config, make_embedder

__all__ = ["Embedder", "embedder_from_config", "make_embedder"]
