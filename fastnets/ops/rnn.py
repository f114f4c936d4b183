"""Recurrent networks: lstm / gru / rnn_tanh / rnn_relu over whole sequences and the four
single-step cells, with torch.nn's weight layout.

Per layer (both directions of a bidirectional layer together):
1. the input projection of every step, x @ W_ih^T + b_ih + b_hh (GRU keeps b_hn aside: it
   sits inside the reset product), as one batched GEMM (cuBLAS); autograd of that GEMM
   gives dx, dW_ih and the bias gradients as one GEMM / reduction each over all steps;
2. the recurrence, `fastnets::rnn_recurrence`: one fused Triton launch per step running
   both directions (fastnets/kernels/rnn.py), or one persistent CUDA launch per direction for the
   whole sequence where the shape fits (fastnets/ops/rnn_persistent.py); its backward
   `fastnets::rnn_recurrence_bwd` is one fused launch per step plus one GEMM for dW_hh (and
   dW_hr) per direction over all steps.
Layers loop in Python; dropout between layers is torch's own F.dropout (torch's generator,
the same mask in the backward). Both are traceable: torch.compile sees two custom ops per
layer and no graph break.

PackedSequence inputs run padded, in the packed (length-sorted) batch order, with per-row
lengths: a finished row keeps its state, so h_n is the state after its last valid step,
exactly as torch's.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from .. import _dispatch, reference
from ..reference.rnn import GATES
from . import _checks

_dispatch.register_op("rnn", "LSTM / GRU / Elman RNN: fused per-step cells (Triton) or a persistent sequence "
                             "kernel (CUDA C++), proj_size, packed sequences, bidirectional", has_cuda=True)

MODES = tuple(GATES)


def _rnn_kernels():
    from ..kernels import rnn
    return rnn


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _empty(like: Tensor) -> Tensor:
    return like.new_empty((0,))


# --- custom ops ------------------------------------------------------------------------------------

@torch.library.custom_op("fastnets::rnn_recurrence", mutates_args=())
def _recurrence(xg: Tensor, h0: Tensor, c0: Optional[Tensor], w_hh: Tensor, b_hn: Optional[Tensor],
                w_hr: Optional[Tensor], lengths: Optional[Tensor],
                mode: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One layer, both directions: every tensor has a leading direction dim D (2: direction 1
    runs backwards in time). Returns (hbuf, c_n, cbuf, save, hraw): hbuf (D, T+1, B, K) holds
    h0 and the state after every step (h0 in slot 0, slot T for direction 1), cbuf the same
    for LSTM's float32 cell state; absent ones (non-LSTM c_n / cbuf, hraw without proj) are empty."""
    from . import rnn_persistent
    acc = _acc(xg.dtype)
    c0a = c0.to(acc).contiguous() if c0 is not None else None
    out = rnn_persistent.maybe_run(mode, xg, h0, c0a, w_hh, b_hn, w_hr, lengths)
    if out is None:
        out = _rnn_kernels().recurrence_fwd(mode, xg, h0, c0a, w_hh, b_hn, w_hr, lengths)
    hbuf, cbuf, save, hraw = out
    if cbuf is not None:
        T = xg.shape[1]
        c_n = torch.stack([cbuf[d, 0 if d else T] for d in range(xg.shape[0])]).to(xg.dtype)
    else:
        c_n = _empty(xg)
    return hbuf, c_n, (cbuf if cbuf is not None else _empty(xg)), save, (hraw if hraw is not None else _empty(xg))


@_recurrence.register_fake
def _(xg, h0, c0, w_hh, b_hn, w_hr, lengths, mode):
    D, T, B, GH = xg.shape
    H = GH // GATES[mode]
    K = w_hh.shape[2]
    lstm = mode == "LSTM"
    return (xg.new_empty((D, T + 1, B, K)), xg.new_empty((D, B, H) if lstm else (0,)),
            xg.new_empty((D, T + 1, B, H) if lstm else (0,), dtype=_acc(xg.dtype)),
            xg.new_empty((D, T, B, (4 if mode in ("LSTM", "GRU") else 1) * H)),
            xg.new_empty((D, T, B, H) if w_hr is not None else (0,)))


