"""DIEN's recurrent layers over right-padded sequences: the GRU interest extractor and the AUGRU interest evolver.

Inputs are right-padded ``[B, L, D]`` (oldest first, the newest real behavior at ``length − 1``) with a bool mask
``[B, L]``. Positions at or beyond a row's length never change its state: the extractor is causal, so its outputs at
real positions do not depend on the padding (padded outputs are zeroed), and the AUGRU keeps the previous state
where the mask is False (as TF's ``dynamic_rnn(sequence_length=...)`` in DIEN's official code).

AUGRU (DIEN, Zhou et al., AAAI 2019, Eq. 6-8), ``form="paper"`` (also FuxiCTR's ``AUGRUCell``)::

    r = σ(W_r x + U_r h + b_r)            u = σ(W_u x + U_u h + b_u)
    h̃ = tanh(W_h x + r ⊙ (U_h h) + b_h)
    u' = a · u                            h_new = (1 − u') ⊙ h + u' ⊙ h̃

so a = 0 keeps the state and a = 1 is a plain GRU step. ``form="official"`` is the TF ``VecAttGRUCell`` of
mouna99/dien ``script/utils.py`` (TF's GRU conventions: the reset gate multiplies the state *before* the candidate's
matrix, the gate biases start at 1.0)::

    r, u = σ(W [x; h] + b)                h̃ = tanh(W_c [x; r ⊙ h] + b_c)
    u' = (1 − a) · u                      h_new = u' ⊙ h + (1 − u') ⊙ h̃

there a = 0 is a plain (TF-convention) GRU step and a = 1 replaces the state by the candidate.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .. import native
from .gru_scan import gru_scan


def next_dots(h: torch.Tensor, clicked: torch.Tensor, sampled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DIEN's auxiliary logits with ``aux_net: dot``: each state against the next clicked and the next sampled
    behavior, ``(<h_t, e_{t+1}>, <h_t, ê_{t+1}>)`` for t < L − 1, each ``[B, L − 1]`` (``h``, ``clicked``,
    ``sampled``: ``[B, L, H]``). Natively where it applies (`ctr.native.next_dots`: one pass each way, no slices of
    the three blocks), else the readable form below; the same values and gradients (`tests/test_native.py`)."""
    found = native.next_dots(h, clicked, sampled)
    if found is not None:
        return found
    h0 = h[:, :-1]
    return (h0 * clicked[:, 1:]).sum(-1), (h0 * sampled[:, 1:]).sum(-1)


class InterestExtractor(nn.Module):
    """DIEN's interest extractor: a one-layer GRU over the behaviors; outputs ``h_t`` [B, L, H], 0 where masked.

    The parameters are ``nn.GRU``'s (``self.gru``); the recurrence runs in `gru_scan` (a hand-written backward, the
    state kept past each row's length) and ``fused=False`` runs ``nn.GRU`` itself, the reference the tests hold it to.
    """

    def __init__(self, input_dim: int, hidden_dim: int, fused: bool = True) -> None:
        super().__init__()
        self.gru = nn.GRU(input_dim, hidden_dim, batch_first=True)
        self.fused = fused

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # Right padding + a causal recurrence: h_t at a real position sees only x_0..x_t, all real.
        if self.fused:
            g = self.gru
            hd = g.hidden_size
            # the state's r and u biases add outside the reset gate: folded into the input projection's
            b_in = g.bias_ih_l0 + torch.cat([g.bias_hh_l0[: 2 * hd], g.bias_hh_l0.new_zeros(hd)])
            gx = F.linear(x, g.weight_ih_l0, b_in)
            out, _ = gru_scan(gx, None, mask, None, g.weight_hh_l0, g.bias_hh_l0[2 * hd :], "torch")
        else:
            out, _ = self.gru(x)
        return out * mask.unsqueeze(-1).to(out.dtype)


class AUGRU(nn.Module):
    """GRU with an attentional update gate (see the module docstring); a loop over time, vectorized over the batch.

    forward(x [B, L, D], att [B, L], mask [B, L], h0 [B, H] | None) -> (states [B, L, H], final [B, H]); ``final``
    is the state after each row's last real position (``h0``, default zeros, for an empty row).
    """

    def __init__(
        self, input_dim: int, hidden_dim: int, form: Literal["paper", "official"] = "paper", fused: bool = True
    ) -> None:
        super().__init__()
        if form not in ("paper", "official"):
            raise ValueError(f"AUGRU form must be 'paper' or 'official', got {form!r}")
        self.form = form
        self.fused = fused  # False: the readable loop below under autograd, the reference of `gru_scan`
        self.hidden_dim = hidden_dim
        self.x2h = nn.Linear(input_dim, 3 * hidden_dim)  # [r | u | candidate] input parts and every bias
        self.h2h = nn.Linear(hidden_dim, 3 * hidden_dim, bias=False)  # [U_r | U_u | U_h]
        if form == "official":
            with torch.no_grad():
                self.x2h.bias[: 2 * hidden_dim].fill_(1.0)  # TF GRU: gate biases start at 1

    def forward(
        self, x: torch.Tensor, att: torch.Tensor, mask: torch.Tensor, h0: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        gx = self.x2h(x)  # [B, L, 3H], every input projection at once
        if self.fused:
            return gru_scan(gx, att, mask, h0, self.h2h.weight, None, self.form)
        return self._loop(gx, att, mask, h0)

    def _loop(
        self, gx: torch.Tensor, att: torch.Tensor, mask: torch.Tensor, h0: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b = gx.shape[0]
        hd = self.hidden_dim
        h = gx.new_zeros(b, hd) if h0 is None else h0
        w_gates, w_cand = self.h2h.weight[: 2 * hd], self.h2h.weight[2 * hd :]
        # unbind once: indexing [:, t] in the loop would cost a full-size zero gradient per step in backward
        gx_steps = gx.unbind(1)
        att_steps = att.unsqueeze(-1).to(gx.dtype).unbind(1)
        keep_steps = mask.unsqueeze(-1).unbind(1)
        states = []
        # Each step is a few small ops on [B, H], so their count is the cost: both gates in one sigmoid, and the
        # state update as one lerp, (1 − u)·h + u·h̃ = h + u·(h̃ − h) (paper), u·h + (1 − u)·h̃ = h̃ + u·(h − h̃).
        for t in range(len(gx_steps)):
            gx_ru, gx_c = gx_steps[t].split((2 * hd, hd), dim=-1)
            if self.form == "paper":
                gh_ru, gh_c = torch.mm(h, self.h2h.weight.t()).split((2 * hd, hd), dim=-1)
                r, u = torch.sigmoid(gx_ru + gh_ru).split(hd, dim=-1)
                cand = torch.tanh(gx_c + r * gh_c)
                new = torch.lerp(h, cand, att_steps[t] * u)
            else:
                r, u = torch.sigmoid(gx_ru + torch.mm(h, w_gates.t())).split(hd, dim=-1)
                cand = torch.tanh(gx_c + torch.mm(r * h, w_cand.t()))
                new = torch.lerp(cand, h, (1 - att_steps[t]) * u)
            h = torch.where(keep_steps[t], new, h)
            states.append(h)
        return torch.stack(states, dim=1), h
