"""Recurrent benchmark cases: 2-layer LSTM / GRU forward and forward+backward against
torch.nn's own path (cuDNN on a GPU, with flattened weights as nn.LSTM keeps them) and its
torch.compile'd version; packed sequences and proj_size, where cuDNN leaves its persistent
algorithms; one-step decoding latency; a char-LM training step (tokens/s).

FLOPs (reported as TFLOP/s): per layer and step 2 * B * G*H * (I + K) for the two
projections (+ 2 * B * H * P with a projection), backward twice that. The recurrence is
latency-bound at small batch: there the figure to read is the time."""
from __future__ import annotations

import torch

from .. import ops
from .harness import Case, compiled, dtype_size

GATES = {"LSTM": 4, "GRU": 3}


def _flops(mode: str, T: int, B: int, I: int, H: int, L: int, proj: int = 0) -> int:
    G, K = GATES[mode], proj or H
    total, in_size = 0, I
    for _ in range(L):
        total += 2 * T * B * G * H * (in_size + K) + (2 * T * B * H * proj if proj else 0)
        in_size = K
    return total


def _torch_rnn(mode: str, L: int, proj: int, lengths):
    """torch.nn's computation as nn.LSTM / nn.GRU.forward runs it (torch._VF, cuDNN on CUDA)."""
    fn = torch._VF.lstm if mode == "LSTM" else torch._VF.gru

    def run(x, *weights):
        B = x.shape[1]
        H = weights[1].shape[1] if not proj else weights[-1].shape[1]
        K = proj or H
        h0 = x.new_zeros(L, B, K)
        hx = (h0, x.new_zeros(L, B, H)) if mode == "LSTM" else h0
        if lengths is not None:
            packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
            data, batch_sizes = packed.data, packed.batch_sizes
            out = fn(data, batch_sizes, hx, list(weights), True, L, 0.0, True, False)
            return out[0]
        return fn(x, hx, list(weights), True, L, 0.0, True, False, False)[0]
    return run


def _fast_rnn(mode: str, L: int, proj: int, lengths, persistent: bool = False):
    from ..ops import rnn_persistent

    def run(x, *weights):
        inp = x
        if lengths is not None:
            inp = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
        with rnn_persistent.use_persistent(persistent):
            out = ops.rnn(mode, inp, None, list(weights), True, L, 0.0, True, False, False, proj_size=proj)[0]
        return out.data if lengths is not None else out
    return run


def _persistent_fits(mode: str, B: int, H: int, dtype: torch.dtype, device: torch.device) -> bool:
    """The persistent kernel is timed (as "fastnets-persistent") where it would run."""
    from ..ops import rnn_persistent
    if device.type != "cuda" or rnn_persistent.runner(device) is None:
        return False
    sms, smem = rnn_persistent._device_limits(device.index if device.index is not None else 0)
    return rnn_persistent.plan(mode, B, H, dtype, False, sms, smem)[0] is not None


def _inputs(mode, T, B, I, H, L, proj, dtype):
    def make(dev):
        cls = torch.nn.LSTM if mode == "LSTM" else torch.nn.GRU
        m = cls(I, H, num_layers=L, **({"proj_size": proj} if proj else {})).to(dev, dtype)
        if dev.type == "cuda":
            m.flatten_parameters()   # cuDNN's own layout: the peer's best case
        x = torch.randn(T, B, I, device=dev, dtype=dtype, requires_grad=True)
        return (x, *[w.detach().requires_grad_() for w in m._flat_weights])
    return make