@torch.library.custom_op("fastnets::rnn_recurrence_bwd", mutates_args=())
def _recurrence_bwd(d_hbuf: Tensor, d_cn: Optional[Tensor], c0: Optional[Tensor], w_hh: Tensor,
                    b_hn: Optional[Tensor], w_hr: Optional[Tensor], hbuf: Tensor, cbuf: Optional[Tensor],
                    save: Tensor, hraw: Optional[Tensor], lengths: Optional[Tensor],
                    mode: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dxg, dh0, dc0, dw_hh, db_hn, dw_hr), each with the leading direction dim; absent ones empty."""
    acc = _acc(hbuf.dtype)
    dxg, dgh, dh0, dc0, dhp = _rnn_kernels().recurrence_bwd(
        mode, d_hbuf.contiguous(), d_cn, w_hh, w_hr, hbuf, cbuf, save, hraw, lengths)
    D, T, B, K = dxg.shape[0], dxg.shape[1], hbuf.shape[2], hbuf.shape[3]
    H = w_hh.shape[1] // GATES[mode]
    dw_hh = torch.empty_like(w_hh)
    dw_hr = torch.empty_like(w_hr) if w_hr is not None else _empty(hbuf)
    for d in range(D):
        # The state each step read: slots 0..T-1 forward, 1..T in reverse (a view, no copy).
        hprev = hbuf[d, 1:] if d else hbuf[d, :-1]
        # dW_hh: one GEMM over all (step, row) pairs; rows past a sequence's end carry zero gradient.
        dw_hh[d] = dgh[d].reshape(T * B, -1).t() @ hprev.reshape(T * B, K)
        if w_hr is not None:
            dw_hr[d] = dhp[d].reshape(T * B, -1).t() @ hraw[d].reshape(T * B, H).to(acc)
    db_hn = dgh[..., 2 * H:].sum((1, 2), dtype=acc).to(b_hn.dtype) if b_hn is not None else _empty(hbuf)
    return (dxg, dh0.to(hbuf.dtype), dc0.to(c0.dtype) if c0 is not None else _empty(hbuf), dw_hh, db_hn, dw_hr)


@_recurrence_bwd.register_fake
def _(d_hbuf, d_cn, c0, w_hh, b_hn, w_hr, hbuf, cbuf, save, hraw, lengths, mode):
    D, T, B, K = hbuf.shape[0], hbuf.shape[1] - 1, hbuf.shape[2], hbuf.shape[3]
    return (hbuf.new_empty((D, T, B, w_hh.shape[1])), hbuf.new_empty((D, B, K)),
            torch.empty_like(c0) if c0 is not None else hbuf.new_empty((0,)), torch.empty_like(w_hh),
            torch.empty_like(b_hn) if b_hn is not None else hbuf.new_empty((0,)),
            torch.empty_like(w_hr) if w_hr is not None else hbuf.new_empty((0,)))


def _recurrence_setup(ctx, inputs, output):
    xg, h0, c0, w_hh, b_hn, w_hr, lengths, mode = inputs
    hbuf, _, cbuf, save, hraw = output
    ctx.save_for_backward(c0, w_hh, b_hn, w_hr, hbuf, cbuf if mode == "LSTM" else None, save,
                          hraw if w_hr is not None else None, lengths)
    ctx.mode = mode
    ctx.h0_dtype = h0.dtype


def _recurrence_backward(ctx, d_hbuf, d_cn, _d_cbuf, _d_save, _d_hraw):
    c0, w_hh, b_hn, w_hr, hbuf, cbuf, save, hraw, lengths = ctx.saved_tensors
    if d_hbuf is None:
        d_hbuf = torch.zeros_like(hbuf)
    if d_cn is not None and d_cn.numel() == 0:
        d_cn = None
    dxg, dh0, dc0, dw_hh, db_hn, dw_hr = torch.ops.fastnets.rnn_recurrence_bwd(
        d_hbuf, d_cn, c0, w_hh, b_hn, w_hr, hbuf, cbuf, save, hraw, lengths, ctx.mode)
    return (dxg, dh0.to(ctx.h0_dtype), dc0 if c0 is not None else None, dw_hh,
            db_hn if b_hn is not None else None, dw_hr if w_hr is not None else None, None, None)


_recurrence.register_autograd(_recurrence_backward, setup_context=_recurrence_setup)


# --- one layer, both directions -------------------------------------------------------------------------

def _split_bias(mode: str, H: int, b_ih: Optional[Tensor], b_hh: Optional[Tensor]):
    """(bias folded into the input projection, GRU's b_hn kept for the reset product)."""
    bias, b_hn = b_ih, None
    if b_hh is not None:
        if mode == "GRU":
            b_hn = b_hh[2 * H:]
            b_hh = torch.cat([b_hh[:2 * H], b_hh.new_zeros(H)])
        bias = b_hh if bias is None else bias + b_hh
    return bias, b_hn


def _layer(mode: str, x: Tensor, h0: Tensor, c0: Optional[Tensor], weights: list, lengths: Optional[Tensor],
           kernel: bool) -> tuple[Tensor, list, list]:
    """One layer, D = len(weights) directions. x: (T, B, I); h0 / c0: (D, B, K) / (D, B, H);
    weights: [(w_ih, w_hh, b_ih, b_hh, w_hr)] per direction. Returns (output (T, B, D*K),
    [h_n per direction], [c_n per direction])."""
    D = len(weights)
    T, B, I = x.shape
    H = weights[0][1].shape[0] // GATES[mode]
    splits = [_split_bias(mode, H, w[2], w[3]) for w in weights]
    x2 = x.reshape(T * B, I)
    if not kernel:
        outs, hns, cns = [], [], []
        for d, ((w_ih, w_hh, _, _, w_hr), (bias, b_hn)) in enumerate(zip(weights, splits)):
            xg = (torch.addmm(bias, x2, w_ih.t()) if bias is not None else x2 @ w_ih.t()).view(T, B, w_ih.shape[0])
            hseq, cn = reference.rnn.recurrence(mode, xg, h0[d], c0[d] if c0 is not None else None, w_hh, b_hn,
                                                w_hr, lengths, d == 1)
            outs.append(hseq)
            hns.append(hseq[0] if d else hseq[-1])
            cns.append(cn)
        return (torch.cat(outs, -1) if D == 2 else outs[0]), hns, cns

    def stack(ts):
        return torch.stack(ts) if D == 2 else ts[0].unsqueeze(0)

    # Every step's input projection, both directions in one batched GEMM: (D, T*B, G*H).
    w_ih = stack([w[0] for w in weights])
    if splits[0][0] is not None:
        xg = torch.baddbmm(stack([b for b, _ in splits]).unsqueeze(1), x2.expand(D, T * B, I), w_ih.transpose(1, 2))
    else:
        xg = torch.bmm(x2.expand(D, T * B, I), w_ih.transpose(1, 2))
    w_hh = stack([w[1] for w in weights]).contiguous()
    b_hn = stack([b for _, b in splits]) if splits[0][1] is not None else None
    w_hr = stack([w[4] for w in weights]).contiguous() if weights[0][4] is not None else None
    hbuf, c_n, _, _, _ = torch.ops.fastnets.rnn_recurrence(xg.view(D, T, B, w_ih.shape[1]), h0.contiguous(),
                                                            c0.contiguous() if c0 is not None else None,
                                                            w_hh, b_hn, w_hr, lengths, mode)
    fwd = hbuf[0, 1:]
    out = torch.cat([fwd, hbuf[1, :-1]], -1) if D == 2 else fwd
    hns = [hbuf[0, T]] + ([hbuf[1, 0]] if D == 2 else [])
    cns = list(c_n.unbind(0)) if mode == "LSTM" else [None] * D
    return out, hns, cns


# --- validation ----------------------------------------------------------------------------------------

def _check_weights(op: str, mode: str, weights: Sequence[Tensor], has_biases: bool, num_layers: int, D: int,
                   input_size: int, proj_size: int, x: Tensor) -> list:
    """torch.nn's _flat_weights order, per layer and direction: w_ih, w_hh, [b_ih, b_hh], [w_hr].
    Returns [(w_ih, w_hh, b_ih, b_hh, w_hr)] indexed by layer * D + direction."""
    per = 2 + 2 * bool(has_biases) + bool(proj_size)
    if len(weights) != per * num_layers * D:
        raise ValueError(f"{op}: expected {per * num_layers * D} weight tensors ({per} per layer and direction), "
                         f"got {len(weights)}")
    G = GATES[mode]
    out = []
    for n in range(num_layers * D):
        ws = list(weights[n * per:(n + 1) * per])
        w_ih, w_hh = ws[0], ws[1]
        b_ih, b_hh = (ws[2], ws[3]) if has_biases else (None, None)
        w_hr = ws[-1] if proj_size else None
        layer = n // D
        H = w_hh.shape[0] // G if w_hh.dim() == 2 else -1
        K = proj_size or H
        in_size = input_size if layer == 0 else D * K
        for name, t, shape in (("weight_ih", w_ih, (G * H, in_size)), ("weight_hh", w_hh, (G * H, K)),
                               ("bias_ih", b_ih, (G * H,)), ("bias_hh", b_hh, (G * H,)),
                               ("weight_hr", w_hr, (proj_size, H))):
            if t is None:
                continue
            label = f"{name}_l{layer}{'_reverse' if n % D else ''}"
            _checks.tensor(op, label, t)
            if tuple(t.shape) != shape:
                raise ValueError(f"{op}: {label} must have shape {shape}, got {tuple(t.shape)}")
            if t.device != x.device:
                raise ValueError(f"{op}: {label} is on {t.device} but input is on {x.device}")
            if t.dtype != x.dtype:
                raise TypeError(f"{op}: {label} has dtype {t.dtype} but input has {x.dtype}")
        out.append((w_ih, w_hh, b_ih, b_hh, w_hr))
    return out


def _check_state(op: str, name: str, t: Optional[Tensor], shape: tuple, x: Tensor) -> Tensor:
    if t is None:
        return x.new_zeros(shape)
    _checks.tensor(op, name, t)
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: expected {name} of shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{op}: {name} is on {t.device} but input is on {x.device}")
    if t.dtype != x.dtype:
        raise TypeError(f"{op}: {name} has dtype {t.dtype} but input has {x.dtype}")
    return t


def _check_lengths(op: str, lengths, T: int, B: int, device) -> Tensor:
    """Per-row lengths of a padded batch as an int64 tensor on the input's device."""
    if not isinstance(lengths, Tensor):
        lengths = torch.as_tensor(lengths)
    if lengths.dtype.is_floating_point or lengths.dtype == torch.bool or lengths.dim() != 1 or lengths.numel() != B:
        raise ValueError(f"{op}: lengths must be {B} integers (one per batch row), got {tuple(lengths.shape)} "
                         f"{lengths.dtype}")
    # Checked where that costs no device sync (a list or a CPU tensor, the usual case). CUDA
    # lengths are taken as they are: a length past T runs all T steps, one under 1 none.
    if lengths.device.type == "cpu" and not torch.compiler.is_compiling() and bool(((lengths < 1) |
                                                                                     (lengths > T)).any()):
        raise ValueError(f"{op}: lengths must be in [1, {T}] (the padded sequence length), got {lengths.tolist()}")
    return lengths.to(device=device, dtype=torch.int64)


# --- public API --------------------------------------------------------------------------------------------

def rnn(mode: str, input, hx, weights: Sequence[Tensor], has_biases: bool = True, num_layers: int = 1,
        dropout: float = 0.0, train: bool = True, bidirectional: bool = False, batch_first: bool = False, *,
        proj_size: int = 0, lengths=None):
    """A whole multi-layer recurrent network, torch.nn.LSTM / GRU / RNN's computation.

    mode: "LSTM", "GRU", "RNN_TANH" or "RNN_RELU". input: (T, B, I) ((B, T, I) when
    batch_first), (T, I) unbatched, or a PackedSequence (variable lengths, sorted or not).
    hx: None (zeros), the (L*D, B, K) initial state, or for LSTM a tuple (h0, c0) with c0
    (L*D, B, H); K = proj_size or H. weights: torch.nn's flat list (module._flat_weights):
    per layer and direction weight_ih, weight_hh, [bias_ih, bias_hh], [weight_hr].
    dropout: on every layer's output but the last, when train (torch's generator).
    lengths: per-row lengths (B,) for a padded input, in any order (a fastnets option,
    packing without the copies): rows stop updating past their length and their output
    there is zero, as torch's pad_packed_sequence gives.
    Returns (output, h_n) or, for LSTM, (output, (h_n, c_n)); output is a PackedSequence
    when input is one. fp16 / bf16 / fp32 / fp64; gates and cell state in float32.
    Backward: input, hx, every weight. Backends: triton / cuda (CUDA), interpret, torch.
    """
    if mode not in MODES:
        raise ValueError(f"rnn: mode must be one of {', '.join(MODES)}, got {mode!r}")
    op = mode.lower()
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"{op}: num_layers must be a positive int, got {num_layers!r}")
    if proj_size and mode != "LSTM":
        raise ValueError(f"{op}: proj_size is only supported for LSTM")
    if isinstance(proj_size, bool) or not isinstance(proj_size, int) or proj_size < 0:
        raise ValueError(f"{op}: proj_size must be a non-negative int, got {proj_size!r}")
    dropout = _checks.number(op, "dropout", dropout, min_value=0.0)
    if dropout > 1:
        raise ValueError(f"{op}: dropout must be in [0, 1], got {dropout}")
    packed = isinstance(input, PackedSequence)
    D = 2 if bidirectional else 1
    if packed:
        data, batch_sizes, sorted_idx, unsorted_idx = input
        _checks.tensor(op, "input", data)
        if data.dim() != 2:
            raise ValueError(f"{op}: packed input data must be 2-D (steps, features), got {tuple(data.shape)}")
        if lengths is not None:
            raise ValueError(f"{op}: lengths is for padded input; a PackedSequence carries its own")
        if data.shape[0] != int(batch_sizes.sum()):
            raise ValueError(f"{op}: PackedSequence holds {data.shape[0]} rows but its batch_sizes sum to "
                             f"{int(batch_sizes.sum())} (lengths longer than the padded sequence?)")
        x, lengths = torch.nn.utils.rnn.pad_packed_sequence(
            PackedSequence(data, batch_sizes, None, None), batch_first=False)
        lengths = lengths.to(data.device)
        unbatched = False
    else:
        _checks.tensor(op, "input", input)
        if input.dim() not in (2, 3):
            raise ValueError(f"{op}: input must be 3-D (batched) or 2-D (unbatched), got shape {tuple(input.shape)}")
        unbatched = input.dim() == 2
        x = input.unsqueeze(1) if unbatched else (input.transpose(0, 1) if batch_first else input)
        sorted_idx = unsorted_idx = None
    T, B, I = x.shape
    if T == 0:   # torch raises too ("Expected sequence length to be larger than 0")
        raise ValueError(f"{op}: input has no time steps (torch.nn's recurrent modules need at least one)")
    padded_lengths = lengths is not None and not packed
    if padded_lengths:
        lengths = _check_lengths(op, lengths, T, B, x.device)
    x, *weights = _checks.autocast(x, *weights)
    layers = _check_weights(op, mode, weights, has_biases, num_layers, D, I, proj_size, x)
    H = layers[0][1].shape[0] // GATES[mode]
    K = proj_size or H
    if mode == "LSTM" and hx is not None and not (isinstance(hx, (tuple, list)) and len(hx) == 2):
        raise TypeError(f"{op}: hx must be a tuple (h0, c0) for LSTM")
    if mode != "LSTM" and isinstance(hx, (tuple, list)):
        raise TypeError(f"{op}: hx must be a tensor for {mode}, got a {type(hx).__name__}")
    h0, c0 = (tuple(hx) if isinstance(hx, (tuple, list)) else (hx, None)) if hx is not None else (None, None)
    if unbatched:
        if h0 is not None and h0.dim() != 2:
            raise ValueError(f"{op}: for unbatched 2-D input, hx must be 2-D, got shape {tuple(h0.shape)}")
        h0 = h0.unsqueeze(1) if h0 is not None else None
        c0 = c0.unsqueeze(1) if c0 is not None else None
    h0 = _check_state(op, "hx" if mode != "LSTM" else "h0", h0, (num_layers * D, B, K), x)
    c0 = _check_state(op, "c0", c0, (num_layers * D, B, H), x) if mode == "LSTM" else None
    if sorted_idx is not None:
        h0 = h0.index_select(1, sorted_idx)
        c0 = c0.index_select(1, sorted_idx) if c0 is not None else None
    # An empty batch launches nothing: torch's own ops make the (empty) result.
    kernel = _dispatch.choose("rnn", x.device, empty=B == 0) != "torch"
    h_n, c_n = [], []
    for layer in range(num_layers):
        n = layer * D
        x, hn, cn = _layer(mode, x, h0[n:n + D], c0[n:n + D] if c0 is not None else None, layers[n:n + D],
                           lengths, kernel)
        h_n += hn
        c_n += cn
        if padded_lengths:
            # Past a row's length its state is frozen; the output there is zero, as torch pads.
            x = x * (torch.arange(T, device=x.device)[:, None] < lengths[None, :]).unsqueeze(-1).to(x.dtype)
        if dropout and train and layer + 1 < num_layers:
            x = F.dropout(x, dropout, True)
    h_n = torch.stack(h_n)
    c_n = torch.stack(c_n) if mode == "LSTM" else None
    if packed:
        if unsorted_idx is not None:
            h_n = h_n.index_select(1, unsorted_idx)
            c_n = c_n.index_select(1, unsorted_idx) if c_n is not None else None
        out_data, _ = torch._VF._pack_padded_sequence(x, lengths.cpu(), False)
        output = PackedSequence(out_data, batch_sizes, sorted_idx, unsorted_idx)
    elif unbatched:
        output = x.squeeze(1)
        h_n = h_n.squeeze(1)
        c_n = c_n.squeeze(1) if c_n is not None else None
    else:
        output = x.transpose(0, 1) if batch_first else x
    return (output, (h_n, c_n)) if mode == "LSTM" else (output, h_n)


