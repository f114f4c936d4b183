"""swap() on models other libraries wrote (transformers, diffusers, torchvision, timm), built
from tiny random configs: after one swap() call every model matches its unswapped self
(outputs and every gradient, eval and train mode, float32), the share of its convolution,
attention, norm, pooling, recurrent, activation and loss work that runs on fastnets kernels
is measured with a dispatch mode (tests/work_counter.py) and held to a floor, and the swap
report names every module of those categories left on torch. Plus the two reproductions of
issue 23: T5's decoder stays causal, and backward through a swapped ResNet in eval mode."""
from __future__ import annotations

import collections
import contextlib
import copy
import importlib

import pytest
import torch
from torch import nn

import fastnets
from helpers import DEVICE, KERNEL_BACKEND, assert_close, expect_backend
from tolerances import MODEL_TRAIN_FLOAT32
from work_counter import WorkCounter


def _require(name: str):
    """The CPU test environment has all four (scripts/env.sh; torchvision and timm from their
    own folder, tests/conftest.py): there a missing one fails. A lent GPU machine runs its
    image's preinstalled packages only (benchmarks/gpu.sh, no network), which may lack them:
    there this file is skipped, saying which."""
    try:
        return importlib.import_module(name)
    except ImportError:
        if torch.cuda.is_available():
            pytest.skip(f"{name} is not installed on this GPU machine's image", allow_module_level=True)
        raise


diffusers = _require("diffusers")
timm = _require("timm")
torchvision = _require("torchvision")
transformers = _require("transformers")


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
        fallbacks = collections.Counter(fastnets._dispatch.fallbacks)
        with contextlib.ExitStack() as stack:
            for op in kernels:
                stack.enter_context(expect_backend(op))
            loss, grads = _run(fast, make_inputs, loss_of, train, counter)
        fell_back = collections.Counter(fastnets._dispatch.fallbacks) - fallbacks
        assert not fell_back, f"{mode}: fastnets modules ran torch in place of a kernel: {dict(fell_back)}"
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
    x = torch.randn(2, 3, 8, 8, device=DEVICE)
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


# --- coverage: one swap() call, every model ---------------------------------------------------------
# Tiny random configs (depthwise convolutions are slow under the interpreter: few channels, small
# images). Each entry: (builder -> model, inputs(dtype) -> kwargs, loss(output), swap kwargs,
# class names the report must list as left on torch).

def _ids(vocab, shape=(2, 9)):
    return torch.randint(1, vocab, shape)


def _image(dtype, size=16, batch=2):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(3)).to(DEVICE, dtype)


def _hf_t5():
    i, labels = _ids(96), _ids(96, (2, 5))
    return _t5(), lambda dt: dict(input_ids=i.to(DEVICE), labels=labels.to(DEVICE)), lambda o: o.loss


def _hf_vit():
    cfg = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=1,
                                 num_attention_heads=4, intermediate_size=64, num_labels=5, hidden_dropout_prob=0.0,
                                 attention_probs_dropout_prob=0.0)
    y = torch.tensor([1, 3], device=DEVICE)
    return (transformers.ViTForImageClassification(cfg), lambda dt: dict(pixel_values=_image(dt), labels=y),
            lambda o: o.loss)


def _hf_gpt2():
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=4, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0)
    i = _ids(64).to(DEVICE)
    return transformers.GPT2LMHeadModel(cfg), lambda dt: dict(input_ids=i, labels=i), lambda o: o.loss


def _hf_llama():
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    i = _ids(64).to(DEVICE)
    return transformers.LlamaForCausalLM(cfg), lambda dt: dict(input_ids=i, labels=i), lambda o: o.loss


def _hf_mistral():
    cfg = transformers.MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                     sliding_window=4)
    i = _ids(64).to(DEVICE)
    return transformers.MistralForCausalLM(cfg), lambda dt: dict(input_ids=i, labels=i), lambda o: o.loss


def _hf_qwen2():
    cfg = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    i = _ids(64).to(DEVICE)
    return transformers.Qwen2ForCausalLM(cfg), lambda dt: dict(input_ids=i, labels=i), lambda o: o.loss


