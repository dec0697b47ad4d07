"""Memory-linear kernels behind the contrastive objectives: logits are never held as one [R, C] matrix.

Why custom autograd functions and not a Python loop over chunks: autograd would keep every chunk's
logits for the backward pass, so the loop would still store R x C numbers. These functions keep only
the inputs and an R- (and C-) sized summary (the log-sum-exps), and recompute one [chunk, C] block of
logits at a time in backward. Memory is O((R + C) * D + chunk * C); the price is one extra matmul per
block in backward (recomputing the logits).

Both functions fall back to the plain full-matrix torch expression when the rows fit in one chunk,
where nothing is saved by chunking and the plain form is faster.

Logits are accumulated in float32 (float64 for float64 inputs) whatever the input dtype (bf16 exp/log-sum-exp over 32k columns loses
the positive's contribution); gradients are returned in the inputs' dtypes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["PairLSE", "acc_dtype", "pair_lse", "siglip_sum"]


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 inputs stay float64 (exact tests, gradcheck); everything else accumulates in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class PairLSE(NamedTuple):
    """Row (and optionally column) log-sum-exp of `scale * x @ y.T` and the arg-maxes for accuracy stats.

    The arg-maxes are taken over the *unmasked* logits (an excluded positive still counts as the correct
    answer), so they are the retrieval predictions whatever the objective's denominator.
    """

    row: torch.Tensor  # [R] float32 (float64 for float64 inputs), differentiable
    col: torch.Tensor | None  # [C] same dtype, differentiable; None unless asked for
    row_arg: torch.Tensor  # [R] int64
    col_arg: torch.Tensor | None  # [C] int64


def _diag(r0: int, r1: int, offset: int | None, n_cols: int, device: torch.device) -> tuple | None:
    """(block rows, columns) of the entries (i, i + offset) for global rows i in [r0, r1) inside the matrix."""
    if offset is None:
        return None
    rows = torch.arange(r0, r1, device=device)
    cols = rows + offset
    ok = (cols >= 0) & (cols < n_cols)
    return rows[ok] - r0, cols[ok]


def _as_acc(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32/fp64 inputs as they are; anything else (bf16, fp16) as fp32 copies, O((R + C) * D)."""
    acc = acc_dtype(x)
    return x.to(acc), y.to(acc)


def _safe(m: torch.Tensor) -> torch.Tensor:
    """A max that may be -inf (an all-excluded row or column) replaced by 0, so that m - m is not NaN."""
    return torch.where(torch.isinf(m), torch.zeros_like(m), m)


