"""The GRU-family recurrences of DIEN (its GRU interest extractor and its AUGRU) as one autograd op with a
hand-written backward.

At DIEN's sizes (B 1,024, H 32, L 50) each step is about ten ops on [B, H] blocks, and on the 2-core machines
these run at memory speed, not at op-dispatch speed (an op on a block that is in cache takes 4 to 12 us, the same
op in the recurrence 30 to 180 us): what costs is the bytes each step writes and reads back. Under autograd every
op saves its inputs and every backward node writes its own gradients and accumulates into the weight's; here the
forward keeps only what the backward needs (the states, the gates, the candidate), every result is written
straight into a preallocated time-major slot, the backward walks back once with one matrix product per step for
the state's gradient, and the weight's gradient is one product over all steps at the end. Measured on the DIEN
training step (MovieLens, L 50, alternating pairs on one machine): 132 and 155 ms against 161 and 196 ms with
``nn.GRU`` and the autograd loop. ``tanh`` is computed as 2σ(2x) − 1: on these CPUs torch.tanh takes 2.6 ns per
element, sigmoid 0.9.

Cells, over input projections ``gx = W_x x + b_x`` ([B, L, 3H], parts r | u | c) and the state's ``W`` = [3H, H]::

    "torch"    (nn.GRU)   gh = W h + b_h;  r, z = σ(gx_ru + gh_ru);  c = tanh(gx_c + r ⊙ gh_c);  h' = h + (1 − z)(c − h)
    "paper"    (AUGRU)    gh = W h;        r, u = σ(gx_ru + gh_ru);  c = tanh(gx_c + r ⊙ gh_c);  h' = h + a·u (c − h)
    "official" (TF AUGRU) r, u = σ(gx_ru + W_ru h);  c = tanh(gx_c + W_c (r ⊙ h));  h' = c + (1 − a)·u (h − c)

and at a padded position (mask False) the state is kept: h' = h. Returns every state [B, L, H] and the last one
[B, H]. The readable references are ``nn.GRU`` and `AUGRU`'s loop (``fused=False``); tests hold the values and all
gradients to them.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from .. import native

FORMS = ("torch", "paper", "official")


_sigmoid_backward = torch.ops.aten.sigmoid_backward.grad_input  # grad · y (1 − y), written into `grad_input`
_tanh_backward = torch.ops.aten.tanh_backward.grad_input  # grad · (1 − y²)


def _tanh_into(pre: torch.Tensor, out: torch.Tensor) -> None:
    """out = tanh(pre) as 2σ(2·pre) − 1 (overwrites `pre`): the same function to float rounding, and on the CPU
    builds measured here torch.tanh takes about 2.6 ns per element where sigmoid takes 0.9."""
    torch.sigmoid(pre.mul_(2), out=out)
    out.mul_(2).sub_(1)


# Rows are independent in the recurrence (only the weight's gradient sums over them, after the loop), so with two or
# more torch threads the batch is cut in two halves that step in two Python threads of one torch thread each: the
# ops on [B, H] blocks are too small for intra-op threads to overlap (one process with two threads used about 1.1
# cores), and the ops release the GIL while they compute. Below `SPLIT_MIN_ROWS` rows, or with one thread (the
# demo's jobs), the loop runs whole. Each row's arithmetic is the same either way.
SPLIT_MIN_ROWS = 256
_POOL: ThreadPoolExecutor | None = None


def _in_row_blocks(b: int, fn: Callable[[slice], None]) -> None:
    """fn(rows) over the batch: once, or over two halves in two threads (see `SPLIT_MIN_ROWS`)."""
    global _POOL
    threads = torch.get_num_threads()
    if threads < 2 or b < SPLIT_MIN_ROWS:
        fn(slice(0, b))
        return
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="gru_scan")
    half = b // 2

    def run(rows: slice) -> None:
        with torch.no_grad():  # grad mode is per thread: the op's own forward and backward record nothing
            fn(rows)

    torch.set_num_threads(1)  # the pool's threads take this at their first op; restored for the caller below
    try:
        for f in [_POOL.submit(run, slice(0, half)), _POOL.submit(run, slice(half, b))]:
            f.result()
    finally:
        torch.set_num_threads(threads)


def _forward_rows(
    rows: slice,
    gx: torch.Tensor,
    bufs: tuple[torch.Tensor, ...],
    p: torch.Tensor,
    q: torch.Tensor | None,
    w_hh: torch.Tensor,
    b_c: torch.Tensor | None,
    form: str,
) -> None:
    """The forward loop over the rows `rows`, writing their slots of `bufs` (hs, ru, c, g, z)."""
    hs, ru_all, c_all, g_all, z_all = (x[:, rows] for x in bufs)
    gx, p = gx[rows], p[:, rows]
    q = q[:, rows] if q is not None else None
    n, steps, h3 = gx.shape
    hd = h3 // 3
    gh = gx.new_empty(n, h3 if form != "official" else 2 * hd)
    w_t = (w_hh if form != "official" else w_hh[: 2 * hd]).t()
    w_c_t = w_hh[2 * hd :].t()
    for t in range(steps):
        h, ru, c, g, z = hs[t], ru_all[t], c_all[t], g_all[t], z_all[t]
        gx_t = gx[:, t]
        torch.mm(h, w_t, out=gh)
        torch.sigmoid(torch.add(gx_t[:, : 2 * hd], gh[:, : 2 * hd], out=ru), out=ru)
        r, u = ru[:, :hd], ru[:, hd:]
        if form == "official":
            assert q is not None
            torch.mul(r, h, out=z)
            _tanh_into(torch.addmm(gx_t[:, 2 * hd :], z, w_c_t), c)
            torch.addcmul(q[t], p[t], u, out=g)
            torch.lerp(c, h, g, out=hs[t + 1])
        else:
            if b_c is None:
                z.copy_(gh[:, 2 * hd :])
            else:
                torch.add(gh[:, 2 * hd :], b_c, out=z)
            _tanh_into(torch.addcmul(gx_t[:, 2 * hd :], r, z), c)
            if form == "torch":  # g = keep (1 − z)
                torch.addcmul(p[t], p[t], u, value=-1, out=g)
            else:
                torch.mul(p[t], u, out=g)
            torch.lerp(h, c, g, out=hs[t + 1])


def _backward_rows(
    rows: slice,
    d_st: torch.Tensor | None,
    saved: tuple[torch.Tensor, ...],
    grads: tuple[torch.Tensor | None, ...],
    w_hh: torch.Tensor,
    form: str,
) -> None:
    """The backward loop over the rows `rows`: their slots of d_gx, d_z, d_a, and their rows of dh (in place)."""
    hs, ru_all, c_all, g_all, z_all, keep, p = (x[:, rows] for x in saved)
    dh_all, d_gx_all, d_z_all, d_a_all = grads  # [B, H], then time-major [L, B, ...]
    assert dh_all is not None and d_gx_all is not None
    dh_out, d_gx = dh_all[rows], d_gx_all[:, rows]
    d_z = d_z_all[:, rows] if d_z_all is not None else None
    d_a = d_a_all[:, rows] if d_a_all is not None else None
    d_st = d_st[:, rows] if d_st is not None else None
    steps, n, hd = c_all.shape
    dh = dh_out.clone()
    d_ru = hs.new_empty(n, 2 * hd)
    w_ru, w_c = w_hh[: 2 * hd], w_hh[2 * hd :]
    for t in range(steps - 1, -1, -1):
        if d_st is not None:
            dh = dh + d_st[t]
        h, c, g, p_t = hs[t], c_all[t], g_all[t], p[t]
        ru = ru_all[t]
        r, u = ru[:, :hd], ru[:, hd:]
        g_dh = g * dh
        if form == "official":  # h' = c + g (h − c)
            d_c, d_g, d_prev = dh - g_dh, (h - c) * dh, g_dh
        else:  # h' = h + g (c − h)
            d_c, d_g, d_prev = g_dh, (c - h) * dh, dh - g_dh
        torch.mul(d_g, p_t, out=d_ru[:, hd:])  # ∂g/∂u = p ("torch": −p)
        if form == "torch":
            d_ru[:, hd:].neg_()
        if d_a is not None:  # ∂g/∂a = keep ⊙ u ("official": −keep ⊙ u)
            torch.sum(d_g * u, dim=-1, out=d_a[t]).mul_(keep[t, :, 0] if form != "official" else -keep[t, :, 0])
        d_pru, d_pc = d_gx[t, :, : 2 * hd], d_gx[t, :, 2 * hd :]
        _tanh_backward(d_c, c, grad_input=d_pc)
        if form == "official":  # c = tanh(gx_c + W_c (r ⊙ h)), r, u = σ(gx_ru + W_ru h)
            d_rh = d_pc @ w_c
            torch.mul(d_rh, h, out=d_ru[:, :hd])
            d_prev = torch.addcmul(d_prev, d_rh, r)
        else:  # c = tanh(gx_c + r ⊙ z), z = W_c h + b_c
            assert d_z is not None
            torch.mul(d_pc, z_all[t], out=d_ru[:, :hd])
            torch.mul(d_pc, r, out=d_z[t])
            d_prev = torch.addmm(d_prev, d_z[t], w_c)
        _sigmoid_backward(d_ru, ru, grad_input=d_pru)
        dh = torch.addmm(d_prev, d_pru, w_ru)
    dh_out.copy_(dh)


class _GRUScan(torch.autograd.Function):
    """The states are kept time-major ([L, B, H]) and each step's results are written straight into their slots
    (``out=``): a strided output would make the kernels compute into a temporary and copy. The input projection comes
    in as [B, L, 3H] and is read one strided [B, 3H] slice per step (whole rows: no transposing copy). The mask is
    folded into the update gate: ``g`` is 0 at a padded position ("torch", "paper": h' = lerp(h, c, 0) = h exactly)
    or 1 ("official": lerp(c, h, 1) = h exactly, as torch.lerp computes a weight ≥ 0.5 from its end), so no per-step
    select is needed."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        gx: torch.Tensor,
        att: torch.Tensor | None,
        mask: torch.Tensor,
        h0: torch.Tensor,
        w_hh: torch.Tensor,
        b_c: torch.Tensor | None,
        form: str,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, steps, h3 = gx.shape
        hd = h3 // 3
        keep = mask.t().unsqueeze(-1).to(gx.dtype)  # [L, B, 1], 1 = real
        a = att.t().unsqueeze(-1).to(gx.dtype) if att is not None else None
        # g = p ⊙ u + q: the update gate's multiplier p and offset q per step and row (see the class docstring)
        q = None
        if form == "official":
            p = keep if a is None else keep * (1 - a)
            q = 1 - keep
        else:
            p = keep if a is None or form == "torch" else keep * a
        hs = gx.new_empty(steps + 1, b, hd)  # hs[t]: the state before step t; hs[L] the last
        ru_all = gx.new_empty(steps, b, 2 * hd)  # σ of the reset and update gates
        c_all, g_all = gx.new_empty(steps, b, hd), gx.new_empty(steps, b, hd)
        # what the reset gate multiplies: W_c h + b_c ("torch", "paper") or the state, r ⊙ h ("official")
        z_all = gx.new_empty(steps, b, hd)
        hs[0] = h0
        bufs = (hs, ru_all, c_all, g_all, z_all)
        ctx.native = native.applies(gx, w_hh)
        if ctx.native:  # ctr/native/gru_scan.cpp: the same loop, one row at a time through all L steps
            p, keep = p.reshape(steps, b).contiguous(), keep.reshape(steps, b).contiguous()
            q = q.reshape(steps, b).contiguous() if q is not None else None
            torch.ops.ctr_native.gru_scan_forward(
                gx.contiguous(), p, q, w_hh.contiguous(), b_c, FORMS.index(form), hs, ru_all, c_all, g_all, z_all
            )
        else:
            _in_row_blocks(b, lambda rows: _forward_rows(rows, gx, bufs, p, q, w_hh, b_c, form))
        ctx.form = form
        ctx.has_bias = b_c is not None
        ctx.att_grad = att is not None and ctx.needs_input_grad[1]
        ctx.save_for_backward(hs, ru_all, c_all, g_all, z_all, keep, p, w_hh)
        return hs[1:].transpose(0, 1), hs[steps].clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, d_states: torch.Tensor | None, d_last: torch.Tensor | None) -> tuple[Any, ...]:
        hs, ru_all, c_all, g_all, z_all, keep, p, w_hh = ctx.saved_tensors
        form = ctx.form
        steps, b, hd = c_all.shape
        flat = steps * b
        d_st = d_states.transpose(0, 1) if d_states is not None else None  # [L, B, H] view
        dh = d_last.clone() if d_last is not None else hs.new_zeros(b, hd)
        # d_gx[t]: the gradient of step t's input projection [r | u | c]; the state product W h has the same r and u
        # rows, and its c rows are d_z[t] = ∂pc ⊙ r ("official": ∂pc itself, on r ⊙ h)
        # the native loop writes d_gx batch-major [B, L, 3H], gx's own layout: the Python loop's time-major d_gx,
        # returned as a transposed view, makes the input projection's backward copy it first (DIEN on the demo world
        # at L = 50: most of 18 ms of `copy_` per step); the weight's gradient then pairs d_gx's rows with a
        # batch-major copy of the states, a third as wide
        d_gx = hs.new_empty(b, steps, 3 * hd) if ctx.native else hs.new_empty(steps, b, 3 * hd)
        d_z = hs.new_empty(steps, b, hd) if form != "official" else None
        d_a = hs.new_empty(steps, b) if ctx.att_grad else None
        if ctx.native:
            torch.ops.ctr_native.gru_scan_backward(
                d_states.contiguous() if d_states is not None else None, hs, ru_all, c_all, g_all, z_all, keep, p,
                w_hh.contiguous(), FORMS.index(form), dh, d_gx, d_z, d_a,
            )  # fmt: skip
        else:
            saved = (hs, ru_all, c_all, g_all, z_all, keep, p)
            grads = (dh, d_gx, d_z, d_a)
            _in_row_blocks(b, lambda rows: _backward_rows(rows, d_st, saved, grads, w_hh, form))
        h_in = hs[:-1].reshape(flat, hd)  # time-major rows (t, b)
        h_in_gx = h_in if not ctx.native else hs[:-1].transpose(0, 1).reshape(flat, hd)  # in d_gx's row order
        d_ru_rows = d_gx[:, :, : 2 * hd].reshape(flat, 2 * hd)
        if form == "official":  # the c rows are d_gx's too: z (r ⊙ h) in d_gx's row order
            c_in = z_all.transpose(0, 1).reshape(flat, hd) if ctx.native else z_all.reshape(flat, hd)
            d_c_rows = d_gx[:, :, 2 * hd :].reshape(flat, hd)
        else:
            d_c_rows, c_in = d_z.reshape(flat, hd), h_in
        d_w_hh = torch.cat([d_ru_rows.t() @ h_in_gx, d_c_rows.t() @ c_in])
        d_b_c = d_c_rows.sum(0) if ctx.has_bias else None
        d_att = d_a.t() if d_a is not None else None
        return (d_gx if ctx.native else d_gx.transpose(0, 1)), d_att, None, dh, d_w_hh, d_b_c, None


def gru_scan(
    gx: torch.Tensor,
    att: torch.Tensor | None,
    mask: torch.Tensor,
    h0: torch.Tensor | None,
    w_hh: torch.Tensor,
    b_c: torch.Tensor | None,
    form: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a GRU-family recurrence (see the module docstring) over the input projections ``gx`` [B, L, 3H] (gate
    order r, u, c), attention ``att`` [B, L] (the AUGRUs; None for "torch"), ``mask`` [B, L] (False keeps the
    state), ``h0`` [B, H] (None: zeros), the state's weight [3H, H] and its c gate's bias [H] | None ("torch":
    nn.GRU's state biases of r and u add to the input's, so the caller folds them into ``gx``). Returns (states
    [B, L, H], last state [B, H])."""
    if form not in FORMS:
        raise ValueError(f"gru_scan form must be one of {FORMS}, got {form!r}")
    if h0 is None:
        h0 = gx.new_zeros(gx.shape[0], w_hh.shape[1])
    return _GRUScan.apply(gx, att, mask, h0, w_hh, b_c, form)