def _hf_gemma():
    cfg = transformers.GemmaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=1, head_dim=8,
                                   max_position_embeddings=32)
    i = _ids(64).to(DEVICE)
    return transformers.GemmaForCausalLM(cfg), lambda dt: dict(input_ids=i, labels=i), lambda o: o.loss


def _hf_roberta():
    cfg = transformers.RobertaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=48, max_position_embeddings=40, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0, pad_token_id=1)
    i = _ids(64).to(DEVICE)
    labels = torch.where(torch.arange(9, device=DEVICE) % 3 == 0, i, -100)
    return transformers.RobertaForMaskedLM(cfg), lambda dt: dict(input_ids=i, labels=labels), lambda o: o.loss


def _hf_siglip():
    cfg = transformers.SiglipConfig(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=16),
        vision_config=dict(image_size=16, patch_size=8, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                           num_attention_heads=4))
    i = _ids(64, (2, 7)).to(DEVICE)
    return (transformers.SiglipModel(cfg), lambda dt: dict(input_ids=i, pixel_values=_image(dt), return_loss=True),
            lambda o: o.loss)


def _hf_wav2vec2():
    cfg = transformers.Wav2Vec2Config(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32, conv_dim=(8, 8), conv_stride=(4, 2), conv_kernel=(8, 4),
                                      num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2, hidden_dropout=0.0,
                                      attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
                                      final_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0, num_labels=3,
                                      classifier_proj_size=8)
    x, y = torch.randn(2, 160), torch.tensor([0, 2], device=DEVICE)
    return (transformers.Wav2Vec2ForSequenceClassification(cfg),
            lambda dt: dict(input_values=x.to(DEVICE, dt), labels=y), lambda o: o.loss)


def _hf_bert_classifier():
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, num_labels=3)
    i, y = _ids(64).to(DEVICE), torch.tensor([0, 2], device=DEVICE)
    return transformers.BertForSequenceClassification(cfg), lambda dt: dict(input_ids=i, labels=y), lambda o: o.loss


def _hf_whisper():
    cfg = transformers.WhisperConfig(vocab_size=64, num_mel_bins=8, encoder_layers=1, decoder_layers=1,
                                     encoder_attention_heads=2, decoder_attention_heads=2, d_model=16,
                                     encoder_ffn_dim=32, decoder_ffn_dim=32, max_source_positions=8,
                                     max_target_positions=16, dropout=0.0, decoder_start_token_id=1, pad_token_id=0)
    x, labels = torch.randn(2, 8, 16), _ids(64, (2, 5)).to(DEVICE)
    return (transformers.WhisperForConditionalGeneration(cfg),
            lambda dt: dict(input_features=x.to(DEVICE, dt), labels=labels), lambda o: o.loss)


def _hf_clip():
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=16),
        vision_config=dict(image_size=16, patch_size=8, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                           num_attention_heads=4), projection_dim=16)
    i = _ids(64, (2, 7)).to(DEVICE)
    return (transformers.CLIPModel(cfg), lambda dt: dict(input_ids=i, pixel_values=_image(dt), return_loss=True),
            lambda o: o.loss)


def _tv_vit():
    m = torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16,
                                             mlp_dim=32, num_classes=5)
    return m, lambda dt: dict(x=_image(dt)), lambda o: o.square().mean()


def _tv_densenet():
    m = torchvision.models.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=5)
    return m, lambda dt: dict(x=_image(dt)), lambda o: o.square().mean()


def _tv_convnext():
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt
    m = ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], num_classes=5)
    return m, lambda dt: dict(x=_image(dt)), lambda o: o.square().mean()


def _tv_resnet():
    # torchvision's ResNet has fixed widths (64..512): the smallest one, one block a stage. Its
    # last stage is 1 x 1 here: a training-mode BN over a batch of 2 normalises two values to
    # +-1 whatever they are, so the gradient under it is rounding noise (in torch as in
    # fastnets): 6 images keep every BN well conditioned.
    m = torchvision.models.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=5)
    return m, lambda dt: dict(x=_image(dt, 8, batch=6)), lambda o: o.square().mean()