def lstm(input, hx, weights, has_biases=True, num_layers=1, dropout=0.0, train=True, bidirectional=False,
         batch_first=False, *, proj_size=0, lengths=None):
    """torch.nn.LSTM's computation (see `rnn`); returns (output, (h_n, c_n))."""
    return rnn("LSTM", input, hx, weights, has_biases, num_layers, dropout, train, bidirectional, batch_first,
               proj_size=proj_size, lengths=lengths)


def gru(input, hx, weights, has_biases=True, num_layers=1, dropout=0.0, train=True, bidirectional=False,
        batch_first=False, *, lengths=None):
    """torch.nn.GRU's computation (see `rnn`); returns (output, h_n)."""
    return rnn("GRU", input, hx, weights, has_biases, num_layers, dropout, train, bidirectional, batch_first,
               lengths=lengths)


def rnn_tanh(input, hx, weights, has_biases=True, num_layers=1, dropout=0.0, train=True, bidirectional=False,
             batch_first=False, *, lengths=None):
    """torch.nn.RNN(nonlinearity='tanh')'s computation (see `rnn`); returns (output, h_n)."""
    return rnn("RNN_TANH", input, hx, weights, has_biases, num_layers, dropout, train, bidirectional, batch_first,
               lengths=lengths)


def rnn_relu(input, hx, weights, has_biases=True, num_layers=1, dropout=0.0, train=True, bidirectional=False,
             batch_first=False, *, lengths=None):
    """torch.nn.RNN(nonlinearity='relu')'s computation (see `rnn`); returns (output, h_n)."""
    return rnn("RNN_RELU", input, hx, weights, has_biases, num_layers, dropout, train, bidirectional, batch_first,
               lengths=lengths)


