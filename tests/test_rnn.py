"""LSTM / GRU / RNN and their cells against fastnets.reference and torch.nn itself (same
weights): outputs, final states and every gradient (input, initial states, all weights)."""
import pytest
import torch
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence

import fastnets
from fastnets import _dispatch, ops
from fastnets import nn as fnn
from helpers import DEVICE, KERNEL_BACKEND, check_op, expect_backend
from tolerances import DTYPES

TORCH_CLASS = {"LSTM": torch.nn.LSTM, "GRU": torch.nn.GRU, "RNN_TANH": torch.nn.RNN, "RNN_RELU": torch.nn.RNN}
FAST_CLASS = {"LSTM": fnn.LSTM, "GRU": fnn.GRU, "RNN_TANH": fnn.RNN, "RNN_RELU": fnn.RNN}


def _kwargs(mode, proj_size=0, **kw):
    if mode == "RNN_RELU":
        kw["nonlinearity"] = "relu"
    if proj_size:
        kw["proj_size"] = proj_size
    return kw


def _torch_module(mode, I, H, L, bi, batch_first, proj_size, dtype):
    torch.manual_seed(1)
    return TORCH_CLASS[mode](I, H, num_layers=L, bidirectional=bi, batch_first=batch_first,
                             **_kwargs(mode, proj_size)).to(DEVICE, dtype)


def _flat(mode, out):
    """One tensor of everything a recurrent module returns, so one upstream gradient covers
    the output and the final states."""
    y, state = out
    y = y.data if hasattr(y, "batch_sizes") else y
    states = state if isinstance(state, tuple) else (state,)
    return torch.cat([y.reshape(-1)] + [s.reshape(-1) for s in states])


def _rnn_case(mode, T, B, I, H, L=1, bi=False, batch_first=False, proj_size=0, lengths=None, dtype=torch.float32,
              with_state=True):
    torch.manual_seed(0)
    mod = _torch_module(mode, I, H, L, bi, batch_first, proj_size, dtype)
    D = 2 if bi else 1
    K = proj_size or H
    x = torch.randn((B, T, I) if batch_first else (T, B, I), device=DEVICE, dtype=dtype)
    states = []
    if with_state:
        states.append(torch.randn(L * D, B, K, device=DEVICE, dtype=dtype) * 0.5)
        if mode == "LSTM":
            states.append(torch.randn(L * D, B, H, device=DEVICE, dtype=dtype) * 0.5)
    weights = [w.detach() for w in mod._flat_weights]
    n_states = len(states)

    def unpack(args):
        x, rest = args[0], args[1:]
        st, ws = rest[:n_states], rest[n_states:]
        hx = None if not st else (tuple(st) if mode == "LSTM" else st[0])
        if lengths is not None:
            x = pack_padded_sequence(x, torch.tensor(lengths), batch_first=batch_first, enforce_sorted=False)
        return x, hx, ws

    def ours(*args):
        x, hx, ws = unpack(args)
        return _flat(mode, ops.rnn(mode, x, hx, ws, True, L, 0.0, True, bi, batch_first, proj_size=proj_size))

    def ref(*args):
        with fastnets.backend("torch"):
            return ours(*args)

    def peer(*args):
        x, hx, ws = unpack(args)
        m = _torch_module(mode, I, H, L, bi, batch_first, proj_size, args[0].dtype)
        return _flat(mode, functional_call(m, dict(zip(m._flat_weights_names, ws)), (x, hx)))

    return ours, ref, peer, [x, *states, *weights]


# (mode, T, B, I, H, layers, bidirectional, batch_first, proj_size, lengths): the odd sizes
# torch users hit (hidden 1 / 7 / 33 / 130, input 3 / 17, one step and 37 steps, batch 1 and 5).
CASES = [
    ("LSTM", 5, 3, 3, 7, 1, False, False, 0, None),
    ("LSTM", 1, 1, 17, 1, 1, False, False, 0, None),
    ("LSTM", 37, 5, 3, 7, 2, True, False, 0, None),
    ("LSTM", 4, 5, 17, 33, 3, False, True, 0, None),
    ("LSTM", 6, 5, 3, 7, 2, True, False, 3, None),
    ("LSTM", 6, 5, 3, 7, 2, True, True, 0, (3, 6, 1, 5, 2)),
    ("LSTM", 6, 5, 3, 7, 1, False, False, 2, (4, 6, 1, 5, 6)),
    ("LSTM", 3, 2, 3, 130, 1, False, False, 0, None),
    ("GRU", 5, 3, 3, 7, 1, False, False, 0, None),
    ("GRU", 37, 1, 17, 33, 2, True, False, 0, None),
    ("GRU", 6, 5, 3, 7, 2, True, True, 0, (3, 6, 1, 5, 2)),
    ("GRU", 3, 2, 3, 130, 1, False, False, 0, None),
    ("RNN_TANH", 5, 3, 3, 7, 2, True, False, 0, None),
    ("RNN_TANH", 6, 5, 3, 7, 1, False, False, 0, (3, 6, 1, 5, 2)),
    ("RNN_RELU", 5, 3, 3, 7, 2, False, True, 0, None),
    ("RNN_RELU", 1, 5, 17, 1, 1, True, False, 0, None),
]