def _tv_vgg_bn():
    # VGG's classifier takes 512 x 7 x 7 features: the last stage keeps 512 channels
    from torchvision.models.vgg import VGG, make_layers
    m = VGG(make_layers([8, "M", 16, "M", 512, "M"], batch_norm=True), num_classes=5, dropout=0.0)
    m.classifier[0], m.classifier[3] = nn.Linear(512 * 49, 32), nn.Linear(32, 32)   # 100M-parameter GEMMs
    m.classifier[6] = nn.Linear(32, 5)
    return m, lambda dt: dict(x=_image(dt)), lambda o: o.square().mean()


def _tv_efficientnet():
    from torchvision.models.efficientnet import EfficientNet, _efficientnet_conf
    setting, last = _efficientnet_conf("efficientnet_b0", width_mult=0.1, depth_mult=0.1)
    m = EfficientNet(setting, dropout=0.0, num_classes=5, last_channel=last, stochastic_depth_prob=0.0)
    return m, lambda dt: dict(x=_image(dt, 32, batch=4)), lambda o: o.square().mean()


def _timm_resnet():
    from timm.models.resnet import BasicBlock, ResNet
    m = ResNet(BasicBlock, [1, 1, 1, 1], channels=(8, 16, 16, 16), stem_width=8, num_classes=5)
    return m, lambda dt: dict(x=_image(dt)), lambda o: o.square().mean()


def _timm_efficientnet():
    from timm.models.efficientnet import _gen_efficientnet
    m = _gen_efficientnet("efficientnet_b0", channel_multiplier=0.1, depth_multiplier=0.1, pretrained=False,
                          num_classes=5)
    return m, lambda dt: dict(x=_image(dt, 32, batch=4)), lambda o: o.square().mean()


def _diffusers_unet():
    m = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                              layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                              up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=4)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 50], device=DEVICE)
    return m, lambda dt: dict(sample=x.to(DEVICE, dt), timestep=t), lambda o: o.sample.square().mean()


def _diffusers_vae():
    m = diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                latent_channels=4, norm_num_groups=4, sample_size=8)
    x = torch.randn(2, 3, 8, 8)
    return m, lambda dt: dict(sample=x.to(DEVICE, dt)), lambda o: o.sample.square().mean()


def _seq(dtype, features=8):
    return torch.randn(2, 5, features, generator=torch.Generator().manual_seed(4)).to(DEVICE, dtype)


def _torch_lstm():
    return nn.LSTM(8, 16, num_layers=2, batch_first=True), lambda dt: dict(input=_seq(dt)), \
        lambda o: o[0].square().mean()


def _torch_gru():
    return nn.GRU(8, 16, batch_first=True, bidirectional=True), lambda dt: dict(input=_seq(dt)), \
        lambda o: o[0].square().mean()


def _torch_transformer_encoder():
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2], device=DEVICE)
    return (nn.TransformerEncoder(layer, 2, enable_nested_tensor=False),
            lambda dt: dict(src=_seq(dt, 16), src_key_padding_mask=pad), lambda o: o.square().mean())


def _torch_mha():
    # torch's default need_weights=True: the output on the flash kernels, the weights beside it
    x = lambda dt: _seq(dt, 16)  # noqa: E731
    return (nn.MultiheadAttention(16, 2, batch_first=True), lambda dt: dict(query=x(dt), key=x(dt), value=x(dt)),
            lambda o: o[0].square().mean() + o[1].square().mean())


def _tv_mobilenet():
    m = torchvision.models.mobilenet_v3_small(weights=None, num_classes=5, width_mult=0.25)
    return m, lambda dt: dict(x=_image(dt)), lambda o: o.square().mean()


def _timm_vit():
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, num_classes=5,
                          embed_dim=32, depth=1, num_heads=2)
    return m, lambda dt: dict(x=_image(dt)), lambda o: o.square().mean()


def _timm_convnext():
    m = timm.create_model("convnext_atto", pretrained=False, num_classes=5, dims=(4, 8, 8, 8), depths=(1, 1, 1, 1))
    return m, lambda dt: dict(x=_image(dt, 32)), lambda o: o.square().mean()