class _ChunkedPairLSE(torch.autograd.Function):
    """Forward: per block of rows, L = (s * x_c) @ y.T; row log-sum-exp directly, column log-sum-exp by an
    online update (running max and rescaled running sum). Backward: recompute L per block and form
    dL = softmax_row * g_row + softmax_col * g_col in place, then two matmuls. The scale's gradient is
    sum_ij dL_ij * x_i.y_j = sum_i x_i . (dL @ y)_i, which needs no extra pass over the block."""

    @staticmethod
    def forward(ctx, x, y, scale, chunk: int, exclude_offset: int | None, want_cols: bool):  # type: ignore[override]
        xa, ya = _as_acc(x, y)
        s = float(scale.detach())
        n_rows, n_cols = x.shape[0], y.shape[0]
        dev, acc = x.device, xa.dtype
        row_lse = torch.empty(n_rows, dtype=acc, device=dev)
        row_arg = torch.empty(n_rows, dtype=torch.int64, device=dev)
        col_m = torch.full((n_cols,), float("-inf"), dtype=acc, device=dev)
        col_sum = torch.zeros(n_cols, dtype=acc, device=dev)
        best_v = torch.full((n_cols,), float("-inf"), dtype=acc, device=dev)
        best_i = torch.zeros(n_cols, dtype=torch.int64, device=dev)
        tmp = None
        for r0 in range(0, n_rows, chunk):
            r1 = min(r0 + chunk, n_rows)
            logits = (xa[r0:r1] * s) @ ya.T
            row_max, row_arg[r0:r1] = logits.max(1)
            if want_cols:
                col_max, ci = logits.max(0)
                better = col_max > best_v
                best_v = torch.where(better, col_max, best_v)
                best_i = torch.where(better, ci + r0, best_i)
            excl = _diag(r0, r1, exclude_offset, n_cols, dev)
            if excl is not None:  # the arg-maxes above saw the positive; the sums below do not
                logits[excl] = float("-inf")
                row_max = logits.max(1).values
                col_max = logits.max(0).values if want_cols else None
            if tmp is None or tmp.shape != logits.shape:
                tmp = torch.empty_like(logits)
            rm = _safe(row_max)
            torch.sub(logits, rm[:, None], out=tmp).exp_()
            row_lse[r0:r1] = tmp.sum(1).log_() + rm
            if want_cols:
                m_new = torch.maximum(col_m, col_max)
                cm = _safe(m_new)
                torch.sub(logits, cm[None, :], out=tmp).exp_()
                col_sum = col_sum * torch.exp(col_m - cm) + tmp.sum(0)
                col_m = m_new
        if want_cols:
            col_lse = col_sum.log() + _safe(col_m)
        else:
            col_lse = torch.empty(0, dtype=acc, device=dev)
            best_i = torch.empty(0, dtype=torch.int64, device=dev)
        ctx.save_for_backward(x, y, scale, row_lse, col_lse)
        ctx.chunk, ctx.exclude_offset, ctx.want_cols = chunk, exclude_offset, want_cols
        ctx.mark_non_differentiable(row_arg, best_i)
        return row_lse, col_lse, row_arg, best_i

    @staticmethod
    def backward(ctx, g_row, g_col, _ga, _gb):  # type: ignore[override]
        x, y, scale, row_lse, col_lse = ctx.saved_tensors
        xa, ya = _as_acc(x, y)
        s = float(scale.detach())
        n_rows, n_cols = x.shape[0], y.shape[0]
        gx = torch.empty_like(xa)
        gy = torch.zeros_like(ya)
        gs = torch.zeros((), dtype=xa.dtype, device=x.device)
        use_cols = ctx.want_cols and g_col is not None
        tmp = None
        for r0 in range(0, n_rows, ctx.chunk):
            r1 = min(r0 + ctx.chunk, n_rows)
            xc = xa[r0:r1]
            g = (xc * s) @ ya.T  # the logits, recomputed; turned into d loss / d logits in place
            excl = _diag(r0, r1, ctx.exclude_offset, n_cols, x.device)
            if excl is not None:
                g[excl] = float("-inf")  # exp(-inf) = 0: excluded entries get no gradient
            if use_cols:
                if tmp is None or tmp.shape != g.shape:
                    tmp = torch.empty_like(g)
                torch.sub(g, col_lse[None, :], out=tmp).exp_().mul_(g_col[None, :])
            g.sub_(row_lse[r0:r1, None]).exp_().mul_(g_row[r0:r1, None])
            if use_cols:
                g.add_(tmp)
            gyr = g @ ya  # [c, D] = sum_j dL_ij y_j
            gs += (xc * gyr).sum()
            gx[r0:r1] = gyr * s
            gy.addmm_(g.T, xc, alpha=s)
        return (
            gx.to(x.dtype) if ctx.needs_input_grad[0] else None,
            gy.to(y.dtype) if ctx.needs_input_grad[1] else None,
            gs.reshape(scale.shape).to(scale.dtype) if ctx.needs_input_grad[2] else None,
            None,
            None,
            None,
        )


def pair_lse(
    x: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    *,
    chunk: int,
    exclude_offset: int | None = None,
    cols: bool = False,
) -> PairLSE:
    """Log-sum-exp over columns of each row of `scale * x @ y.T` (and over rows of each column).

    exclude_offset: when not None, entry (i, i + exclude_offset) is left out of the sums (DCL removes the
    positive from the denominator; in the distributed local form the positive of local row i sits at
    global column rank*B + i). Rows are processed `chunk` at a time once there are more than `chunk`.
    """
    if x.shape[0] > chunk:
        row, col, row_arg, col_arg = _ChunkedPairLSE.apply(x, y, scale, chunk, exclude_offset, cols)
        return PairLSE(row, col if cols else None, row_arg, col_arg if cols else None)
    acc = acc_dtype(x)
    logits = (x.to(acc) @ y.to(acc).T) * scale.to(acc).reshape(())
    row_arg = logits.detach().argmax(1)
    col_arg = logits.detach().argmax(0) if cols else None
    excl = _diag(0, x.shape[0], exclude_offset, y.shape[0], x.device)
    if excl is not None:
        mask = torch.zeros_like(logits, dtype=torch.bool)
        mask[excl] = True
        logits = logits.masked_fill(mask, float("-inf"))
    return PairLSE(torch.logsumexp(logits, 1), torch.logsumexp(logits, 0) if cols else None, row_arg, col_arg)