def _id(case):
    mode, T, B, I, H, L, bi, bf, proj, lengths = case
    return (f"{mode}-T{T}-B{B}-I{I}-H{H}-L{L}{'-bi' if bi else ''}{'-bf' if bf else ''}"
            f"{f'-proj{proj}' if proj else ''}{'-packed' if lengths else ''}")


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_rnn_float32_against_torch(case):
    mode, T, B, I, H, L, bi, bf, proj, lengths = case
    ours, ref, peer, args = _rnn_case(mode, T, B, I, H, L, bi, bf, proj, lengths)
    check_op("rnn", ours, ref, args, torch.float32, peer=peer)


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != torch.float32], ids=str)
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH"])
def test_rnn_low_precision(mode, dtype):
    ours, ref, peer, args = _rnn_case(mode, 6, 5, 17, 33, 2, True, False, 0, None, dtype=dtype)
    check_op("rnn", ours, ref, args, dtype, peer=peer)


def test_rnn_low_precision_packed_projection():
    ours, ref, peer, args = _rnn_case("LSTM", 6, 5, 3, 7, 2, True, False, 3, (3, 6, 1, 5, 2), dtype=torch.bfloat16)
    check_op("rnn", ours, ref, args, torch.bfloat16, peer=peer)


def test_rnn_without_initial_state():
    ours, ref, peer, args = _rnn_case("LSTM", 5, 3, 3, 7, 2, True, False, 0, None, with_state=False)
    check_op("rnn", ours, ref, args, torch.float32, peer=peer)


@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH", "RNN_RELU"])
def test_rnn_gradcheck_float64(mode):
    """Every input and weight of a 2-layer bidirectional network, packed (unsorted lengths),
    with proj_size for LSTM: float64 gradcheck through the kernels' own backward."""
    proj = 2 if mode == "LSTM" else 0
    _, _, _, args = _rnn_case(mode, 4, 3, 2, 3, 2, True, False, proj, (2, 4, 1), dtype=torch.float64)
    n_states = 2 if mode == "LSTM" else 1

    def fn(*a):
        x = pack_padded_sequence(a[0], torch.tensor([2, 4, 1]), enforce_sorted=False)
        st = a[1:1 + n_states]
        hx = tuple(st) if mode == "LSTM" else st[0]
        return _flat(mode, ops.rnn(mode, x, hx, a[1 + n_states:], True, 2, 0.0, True, True, False, proj_size=proj))

    inputs = [a.detach().clone().requires_grad_() for a in args]
    with expect_backend("rnn"):
        # fast_mode: the analytical and numerical Jacobians projected on random vectors (a
        # few forwards instead of one per input element, which the interpreter cannot afford).
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-6, fast_mode=True)


@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH", "RNN_RELU"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cells(mode, dtype):
    torch.manual_seed(0)
    cls = {"LSTM": torch.nn.LSTMCell, "GRU": torch.nn.GRUCell}.get(mode, torch.nn.RNNCell)
    kw = {"nonlinearity": "relu"} if mode == "RNN_RELU" else {}
    tcell = cls(17, 33, **kw).to(DEVICE, dtype)
    fn = {"LSTM": ops.lstm_cell, "GRU": ops.gru_cell, "RNN_TANH": ops.rnn_tanh_cell, "RNN_RELU": ops.rnn_relu_cell}[mode]
    B = 5
    x = torch.randn(B, 17, device=DEVICE, dtype=dtype)
    h = torch.randn(B, 33, device=DEVICE, dtype=dtype)
    c = torch.randn(B, 33, device=DEVICE, dtype=dtype)
    ws = [tcell.weight_ih.detach(), tcell.weight_hh.detach(), tcell.bias_ih.detach(), tcell.bias_hh.detach()]
    lstm = mode == "LSTM"

    def flat(out):
        return torch.cat([out[0].reshape(-1), out[1].reshape(-1)]) if lstm else out

    def ours(x, h, c, *w):
        return flat(fn(x, (h, c) if lstm else h, *w))

    def ref(*a):
        with fastnets.backend("torch"):
            return ours(*a)

    def peer(x, h, c, *w):
        m = cls(17, 33, **kw).to(DEVICE, x.dtype)
        return flat(functional_call(m, dict(zip(["weight_ih", "weight_hh", "bias_ih", "bias_hh"], w)),
                                    (x, (h, c) if lstm else h)))

    args = [x, h, c, *ws]
    grad_args = tuple(i for i in range(len(args)) if lstm or i != 2)
    check_op("rnn", ours, ref, args, dtype, peer=peer, grad_args=grad_args)


