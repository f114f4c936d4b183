"""Every op under torch.compile: fake implementations trace without graph breaks
(fullgraph=True), and compiled forward + backward match eager."""
import pytest
import torch

from fastnets import ops
from helpers import DEVICE, assert_close, expect_backend

CASES = {
    "layer_norm": (lambda x, w, b: ops.layer_norm(x, (x.shape[-1],), w, b), (5, 33), (33,)),
    "rms_norm": (lambda x, w, b: ops.rms_norm(x, (x.shape[-1],), w, offset=1.0) + b, (5, 33), (33,)),
    "group_norm": (lambda x, w, b: ops.group_norm(x.view(5, 3, 11), 3, w[:3], b[:3], activation="silu"), (5, 33), (33,)),
    "bias_act": (lambda x, w, b: ops.bias_act(x * w, b, "gelu_tanh"), (5, 33), (33,)),
    "bias_act_swiglu": (lambda x, w, b: ops.bias_act(x[:, :32] * w[:32], b[:32], "swiglu"), (5, 33), (33,)),
    "conv2d_fused": (lambda x, w, b: ops.conv2d(x, w, b[:, 0, 0, 0], padding=1, activation="relu", residual=x[:, :4]),
                     (2, 6, 5, 5), (4, 6, 3, 3)),
    "conv_transpose2d": (lambda x, w, b: ops.conv_transpose2d(x, w, b[:3, 0, 0, 0], 2, 1, 1),
                         (1, 4, 3, 3), (4, 3, 3, 3)),
    "batch_norm_pool": (lambda x, w, b: ops.max_pool2d(ops.batch_norm(x, None, None, w, b, True,
                                                                      activation="relu"), 3, 2, 1)
                        + ops.adaptive_avg_pool2d(x, 3), (2, 6, 6, 6), (6,)),
    # q from x, k / v from w (GQA 2:1), an additive mask from b that also gets a gradient.
    "flash_attention": (lambda x, w, b: ops.flash_attention(x, w, w * 2, causal=True, attn_mask=b[:, :1, :7, :9]
                                                            .expand(1, 2, 7, 9), window=(4, 0)),
                        (1, 2, 7, 16), (1, 1, 9, 16)),
    "sdpa": (lambda x, w, b: ops.scaled_dot_product_attention(x, w, b, is_causal=True), (2, 3, 9, 16), (2, 3, 9, 16)),
    # cos / sin are constants (no gradient): w and b reach the output through a plain sum too.
    "rope": (lambda x, w, b: sum(ops.rope(x, x * 2, w[0, 0], b[0, 0])) + (w + b).sum(), (1, 2, 5, 8), (1, 1, 5, 4)),
    "cross_entropy": (lambda x, w, b: ops.cross_entropy(x * w, torch.arange(5, device=x.device) % 33,
                                                        label_smoothing=0.1, z_loss=1e-3) + b.sum(),
                      (5, 33), (33,)),
    "linear_cross_entropy": (lambda x, w, b: ops.linear_cross_entropy(x, w, torch.arange(5, device=x.device),
                                                                      b[:, 0], chunk_size=2), (5, 8), (11, 8)),
    # A 2-layer LSTM (w: W_ih and W_hh of both layers, no biases) and a bidirectional GRU
    # with per-row lengths: two custom ops per layer and direction, no graph break.
    "rnn_lstm": (lambda x, w, b: ops.lstm(x, None, [w, b, w * 0.5, b * 0.5], False, 2)[0], (5, 2, 4), (16, 4)),
    "rnn_gru_lengths": (lambda x, w, b: ops.gru(x, None, [w, b, b, w], False, 1, 0.0, True, True,
                                                lengths=[4, 1, 3])[0], (4, 3, 4), (12, 4)),
    # The forward process with the v target: x0 = x, noise = w, a gradient to both.
    "q_sample": (lambda x, w, b: sum(ops.q_sample(x, w, torch.tensor([0, 500, 999], device=x.device), _ACP,
                                                  target="v_prediction")) * b, (3, 4, 5), (3, 4, 5)),
}
_ACP = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)


