"""swap() -> unswap() on every model family fastnets knows: after swap the outputs match
(and the kernels ran), after unswap the module tree, the state_dict, the Parameter objects
and the outputs are exactly what they were."""
import contextlib
import copy
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import fastnets
import torchvision_style as tv
from helpers import DEVICE, assert_close, expect_backend
from tolerances import MODEL_TRAIN_FLOAT32


def _snapshot(model: nn.Module) -> dict:
    return {"modules": [(name, m, type(m), sorted(m.__dict__)) for name, m in model.named_modules()],
            "params": dict(model.named_parameters()), "buffers": dict(model.named_buffers()),
            "state": {k: v.clone() for k, v in model.state_dict().items()}}


def check_round_trip(model: nn.Module, run, kernels: tuple, *, train_too: bool = False, **swap_kwargs):
    """run(model) -> a float tensor. Compares the swapped model with a float64 copy of the
    original (torch float32 as the 2x baseline), asserts each op in `kernels` ran on the
    kernel backend, then that unswap() restores everything bit for bit."""
    snap = _snapshot(model)
    reference = copy.deepcopy(model).double()
    with torch.no_grad():
        before, want = run(model), run(reference)
    report = fastnets.swap(model, **swap_kwargs)
    assert report.replaced, "swap() converted nothing"
    with contextlib.ExitStack() as stack:
        for op in kernels:
            stack.enter_context(expect_backend(op))
        with torch.no_grad():
            after = run(model)
    assert_close(after, want, torch.float32, "output after swap", baseline=before)
    if train_too:   # training mode (on copies: BN statistics move): no fusion, batch statistics
        fast, ref, plain = copy.deepcopy(model).train(), copy.deepcopy(reference).train(), copy.deepcopy(model)
        fastnets.unswap(plain).model.train()   # a deep copy of a swapped model unswaps too
        assert not any(type(m).__module__.startswith("fastnets.") for m in plain.modules())
        with expect_backend("batch_norm"):
            got = run(fast)
        # The unswapped deep copy runs as plain torch: its float32 error is the yardstick (batch
        # statistics over few values amplify rounding, differently on every CPU).
        assert_close(got, run(ref), torch.float32, "train-mode output after swap", baseline=run(plain),
                     tol=MODEL_TRAIN_FLOAT32)
    undo = fastnets.unswap(model)
    assert {name for name, *_ in undo.replaced} >= {name for name, *_ in report.replaced}
    now = _snapshot(model)
    for (n0, m0, c0, k0), (n1, m1, c1, k1) in zip(snap["modules"], now["modules"]):
        assert (n1, c1) == (n0, c0) and m1 is m0, f"module {n0!r}: {c0.__name__} became {c1.__name__}"
        assert k1 == k0, f"module {n0!r}: attributes {sorted(set(k1) ^ set(k0))} differ after unswap"
    assert len(now["modules"]) == len(snap["modules"])
    assert all(now["params"][n] is p for n, p in snap["params"].items()) and now["params"].keys() == snap["params"].keys()
    assert all(now["buffers"][n] is b for n, b in snap["buffers"].items())
    assert now["state"].keys() == snap["state"].keys()
    assert all(torch.equal(now["state"][k], v) for k, v in snap["state"].items())
    with torch.no_grad():
        assert torch.equal(run(model), before), "output after unswap differs from the original's"
    return report


def test_round_trip_torchvision_resnet():
    model = tv.randomize_bn(tv.resnet18(num_classes=5)).to(DEVICE).eval()
    x = torch.randn(2, 3, 16, 16, device=DEVICE)
    report = check_round_trip(model, lambda m: m(x.to(next(m.parameters()).dtype)), ("conv2d", "max_pool2d",
                                                                                      "adaptive_avg_pool2d"))
    assert len(report.fused) == 20


def test_round_trip_resnet_train_mode():
    model = tv.randomize_bn(tv.resnet18(num_classes=3)).to(DEVICE).eval()
    x = torch.randn(4, 3, 16, 16, device=DEVICE)
    check_round_trip(model, lambda m: m(x.to(next(m.parameters()).dtype)), ("conv2d",), train_too=True)


