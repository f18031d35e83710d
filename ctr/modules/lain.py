"""LAIN: Length-Adaptive Interest Network, a plug-in that conditions a backbone's target attention on the length
of the user's history (Zhang, Du, Zhu et al., "Length-Adaptive Interest Network for Balancing Long and Short
Sequence Modeling in CTR Prediction", AAAI 2026, arXiv 2601.19142).

No official code was found (models.md §6); the equations below follow the secondary notes in models.md §6.2
([SEC]); every place they are silent is a documented choice ([choice]).

With ``L`` = the sample's full prefix length (``batch.dense["hist_len"]``: every behavior before the sample, not the
truncated view; models.md §6.4's default)::

    SLE  (Spectral Length Encoder)    x = log1p(L) [choice; raw L as an option]
                                      f = [sin(x·ω); cos(x·ω)] ∈ R^{2 d_f}, ω ∈ R^{d_f} learnable (NeRF-style)
                                      h_len = MLP(LayerNorm(Linear(f))) ∈ R^{d_len}
    LCP  (Length-Conditioned Prompts) P(L) = reshape(MLP_prompt(h_len)) ∈ R^{k × D}, k = 2–4 [SEC; default 2]
                                      S' = [P; S] for every behavior branch (long and short), prompts mask = 1
    LMA  (Length-Modulated Attention) Q' = W_q [Q; h_len],  K' = W_k [K; h_len]
                                      τ(L) = 1 + γ·σ(−β (x − x0)),  β, γ learnable (β, γ > 0 [choice])
                                      α_j = softmax_j(score(Q', K'_j) / τ)

Short histories get τ > 1 (flatter attention), long ones τ → 1. The loss stays the backbone's (BCE only).

Choices where the notes are silent, and why:

* ``x = log1p(L)`` by default for the SLE (``length_transform: raw`` feeds L itself). Lengths span 5 orders of
  magnitude; with raw L the gradient of a learnable ω is ∝ L, so one optimizer step moves the phase of a long user's
  features by radians. The frequencies start geometric in [0.1, 10] (log1p) or [1e-4, 1] (raw), so the lowest
  period covers the whole length range and the highest resolves nearby lengths.
* τ uses ``x = log1p(L)`` always and ``x0 = log1p(L0)``, learnable, started at the train split's median ``hist_len``
  (manifest) unless ``l0`` is given: a sigmoid over raw L would switch within a few behaviors of L0. β and γ are
  kept positive by a softplus (so "short → flatter" holds for any parameters); they start at ``tau_beta`` = 2 (per
  unit of log-length) and ``tau_gamma`` = 1 (τ ∈ (1, 2)).
* ``W_q``, ``W_k`` start at ``[I | 0]`` (zero bias): at start ``Q' = Q`` and ``K' = K``, so LAIN begins from the
  backbone's attention (plug-and-play) and learns how much length to mix in. Values are not conditioned: the
  pooled interest is a weighted sum of the backbone's (prompt-extended) behaviors.
* The prompt head's output layer starts small (std 0.01, zero bias), so the prompts start on the scale of fresh
  embedding rows instead of dominating a raw-sum pooling (DIN's paper form has no softmax).
* The SLE and the prompts are shared by all branches (the notes prepend the same P to the long and the short
  sequence); each attention (branch) gets its own ``W_q``, ``W_k``; τ is one function of L for all branches.
* ``d_len`` (``length_dim``) defaults to the behavior width D, ``fourier_dim`` d_f = 16, both MLPs one hidden layer
  of 64 ReLU units: the notes give none of these (overhead "under 1.5% parameters").

Use in a backbone (see ctr/models/din.py and dien.py)::

    h = lain.encode(L)                                     # [B, d_len]
    seq, mask = prepend_prompts(lain.prompts(h), seq, mask)
    q, k = lain.condition_query(q, h, "hist"), lain.condition_key(k, h, "hist")
    scores = lain.temper(score(q, k), L)                   # scores / τ(L)

``lain.active = False`` switches the conditioning off: ``prompts`` returns None (nothing is prepended),
``condition_*`` return their input and ``temper`` its scores, so the backbone's computation is unchanged, exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from .attention import DinAttention, masked_softmax, pool
from .mlp import MLP

DEFAULT_L0 = 100.0  # pivot length when neither `l0` nor the train split's median hist_len is known


class LainParams(BaseModel):
    """The ``lain:`` block of a backbone's model config (off by default: the backbone is unchanged)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    prompts: int = Field(2, ge=0, description="k length-conditioned prompt tokens (paper: 2-4); 0 = without LCP")
    qk_conditioning: bool = Field(True, description="LMA (i): Q' = W_q[Q; h_len], K' = W_k[K; h_len]")
    temperature: bool = Field(True, description="LMA (ii): scores / τ(L)")
    fourier_dim: int = Field(16, gt=0, description="d_f, learnable frequencies of the SLE")
    length_dim: int | None = Field(None, gt=0, description="width of h_len; null = the behavior width")
    encoder_hidden: list[int] = Field(default_factory=lambda: [64], description="SLE MLP hidden sizes")
    prompt_hidden: list[int] = Field(default_factory=lambda: [64], description="prompt MLP hidden sizes")
    length_transform: Literal["log1p", "raw"] = "log1p"
    l0: float | None = Field(None, gt=0, description="τ's pivot length L0; null = the train split's median hist_len")
    tau_beta: float = Field(2.0, gt=0, description="initial β (per unit of log1p length)")
    tau_gamma: float = Field(1.0, gt=0, description="initial γ: τ → 1 + γ for the shortest histories")