# The dispatch op each case must run on the kernel backend (eager), and find as a
# torch.ops.fastnets custom op in the compiled graph.
OPS = {"bias_act_swiglu": "bias_act", "conv2d_fused": "conv2d", "batch_norm_pool": "batch_norm",
       "sdpa": "scaled_dot_product_attention", "rope": "apply_rotary_emb", "rnn_lstm": "rnn",
       "rnn_gru_lengths": "rnn"}


def _recording_backend(seen: list):
    def backend(gm, example_inputs):
        # Subgraphs too: an autograd.Function (linear_cross_entropy) traces into a
        # higher-order op whose body is a submodule of the graph module.
        for sub in gm.modules():
            if isinstance(sub, torch.fx.GraphModule):
                seen.extend(str(n.target) for n in sub.graph.nodes if n.op == "call_function")
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)
    return backend


def _run(fn, inputs):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    grads = torch.autograd.grad(out, inputs, torch.ones_like(out))
    return out, grads


@pytest.mark.parametrize("name", sorted(CASES))
def test_compiled_matches_eager(name):
    fn, xshape, wshape = CASES[name]
    inputs = [torch.randn(xshape, device=DEVICE), torch.randn(wshape, device=DEVICE), torch.randn(wshape, device=DEVICE)]
    with expect_backend(OPS.get(name, name)):
        eager_out, eager_grads = _run(fn, inputs)
    torch._dynamo.reset()
    seen: list = []
    compiled = torch.compile(fn, backend=_recording_backend(seen), fullgraph=True)
    out, grads = _run(compiled, inputs)
    assert any(t.startswith("fastnets.") for t in seen), f"{name}: no fastnets custom op in the compiled graph: {seen}"
    assert_close(out, eager_out.double(), torch.float32, f"compiled {name}")
    for i, (g, e) in enumerate(zip(grads, eager_grads)):
        assert_close(g, e.double(), torch.float32, f"compiled {name} grad {i}")


def test_inductor_compiles_a_norm_block():
    """The default inductor backend too, with the custom op inside a fused region."""
    def block(x, w, b):
        return ops.bias_act(ops.layer_norm(x, (x.shape[-1],), w, b) * 2.0, None, "silu")

    inputs = [torch.randn(4, 24, device=DEVICE), torch.randn(24, device=DEVICE), torch.randn(24, device=DEVICE)]
    with expect_backend("layer_norm"), expect_backend("bias_act"):
        eager_out, eager_grads = _run(block, inputs)
    torch._dynamo.reset()
    out, grads = _run(torch.compile(block, fullgraph=True), inputs)
    assert_close(out, eager_out.double(), torch.float32, "inductor block")
    for i, (g, e) in enumerate(zip(grads, eager_grads)):
        assert_close(g, e.double(), torch.float32, f"inductor block grad {i}")


def test_compiled_sampler_step_and_timestep_embedding():
    """The inference ops (no autograd) trace fullgraph too: a guided DPM-style step with a
    device step index and an in-place history, and the embedding."""
    g = torch.Generator().manual_seed(0)
    x, m = torch.randn(2, 3, 4, 5, generator=g).to(DEVICE), torch.randn(4, 3, 4, 5, generator=g).to(DEVICE)
    table = torch.randn(6, ops.diffusion.N_COEFS, generator=g).to(DEVICE) * 0.5
    index = torch.tensor([3], device=DEVICE)
    t = torch.tensor([1, 999], device=DEVICE)

    def fn(x, m, hist):
        out, x0 = ops.sampler_step(x, m, table, index, history=hist, guidance_scale=5.0, clip_sample_range=1.0,
                                   return_x0=True)
        return out + x0 + ops.timestep_embedding(t, 60, True, 0).sum()

    hist_eager, hist_compiled = torch.zeros_like(x), torch.zeros_like(x)
    with expect_backend("sampler_step"), expect_backend("timestep_embedding"):
        want = fn(x, m, hist_eager)
    torch._dynamo.reset()
    seen: list = []
    got = torch.compile(fn, backend=_recording_backend(seen), fullgraph=True)(x, m, hist_compiled)
    for op in ("fastnets.sampler_step", "fastnets.timestep_embedding"):
        assert any(t.startswith(op) for t in seen), f"{op} not in the compiled graph: {seen}"
    assert_close(got, want.double(), torch.float32, "compiled sampler step")
    assert_close(hist_compiled, hist_eager.double(), torch.float32, "compiled history update")
