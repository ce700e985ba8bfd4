"""Exceptions raised by spikgpt.

Each subclasses the built-in it resembles, so ``except ValueError`` still works.
"""

from __future__ import annotations


class SpikGPTError(Exception):
    """Base class of every spikgpt error."""


class InputError(SpikGPTError, ValueError):
    """The input data cannot be used as given (empty, NaN, negative, missing column, ...)."""


class GeneOverlapError(InputError):
    """Too few of the model's genes are present in the input."""


class ModelFormatError(SpikGPTError, OSError):
    """A model folder is missing, corrupted, foreign or from a newer format version."""
