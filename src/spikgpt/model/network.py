"""The spiking transformer classifier (an ``nn.Module``; knows nothing of AnnData).

A cell embedding ``[B, d]`` becomes N tokens, is fed for T time steps (direct encoding) into
L pre-activation blocks (membrane shortcut: every Linear after the input projection receives
spikes), and the time- and token-averaged spike rate of a final LIF is read out by a linear
head, giving logits per time step ``[T, B, C]``. The classifier is a :class:`SpikingEnsemble` of
such networks, trained from different seeds, whose logits are averaged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from spikgpt.model.config import JSONConfig
from spikgpt.snn.attention import SpikingSelfAttention, activation, linear_bn


@dataclass(frozen=True)
class NetworkConfig(JSONConfig):
    """Architecture of the classifier.

    Attributes
    ----------
    in_dim
        Width of the cell embedding.
    n_classes
        Number of cell types.
    tokenization
        ``"split"``: cut the embedding into ``n_tokens`` chunks, each projected by a shared
        linear layer. ``"repeat"``: every token is the whole embedding (the paper's scheme).
        Both add a learned position embedding.
    n_tokens
        Number of tokens N.
    dim
        Token width D.
    depth
        Number of transformer blocks L.
    heads
        Attention heads.
    mlp_ratio
        Hidden width of the MLP relative to D.
    time_steps
        Simulation steps T (the twin always uses 1: without spikes every step is the same).
    spiking
        False builds the non-spiking twin: ReLU for LIF, softmax attention.
    tau
        LIF membrane time constant.
    dropout
        Dropout on the pooled features before the head (training only).
    """

    in_dim: int
    n_classes: int
    tokenization: Literal["split", "repeat"] = "repeat"
    n_tokens: int = 4
    dim: int = 64
    depth: int = 2
    heads: int = 4
    mlp_ratio: float = 2.0
    time_steps: int = 4
    spiking: bool = True
    tau: float = 2.0
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.tokenization not in ("split", "repeat"):
            msg = f"tokenization must be 'split' or 'repeat', got {self.tokenization!r}."
            raise ValueError(msg)
        for name in ("in_dim", "n_classes", "n_tokens", "dim", "depth", "heads", "time_steps"):
            if getattr(self, name) < 1:
                msg = f"{name} must be >= 1, got {getattr(self, name)}."
                raise ValueError(msg)


class Tokenizer(nn.Module):
    """Cell embedding ``[B, d]`` → tokens ``[B, N, D]`` (linear projection, BatchNorm, position)."""

    def __init__(self, cfg: NetworkConfig) -> None:
        super().__init__()
        self.mode, self.n_tokens = cfg.tokenization, cfg.n_tokens
        if self.mode == "split":
            self.token_dim = math.ceil(cfg.in_dim / cfg.n_tokens)
            self.pad = self.token_dim * cfg.n_tokens - cfg.in_dim
        else:
            self.token_dim, self.pad = cfg.in_dim, 0
        self.proj = nn.Linear(self.token_dim, cfg.dim)
        self.bn = nn.BatchNorm1d(cfg.dim)
        self.pos = nn.Parameter(torch.zeros(cfg.n_tokens, cfg.dim))
        nn.init.trunc_normal_(self.pos, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if self.mode == "split":
            x = nn.functional.pad(x, (0, self.pad)).reshape(x.shape[0], self.n_tokens, self.token_dim)
        else:
            x = x.unsqueeze(1).expand(-1, self.n_tokens, -1)
        return linear_bn(x, self.proj, self.bn) + self.pos


class MLP(nn.Module):
    """Spiking MLP: Linear → BN → LIF → Linear → BN on spike inputs ``[T, B, N, D]``."""

    def __init__(self, dim: int, hidden: int, *, spiking: bool, tau: float) -> None:
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(dim, hidden), nn.BatchNorm1d(hidden)
        self.lif = activation(spiking, tau=tau)
        self.fc2, self.bn2 = nn.Linear(hidden, dim), nn.BatchNorm1d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return linear_bn(self.lif(linear_bn(x, self.fc1, self.bn1)), self.fc2, self.bn2)


class Block(nn.Module):
    """``u += SSA(LIF(u)); u += MLP(LIF(u))`` on the membrane stream u ``[T, B, N, D]``."""

    def __init__(self, cfg: NetworkConfig) -> None:
        super().__init__()
        self.attn_in = activation(cfg.spiking, tau=cfg.tau)
        self.attn = SpikingSelfAttention(cfg.dim, cfg.heads, spiking=cfg.spiking, tau=cfg.tau)
        self.mlp_in = activation(cfg.spiking, tau=cfg.tau)
        hidden = int(cfg.dim * cfg.mlp_ratio)
        self.mlp = MLP(cfg.dim, hidden, spiking=cfg.spiking, tau=cfg.tau)

    def forward(self, u: torch.Tensor) -> torch.Tensor:  # noqa: D102
        u = u + self.attn(self.attn_in(u))
        return u + self.mlp(self.mlp_in(u))


class HostDropout(nn.Dropout):
    """``nn.Dropout`` whose mask is drawn by the CPU's default generator on every device.

    On the CPU it is ``nn.Dropout`` bit for bit; on a GPU it applies the masks the CPU would,
    so one seed trains the same network on both, up to the order of float reductions (the GPU's
    own generator would make the GPU run a different seed).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if not self.training or self.p == 0 or x.numel() == 0:
            return x
        if self.p == 1:
            return x * 0
        noise = torch.empty(x.shape, dtype=x.dtype).bernoulli_(1 - self.p).div_(1 - self.p)
        return x * noise.to(x.device)


class SpikingTransformer(nn.Module):
    """One network of the classifier; ``forward`` returns logits per time step ``[T, B, C]``."""

    def __init__(self, cfg: NetworkConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.time_steps = cfg.time_steps if cfg.spiking else 1
        self.tokenizer = Tokenizer(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.out_lif = activation(cfg.spiking, tau=cfg.tau)
        self.dropout = HostDropout(cfg.dropout)
        self.head = nn.Linear(cfg.dim, cfg.n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Token-averaged output spike rates per time step ``[T, B, D]`` (the latent)."""
        tokens = self.tokenizer(x)
        u = tokens.unsqueeze(0).expand(self.time_steps, *tokens.shape)
        for block in self.blocks:
            u = block(u)
        return self.out_lif(u).mean(dim=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.head(self.dropout(self.features(x)))


class SpikingEnsemble(nn.Module):
    """The classifier: :class:`SpikingTransformer` networks of one architecture whose logits are averaged.

    ``features`` concatenates the members' latents ``[T, B, members × D]``; ``head`` maps such a
    latent to the members' mean logits, so ``head(features(x)) == forward(x)`` in eval mode.

    Parameters
    ----------
    cfg
        The members' architecture.
    members
        The networks, or how many freshly initialised ones to build.
    """

    def __init__(self, cfg: NetworkConfig, members: list[SpikingTransformer] | int = 1) -> None:
        super().__init__()
        if isinstance(members, int):
            if members < 1:
                msg = f"An ensemble needs at least one network, got {members}."
                raise ValueError(msg)
            members = [SpikingTransformer(cfg) for _ in range(members)]
        if any(m.cfg != cfg for m in members):
            msg = "Every network of an ensemble must have the ensemble's NetworkConfig."
            raise ValueError(msg)
        self.cfg = cfg
        self.members = nn.ModuleList(members)
        self.time_steps = self.members[0].time_steps

    @property
    def latent_dim(self) -> int:
        """Width of :meth:`features`."""
        return self.cfg.dim * len(self.members)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The members' latents side by side ``[T, B, members × D]``."""
        return torch.cat([m.features(x) for m in self.members], dim=-1)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """Mean logits ``[T, B, C]`` of the members' heads on their parts of ``features``."""
        parts = features.split(self.cfg.dim, dim=-1)
        return torch.stack([m.head(f) for m, f in zip(self.members, parts, strict=True)]).mean(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return torch.stack([m(x) for m in self.members]).mean(0)