def _diffusers_unet_conditional():
    m = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4)
    x, e = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16)
    t = torch.tensor([3, 50], device=DEVICE)
    return (m, lambda dt: dict(sample=x.to(DEVICE, dt), timestep=t, encoder_hidden_states=e.to(DEVICE, dt)),
            lambda o: o.sample.square().mean())


# (builder, swap keywords (and `kernels`: ops that must run), classes the report lists, floor on
# the fastnets share, modes).
# Models without BatchNorm compute the same in eval and train mode (dropout is 0): train only.
_NO_HARD = ("Hardsigmoid", "Hardswish")   # fastnets has no hardswish / hardsigmoid kernel
_BOTH, _TRAIN = ("eval", "train"), ("train",)
_ROPE = dict(kernels=("apply_rotary_emb",))   # apply_rotary_pos_emb ran on fastnets' rope kernel
MODELS = {
    "transformers-t5": (_hf_t5, dict(functional=True), (), 0.95, _TRAIN),   # CrossEntropyLoss built in forward
    "transformers-vit": (_hf_vit, {}, (), 0.95, _TRAIN),
    "transformers-gpt2": (_hf_gpt2, {}, (), 0.95, _TRAIN),
    "transformers-llama": (_hf_llama, _ROPE, (), 0.95, _TRAIN),
    "transformers-mistral-sliding-window": (_hf_mistral, _ROPE, (), 0.95, _TRAIN),
    "transformers-qwen2": (_hf_qwen2, _ROPE, (), 0.95, _TRAIN),
    "transformers-gemma": (_hf_gemma, _ROPE, (), 0.95, _TRAIN),
    "transformers-roberta-mlm": (_hf_roberta, dict(functional=True), (), 0.95, _TRAIN),   # inline gelu + loss
    "transformers-siglip": (_hf_siglip, {}, (), 0.95, _TRAIN),
    "transformers-wav2vec2": (_hf_wav2vec2, {}, (), 0.95, _TRAIN),
    "transformers-bert-classifier": (_hf_bert_classifier, {}, (), 0.95, _TRAIN),
    "transformers-whisper": (_hf_whisper, dict(functional=True), (), 0.95, _TRAIN),
    "transformers-clip": (_hf_clip, {}, (), 0.95, _TRAIN),
    "torchvision-vit": (_tv_vit, {}, (), 0.95, _TRAIN),
    "torchvision-densenet": (_tv_densenet, {}, (), 0.95, _BOTH),
    "torchvision-resnet": (_tv_resnet, {}, (), 0.95, _BOTH),
    "torchvision-vgg-bn": (_tv_vgg_bn, {}, (), 0.95, _BOTH),
    "timm-resnet": (_timm_resnet, {}, (), 0.95, _BOTH),
    "diffusers-unet": (_diffusers_unet, {}, (), 0.95, _TRAIN),
    "torch-lstm": (_torch_lstm, {}, (), 0.95, _TRAIN),
    "torch-gru": (_torch_gru, {}, (), 0.95, _TRAIN),
    "torch-transformer-encoder": (_torch_transformer_encoder, {}, (), 0.95, _TRAIN),
    # need_weights=True: the weights the caller asked for are torch's softmax of q k^T, beside the
    # flash output (the kernels never form that matrix): 20% of this tiny layer's bytes
    "torch-multihead-attention": (_torch_mha, {}, (), 0.75, _TRAIN),
    "diffusers-vae": (_diffusers_vae, {}, (), 0.95, _TRAIN),
    "timm-vit": (_timm_vit, dict(functional=True), (), 0.95, _TRAIN),   # timm's Attention calls F.sdpa inline
    "diffusers-unet-conditional": (_diffusers_unet_conditional, {}, (), 0.95, _TRAIN),
    "torchvision-convnext": (_tv_convnext, {}, (), 0.95, _TRAIN),   # LayerNorm2d: a norm found by behaviour
    "timm-convnext": (_timm_convnext, {}, (), 0.95, _TRAIN),
}
# The depthwise CNNs' convolutions and squeeze-excitation blocks take 6 to 10 minutes each
# under Triton's interpreter (MobileNetV3 570 s on one core; both EfficientNets 350-400 s at
# 8 x 8, passing in eval mode): they run where the kernels are compiled, on a GPU, at 32 x 32
# with 4 images so every training-mode BN normalises more than two values.
GPU_MODELS = {
    "torchvision-mobilenet-v3": (_tv_mobilenet, {}, _NO_HARD, 0.5, _BOTH),
    "torchvision-efficientnet": (_tv_efficientnet, {}, (), 0.95, _BOTH),
    "timm-efficientnet": (_timm_efficientnet, {}, (), 0.95, _BOTH),
}