class _ChunkedSigLIP(torch.autograd.Function):
    """Per block: L = (s * x_c) @ y.T + b. Loss: softplus(L) off the positives, softplus(-L) on them
    (= -log sigmoid(z L)). Gradient d/dL = sigmoid(L) - [positive]; the scale's gradient is
    sum_i x_i . (dL @ y)_i as in `_ChunkedPairLSE`, the bias's the sum of dL."""

    @staticmethod
    def forward(ctx, x, y, scale, bias, chunk: int, pos_offset: int):  # type: ignore[override]
        xa, ya = _as_acc(x, y)
        s, b = float(scale.detach()), float(bias.detach())
        total = torch.zeros((), dtype=xa.dtype, device=x.device)
        row_arg = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
        for r0 in range(0, x.shape[0], chunk):
            r1 = min(r0 + chunk, x.shape[0])
            logits = ((xa[r0:r1] * s) @ ya.T).add_(b)
            row_arg[r0:r1] = logits.argmax(1)
            pos = logits[_diag(r0, r1, pos_offset, y.shape[0], x.device)]
            total += F.softplus(logits).sum() + (F.softplus(-pos) - F.softplus(pos)).sum()
        ctx.save_for_backward(x, y, scale, bias)
        ctx.chunk, ctx.pos_offset = chunk, pos_offset
        ctx.mark_non_differentiable(row_arg)
        return total, row_arg

    @staticmethod
    def backward(ctx, g_total, _g_arg):  # type: ignore[override]
        x, y, scale, bias = ctx.saved_tensors
        xa, ya = _as_acc(x, y)
        s, b = float(scale.detach()), float(bias.detach())
        gx = torch.empty_like(xa)
        gy = torch.zeros_like(ya)
        gs = torch.zeros((), dtype=xa.dtype, device=x.device)
        gb = torch.zeros((), dtype=xa.dtype, device=x.device)
        for r0 in range(0, x.shape[0], ctx.chunk):
            r1 = min(r0 + ctx.chunk, x.shape[0])
            xc = xa[r0:r1]
            g = ((xc * s) @ ya.T).add_(b).sigmoid_()
            g[_diag(r0, r1, ctx.pos_offset, y.shape[0], x.device)] -= 1.0
            g.mul_(g_total)
            gb += g.sum()
            gyr = g @ ya
            gs += (xc * gyr).sum()
            gx[r0:r1] = gyr * s
            gy.addmm_(g.T, xc, alpha=s)
        return (
            gx.to(x.dtype) if ctx.needs_input_grad[0] else None,
            gy.to(y.dtype) if ctx.needs_input_grad[1] else None,
            gs.reshape(scale.shape).to(scale.dtype) if ctx.needs_input_grad[2] else None,
            gb.reshape(bias.shape).to(bias.dtype) if ctx.needs_input_grad[3] else None,
            None,
            None,
        )


def siglip_sum(
    x: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    *,
    chunk: int,
    pos_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over all (i, j) of -log sigmoid(z_ij * (scale * x_i.y_j + bias)), z = +1 at j = i + pos_offset
    and -1 elsewhere, and each row's arg-max column. Rows are processed `chunk` at a time once there are
    more than `chunk`, holding O(chunk * C) numbers instead of R * C."""
    if x.shape[0] > chunk:
        return _ChunkedSigLIP.apply(x, y, scale, bias, chunk, pos_offset)
    acc = acc_dtype(x)
    logits = (x.to(acc) @ y.to(acc).T) * scale.to(acc).reshape(()) + bias.to(acc).reshape(())
    z = torch.full_like(logits, -1.0)
    z[_diag(0, x.shape[0], pos_offset, y.shape[0], x.device)] = 1.0
    return F.softplus(-z * logits).sum(), logits.detach().argmax(1)
