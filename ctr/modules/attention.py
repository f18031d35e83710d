"""Target attention over a right-padded behavior sequence: DIN's activation unit, DIEN's bilinear attention and the
DIN-style attention of DIEN's official code.

Every module here takes the target ``query [B, Dq]``, the behaviors ``keys [B, L, D]`` (right-padded, oldest first)
and a bool ``mask [B, L]`` (True = a real behavior) and returns ``(pooled [B, Dv], weights [B, L])``; the weights are
0 at masked positions and a row without behaviors pools to zeros.

* `DinAttention` (DIN, Zhou et al., KDD 2018, Eq. 3): ``s_i = MLP([q; k_i; q − k_i; q ⊙ k_i]) → 1``, ``pooled = Σ_i
  w_i v_i``. The paper uses the raw scores as weights (``softmax=False``: "the normalization with softmax is
  abandoned" to keep the intensity of user interest); the official code (zhougr1993/DeepInterestNetwork
  ``din/model.py``) masks, divides by sqrt(D) and takes a softmax (``softmax=True``, ``scale=None``). The MLP runs on
  the real behaviors only (``keys[mask]``), so padding never reaches Dice's batch statistics.
  `DinAttention.forward_jagged` computes the same thing with the fused `kernels.din_attention` on jagged keys.
* `BilinearAttention` (DIEN, Zhou et al., AAAI 2019, Eq. 5): ``a_t = softmax_t(h_t W e_target)`` over the real
  positions.
* `DienDinAttention` (DIEN official code, mouna99/dien ``script/utils.py::din_fcn_attention``): the query is
  ``PReLU(Dense_H(e_target))`` (PReLU slope starts at 0.1), then a DIN activation unit [80, 40] sigmoid over
  ``[q; h; q − h; q ⊙ h]`` and a masked softmax *without* the 1/sqrt(D) scaling (commented out there).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import native
from .activations import Dice, make_activation

DIN_ACTIVATIONS = ("sigmoid", "relu", "prelu", "dice")
log = logging.getLogger(__name__)


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim restricted to ``mask``; 0 at masked positions, all zeros for an empty row."""
    filled = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.softmax(filled, dim=-1) * mask.to(scores.dtype)


