"""DiffuMIN's Diffusion Multi-Interest Generator (DMIG) and Contrastive Multi-Interest Calibrator (CMIC)
(Lai et al., RecSys '25; models-wave2.md A.3, A.9).

The C interests of a sample ``r̂ [B, C, D]`` (L2-normalized) are the tokens. To generate interest i, token i is
replaced by a noisy ``x_t`` and a small Transformer denoiser, conditioned on the other C − 1 clean interests (its
self-attention), on the channel vector ``o_i`` and on the time step, predicts the clean ``r̂_i`` (x0-prediction).
All C generations run at once: the channel axis is folded into the batch, ``[B·C, C, D]``, copy i noised at i.

* Schedule: DDPM, T = 1000, β linear from 1e-4 to 0.02 (the release's only working schedule).
* Denoiser block (post-LN, ε 1e-6): multi-head self-attention over the C tokens (2 heads, no bias, scale
  1/sqrt(d_head): the release divides by sqrt(#keys), a bug), then the cross-attention to ``o_i``, then an FFN
  ``D → 3D (ReLU) → D``. The cross-attention has one key, so its softmax is 1 and it adds ``W_o W_v o_i`` to every
  token: one bias-free linear map of ``o_i`` here (the same function class, one matrix instead of two).
* Time embedding: sinusoidal (half sin, half cos, base 10000), ``Linear(D, 4D) → SiLU → Linear(4D, D)``, added
  to every token.
* Training loss ``L_d``: per (sample, channel) a ``t ~ U{0..T−1}``, ``x_t = sqrt(ᾱ_t) r̂_i + sqrt(1 − ᾱ_t) ε``, MSE
  of the prediction at i against ``r̂_i``, mean over channels. Its inputs are detached: ``L_d`` trains the denoiser
  to model the interests, it does not push the extractor toward interests that are easy to denoise (the paper
  does not say; the release never adds ``L_d`` to the optimized loss at all).
* Sampling (``mode: paper``), consistent with the x0 training: start at ``t0`` (a config value, 50) from the
  interests themselves, ``x = sqrt(ᾱ_t0) r̂_i + sqrt(1 − ᾱ_t0) ε`` ("start from r_{i,t}, not noise"), then
  ``steps`` (10) DDIM steps on a strided schedule down to 0 reading the output as x0. Training: η = 1 (ancestral,
  stochastic) and a random ε; evaluation: η = 0 and ε = 0, so a sample's prediction is deterministic.
  ``mode: code`` reproduces the release: a random ``t0`` in [0, T), fresh noise, the last 10 steps of the chain
  (n = 9..0) reading the x0-trained output as ε with the DDPM posterior, stochastic at evaluation too.
* ``grad_through_sampler`` (default true, as the release): the CTR loss reaches the denoiser through the sampled
  interests.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .. import native


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``[N, dim]``: half sin, half cos of ``t / 10000^(k / half)`` (``dim`` even)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angle = t.float().unsqueeze(-1) * freqs
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1)


class TokenSelfAttention(nn.Module):
    """Multi-head self-attention without biases over a handful of tokens (C = 4), scale 1/sqrt(d_head).

    The queries and the keys/values are two projections (the packed ``qkv`` weight's rows split), so that the last
    block can project one token's query alone (``at``). The attention itself runs natively on the CPU
    (`ctr.native.token_attention`: each row's C x C products in registers, 10 ms -> about 1 ms per call at [2048, 4,
    32], forward and backward, on one core); elsewhere, and as the readable reference, PyTorch's
    `scaled_dot_product_attention` (measured at the same shape: 9 ms against 12 ms for `nn.MultiheadAttention` and
    14 ms for broadcast products)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} must be a multiple of heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, at: torch.Tensor | None = None) -> torch.Tensor:
        """x ``[N, C, D]`` -> ``[N, C, D]``; with ``at [N]`` (one token per row) only that token's output,
        ``[N, 1, D]``: its query alone, every token's key and value."""
        d = x.shape[-1]
        w_q, w_kv = self.qkv.weight.split([d, 2 * d])  # the packed rows: q, then k, then v
        q = F.linear(x if at is None else _token(x, at), w_q)  # [N, Cq, D]
        kv = F.linear(x, w_kv)  # [N, C, 2D]
        scale = 1.0 / math.sqrt(d // self.heads)
        out = native.token_attention(q, kv, self.heads, scale)
        return self.out(attend(q, kv, self.heads) if out is None else out)


def attend(q: torch.Tensor, kv: torch.Tensor, heads: int) -> torch.Tensor:
    """The readable form of the attention: ``q [N, Cq, D]``, ``kv [N, C, 2D]`` -> ``[N, Cq, D]`` by
    `scaled_dot_product_attention` per head (scale 1/sqrt(D / heads))."""
    n, cq, d = q.shape
    qh = q.view(n, cq, heads, d // heads).transpose(1, 2)
    k, v = kv.view(n, kv.shape[1], 2, heads, d // heads).permute(2, 0, 3, 1, 4).unbind(0)
    return F.scaled_dot_product_attention(qh, k, v).transpose(1, 2).reshape(n, cq, d)


def _token(x: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """``x [N, C, D]``, ``at [N]`` -> ``[N, 1, D]``: token ``at[n]`` of row n (a gather: its backward is a scatter)."""
    return x.gather(1, at.view(-1, 1, 1).expand(-1, 1, x.shape[-1]))


class DenoiserBlock(nn.Module):
    """Self-attention over the C interest tokens, the channel condition, an FFN; each with residual + LayerNorm."""

    def __init__(self, dim: int, heads: int = 2, ffn_factor: int = 3) -> None:
        super().__init__()
        self.attention = TokenSelfAttention(dim, heads)
        self.cond = nn.Linear(dim, dim, bias=False)  # cross-attention to one token: W_o W_v o_i
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_factor * dim), nn.ReLU(), nn.Linear(ffn_factor * dim, dim))
        self.norms = nn.ModuleList(nn.LayerNorm(dim, eps=1e-6) for _ in range(3))

    def forward(self, x: torch.Tensor, cond: torch.Tensor, at: torch.Tensor | None = None) -> torch.Tensor:
        """x ``[N, C, D]``, cond ``[N, D]`` -> ``[N, C, D]``; with ``at [N]``, token ``at[n]``'s output only
        (``[N, 1, D]``: everything after the attention is per token)."""
        x = self.norms[0]((x if at is None else _token(x, at)) + self.attention(x, at))
        x = self.norms[1](x + self.cond(cond).unsqueeze(1))
        return self.norms[2](x + self.ffn(x))


class Denoiser(nn.Module):
    """The x0-predictor: time embedding added to every token, then ``layers`` blocks."""

    def __init__(self, dim: int, layers: int = 2, heads: int = 2, ffn_factor: int = 3) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"the denoiser's width must be even (sinusoidal time embedding), got {dim}")
        self.dim = dim
        self.time = nn.Sequential(nn.Linear(dim, 4 * dim), nn.SiLU(), nn.Linear(4 * dim, dim))
        self.blocks = nn.ModuleList(DenoiserBlock(dim, heads, ffn_factor) for _ in range(layers))

    def forward(
        self, tokens: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, at: torch.Tensor | None = None
    ) -> torch.Tensor:
        """tokens ``[N, C, D]``, t ``[N]`` int (or ``[1]``: one step for every row), cond ``[N, D]`` -> the
        prediction at every token ``[N, C, D]``, or with ``at [N]`` at token ``at[n]`` of each row only, ``[N, 1,
        D]`` (the last block computes that token's query, attention output and FFN alone; the blocks before still
        run on every token, whose outputs are the last block's keys and values)."""
        x = tokens + self.time(sinusoidal_embedding(t, self.dim)).unsqueeze(1)
        for i, block in enumerate(self.blocks):
            x = block(x, cond, at if i + 1 == len(self.blocks) else None)
        return x


class DMIG(nn.Module):
    """Generates ``r* [B, C, D]`` from the interests ``r̂ [B, C, D]`` and the channels ``o [B, C, D]``."""

    def __init__(
        self,
        dim: int,
        *,
        timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        layers: int = 2,
        heads: int = 2,
        ffn_factor: int = 3,
        steps: int = 10,
        t0: int = 50,
        mode: Literal["paper", "code"] = "paper",
        grad_through_sampler: bool = True,
    ) -> None:
        super().__init__()
        if not 0 < t0 < timesteps or not 0 < steps <= t0 + 1:
            raise ValueError(f"need 0 < t0 < timesteps and 0 < steps <= t0 + 1, got t0={t0}, steps={steps}")
        self.denoiser = Denoiser(dim, layers, heads, ffn_factor)
        self.timesteps, self.steps, self.t0, self.mode = timesteps, steps, t0, mode
        self.grad_through_sampler = grad_through_sampler
        betas = torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
        self.register_buffer("betas", betas.float(), persistent=False)
        self.register_buffer("alpha_bar", torch.cumprod(1 - betas, 0).float(), persistent=False)

    # ---- the channel-folded denoiser call ---------------------------------------------------------------------------
    def predict(self, x: torch.Tensor, r: torch.Tensor, o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The denoiser's output for every channel i at once: ``x [B, C, D]`` the noisy interest i (at time
        ``t [B, C]``, or ``[1]``: one step for all, as in sampling, whose time embedding is then computed once, not
        once per row), the other tokens the clean ``r``, the condition ``o_i`` -> ``[B, C, D]`` (output at i)."""
        b, c, d = r.shape
        eye = torch.eye(c, dtype=torch.bool, device=r.device)  # copy i: token i noisy
        tokens = torch.where(eye.view(1, c, c, 1), x.unsqueeze(2), r.unsqueeze(1))  # [B, C(copy), C(token), D]
        # only copy i's token i is read: the last block computes that token alone (`Denoiser.forward`'s `at`), the
        # same values as the whole copy's output at i (to float rounding; tests/test_diffumin.py); at C = 4 and two
        # blocks, 56 of the 80 D x D row products per copy (the second block's q, output and FFN on 1 token of 4)
        at = torch.arange(c, device=r.device).repeat(b)  # row b * C + i is copy i
        out = self.denoiser(tokens.reshape(b * c, c, d), t.reshape(-1), o.reshape(b * c, d), at)
        return out.view(b, c, d)

    def q_sample(self, r: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        a = self.alpha_bar[t].unsqueeze(-1)
        return a.sqrt() * r + (1 - a).sqrt() * noise

    def loss(self, r: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """``L_d``: x0-prediction MSE at a random step per (sample, channel); inputs detached (module docstring)."""
        r, o = r.detach(), o.detach()
        t = torch.randint(0, self.timesteps, r.shape[:2], device=r.device)
        x = self.q_sample(r, t, torch.randn_like(r))
        return F.mse_loss(self.predict(x, r, o, t), r)

    # ---- sampling ---------------------------------------------------------------------------------------------------
    def schedule(self) -> list[int]:
        """The strided steps from ``t0`` down to 0 (``steps`` distinct values, t0 first)."""
        return sorted({round(self.t0 * (1 - k / max(1, self.steps - 1))) for k in range(self.steps)}, reverse=True)

    def forward(self, r: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """``r* [B, C, D]``: stochastic in training, deterministic at evaluation (``mode: paper``)."""
        if self.grad_through_sampler:
            return self._sample_code(r, o) if self.mode == "code" else self._sample(r, o)
        with torch.no_grad():
            return self._sample_code(r, o) if self.mode == "code" else self._sample(r, o)

    def _sample(self, r: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        eta = 1.0 if self.training else 0.0
        ts = self.schedule()
        noise = torch.randn_like(r) if self.training else torch.zeros_like(r)
        x = self.q_sample(r, torch.full(r.shape[:2], ts[0], device=r.device), noise)
        x0 = x
        for i, t in enumerate(ts):
            x0 = self.predict(x, r, o, torch.full((1,), t, device=r.device))
            if i + 1 == len(ts):
                break
            a_t, a_prev = self.alpha_bar[t], self.alpha_bar[ts[i + 1]]
            eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
            sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
            if eta > 0:
                x = x + sigma * torch.randn_like(x)
        return x0

    def _sample_code(self, r: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """The release: random t0, fresh noise, steps n = 9..0 reading the output as ε (DDPM posterior mean)."""
        t0 = torch.randint(0, self.timesteps, r.shape[:2], device=r.device)
        x = self.q_sample(r, t0, torch.randn_like(r))
        for n in range(self.steps - 1, -1, -1):
            eps = self.predict(x, r, o, torch.full((1,), n, device=r.device))
            a_bar, beta = self.alpha_bar[n], self.betas[n]
            a_prev = self.alpha_bar[n - 1] if n > 0 else torch.ones_like(a_bar)
            x0 = (x - (1 - a_bar).sqrt() * eps) / a_bar.sqrt()
            mean = (a_prev.sqrt() * beta * x0 + (1 - beta).sqrt() * (1 - a_prev) * x) / (1 - a_bar)
            x = mean + (((1 - a_prev) / (1 - a_bar) * beta).sqrt() * torch.randn_like(x) if n > 0 else 0.0)
        return x


class ChannelContrast(nn.Module):
    """CMIC: per channel, InfoNCE between ``l2n(MLP1(r̂_c))`` and ``l2n(MLP2(r*_c))`` with the other samples of the
    batch as negatives (one direction, r → r*), mean over channels and samples; τ = 0.05 (the configs)."""

    def __init__(self, dim: int, tau: float = 0.05) -> None:
        super().__init__()
        self.real = nn.Sequential(nn.Linear(dim, 4 * dim), nn.ReLU(), nn.Linear(4 * dim, dim))
        self.generated = nn.Sequential(nn.Linear(dim, 4 * dim), nn.ReLU(), nn.Linear(4 * dim, dim))
        self.tau = tau

    def forward(self, r: torch.Tensor, r_star: torch.Tensor) -> torch.Tensor:
        p = F.normalize(self.real(r), dim=-1).transpose(0, 1)  # [C, B, D]
        q = F.normalize(self.generated(r_star), dim=-1).transpose(0, 1)
        logits = torch.bmm(p, q.transpose(1, 2)) / self.tau  # [C, B, B]
        target = torch.arange(r.shape[0], device=r.device).expand(r.shape[1], -1)
        return F.cross_entropy(logits.flatten(0, 1), target.flatten())


__all__ = ["DMIG", "ChannelContrast", "Denoiser", "sinusoidal_embedding"]