def _inv_softplus(v: float) -> float:
    return v + math.log(-math.expm1(-v))


class SpectralLengthEncoder(nn.Module):
    """SLE: length [B] -> h_len [B, out_dim] = MLP(LayerNorm(Linear([sin(xω); cos(xω)])))."""

    def __init__(
        self,
        out_dim: int,
        fourier_dim: int = 16,
        hidden: Sequence[int] = (64,),
        transform: Literal["log1p", "raw"] = "log1p",
    ) -> None:
        super().__init__()
        if transform not in ("log1p", "raw"):
            raise ValueError(f"length transform must be 'log1p' or 'raw', got {transform!r}")
        self.transform = transform
        lo, hi = (0.1, 10.0) if transform == "log1p" else (1e-4, 1.0)
        self.omega = nn.Parameter(torch.logspace(math.log10(lo), math.log10(hi), fourier_dim))
        self.proj = nn.Linear(2 * fourier_dim, out_dim)
        self.norm = nn.LayerNorm(out_dim)
        self.mlp = MLP(out_dim, hidden, activation="relu", out_dim=out_dim)

    def features(self, length: torch.Tensor) -> torch.Tensor:
        """The spectral features f [B, 2 d_f] of lengths [B]."""
        x = length.to(self.omega.dtype)
        if self.transform == "log1p":
            x = torch.log1p(x.clamp_min(0))
        phase = x.unsqueeze(-1) * self.omega
        return torch.cat([torch.sin(phase), torch.cos(phase)], dim=-1)

    def forward(self, length: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(self.proj(self.features(length))))