def _check_entry(entry):
    build, swap_kwargs, uncovered, floor, modes = entry
    torch.manual_seed(0)
    model, inputs, loss_of = build()
    report, _ = check_swapped_model(model, inputs, loss_of, min_share=floor, uncovered=uncovered, modes=modes,
                                    **swap_kwargs)
    assert report.replaced


@pytest.mark.parametrize("name", list(MODELS))
def test_swapped_model_matches_and_runs_on_fastnets(name):
    _check_entry(MODELS[name])


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(GPU_MODELS))
def test_swapped_depthwise_model_matches_and_runs_on_fastnets(name):
    _check_entry(GPU_MODELS[name])


# --- the structural rules, one module each ------------------------------------------------------

def _check_module(module: nn.Module, x: torch.Tensor, rule: str, op: str):
    module = module.to(DEVICE)
    ref, plain = copy.deepcopy(module).double(), copy.deepcopy(module)
    report = fastnets.swap(module)
    assert rule in {r for *_, r in report.replaced}, str(report)
    for m in (module, ref, plain):
        xi = x.detach().to(DEVICE, next(m.parameters()).dtype).requires_grad_()
        if m is module:
            with expect_backend(op):
                y = m(xi)
        else:
            y = m(xi)
        y.square().sum().backward()
        m._out = (y, xi.grad, [p.grad for p in m.parameters()])
    for got, want, base in zip([module._out[0], module._out[1], *module._out[2]],
                               [ref._out[0], ref._out[1], *ref._out[2]],
                               [plain._out[0], plain._out[1], *plain._out[2]]):
        assert_close(got, want, torch.float32, rule, baseline=base, tol=MODEL_TRAIN_FLOAT32)
    fastnets.unswap(module)
    assert not any(type(m).__module__.startswith("fastnets.") for m in module.modules())


def test_weight_normed_conv1d_keeps_its_parametrization():
    conv = nn.utils.parametrizations.weight_norm(nn.Conv1d(4, 6, 3, padding=1))
    _check_module(nn.Sequential(conv), torch.randn(2, 4, 9), "torch.subclass", "conv2d")


def test_timm_batchnorm_act_runs_one_fused_pass():
    bn = timm.layers.BatchNormAct2d(6, act_layer=nn.SiLU)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    _check_module(nn.Sequential(bn.eval()), torch.randn(2, 6, 5, 5), "bn_act", "batch_norm")


@pytest.mark.parametrize("kind", ["t5", "layernorm2d"])
def test_norms_recognised_by_behaviour(kind):
    if kind == "t5":
        from transformers.models.t5.modeling_t5 import T5LayerNorm
        norm = T5LayerNorm(8, eps=1e-6)
        x, op = torch.randn(2, 5, 8), "rms_norm"
    else:
        norm = timm.layers.LayerNorm2d(8)
        x, op = torch.randn(2, 8, 3, 4), "layer_norm"
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    _check_module(nn.Sequential(norm), x, "norm.by_behaviour", op)


def _llama_attention():
    torch.manual_seed(0)
    model, _, _ = _hf_llama()
    return model