def pool(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``Σ_i w_i v_i``: weights [B, L], values [B, L, Dv] -> [B, Dv].

    A broadcast product and a sum, not ``bmm`` of [B, 1, L] by [B, L, Dv]: on the CPU that batched matmul runs one
    tiny product per sample (forward and backward), about twice the time of the two memory-bound passes here.
    """
    return (weights.unsqueeze(-1) * values).sum(1)


def segment_softmax(scores: torch.Tensor, rows: torch.Tensor, b: int) -> torch.Tensor:
    """Softmax of ``scores [N]`` within each sample (``rows [N]`` < ``b``): `masked_softmax` on rows."""
    top = scores.new_full((b,), float("-inf")).scatter_reduce(0, rows, scores.detach(), "amax")
    e = torch.exp(scores - top.index_select(0, rows))
    total = e.new_zeros(b).index_add(0, rows, e)
    return e / total.index_select(0, rows)


def _is_identity(flat: torch.Tensor) -> bool:
    """Whether the positions ``flat`` (increasing) are 0..N-1: then they read every row in order."""
    n = flat.numel()
    return n == 0 or (int(flat[0]) == 0 and int(flat[-1]) == n - 1)


class DinAttention(nn.Module):
    """DIN's local activation unit and weighted sum pooling (see the module docstring).

    Args:
        dim: D, the width of the query and the keys (the unit takes ``q − k`` and ``q ⊙ k``).
        hidden: hidden sizes of the activation unit MLP ([80, 40] in the official DIN and DIEN code).
        activation: hidden activation: ``sigmoid`` (official code), ``relu``, ``prelu`` or ``dice`` (the paper's
            Fig. 2 shows PReLU/Dice in the activation unit).
        softmax: False (paper): the raw scores are the weights. True (official code): masked softmax of
            ``scores · scale``.
        scale: the score multiplier before the softmax; None = 1/sqrt(D) (official DIN code).
    """

    def __init__(
        self,
        dim: int,
        hidden: Sequence[int] = (80, 40),
        activation: str = "dice",
        softmax: bool = False,
        scale: float | None = None,
    ) -> None:
        super().__init__()
        if activation not in DIN_ACTIVATIONS:
            raise ValueError(f"DinAttention activation must be one of {DIN_ACTIVATIONS}, got {activation!r}")
        if not hidden:
            raise ValueError("DinAttention needs at least one hidden layer")
        self.dim = dim
        self.activation = activation
        self.softmax = softmax
        self.scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
        widths = [4 * dim, *hidden]
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True))
        self.acts = nn.ModuleList(make_activation(activation, h) for h in hidden)
        self.out = nn.Linear(widths[-1], 1)
        self._compiled_rows: Callable[..., torch.Tensor] | None = None  # compile_rows()
        self._compile_checked = False

    # ---- the readable form ----------------------------------------------------------------------------------
    def unit(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The activation unit on rows: q, k [N, D] -> scores [N]."""
        x = torch.cat([q, k, q - k, q * k], dim=-1)
        for linear, act in zip(self.linears, self.acts, strict=True):
            x = act(linear(x))
        return self.out(x).squeeze(-1)

    def scores(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Raw scores [B, L] (0 at masked positions): `unit` on the real behaviors only, computed the fast way.

        Two rewrites of `unit` that keep its value (to float rounding; `tests/test_models.py` holds them equal):

        * the first layer is split by input block, ``W [q; k; q − k; q ⊙ k] = (W_q + W_d) q + [W_k − W_d, W_p]
          [k; q ⊙ k]``: the query's share is computed once per sample (B rows, not one per behavior) and the
          [N, 4D] concatenation is never built, which halves the layer's multiply-adds;
        * the real behaviors are gathered by flat position (`native.gather_rows`: an ``index_select`` whose
          backward sums rows by index in one pass) rather than by a boolean mask, whose backward is an
          accumulating ``index_put`` that runs serially on the CPU.

        With Dice (the default) on float32 CPU tensors the rows go to `native.din_unit`: the same two rewrites,
        forward and backward in passes over blocks of rows that stay in cache (`ctr/native/din_unit.cpp`), instead
        of the chain of whole-batch operators below, which on 2 cores run at the memory's rate.
        """
        b, n, d = keys.shape
        flat = mask.reshape(-1).nonzero().squeeze(1)  # the real positions, row-major
        out = keys.new_zeros(b * n)
        if flat.numel() == 0:
            return out.view(b, n)
        rows = torch.div(flat, n, rounding_mode="floor")
        s = self.scores_rows(query, keys.reshape(b * n, d), flat, rows)
        return out.index_copy(0, flat, s).view(b, n)

    def scores_rows(
        self, query: torch.Tensor, keys: torch.Tensor, flat: torch.Tensor, rows: torch.Tensor
    ) -> torch.Tensor:
        """Raw scores [N] of the behaviors ``keys[flat]`` (``keys [M, D]``, ``flat [N]`` increasing int64
        positions) of samples ``rows [N]`` (nondecreasing): `scores` without the padded layout. The keys may be the
        rows of a jagged block as they come (``flat`` every position, or a tail of each sample's), so no padded
        copy is built and none is read back in the backward."""
        if flat.numel() == 0:
            return keys.new_zeros(0)
        q_share, w_kp = self._first_layer(query, keys.shape[1])
        compiled = self._compiled_rows is not None and self.training and torch.is_grad_enabled()
        if self.activation == "dice" and not compiled:  # the unit in cache-sized blocks (ctr/native/din_unit.cpp)
            s = native.din_unit(keys, flat, query, rows, q_share, w_kp, self.linears[1:], self.acts, self.out)
            if s is not None:
                return s  # type: ignore[return-value]
        k = native.gather_rows(keys, flat)
        q_part = native.gather_rows(q_share, rows)
        q = native.gather_rows(query, rows)
        if compiled:
            return self._run_compiled(q_part, q, k, w_kp)
        return self._rows(q_part, q, k, w_kp)

    def _first_layer(self, query: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first layer on ``[q; k; q − k; q ⊙ k]`` split into the query's share ``[B, H_1]`` (with the bias) and
        the weight ``[H_1, 2d]`` on ``[k; q ⊙ k]``."""
        first = self.linears[0]
        w_q, w_k, w_d, w_p = first.weight.split(d, dim=1)
        return F.linear(query, w_q + w_d, first.bias), torch.cat([w_k - w_d, w_p], dim=1)

    def _pooled_rows(
        self, query: torch.Tensor, keys: torch.Tensor, flat: torch.Tensor, rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """`forward_rows` without softmax, pooling the keys themselves, in one native op: the unit's scores and their
        weighted sum of the keys (`din_unit(pool=True)`: the sum in the scores' pass, its gradient in the unit's
        backward, no second gradient of the keys for autograd to add); None where it does not apply."""
        compiled = self._compiled_rows is not None and self.training and torch.is_grad_enabled()
        if self.softmax or self.activation != "dice" or compiled or flat.numel() == 0:
            return None
        q_share, w_kp = self._first_layer(query, keys.shape[1])
        found = native.din_unit(keys, flat, query, rows, q_share, w_kp, self.linears[1:], self.acts, self.out, True)
        return found  # type: ignore[return-value]

    def _rows(self, q_part: torch.Tensor, q: torch.Tensor, k: torch.Tensor, w_kp: torch.Tensor) -> torch.Tensor:
        """The unit from the first layer's behavior share on: gathered rows [N, ...] -> scores [N]."""
        x = self.acts[0](torch.addmm(q_part, torch.cat([k, q * k], dim=-1), w_kp.t()))
        for linear, act in zip(self.linears[1:], self.acts[1:], strict=True):
            x = act(linear(x))
        return self.out(x).squeeze(-1)

    # ---- torch.compile of the rows (train.compile) ----------------------------------------------------------
    def compile_rows(self) -> None:
        """Train through a `torch.compile`d `_rows` (evaluation and no-grad calls stay eager).

        Inductor fuses Dice's elementwise passes over the [N, H] blocks, which eager PyTorch runs one by one through
        memory; same parameters, same function to float rounding (`tests/test_compile.py`). The first call compiles
        (seconds); if that fails (no C++ compiler, an unsupported build), the unit falls back to eager with a
        warning rather than stopping the run.
        """
        # the unbound function, called with the module: a copy of the module (deepcopy) trains its own parameters
        self._compiled_rows = torch.compile(DinAttention._rows, dynamic=True)
        self._compile_checked = False

    def _run_compiled(self, *args: torch.Tensor) -> torch.Tensor:
        assert self._compiled_rows is not None
        if self._compile_checked:
            return self._compiled_rows(self, *args)
        try:
            s = self._compiled_rows(self, *args)
        except Exception as e:  # the first call is the compilation: keep training, eagerly
            log.warning("train.compile: DIN's activation unit did not compile (%s: %s); running it eagerly",
                        type(e).__name__, str(e).splitlines()[0] if str(e) else "")  # fmt: skip
            self._compiled_rows = None
            return self._rows(*args)
        self._compile_checked = True
        return s

    def forward(
        self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor, values: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """query [B, D], keys [B, L, D], mask [B, L] -> (pooled [B, Dv], weights [B, L])."""
        s = self.scores(query, keys, mask)
        weights = masked_softmax(s * self.scale, mask) if self.softmax else s * mask.to(s.dtype)
        return pool(weights, keys if values is None else values), weights

    def forward_rows(
        self,
        query: torch.Tensor,
        keys: torch.Tensor,
        flat: torch.Tensor,
        rows: torch.Tensor,
        values: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` on behaviors given as rows: ``keys [M, D]`` (and ``values [M, Dv]``, default the keys) at the
        increasing positions ``flat [N]``, of samples ``rows [N]`` (nondecreasing, < B = ``query``'s rows) ->
        (pooled [B, Dv], weights [N]). The same function as `forward` on the padded layout of the same behaviors
        (`tests/test_attention_rows.py`), without building it: for a jagged block (a prefix's rows, ``flat`` all
        or each sample's tail) the zero-filled ``[B, L, D]`` copy, its read-back in the backward and the padded
        positions' share of the pooling are skipped. A sample without rows pools to zeros."""
        b = query.shape[0]
        if values is None or values is keys:
            fused = self._pooled_rows(query, keys, flat, rows)
            if fused is not None:
                return fused
        s = self.scores_rows(query, keys, flat, rows)
        weights = segment_softmax(s * self.scale, rows, b) if self.softmax else s
        v = keys if values is None else values
        pooled = native.weighted_pool(weights, v, flat, rows, b)  # one pass each way (weighted_pool.cpp)
        if pooled is not None:
            return pooled, weights
        if flat.numel() != v.shape[0] or not _is_identity(flat):
            v = native.gather_rows(v, flat)
        return native.sum_rows(weights.unsqueeze(1) * v, rows, b), weights

    # ---- the fused kernel on jagged keys --------------------------------------------------------------------
    def forward_jagged(
        self,
        query: torch.Tensor,
        keys: torch.Tensor,
        offsets: torch.Tensor,
        values: torch.Tensor | None = None,
        *,
        max_len: int | None = None,
        backend: str | None = None,
    ) -> torch.Tensor:
        """The same pooled output from `kernels.din_attention` (Triton on CUDA, its PyTorch reference elsewhere).

        query [B, D], keys [N, D] jagged by int64 ``offsets [B + 1]`` -> pooled [B, Dv]. Uses this module's
        parameters and, for Dice, its BatchNorm buffers (batch statistics over the real behaviors in training,
        running statistics in eval, updated in place like the module does).
        """
        from kernels import din_attention

        weights = [lin.weight.t() for lin in self.linears] + [self.out.weight.t()]
        biases = [lin.bias for lin in self.linears] + [self.out.bias]
        alphas = running = None
        dice_momentum, dice_eps = 0.1, 1e-8
        if self.activation == "prelu":
            alphas = [act.weight for act in self.acts]
        elif self.activation == "dice":
            dices: list[Dice] = list(self.acts)  # type: ignore[arg-type]
            alphas = [act.alpha for act in dices]
            norms: list[nn.BatchNorm1d] = [act.norm for act in dices]  # type: ignore[misc]
            running = [(bn.running_mean, bn.running_var) for bn in norms]
            dice_momentum, dice_eps = float(norms[0].momentum or 0.1), float(norms[0].eps)
        return din_attention(
            query, keys, offsets, weights, biases, values=values, activation=self.activation, alphas=alphas,
            dice_running=running, dice_training=self.training and self.activation == "dice",
            dice_momentum=dice_momentum, dice_eps=dice_eps, softmax=self.softmax, softmax_scale=self.scale,
            max_len=max_len, backend=backend,
        )  # fmt: skip


class BilinearAttention(nn.Module):
    """DIEN's attention (paper Eq. 5): ``a_t = exp(h_t W e_a) / Σ_j exp(h_j W e_a)`` over the real positions.

    ``W`` maps the target (``query_dim``) to the key space (``key_dim``), without a bias (Eq. 5 has none).
    """

    def __init__(self, query_dim: int, key_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(query_dim, key_dim, bias=False)

    def forward(
        self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor, values: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.bmm(keys, self.proj(query).unsqueeze(-1)).squeeze(-1)  # [B, L]
        weights = masked_softmax(scores, mask)
        return pool(weights, keys if values is None else values), weights


class DienDinAttention(nn.Module):
    """DIEN official code's attention (``din_fcn_attention``): query ``PReLU(Dense_Dk(e_target))``, then a DIN
    activation unit (default [80, 40] sigmoid) and a masked softmax without scaling."""

    def __init__(
        self, query_dim: int, key_dim: int, hidden: Sequence[int] = (80, 40), activation: str = "sigmoid"
    ) -> None:
        super().__init__()
        self.proj = nn.Linear(query_dim, key_dim)
        self.prelu = nn.PReLU(key_dim, init=0.1)
        self.unit = DinAttention(key_dim, hidden, activation, softmax=True, scale=1.0)

    def forward(
        self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor, values: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.unit(self.prelu(self.proj(query)), keys, mask, values)
