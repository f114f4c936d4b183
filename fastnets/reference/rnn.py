"""Recurrent networks in plain PyTorch: the ground truth of fastnets.ops.rnn and its CPU fallback.

The split is the kernels' split. The input projection of every step (x @ W_ih^T + biases)
is one GEMM outside the recurrence; `recurrence` is the sequential part: the hidden
projection, the gate nonlinearities and the state update, step after step, in float32
(float64 for float64 input).

Gate layouts are torch's: LSTM rows of W_ih / W_hh are (i, f, g, o), GRU (r, z, n), and
GRU's b_hn stays inside the reset product, n = tanh(x_n + b_in + r * (h W_hn^T + b_hn)).
Variable lengths (packed sequences) freeze a finished sequence's state: for a row whose
length is L, steps t >= L leave h and c as they were, so the last step's state is the
state after step L-1 (forward) and the reverse direction starts at step L-1 from h0.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

# torch's mode names (torch.nn.RNNBase.mode) -> number of gates.
GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


def _acc(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def cell_step(mode: str, xg: Tensor, h: Tensor, c: Optional[Tensor], w_hh: Tensor, b_hn: Optional[Tensor],
              w_hr: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    """One step, all in the accumulator dtype. xg: (B, G*H) input projection with every
    bias folded in except GRU's b_hn; h: (B, K) with K = proj_size or H; c: (B, H) (LSTM)."""
    hh = h @ w_hh.t()
    if mode == "LSTM":
        i, f, g, o = (xg + hh).chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return (h @ w_hr.t() if w_hr is not None else h), c
    if mode == "GRU":
        xr, xz, xn = xg.chunk(3, 1)
        hr, hz, hn = hh.chunk(3, 1)
        if b_hn is not None:
            hn = hn + b_hn
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        return (1 - z) * n + z * h, None
    a = xg + hh
    return (torch.tanh(a) if mode == "RNN_TANH" else torch.relu(a)), None


def recurrence(mode: str, xg: Tensor, h0: Tensor, c0: Optional[Tensor], w_hh: Tensor, b_hn: Optional[Tensor] = None,
               w_hr: Optional[Tensor] = None, lengths: Optional[Tensor] = None,
               reverse: bool = False) -> tuple[Tensor, Optional[Tensor]]:
    """The sequential part of one layer and direction.

    xg: (T, B, G*H) input projections; h0: (B, K); c0: (B, H) for LSTM else None;
    w_hh: (G*H, K); b_hn: GRU's (H,) or None; w_hr: LSTM's (P, H) projection or None;
    lengths: (B,) int64 on any device, or None (every row runs T steps).
    Returns (hseq, c_n): hseq (T, B, K) is the state after every step (frozen past a row's
    length), so h_n is hseq[-1] (forward) or hseq[0] (reverse); c_n (B, H) for LSTM.
    """
    acc = _acc(xg)
    T = xg.shape[0]
    h = h0.to(acc)
    c = c0.to(acc) if c0 is not None else None
    w = w_hh.to(acc)
    bn = b_hn.to(acc) if b_hn is not None else None
    wr = w_hr.to(acc) if w_hr is not None else None
    live = None
    if lengths is not None:
        lengths = lengths.to(xg.device)
    out = [None] * T
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        h_new, c_new = cell_step(mode, xg[t].to(acc), h, c, w, bn, wr)
        if lengths is not None:
            live = (t < lengths).unsqueeze(1)
            h_new = torch.where(live, h_new, h)
            if c is not None:
                c_new = torch.where(live, c_new, c)
        # The state feeds the next step's GEMM in the input dtype, as the kernels store it.
        h = h_new.to(xg.dtype).to(acc)
        c = c_new
        out[t] = h_new.to(xg.dtype)
    return torch.stack(out), (c.to(xg.dtype) if c is not None else None)


def cell(mode: str, input: Tensor, hx: Optional[Tensor], cx: Optional[Tensor], w_ih: Tensor, w_hh: Tensor,
         b_ih: Optional[Tensor], b_hh: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    """torch.nn.LSTMCell / GRUCell / RNNCell: input (B, I), hx / cx (B, H)."""
    acc = _acc(input)
    H = w_hh.shape[1]
    G = GATES[mode]
    if hx is None:
        hx = input.new_zeros(input.shape[0], H)
    if mode == "LSTM" and cx is None:
        cx = input.new_zeros(input.shape[0], H)
    xg = input.to(acc) @ w_ih.to(acc).t()
    if b_ih is not None:
        xg = xg + b_ih.to(acc)
    b_hn = None
    if b_hh is not None:
        if mode == "GRU":
            xg = xg + torch.cat([b_hh[:2 * H].to(acc), b_hh.new_zeros(H, dtype=acc)])
            b_hn = b_hh[2 * H:]
        else:
            xg = xg + b_hh.to(acc)
    assert xg.shape[1] == G * H
    h, c = cell_step(mode, xg, hx.to(acc), cx.to(acc) if cx is not None else None, w_hh.to(acc),
                     b_hn.to(acc) if b_hn is not None else None, None)
    return h.to(input.dtype), (c.to(input.dtype) if c is not None else None)