def test_rotary_rule_takes_the_hub_hook_and_unswap_removes_it():
    model = _llama_attention().to(DEVICE)
    attn = model.model.layers[0].self_attn
    wrapper = attn._kernel_funcs["rotary_pos_emb"]
    rotary = transformers.models.llama.modeling_llama.apply_rotary_pos_emb
    q, k = torch.randn(2, 4, 5, 8, device=DEVICE), torch.randn(2, 2, 5, 8, device=DEVICE)
    ids = torch.arange(5, device=DEVICE)[None].expand(2, 5)
    cos, sin = model.model.rotary_emb(q, ids)
    want = rotary(q, k, cos, sin)
    report = fastnets.swap(model, include=["transformers.rotary"])
    assert [r for *_, r in report.replaced] == ["transformers.rotary"] and "forward" in wrapper.__dict__
    with expect_backend("apply_rotary_emb"):
        got = wrapper(q, k, cos, sin)
        got_bshd = wrapper(q.transpose(1, 2), k.transpose(1, 2), cos, sin, unsqueeze_dim=2)
    for g, w in zip(got + tuple(t.transpose(1, 2) for t in got_bshd), want + want):
        assert_close(g, w, torch.float32, "rotary")
    # what the kernel does not take runs the model's own function: float64 tables would
    # promote a float32 q, so they go to torch (same result, no rope call)
    before = fastnets._dispatch.calls[("apply_rotary_emb", KERNEL_BACKEND)]
    promoted = wrapper(q, k, cos.double(), sin.double())
    assert promoted[0].dtype == torch.float64
    assert fastnets._dispatch.calls[("apply_rotary_emb", KERNEL_BACKEND)] == before
    fastnets.unswap(model)
    assert "forward" not in wrapper.__dict__
    # a model whose attention has no hook (kernels not installed): listed, not silent
    del attn.__dict__["_kernel_funcs"]
    report = fastnets.swap(model)
    miss = [u for u in report.uncovered if u[:3] == ("model.layers.0.self_attn", "LlamaAttention", "rotary")]
    assert miss and "use_kernelized_func" in miss[0][3], report


