"""DiffuMIN: Diffusion-driven Multi-Interest Network (Lai et al., RecSys '25, arXiv 2508.15311; models-wave2.md A).

Over the long view (the whole prefix up to ``max_len``, embedded) and the short view (the last ``short_len``)::

    O = orthonormalize(W_p e_t)                  [B, C, D]   C interest channels (OMIE, `ctr.modules.multi_interest`)
    A_ic = e_i · o_c, route_i = argmax_c A_ic;   S_c = channel c's selection of its routed behaviors
    r_c = Σ_{i∈S_c} A_ic e_i / |S_c|;  r̂ = l2n(r)                 the C interests
    r* = DMIG(r̂, O)                              [B, C, D]   diffusion-generated interests (`ctr.modules.diffusion`)
    u_s = Transformer([e_t; e_{last k_s}])[target token]         the short branch
    logit = MLP([e_t; u_s; u_s ⊙ e_t; r̂; r*; context])
    loss  = BCE + λ_d L_d + λ_cl L_cl             λ_d 0.01, λ_cl 0.001 (the release's configs; terms ``diffusion``
                                                  and ``contrastive``); ``(0, 0)`` is the ablation

D = 2d (``[e(item); e(cate)]``). The release is not runnable and differs from the paper (models-wave2.md A.8); we
follow the paper, with the release's behavior as options:

* ``select: paper`` keeps the top ``ceil(p · n_c)`` routed behaviors per channel (``p`` 0.5: unpublished), at most
  ``per_channel`` (100, the release's k; ours as a cap); ``select: code`` is the release's top-100 over every
  behavior AND-ed with the routing. ``aggregate: count`` divides by ``|S_c|``; ``aggregate: length`` by the
  prefix length L (the release's ``reduce_mean`` over L).
* ``channels: 4`` (the industrial config; the paper's C is unpublished).
* DMIG (x0-prediction trained and sampled consistently, deterministic at evaluation) and CMIC (per-channel
  InfoNCE, τ 0.05): see `ctr.modules.diffusion`; ``dmig_mode: code`` samples as the release does.
* The tower takes ``r̂`` (normalized) and ``r*``; the release feeds the unnormalized r (its MLP then sees 1/L-sized
  vectors). Its tower is [1024, 512, 256] with BatchNorm and Dice and a BatchNorm on the logit; ours is the
  two-stage frame's [200, 80] Dice, the budget every model of the demo gets.
* Short branch: a 2-layer, 2-head Transformer encoder (post-LN, FFN 4D, no dropout) over the target token and the
  last ``short_len`` behaviors, with a learned embedding of the recency rank (0: the target, 1: the newest); the
  target's output token is ``u_s``. The release runs its diffusion blocks there instead (models-wave2.md A.8).
* Not supported: LAIN, DARE (refused at build).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from features.dataset import DatasetInfo
from features.loader import Batch

from ..modules.dense_embedding import DenseEmbedding
from ..modules.diffusion import DMIG, ChannelContrast
from ..modules.gsu import Selection
from ..modules.multi_interest import channel_pooling, orthonormal_rows, select_per_channel
from .base import ModelOutput, register
from .two_stage import StageInput, TwoStageModel, TwoStageParams


class DiffuMINParams(TwoStageParams):
    channels: int = Field(4, ge=1, description="C interest channels (industrial config: 4)")
    select: Literal["paper", "code"] = "paper"
    p: float = Field(0.5, gt=0, le=1, description="select: paper: the share of its routed behaviors a channel keeps")
    per_channel: int = Field(100, ge=1, description="behaviors a channel keeps at most (the release's top-k)")
    aggregate: Literal["count", "length"] = "count"  # r_c / |S_c| (paper) or / L (release)
    diffusion_weight: float = Field(0.01, ge=0, description="λ_d of L_d (0 with contrastive_weight 0: the ablation)")
    contrastive_weight: float = Field(0.001, ge=0, description="λ_cl of L_cl")
    contrastive_tau: float = Field(0.05, gt=0)
    timesteps: int = 1000
    sample_steps: int = 10
    sample_t0: int = 50  # the evaluation's (and training's) starting step of the sampler, paper mode
    dmig_mode: Literal["paper", "code"] = "paper"
    grad_through_sampler: bool = True
    denoiser_layers: int = 2
    denoiser_heads: int = 2
    short_layers: int = 2
    short_heads: int = 2

    @model_validator(mode="after")
    def _unsupported(self) -> DiffuMINParams:
        if self.lain.enabled or self.dare:
            raise ValueError("diffumin does not support LAIN or DARE")
        return self


def encode_first_token(encoder: nn.TransformerEncoder, tokens: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """``encoder(tokens, src_key_padding_mask=pad)[:, 0]`` (post-LN layers, batch first, no final norm) without
    computing the last layer's other outputs: its keys and values come from every token, its query, attention
    output, FFN and norms from token 0 alone. The same values and gradients to float rounding
    (`tests/test_diffumin.py`); on the demo world (51 tokens) the last layer's work drops to about a sixth."""
    layers = list(encoder.layers)
    last = layers[-1]
    if encoder.norm is not None or last.norm_first or not isinstance(last, nn.TransformerEncoderLayer):
        return encoder(tokens, src_key_padding_mask=pad)[:, 0]
    x = tokens
    for layer in layers[:-1]:
        x = layer(x, src_key_padding_mask=pad)
    q = x[:, :1]
    a = last.self_attn(q, x, x, key_padding_mask=pad, need_weights=False)[0]
    h = last.norm1(q + last.dropout1(a))
    h = last.norm2(h + last.dropout2(last.linear2(last.dropout(last.activation(last.linear1(h))))))
    return h[:, 0]