# --- cells -------------------------------------------------------------------------------------------------

def _cell(mode: str, op: str, input: Tensor, hx, w_ih: Tensor, w_hh: Tensor, b_ih, b_hh):
    _checks.tensor(op, "input", input)
    if input.dim() not in (1, 2):
        raise ValueError(f"{op}: input must be 2-D (batch, features) or 1-D, got shape {tuple(input.shape)}")
    unbatched = input.dim() == 1
    x = input.unsqueeze(0) if unbatched else input
    x, w_ih, w_hh, b_ih, b_hh = _checks.autocast(x, w_ih, w_hh, b_ih, b_hh)
    (w_ih, w_hh, b_ih, b_hh, _), = _check_weights(op, mode, [w for w in (w_ih, w_hh, b_ih, b_hh) if w is not None],
                                                  b_ih is not None, 1, 1, x.shape[1], 0, x)
    H = w_hh.shape[1]
    h, c = (hx if isinstance(hx, (tuple, list)) else (hx, None)) if hx is not None else (None, None)
    if unbatched:
        h = h.unsqueeze(0) if h is not None else None
        c = c.unsqueeze(0) if c is not None else None
    B = x.shape[0]
    h = _check_state(op, "hx", h, (B, H), x)
    c = _check_state(op, "cx", c, (B, H), x) if mode == "LSTM" else None
    kernel = _dispatch.choose("rnn", x.device, empty=B == 0) != "torch"
    if kernel:
        _, (h1,), (c1,) = _layer(mode, x.unsqueeze(0), h.unsqueeze(0), c.unsqueeze(0) if c is not None else None,
                                 [(w_ih, w_hh, b_ih, b_hh, None)], None, True)
    else:
        h1, c1 = reference.rnn.cell(mode, x, h, c, w_ih, w_hh, b_ih, b_hh)
    if unbatched:
        h1 = h1.squeeze(0)
        c1 = c1.squeeze(0) if c1 is not None else None
    return (h1, c1) if mode == "LSTM" else h1