def test_rotary_probe_tells_the_forms_apart():
    from fastnets.integrations.transformers import _probe_rotary

    def neox(q, k, cos, sin, unsqueeze_dim=1):
        rot = lambda x: torch.cat((-x[..., x.shape[-1] // 2:], x[..., :x.shape[-1] // 2]), -1)
        c, s = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return q * c + rot(q) * s, k * c + rot(k) * s

    def gptj(q, k, cos, sin):
        rot = lambda x: torch.stack((-x[..., 1::2], x[..., 0::2]), -1).flatten(-2)
        c, s = cos[:, None], sin[:, None]
        return q * c + rot(q) * s, k * c + rot(k) * s

    def not_rotary(q, k, cos, sin):
        return q * cos[:, None], k

    def other_arguments(q, k, cos, sin, mrope_section):
        return q, k

    assert _probe_rotary(neox) | {"signature": None} == dict(interleaved=False, partial=False, unsqueeze_dim=True,
                                                               signature=None)
    assert _probe_rotary(gptj)["interleaved"] and not _probe_rotary(gptj)["unsqueeze_dim"]
    assert _probe_rotary(not_rotary) is None and _probe_rotary(other_arguments) is None


def test_strict_raises_and_names_what_stays_on_torch():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Hardswish())
    with pytest.raises(ValueError, match=r"1 \(Hardswish, activation\): fastnets has no hardswish kernel"):
        fastnets.swap(model, strict=True)
    assert type(model[0]) is nn.Conv2d   # undone
    report = fastnets.swap(model)
    assert [(n, c) for n, c, *_ in report.uncovered] == [("1", "Hardswish")] and "uncovered" in str(report)


def test_subclass_redefining_a_method_forward_calls_is_left_alone():
    class PaddedConv(nn.Conv2d):   # torch's forward calls _conv_forward; fastnets' would not
        def _conv_forward(self, input, weight, bias):
            return super()._conv_forward(nn.functional.pad(input, (1, 1, 1, 1)), weight, bias)

    model = nn.Sequential(PaddedConv(3, 4, 3))
    report = fastnets.swap(model)
    assert type(model[0]) is PaddedConv
    assert [(n, c) for n, c, *_ in report.uncovered] == [("0", "PaddedConv")]
    assert "redefining _conv_forward" in report.uncovered[0][3]


def test_functional_mode_routes_inline_calls_and_unswap_removes_it():
    class Inline(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 24)

        def forward(self, x, mask, target):
            q, k, v = self.proj(x).unflatten(-1, (3, 2, 4)).permute(2, 0, 3, 1, 4)
            y = nn.functional.scaled_dot_product_attention(q, k, v, mask)   # a positional bool mask
            y = nn.functional.gelu(y.transpose(1, 2).flatten(2))
            return nn.functional.cross_entropy(y.flatten(0, 1), target)

    model = Inline().to(DEVICE)
    x = torch.randn(2, 5, 8, device=DEVICE)
    mask = torch.rand(5, 5, device=DEVICE) > 0.3
    mask[:, 0] = True
    target = torch.randint(0, 8, (10,), device=DEVICE)
    want = model(x, mask, target)
    hooks = (dict(model._forward_pre_hooks), dict(model._forward_hooks))
    fastnets.swap(model, functional=True)
    with expect_backend("scaled_dot_product_attention"), expect_backend("bias_act"), \
            expect_backend("cross_entropy"):
        got = model(x, mask, target)
    assert_close(got, want.double(), torch.float32, "inline calls under FunctionalMode", baseline=want,
                 tol=MODEL_TRAIN_FLOAT32)
    got.backward()
    assert model.proj.weight.grad is not None
    fastnets.unswap(model)
    assert (dict(model._forward_pre_hooks), dict(model._forward_hooks)) == hooks
    assert "_fastnets_functional_mode" not in model.__dict__
    # an exception inside forward still leaves the mode (the hook is always called)
    fastnets.swap(model, functional=True)
    with pytest.raises(Exception):
        model(x, mask, target[:3])
    assert not torch.overrides._get_current_function_mode_stack()
    fastnets.unswap(model)


def test_functional_mode_falls_back_with_a_warning_for_what_fastnets_does_not_take():
    from fastnets.intercept import FunctionalMode
    x = torch.randn(4, 6, device=DEVICE)
    soft = torch.softmax(torch.randn(4, 6, device=DEVICE), -1)
    with FunctionalMode(), pytest.warns(UserWarning, match="probability targets"):
        got = nn.functional.cross_entropy(x, soft)
    assert torch.equal(got, nn.functional.cross_entropy(x, soft))
    with FunctionalMode(), pytest.warns(UserWarning, match="inplace=True"):
        y = x.clone()
        nn.functional.relu(y, inplace=True)
    assert torch.equal(y, x.relu())


@pytest.mark.parametrize("head", ["token", "regression"])
def test_transformers_classification_losses(head):
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, num_labels=3 if head == "token" else 1)
    i = _ids(64).to(DEVICE)
    if head == "token":   # GPT-NeoX's head goes through loss_function (BERT's builds CrossEntropyLoss inline)
        cfg = transformers.GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                         intermediate_size=48, max_position_embeddings=32, num_labels=3,
                                         hidden_dropout=0.0, attention_dropout=0.0, classifier_dropout=0.0)
        labels = torch.randint(0, 3, i.shape, device=DEVICE)
        labels[0, :2] = -100
        model = transformers.GPTNeoXForTokenClassification(cfg)
    else:
        labels = torch.randn(2, device=DEVICE)
        model = transformers.BertForSequenceClassification(cfg)
    # GPT-NeoX's attention is not decorated with use_kernelized_func: its rotary embedding has no
    # per-instance hook and the report says so.
    check_swapped_model(model, lambda dt: dict(input_ids=i, labels=labels), lambda o: o.loss, min_share=0.95,
                        modes=_TRAIN, kernels=("cross_entropy",) if head == "token" else (),
                        uncovered=("GPTNeoXAttention",) if head == "token" else ())


_COPIES = ("clone", "copy_", "_to_copy", "contiguous")


class _CopyCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes written by layout copies (clone / copy_ / _to_copy) during a forward."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.__name__.split(".")[0] in _COPIES:
            t = out if isinstance(out, torch.Tensor) else args[0]
            self.bytes += t.numel() * t.element_size()
        return out


