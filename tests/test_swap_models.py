"""swap() on models other libraries wrote (transformers, diffusers, torchvision, timm), built
from tiny random configs: after one swap() call every model matches its unswapped self
(outputs and every gradient, eval and train mode, float32), the share of its convolution,
attention, norm, pooling, recurrent, activation and loss work that runs on fastnets kernels
is measured with a dispatch mode (tests/work_counter.py) and held to a floor, and the swap
report names every module of those categories left on torch. Plus the two reproductions of
issue 23: T5's decoder stays causal, and backward through a swapped ResNet in eval mode."""
from __future__ import annotations

import copy

import contextlib

import pytest
import torch
from torch import nn

import fastnets
from helpers import DEVICE, assert_close, expect_backend
from tolerances import MODEL_TRAIN_FLOAT32
from work_counter import WorkCounter

# The test environment has all four (scripts/env.sh; torchvision and timm from their own folder,
# tests/conftest.py): a missing one fails here, never skips.
import diffusers  # noqa: E402
import timm  # noqa: E402
import torchvision  # noqa: E402
import transformers  # noqa: E402


def _grads(model: nn.Module, extra=()) -> dict:
    out = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    out.update({f"input{i}": t.grad for i, t in enumerate(extra) if t.grad is not None})
    return out


def _run(model, make_inputs, loss_of, train: bool, counter=None):
    model.train(train)
    model.zero_grad(set_to_none=True)
    inputs = make_inputs(next(model.parameters()).dtype)
    leaves = [v for v in inputs.values() if isinstance(v, torch.Tensor) and v.requires_grad]
    if counter is None:
        out = model(**inputs)
        loss = loss_of(out)
        loss.backward()
    else:
        with counter:
            out = model(**inputs)
            loss = loss_of(out)
            loss.backward()
    return loss.detach(), _grads(model, leaves)


def check_swapped_model(model: nn.Module, make_inputs, loss_of, *, min_share: float, functional: bool = False,
                        modes=("eval", "train"), uncovered=(), kernels=()):
    """Swap a copy of `model`, then for each mode compare its loss and every gradient with a
    float64 copy (torch's float32 model as the yardstick, MODEL_TRAIN_FLOAT32), count the
    work, and hold the fastnets share (bytes and FLOPs) to min_share. `uncovered`: the class
    names the report must list as left on torch (and nothing else)."""
    model = model.to(DEVICE)
    fast, ref = copy.deepcopy(model), copy.deepcopy(model).double()
    report = fastnets.swap(fast, functional=functional)
    listed = sorted({cls for _, cls, _, _ in report.uncovered})
    assert listed == sorted(set(uncovered)), f"uncovered modules: {listed}\n{report}"
    shares = {}
    for mode in modes:
        train = mode == "train"
        torch.manual_seed(1)
        base_loss, base_grads = _run(model, make_inputs, loss_of, train)
        torch.manual_seed(1)
        want_loss, want_grads = _run(ref, make_inputs, loss_of, train)
        torch.manual_seed(1)
        counter = WorkCounter()
        with contextlib.ExitStack() as stack:
            for op in kernels:
                stack.enter_context(expect_backend(op))
            loss, grads = _run(fast, make_inputs, loss_of, train, counter)
        assert_close(loss, want_loss, torch.float32, f"{mode} loss", baseline=base_loss, tol=MODEL_TRAIN_FLOAT32)
        assert grads.keys() == want_grads.keys()
        for name, g in grads.items():
            assert_close(g, want_grads[name], torch.float32, f"{mode} grad {name}", baseline=base_grads[name],
                         tol=MODEL_TRAIN_FLOAT32)
        shares[mode] = (counter.share("bytes"), counter.share("flops"))
        assert min(shares[mode]) >= min_share, f"{mode}: {counter.summary()}"
    fastnets.unswap(fast)
    assert not any(type(m).__module__.startswith("fastnets.") for m in fast.modules())
    return report, shares


# --- the two reproductions -------------------------------------------------------------------------

def _t5():
    cfg = transformers.T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1,
                                num_heads=4, dropout_rate=0.0, relative_attention_num_buckets=8,
                                decoder_start_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    return transformers.T5ForConditionalGeneration(cfg).eval()


