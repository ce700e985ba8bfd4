"""JSON round trip shared by the frozen config dataclasses."""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Self


class JSONConfig:
    """Mixin for frozen dataclasses: ``to_dict`` / ``from_dict`` that rejects unknown keys."""

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Self:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            msg = f"Unknown {cls.__name__} keys: {sorted(unknown)}."
            raise ValueError(msg)
        return cls(**d)