def test_channels_last_layout_policy_converts_only_at_the_boundary():
    """swap(memory_format="channels_last") on an NCHW ResNet: the conv weights are re-laid once,
    the input is converted on the way in, every convolution then sees channels_last input and
    nothing else is copied inside the forward; unswap lays the weights out again."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=5).to(DEVICE).eval()
    ref = copy.deepcopy(model)
    params = dict(model.named_parameters())
    x = torch.randn(2, 3, 8, 8, device=DEVICE)
    fastnets.swap(model, memory_format="channels_last")
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in model.parameters() if p.dim() == 4)
    seen = []
    handles = [m.register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous(
        memory_format=torch.channels_last))) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(x)   # the first inference call folds each BN into its conv (kept until a weight changes)
        counter = _CopyCounter()
        with counter:
            y = model(x)
    for h in handles:
        h.remove()
    assert seen and all(seen), f"{seen.count(False)} of {len(seen)} convolutions saw NCHW input"
    assert counter.bytes <= 2 * x.numel() * x.element_size(), counter.bytes   # the input's conversion
    with torch.no_grad():
        base = ref(x)
        want = ref.double()(x.double())
    assert_close(y, want, torch.float32, "channels_last policy", baseline=base, tol=MODEL_TRAIN_FLOAT32)
    fastnets.unswap(model)
    assert all(model.get_parameter(n) is p for n, p in params.items())
    assert all(p.is_contiguous() for p in model.parameters())
    assert not model._forward_pre_hooks and not model._forward_hooks
    with pytest.raises(ValueError, match="memory_format"):
        fastnets.swap(model, memory_format="nhwc")


def test_eval_mode_fold_under_autograd_copies_no_weights():
    """With autograd recording the BN is folded into its conv every call: only per-channel
    vectors are converted (the fold used to round-trip every weight through float64)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=5).to(DEVICE).eval()
    fastnets.swap(model)
    x = torch.randn(2, 3, 8, 8, device=DEVICE)
    counter = _CopyCounter()
    with counter:
        model(x).sum().backward()
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if p.dim() == 4)
    assert counter.bytes < weights / 50, (counter.bytes, weights)


# --- torch.compile of swapped models -----------------------------------------------------------------

@pytest.mark.parametrize("name,swap_kwargs,ops_in_graph", [
    ("transformers-llama", {}, ("fastnets.rope", "fastnets.flash_attn_fwd", "fastnets.row_norm_fwd")),
    ("timm-vit", dict(functional=True), ("fastnets.flash_attn_fwd", "fastnets.row_norm_fwd")),
    ("torchvision-densenet", dict(memory_format="channels_last"), ("fastnets.conv2d_fwd", "fastnets.batch_norm_fwd")),
])
def test_swapped_model_compiles_without_graph_breaks(name, swap_kwargs, ops_in_graph):
    """What swap() installs besides class changes (the rotary hub hook, FunctionalMode around
    the forward, the channels_last boundary hooks) traces under torch.compile with no graph
    break, the fastnets custom ops in the graph, and the same loss and gradients as eager."""
    from test_compile import _recording_backend
    torch.manual_seed(0)
    build = MODELS[name][0]
    model, make_inputs, loss_of = build()
    model = model.to(DEVICE).train()
    fastnets.swap(model, **swap_kwargs)
    torch.manual_seed(1)
    want, want_grads = _run(model, make_inputs, loss_of, True)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    seen: list = []
    compiled = torch.compile(model, backend=_recording_backend(seen))
    torch.manual_seed(1)
    got, grads = _run(compiled, make_inputs, loss_of, True)
    grads = {n.removeprefix("_orig_mod."): g for n, g in grads.items()}
    assert grads.keys() == want_grads.keys()
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    missing = [op for op in ops_in_graph if not any(t.startswith(op) for t in seen)]
    assert not missing, f"not in the compiled graph: {missing}"
    assert_close(got, want.double(), torch.float32, "compiled loss")
    for n, g in want_grads.items():
        assert_close(grads[n], g.double(), torch.float32, f"compiled grad {n}")