def _padding(n: int, s: int) -> torch.Tensor:
    pad = torch.zeros(n, s, dtype=torch.bool, device=DEVICE)
    pad[1, s - 3:] = True
    return pad


@pytest.mark.parametrize("norm_first", [False, True])
def test_round_trip_transformer_encoder_with_padding_mask(norm_first):
    """Default arguments (enable_nested_tensor=True), eval mode, no autograd, a padding mask:
    torch runs its nested-tensor path there; the swapped encoder runs fastnets attention
    and gives torch's result, padded positions included."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=48, batch_first=True, norm_first=norm_first)
    model = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(32)).to(DEVICE).eval()
    x = torch.randn(3, 9, 32, device=DEVICE)
    pad = _padding(3, 9)
    report = check_round_trip(model, lambda m: m(x.to(next(m.parameters()).dtype), src_key_padding_mask=pad),
                              ("scaled_dot_product_attention", "layer_norm", "bias_act"))
    assert any("nested-tensor" in note for *_, note in report.notes)


def test_round_trip_transformer_decoder():
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(32, 4, dim_feedforward=48, batch_first=False, activation="gelu")
    model = nn.TransformerDecoder(layer, 2, norm=nn.LayerNorm(32)).to(DEVICE).eval()
    tgt, memory = torch.randn(7, 2, 32, device=DEVICE), torch.randn(5, 2, 32, device=DEVICE)
    causal = nn.Transformer.generate_square_subsequent_mask(7, device=DEVICE)

    def run(m):
        dt = next(m.parameters()).dtype
        return m(tgt.to(dt), memory.to(dt), tgt_mask=causal.to(dt), tgt_is_causal=True)

    check_round_trip(model, run, ("scaled_dot_product_attention", "layer_norm", "bias_act"))


def test_readme_swap_example_runs_fastnets_kernels():
    """The README's swap example, as written, runs fastnets' kernels (not torch's fused layer)."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "fastnets.swap(model)" in b)
    with expect_backend("scaled_dot_product_attention"), expect_backend("layer_norm"):
        exec(compile(block, "README.md", "exec"), {})


# --- Hugging Face transformers --------------------------------------------------------------------

transformers = pytest.importorskip("transformers", minversion="4.48")


def _hf(cfg, auto):
    torch.manual_seed(0)
    return auto.from_config(cfg, attn_implementation="eager").to(DEVICE).eval()


def _hf_run(ids, mask=None):
    def run(m):
        return m(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return run


def test_round_trip_hf_gpt2():
    cfg = transformers.GPT2Config(vocab_size=101, n_positions=32, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0)
    model = _hf(cfg, transformers.AutoModelForCausalLM)
    ids = torch.randint(0, 101, (2, 9), device=DEVICE)
    report = check_round_trip(model, _hf_run(ids), ("flash_attention", "layer_norm", "bias_act"))
    rules = {rule for *_, rule in report.replaced}
    assert {"transformers.attention", "transformers.gpt2_mlp", "transformers.loss"} <= rules
    assert model.config._attn_implementation == "eager"


def test_round_trip_hf_llama():
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = _hf(cfg, transformers.AutoModelForCausalLM)
    ids = torch.randint(0, 97, (2, 8), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    # Right padding: every query sees a key (a left-padded row's padded queries see none, and
    # the float64 eager reference turns those rows into NaN); the real positions are compared.
    keep = mask.bool()

    def run(m):
        return m(input_ids=ids, attention_mask=mask, use_cache=False).logits[keep]

    report = check_round_trip(model, run, ("flash_attention", "rms_norm", "bias_act"))
    assert {"transformers.rms_norm", "transformers.gated_mlp"} <= {rule for *_, rule in report.replaced}


def test_round_trip_hf_bert():
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=24, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    model = _hf(cfg, transformers.AutoModelForMaskedLM)
    ids = torch.randint(1, 120, (2, 10), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    report = check_round_trip(model, lambda m: m(input_ids=ids, attention_mask=mask).logits,
                              ("flash_attention", "layer_norm", "bias_act"))
    assert "transformers.bert_intermediate" in {rule for *_, rule in report.replaced}


def test_hf_swap_puts_the_loss_on_fastnets_and_unswap_takes_it_off():
    cfg = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    model = _hf(cfg, transformers.AutoModelForCausalLM)
    ids = torch.randint(0, 50, (2, 6), device=DEVICE)
    want = model(input_ids=ids, labels=ids).loss
    fastnets.swap(model)
    with expect_backend("cross_entropy"):
        got = model(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    fastnets.unswap(model)
    assert "_loss_function" not in model.__dict__
    calls = fastnets._dispatch.calls[("cross_entropy", "interpret" if DEVICE.type == "cpu" else "triton")]
    model(input_ids=ids, labels=ids)
    assert fastnets._dispatch.calls[("cross_entropy", "interpret" if DEVICE.type == "cpu" else "triton")] == calls


def test_swap_twice_is_a_no_op_and_include_by_rule_name():
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=24, batch_first=True)
    model = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
    first = fastnets.swap(model)
    assert first.replaced and not fastnets.swap(model).replaced
    fastnets.unswap(model)
    report = fastnets.swap(model, include=["torch.nn.modules.normalization.LayerNorm"])
    assert {rule for *_, rule in report.replaced} == {"torch.nn.modules.normalization.LayerNorm"}
    fastnets.unswap(model)
    assert type(model.layers[0].norm1) is nn.LayerNorm


def test_swapped_hf_model_pickles_and_unswaps_after_loading(tmp_path):
    """torch.save(model) of a swapped transformers model works (the patched classes are
    module-level), and the loaded copy still unswaps."""
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
    model = _hf(cfg, transformers.AutoModelForCausalLM)
    fastnets.swap(model)
    path = tmp_path / "swapped.pt"
    torch.save(model, path)
    loaded = torch.load(path, weights_only=False)
    assert type(loaded.model.norm).__name__.startswith("FastnetsLlamaRMSNorm")
    fastnets.unswap(loaded)
    assert type(loaded.model.norm).__name__ == "LlamaRMSNorm"
    assert loaded.config._attn_implementation == "eager"


def test_round_trip_diffusers_unet():
    """swap() on diffusers' own UNet2DModel: GroupNorm, Conv2d, the fused ResnetBlock2D
    forward, the timestep embedding and the attention processor; unswap() restores classes
    and processors."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                  block_out_channels=(16, 32), norm_num_groups=8,
                                  down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                  up_block_types=("AttnUpBlock2D", "UpBlock2D")).to(DEVICE).eval()
    x = torch.randn(2, 3, 8, 8, device=DEVICE)
    t = torch.tensor([7, 640], device=DEVICE)

    def run(m):
        return m(x.to(next(m.parameters()).dtype), t).sample
    processors = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    report = check_round_trip(model, run, ("conv2d", "group_norm", "scaled_dot_product_attention",
                                           "timestep_embedding"))
    rules = {rule for *_, rule in report.replaced}
    assert {"diffusers.attention", "diffusers.resnet", "diffusers.timesteps"} <= rules
    assert all(model.get_submodule(n).processor is p for n, p in processors.items())


def test_round_trip_diffusers_autoencoder_kl():
    """swap() on diffusers' own AutoencoderKL (the latent VAE): its ResnetBlock2Ds have no time
    embedding, which the fused resnet rule must take; unswap() restores everything."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), latent_channels=2,
                                    down_block_types=("DownEncoderBlock2D",) * 2,
                                    up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4,
                                    layers_per_block=1).to(DEVICE).eval()
    x = torch.randn(2, 3, 8, 8, device=DEVICE)

    def run(m):
        return m(x.to(next(m.parameters()).dtype)).sample
    report = check_round_trip(model, run, ("conv2d", "group_norm", "scaled_dot_product_attention"))
    assert "diffusers.resnet" in {rule for *_, rule in report.replaced}