def lstm_cell(input: Tensor, hx, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None,
              b_hh: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """torch.lstm_cell / nn.LSTMCell: input (B, I) or (I,); hx (h, c) or None. Returns (h', c')."""
    return _cell("LSTM", "lstm_cell", input, hx, w_ih, w_hh, b_ih, b_hh)


def gru_cell(input: Tensor, hx: Optional[Tensor], w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None,
             b_hh: Optional[Tensor] = None) -> Tensor:
    """torch.gru_cell / nn.GRUCell. Returns h'."""
    return _cell("GRU", "gru_cell", input, hx, w_ih, w_hh, b_ih, b_hh)


def rnn_tanh_cell(input: Tensor, hx: Optional[Tensor], w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None,
                  b_hh: Optional[Tensor] = None) -> Tensor:
    """torch.rnn_tanh_cell / nn.RNNCell(nonlinearity='tanh'). Returns h'."""
    return _cell("RNN_TANH", "rnn_tanh_cell", input, hx, w_ih, w_hh, b_ih, b_hh)


def rnn_relu_cell(input: Tensor, hx: Optional[Tensor], w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None,
                  b_hh: Optional[Tensor] = None) -> Tensor:
    """torch.rnn_relu_cell / nn.RNNCell(nonlinearity='relu'). Returns h'."""
    return _cell("RNN_RELU", "rnn_relu_cell", input, hx, w_ih, w_hh, b_ih, b_hh)