class LengthPrompts(nn.Module):
    """LCP: h_len [B, d_len] -> k prompt tokens [B, k, width] (per sample: row b depends on h_len[b] only)."""

    def __init__(self, length_dim: int, num_prompts: int, width: int, hidden: Sequence[int] = (64,)) -> None:
        super().__init__()
        self.num_prompts, self.width = num_prompts, width
        self.mlp = MLP(length_dim, hidden, activation="relu", out_dim=num_prompts * width)
        out = self.mlp.net[-1]
        assert isinstance(out, nn.Linear)
        nn.init.normal_(out.weight, std=0.01)
        nn.init.zeros_(out.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.mlp(h).view(h.shape[0], self.num_prompts, self.width)


class LengthConditionedProjection(nn.Module):
    """LMA (i): ``x' = W [x; h_len] + b`` for x [B, D] or [B, L, D] (h_len broadcast over L); starts at x' = x.

    Written as ``W_x x + W_h h_len + b`` (the same map, without concatenating h_len to every position).
    """

    def __init__(self, dim: int, length_dim: int) -> None:
        super().__init__()
        self.x = nn.Linear(dim, dim)
        self.h = nn.Linear(length_dim, dim, bias=False)
        with torch.no_grad():
            self.x.weight.copy_(torch.eye(dim))
            self.x.bias.zero_()
            self.h.weight.zero_()

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        shift = self.h(h)
        if x.dim() == 3:
            shift = shift.unsqueeze(1)
        return self.x(x) + shift


class LengthTemperature(nn.Module):
    """LMA (ii): ``τ(L) = 1 + γ σ(−β (log1p(L) − x0))`` with β = softplus(·), γ = softplus(·), x0 learnable."""

    def __init__(self, l0: float, beta: float = 2.0, gamma: float = 1.0) -> None:
        super().__init__()
        self.x0 = nn.Parameter(torch.tensor(math.log1p(l0)))
        self.beta_raw = nn.Parameter(torch.tensor(_inv_softplus(beta)))
        self.gamma_raw = nn.Parameter(torch.tensor(_inv_softplus(gamma)))

    def forward(self, length: torch.Tensor) -> torch.Tensor:
        x = torch.log1p(length.to(self.x0.dtype).clamp_min(0))
        beta, gamma = nn.functional.softplus(self.beta_raw), nn.functional.softplus(self.gamma_raw)
        return 1.0 + gamma * torch.sigmoid(-beta * (x - self.x0))


def prepend_prompts(
    prompts: torch.Tensor | None, seq: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[P; S]``: prompts [B, k, D] before a right-padded sequence seq [B, L, D] with mask [B, L] (True = real).

    Returns ([B, k + L, D], [B, k + L]); the prompts are real (mask True) for every row, also an empty history, and
    the padding stays at the right. ``prompts=None`` returns the inputs unchanged.
    """
    if prompts is None or prompts.shape[1] == 0:
        return seq, mask
    ones = torch.ones(mask.shape[0], prompts.shape[1], dtype=mask.dtype, device=mask.device)
    return torch.cat([prompts.to(seq.dtype), seq], dim=1), torch.cat([ones, mask], dim=1)


class LainConditioner(nn.Module):
    """The LAIN plug-in for one backbone: SLE + prompts + per-branch QK conditioning + temperature.

    Args:
        params: the ``lain:`` config block.
        branches: attention name -> (query width, key width), e.g. ``{"hist": (2d, 2d)}`` for DIN or
            ``{"long": (D, D), "short": (D, D)}`` for a two-stage model.
        prompt_dim: width of the behavior tokens the prompts are prepended to.
        median_length: the train split's median hist_len, τ's pivot L0 unless ``params.l0`` is set.

    ``active`` (default True) switches everything off at run time: the methods become identities, so the backbone
    computes exactly what it computes without LAIN (same parameters).
    """

    def __init__(
        self,
        params: LainParams,
        branches: Mapping[str, tuple[int, int]],
        prompt_dim: int,
        median_length: float | None = None,
    ) -> None:
        super().__init__()
        self.params = params
        self.active = True
        d_len = params.length_dim or prompt_dim
        self.encoder = SpectralLengthEncoder(d_len, params.fourier_dim, params.encoder_hidden, params.length_transform)
        self.prompt_head = (
            LengthPrompts(d_len, params.prompts, prompt_dim, params.prompt_hidden) if params.prompts > 0 else None
        )
        self.query_proj = nn.ModuleDict()
        self.key_proj = nn.ModuleDict()
        if params.qk_conditioning:
            for name, (q_dim, k_dim) in branches.items():
                self.query_proj[name] = LengthConditionedProjection(q_dim, d_len)
                self.key_proj[name] = LengthConditionedProjection(k_dim, d_len)
        l0 = params.l0 or (median_length if median_length and median_length > 0 else DEFAULT_L0)
        self.tau = LengthTemperature(l0, params.tau_beta, params.tau_gamma) if params.temperature else None

    @property
    def num_prompts(self) -> int:
        """Tokens prepended to each branch (0 when inactive or without LCP)."""
        return self.params.prompts if self.active and self.prompt_head is not None else 0

    def encode(self, length: torch.Tensor) -> torch.Tensor:
        """h_len [B, d_len] from the full prefix lengths [B] (any numeric dtype)."""
        return self.encoder(length)

    def prompts(self, length_emb: torch.Tensor) -> torch.Tensor | None:
        """P(L) [B, k, D], or None when inactive or without LCP."""
        if not self.active or self.prompt_head is None:
            return None
        return self.prompt_head(length_emb)

    def condition_query(self, q: torch.Tensor, length_emb: torch.Tensor, branch: str) -> torch.Tensor:
        """Q' = W_q [Q; h_len] for the attention `branch` (identity when inactive or without QK conditioning)."""
        if not self.active or branch not in self.query_proj:
            return q
        return self.query_proj[branch](q, length_emb)

    def condition_key(self, k: torch.Tensor, length_emb: torch.Tensor, branch: str) -> torch.Tensor:
        """K' = W_k [K; h_len] for the attention `branch`, k [B, L, D] (identity when off)."""
        if not self.active or branch not in self.key_proj:
            return k
        return self.key_proj[branch](k, length_emb)

    def temperature(self, length: torch.Tensor) -> torch.Tensor | None:
        """τ(L) [B], or None when inactive or without the temperature."""
        if not self.active or self.tau is None:
            return None
        return self.tau(length)

    def temper(self, scores: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        """scores [B, L] / τ(L) (unchanged when off)."""
        tau = self.temperature(length)
        return scores if tau is None else scores / tau.unsqueeze(-1).to(scores.dtype)


def lain_din_attention(
    attention: DinAttention,
    lain: LainConditioner,
    length_emb: torch.Tensor,
    length: torch.Tensor,
    query: torch.Tensor,
    keys: torch.Tensor,
    mask: torch.Tensor,
    values: torch.Tensor | None = None,
    branch: str = "hist",
) -> torch.Tensor:
    """`DinAttention.forward` with LAIN: ``[P; keys]`` (and ``[P; values]``), ``Q'``/``K'`` conditioning of `branch`,
    the activation-unit scores divided by τ(L), then the attention's own weighting (raw or masked softmax).

    query ``[B, Dq]``, keys ``[B, L, D]``, mask ``[B, L]``, values ``[B, L, D]`` (None = the keys) -> ``[B, D]``.
    """
    prompts = lain.prompts(length_emb)
    seq, seq_mask = prepend_prompts(prompts, keys, mask)
    vals = seq if values is None else prepend_prompts(prompts, values, mask)[0]
    q = lain.condition_query(query, length_emb, branch)
    scores = lain.temper(attention.scores(q, lain.condition_key(seq, length_emb, branch), seq_mask), length)
    if attention.softmax:
        weights = masked_softmax(scores * attention.scale, seq_mask)
    else:
        weights = scores * seq_mask.to(scores.dtype)
    return pool(weights, vals)