def test_cell_unbatched_and_no_state():
    torch.manual_seed(0)
    t, f = torch.nn.LSTMCell(3, 4), fnn.LSTMCell(3, 4)
    f.load_state_dict(t.state_dict())
    x = torch.randn(3)
    with expect_backend("rnn"):
        got = f(x)
    want = t(x)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    g, tg = fnn.GRUCell(3, 4), torch.nn.GRUCell(3, 4)
    g.load_state_dict(tg.state_dict())
    torch.testing.assert_close(g(x), tg(x), atol=1e-5, rtol=1e-5)


# --- modules ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH", "RNN_RELU"])
def test_modules_are_drop_in(mode):
    """Same constructor, parameter names and state_dict as torch.nn; a torch state_dict
    loads; outputs (batched, unbatched, packed) match; flatten_parameters exists."""
    torch.manual_seed(0)
    kw = _kwargs(mode, proj_size=2 if mode == "LSTM" else 0, num_layers=2, bidirectional=True, batch_first=True)
    t = TORCH_CLASS[mode](3, 5, **kw).to(DEVICE)
    f = FAST_CLASS[mode](3, 5, **kw).to(DEVICE)
    assert [n for n, _ in f.named_parameters()] == [n for n, _ in t.named_parameters()]
    assert "weight_hh_l1_reverse" in f.state_dict()
    f.load_state_dict(t.state_dict())
    f.flatten_parameters()
    x = torch.randn(4, 6, 3, device=DEVICE)
    for inp in (x, x[0], pack_padded_sequence(x, torch.tensor([2, 6, 1, 4]), batch_first=True,
                                              enforce_sorted=False)):
        with expect_backend("rnn"):
            got = f(inp)
        want = t(inp)
        torch.testing.assert_close(_flat(mode, got), _flat(mode, want), atol=2e-5, rtol=2e-5)
    assert isinstance(f, TORCH_CLASS[mode])


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_padded_lengths_match_packed(mode):
    """lengths= on a padded batch (any order) gives what packing gives, without the packing."""
    torch.manual_seed(0)
    f = FAST_CLASS[mode](3, 5, num_layers=2, bidirectional=True, batch_first=True).to(DEVICE)
    x = torch.randn(4, 6, 3, device=DEVICE)
    lengths = [2, 6, 1, 4]
    with expect_backend("rnn"):
        y, h = f(x, lengths=lengths)
    yp, hp = f(pack_padded_sequence(x, torch.tensor(lengths), batch_first=True, enforce_sorted=False))
    yp, _ = torch.nn.utils.rnn.pad_packed_sequence(yp, batch_first=True, total_length=6)
    torch.testing.assert_close(y, yp, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(_flat(mode, (y, h)), _flat(mode, (yp, hp)), atol=1e-6, rtol=1e-6)


def test_dropout_between_layers_is_reproducible():
    """Dropout draws from torch's generator: the same seed gives the same output, the
    backward uses the forward's mask, and eval mode has no dropout."""
    torch.manual_seed(0)
    f = fnn.LSTM(3, 8, num_layers=3, dropout=0.5).to(DEVICE)
    x = torch.randn(5, 2, 3, device=DEVICE, requires_grad=True)
    torch.manual_seed(123)
    y1, _ = f(x)
    torch.manual_seed(123)
    y2, _ = f(x)
    assert torch.equal(y1, y2)
    torch.manual_seed(124)
    y3, _ = f(x)
    assert not torch.equal(y1, y3)
    # The gradient of the dropped network equals the reference's with the same mask (same seed).
    g = torch.randn_like(y1)
    torch.manual_seed(7)
    with expect_backend("rnn"):
        dx = torch.autograd.grad((f(x)[0] * g).sum(), x)[0]
    torch.manual_seed(7)
    with fastnets.backend("torch"):
        dx_ref = torch.autograd.grad((f(x)[0] * g).sum(), x)[0]
    torch.testing.assert_close(dx, dx_ref, atol=1e-5, rtol=1e-5)
    f.eval()
    assert torch.equal(f(x)[0], f(x)[0])


def test_swap_learns_recurrent_modules():
    model = torch.nn.ModuleDict({"lstm": torch.nn.LSTM(3, 4), "gru": torch.nn.GRU(3, 4), "rnn": torch.nn.RNN(3, 4),
                                 "cell": torch.nn.LSTMCell(3, 4)})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = fastnets.swap(model)
    assert {r[2] for r in report.replaced} >= {"fastnets.nn.rnn.LSTM", "fastnets.nn.rnn.GRU", "fastnets.nn.rnn.RNN",
                                               "fastnets.nn.rnn.LSTMCell"}
    assert type(model["lstm"]) is fnn.LSTM
    x = torch.randn(2, 3, 3)
    with expect_backend("rnn"):
        model["lstm"](x)
    fastnets.unswap(model)
    assert type(model["lstm"]) is torch.nn.LSTM
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# --- bad input -----------------------------------------------------------------------------------------

def test_bad_input_errors():
    f = fnn.LSTM(3, 4, num_layers=2)
    with pytest.raises(ValueError, match="weight_ih_l0 must have shape"):
        f(torch.randn(5, 2, 7))
    with pytest.raises(ValueError, match="expected h0 of shape"):
        f(torch.randn(5, 2, 3), (torch.zeros(1, 2, 4), torch.zeros(2, 2, 4)))
    with pytest.raises(ValueError, match="expected c0 of shape"):
        f(torch.randn(5, 2, 3), (torch.zeros(2, 2, 4), torch.zeros(2, 3, 4)))
    with pytest.raises(TypeError, match="hx must be a tuple"):
        f(torch.randn(5, 2, 3), torch.zeros(2, 2, 4))
    with pytest.raises(ValueError, match="3-D .batched. or 2-D"):
        f(torch.randn(5, 2, 3, 1))
    with pytest.raises(TypeError, match="dtype"):
        f(torch.randn(5, 2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="no time steps"):
        f(torch.randn(0, 2, 3))
    with pytest.raises(ValueError, match="mode must be one of"):
        ops.rnn("LSTMX", torch.randn(2, 1, 3), None, f._flat_weights)
    with pytest.raises(ValueError, match="proj_size is only supported for LSTM"):
        ops.rnn("GRU", torch.randn(2, 1, 3), None, [], proj_size=2)
    g = fnn.GRU(3, 4)
    with pytest.raises(TypeError, match="hx must be a tensor"):
        g(torch.randn(5, 2, 3), (torch.zeros(1, 2, 4),))
    with pytest.raises(ValueError, match="hx of shape"):
        g(torch.randn(5, 2, 3), torch.zeros(1, 3, 4))
    # Lengths longer than the sequence: torch packs them without a word (batch_sizes that
    # do not match the data); fastnets refuses the inconsistent batch, and bad padded lengths.
    with pytest.raises(ValueError, match="batch_sizes sum to"):
        g(pack_padded_sequence(torch.randn(3, 2, 3), torch.tensor([5, 2])))
    with pytest.raises(ValueError, match=r"lengths must be in \[1, 3\]"):
        g(torch.randn(3, 2, 3), lengths=[5, 2])
    with pytest.raises(ValueError, match="lengths must be 2 integers"):
        g(torch.randn(3, 2, 3), lengths=[1, 2, 3])
    # Unsorted lengths with enforce_sorted=True: torch's own packing raises.
    with pytest.raises(RuntimeError, match="sorted"):
        pack_padded_sequence(torch.randn(3, 2, 3), torch.tensor([2, 3]), enforce_sorted=True)
    cell = fnn.LSTMCell(3, 4)
    with pytest.raises(ValueError, match="weight_ih_l0 must have shape"):
        cell(torch.randn(2, 5))
    with pytest.raises(ValueError, match="expected hx of shape"):
        cell(torch.randn(2, 3), (torch.zeros(3, 4), torch.zeros(2, 4)))


def test_fallback_counts_when_forced_to_torch():
    f = fnn.GRU(3, 4)
    before = _dispatch.calls[("rnn", "torch")]
    with fastnets.backend("torch"):
        f(torch.randn(2, 1, 3))
    assert _dispatch.calls[("rnn", "torch")] == before + 1
    assert KERNEL_BACKEND in ("interpret", "triton")