def rnn_cases(device: torch.device, quick: bool) -> list[Case]:
    cuda = device.type == "cuda"
    if cuda:
        dtypes = (torch.bfloat16,) if quick else (torch.bfloat16, torch.float16)
        hiddens = (256, 1024) if quick else (256, 512, 1024)
        batches = (8, 64) if quick else (1, 8, 64, 256)
        seqs = (100,)
        L = 2
    else:
        dtypes, hiddens, batches, seqs, L = (torch.float32,), (16,), (3,), (5,), 2
    cases = []
    for dtype in dtypes:
        es = dtype_size(dtype)
        for mode in ("LSTM", "GRU"):
            for H in hiddens:
                for B in batches:
                    for T in seqs + ((1000,) if cuda and not quick and H == 512 and B in (8, 64) else ()):
                        I = H
                        flops = _flops(mode, T, B, I, H, L)
                        io = (T * B * I + T * B * H + L * GATES[mode] * H * 2 * H) * es
                        impls = {"fastnets": _fast_rnn(mode, L, 0, None), "torch": _torch_rnn(mode, L, 0, None)}
                        if cuda:
                            impls["torch.compile"] = compiled(_torch_rnn(mode, L, 0, None))
                        if _persistent_fits(mode, B, H, dtype, device):
                            impls["fastnets-persistent"] = _fast_rnn(mode, L, 0, None, persistent=True)
                        cases.append(Case("rnn", mode.lower(), f"{mode} L{L} T{T} B{B} H{H}", B, dtype,
                                          _inputs(mode, T, B, I, H, L, 0, dtype), impls, io, 2 * io,
                                          modes=("fwd", "fwd_bwd"), flops_fwd=flops, flops_bwd=2 * flops))
        if dtype != dtypes[0]:
            continue
        # Where cuDNN drops to its standard algorithm: packed variable-length batches and
        # LSTM projections (hidden 1024 -> 512).
        for B in ((8, 64) if cuda else (3,)):
            T, H = (100, 1024) if cuda else (5, 16)
            lengths = torch.linspace(T, max(1, T // 4), B).round().long()
            flops = _flops("LSTM", T, B, H, H, L) * float(lengths.sum()) / (T * B)
            io = (T * B * 2 * H + L * 8 * H * H) * es
            cases.append(Case("rnn", "lstm_packed", f"LSTM packed L{L} T<={T} B{B} H{H}", B, dtype,
                              _inputs("LSTM", T, B, H, H, L, 0, dtype),
                              {"fastnets": _fast_rnn("LSTM", L, 0, lengths), "torch": _torch_rnn("LSTM", L, 0, lengths)},
                              io, 2 * io, modes=("fwd", "fwd_bwd"), flops_fwd=int(flops), flops_bwd=int(2 * flops)))
            P = H // 2
            flops = _flops("LSTM", T, B, H, H, L, P)
            cases.append(Case("rnn", "lstm_proj", f"LSTM proj{P} L{L} T{T} B{B} H{H}", B, dtype,
                              _inputs("LSTM", T, B, H, H, L, P, dtype),
                              {"fastnets": _fast_rnn("LSTM", L, P, None), "torch": _torch_rnn("LSTM", L, P, None)},
                              io, 2 * io, modes=("fwd", "fwd_bwd"), flops_fwd=flops, flops_bwd=2 * flops))
        # Decoding: one step at a time (T = 1), latency per step.
        for H in ((512, 1024) if cuda else (16,)):
            for B in ((1, 8) if cuda else (3,)):
                flops = _flops("LSTM", 1, B, H, H, L)
                io = (L * 8 * H * H) * es
                impls = {"fastnets": _fast_rnn("LSTM", L, 0, None), "torch": _torch_rnn("LSTM", L, 0, None)}
                if _persistent_fits("LSTM", B, H, dtype, device):
                    impls["fastnets-persistent"] = _fast_rnn("LSTM", L, 0, None, persistent=True)
                cases.append(Case("rnn", "lstm_decode_step", f"LSTM step L{L} B{B} H{H}", B, dtype,
                                  _inputs("LSTM", 1, B, H, H, L, 0, dtype), impls,
                                  io, 2 * io, modes=("fwd",), flops_fwd=flops, flops_bwd=2 * flops))
    return cases + char_lm_cases(device, quick)


def char_lm_cases(device: torch.device, quick: bool) -> list[Case]:
    """The char-LM training step (forward + backward, no optimizer), bf16 autocast, 2-layer
    LSTM hidden 512, batch 64 x 256 characters. Peers: the same model on torch.nn.LSTM
    (cuDNN) eager and torch.compile'd, same weights. Size = tokens; tokens/s = size / ms * 1000."""
    if device.type != "cuda":
        return []   # seconds per step under the interpreter: the unit tests cover it there
    from ..models import CharLM, CharLMConfig
    B, T = (32, 256) if quick else (64, 256)
    cfg = CharLMConfig(vocab_size=128, embed=128, hidden=512, num_layers=2, dropout=0.0)
    ours = CharLM(cfg).to(device)
    theirs = CharLM(cfg, use_torch=True).to(device)
    theirs.load_state_dict(ours.state_dict())

    def step(model):
        def fn(idx, targets):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return model(idx, targets=targets)[2]
        return fn

    impls = {"fastnets": step(ours), "torch": step(theirs), "torch.compile": step(torch.compile(theirs))}

    def inputs(dev):
        idx = torch.randint(0, 128, (B, T), device=dev)
        return idx, idx.roll(-1, 1)

    flops = 3 * (_flops("LSTM", T, B, 128, 512, 2) + 2 * B * T * 512 * 128)
    return [Case("rnn", "char_lm_train_step", f"LSTM L2 H512 batch {B}x{T}", B * T, torch.bfloat16, inputs, impls,
                 B * T * 8, 0, modes=("fwd_bwd",), flops_fwd=flops // 3, flops_bwd=2 * flops // 3, check_rel=0.05)]