@register
class DiffuMIN(TwoStageModel):
    name = "diffumin"
    Params = DiffuMINParams
    embeds_prefix = True  # the routing scores every behavior of the prefix with its live embedding
    prefix_grad = False  # the ESU reads the selected only (the channels are recomputed with gradient there)

    def __init__(self, params: DiffuMINParams, info: DatasetInfo, device: torch.device | None = None) -> None:
        super().__init__(params, info, device)
        d = 2 * self.dim
        if params.channels > d:
            raise ValueError(f"channels ({params.channels}) must be at most the behavior width 2d = {d}")
        del self.short_attention  # the frame's DIN short branch: replaced by the Transformer below
        self.project = nn.Linear(d, d * params.channels)  # W_p: the target to C channel vectors
        self.dmig = DMIG(
            d, timesteps=params.timesteps, layers=params.denoiser_layers, heads=params.denoiser_heads,
            steps=params.sample_steps, t0=params.sample_t0, mode=params.dmig_mode,
            grad_through_sampler=params.grad_through_sampler,
        )  # fmt: skip
        self.contrast = ChannelContrast(d, params.contrastive_tau)
        layer = nn.TransformerEncoderLayer(
            d, params.short_heads, dim_feedforward=4 * d, dropout=0.0, batch_first=True, norm_first=False
        )
        self.short_encoder = nn.TransformerEncoder(layer, params.short_layers, enable_nested_tensor=False)
        self.recency = DenseEmbedding(params.short_len + 1, d)
        nn.init.zeros_(self.recency.weight)
        self.long_dim = 2 * params.channels * d
        self.build_tower()

    # ---- OMIE --------------------------------------------------------------------------------------------------
    def channels_of(self, target: torch.Tensor) -> torch.Tensor:
        """``O [B, C, D]``: the target's C projections, orthonormalized (with gradient)."""
        p: DiffuMINParams = self.p  # type: ignore[assignment]
        return orthonormal_rows(self.project(target).view(target.shape[0], p.channels, -1))

    def search(
        self, batch: Batch, ids: dict[str, Any], offsets: torch.Tensor, emb: dict[str, Any] | None
    ) -> tuple[Selection, dict[str, torch.Tensor]]:
        assert emb is not None
        p: DiffuMINParams = self.p  # type: ignore[assignment]
        channels = self.channels_of(self.pair(emb, ""))
        selection, _ = select_per_channel(
            offsets, self.pair(emb, "long_"), channels, cap=p.per_channel, p=p.p, mode=p.select, backend=p.backend
        )
        return selection, {}

    def interests(self, inp: StageInput) -> tuple[torch.Tensor, torch.Tensor]:
        """``(r̂ [B, C, D], O [B, C, D])`` from the selected behaviors (their live embeddings)."""
        p: DiffuMINParams = self.p  # type: ignore[assignment]
        # the search's channels again (the same values), with gradient: the search may have run without it
        o = self.channels_of(inp.target)
        b, c, d = o.shape
        e = inp.long.view(b, c, p.per_channel, d)
        mask = inp.long_mask.view(b, c, p.per_channel).to(e.dtype)
        total = channel_pooling(e, o, mask)
        if p.aggregate == "count":
            denom = mask.sum(-1, keepdim=True)
        else:
            lengths = (inp.long_offsets[1:] - inp.long_offsets[:-1]).to(e.dtype)
            denom = lengths.view(b, 1, 1).expand(b, c, 1)
        r = total / denom.clamp(min=1)
        return F.normalize(r, dim=-1), o

    # ---- the two-stage frame's parts ----------------------------------------------------------------------------
    def long_interest(self, inp: StageInput) -> list[torch.Tensor]:
        """``[r̂; r*]`` flattened; in training, the losses ``L_d`` and ``L_cl`` go to ``inp.extras`` (the frame's
        forward hands them to `loss`)."""
        p: DiffuMINParams = self.p  # type: ignore[assignment]
        r, o = self.interests(inp)
        r_star = self.dmig(r, o)
        if self.training:
            if p.diffusion_weight > 0:
                inp.extras["diffusion"] = self.dmig.loss(r, o)
            if p.contrastive_weight > 0:
                inp.extras["contrastive"] = self.contrast(r, r_star)
        return [r.flatten(1), r_star.flatten(1)]

    def short_interest(self, inp: StageInput) -> torch.Tensor:
        """The target's output token of the Transformer over [target; last short_len behaviors]."""
        mask = inp.short_mask
        n = mask.sum(1, keepdim=True)
        rank = torch.where(mask, n - torch.arange(mask.shape[1], device=mask.device), 0)  # 1 = the newest
        tokens = torch.cat([inp.target.unsqueeze(1), inp.short + self.recency(rank)], 1)
        tokens[:, 0] = tokens[:, 0] + self.recency.weight[0]
        pad = torch.cat([torch.zeros_like(mask[:, :1]), ~mask], 1)  # True = ignore
        return encode_first_token(self.short_encoder, tokens, pad)

    def loss(self, out: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        """BCE + ``diffusion_weight`` · L_d + ``contrastive_weight`` · L_cl (training only)."""
        terms = super().loss(out, batch)
        p: DiffuMINParams = self.p  # type: ignore[assignment]
        if "diffusion" in out.extras:
            terms["diffusion"] = p.diffusion_weight * out.extras["diffusion"]
        if "contrastive" in out.extras:
            terms["contrastive"] = p.contrastive_weight * out.extras["contrastive"]
        return terms


__all__ = ["DiffuMIN", "DiffuMINParams", "encode_first_token"]