def test_t5_decoder_stays_causal_after_swap():
    """T5 passes its relative position bias beside a mask transformers leaves None for a purely
    causal decoder: the bias adds to the scores and causality stays on."""
    model = _t5().to(DEVICE)
    ref = copy.deepcopy(model)
    fastnets.swap(model)
    ids = torch.randint(1, 96, (2, 7), device=DEVICE)
    dec = torch.randint(1, 96, (2, 5), device=DEVICE)
    with torch.no_grad(), expect_backend("flash_attention"):
        got = model(input_ids=ids, decoder_input_ids=dec).logits
        changed = dec.clone()
        changed[:, -1] = (changed[:, -1] + 1) % 96
        moved = model(input_ids=ids, decoder_input_ids=changed).logits
        want = ref(input_ids=ids, decoder_input_ids=dec).logits
    assert_close(got, want.double(), torch.float32, "T5 logits after swap", baseline=want, tol=MODEL_TRAIN_FLOAT32)
    # the last decoder token is seen by the last position only
    assert torch.equal(got[:, :-1], moved[:, :-1]), "changing the last decoder token moved earlier positions"


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_attention_function_bias_never_replaces_the_mask(causal, mask_kind):
    """transformers' attention-function contract with a position bias: every combination of
    the model's mask (None / bool / additive) and is_causal matches transformers' SDPA path."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from fastnets.integrations.transformers import fastnets_attention_forward
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 6, 8, device=DEVICE) for _ in range(3))
    bias = torch.randn(1, 4, 6, 6, device=DEVICE)
    mask = None
    if mask_kind is not None:
        keep = torch.ones(2, 1, 6, 6, dtype=torch.bool, device=DEVICE).tril() if causal else \
            torch.rand(2, 1, 6, 6, device=DEVICE) > 0.3
        keep[..., 0] = True
        mask = keep if mask_kind == "bool" else torch.zeros(keep.shape, device=DEVICE).masked_fill(~keep, -1e9)
    module = nn.Module()
    module.is_causal = causal
    got, _ = fastnets_attention_forward(module, q, k, v, mask, position_bias=bias, scaling=0.3)
    want, _ = sdpa_attention_forward(module, q.double(), k.double(), v.double(),
                                     None if mask is None else (mask if mask.dtype == torch.bool else mask.double()),
                                     position_bias=bias.double(), scaling=0.3)
    assert_close(got, want, torch.float32, "attention with position bias")


@pytest.mark.parametrize("mode", ["eval", "eval-no-grad-params"])
def test_backward_through_swapped_resnet(mode):
    """torchvision's blocks share one ReLU(inplace=True) between call sites and add the skip
    in place: backward through the fused eval-mode convs (frozen-BN fine-tuning, saliency maps
    with frozen weights) and through training mode matches the unswapped model."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).to(DEVICE)
    if mode == "eval-no-grad-params":
        model.requires_grad_(False)
    train = mode == "train"
    ref = copy.deepcopy(model).double().train(train)
    plain = copy.deepcopy(model).train(train)
    fastnets.swap(model)
    model.train(train)
    x = torch.randn(2, 3, 16, 16, device=DEVICE)
    outs = {}
    for name, m in (("fast", model), ("ref", ref), ("plain", plain)):
        xi = x.detach().to(next(m.parameters()).dtype).requires_grad_()
        with expect_backend("conv2d") if name == "fast" else contextlib.nullcontext():
            m(xi).square().sum().backward()
        outs[name] = [xi.grad] + [p.grad for p in m.parameters() if p.grad is not None]
    assert len(outs["fast"]) == len(outs["ref"])
    for i, (a, b, c) in enumerate(zip(outs["fast"], outs["ref"], outs["plain"])):
        assert_close(a, b, torch.float32, f"{mode} gradient {i}", baseline=c, tol=MODEL_TRAIN_FLOAT32)
    with torch.no_grad():   # and inference still takes the fused epilogue
        model.eval()(x)


def test_cpu_tensors_never_take_tf32():
    """torch never runs float32 on TF32 for CPU tensors, whatever cudnn.allow_tf32 says (its
    default is True): neither do fastnets' kernels; tests can still force the TF32 path."""
    from fastnets.kernels import _common
    assert torch.backends.cudnn.allow_tf32 or DEVICE.type == "cuda"
    cpu, meta = torch.device("cpu"), torch.device("meta")
    before = torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = True
        assert _common.float32_precision(torch.float32, cpu, True) == "ieee"
        assert _common.float32_precision(torch.float32, meta, True) == "tf32"   # a GPU launch
        assert _common.float32_precision(torch.float32, meta, False) == "ieee"
        assert _common.float32_precision(torch.float16, meta, True) == "ieee"
        with _common.force_tf32():
            assert _common.float32_precision(torch.float32, cpu, False) == "tf32"
        # a float32 conv on CPU tensors under allow_tf32=True is as exact as IEEE float32
        x, w = torch.randn(2, 8, 9, 9, dtype=torch.float64), torch.randn(16, 8, 3, 3, dtype=torch.float64)
        got = fastnets.ops.conv2d(x.float().to(DEVICE), w.float().to(DEVICE), padding=1)
        want = torch.nn.functional.conv2d(x, w, padding=1)
        if DEVICE.type == "cpu":
            assert_close(got, want, torch.float32, "float32 conv with allow_tf32=True on CPU tensors")
    finally:
        torch.backends.cudnn.allow_tf32 = before
