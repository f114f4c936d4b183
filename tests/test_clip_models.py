"""fastnets.models.CLIPModel against transformers' CLIPModel with the same weights (logits,
loss, every parameter's gradient), state dicts both ways, the feature APIs, the SigLIP
variant, patch_embed, the zero-shot head, and swap() of HF's own CLIP."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import fastnets
from fastnets import ops
from fastnets.models import CLIPConfig, CLIPModel, zero_shot_logits
from helpers import DEVICE, assert_close, expect_backend
from tolerances import MODEL_FLOAT64, MODEL_TRAIN_FLOAT32

transformers = pytest.importorskip("transformers")

EOS = 98


def _hf_config(act="quick_gelu"):
    return transformers.CLIPConfig(
        text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=12, eos_token_id=EOS, bos_token_id=97,
                         pad_token_id=0, projection_dim=16, hidden_act=act),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=16, patch_size=4, projection_dim=16, hidden_act=act),
        projection_dim=16)


def _batch(n=3, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 97, (n, 9), generator=g)
    mask = torch.ones_like(ids)
    for i in range(n):                      # different lengths: EOT, then padding
        end = 4 + i % 4
        ids[i, end], ids[i, end + 1:], mask[i, end + 1:] = EOS, 0, 0
    px = torch.randn(n, 3, 16, 16, generator=g)
    return ids.to(DEVICE), mask.to(DEVICE), px.to(DEVICE, dtype)


def _pair(act="quick_gelu", dtype=torch.float64):
    torch.manual_seed(0)
    hf = transformers.CLIPModel(_hf_config(act)).to(DEVICE, dtype)
    ours = CLIPModel(_hf_config(act)).to(DEVICE, dtype)
    ours.load_state_dict(hf.state_dict())
    return hf, ours


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_clip_matches_hf_forward_and_every_gradient(act):
    hf, ours = _pair(act)
    ids, mask, px = _batch(dtype=torch.float64)
    with expect_backend("clip_loss"), expect_backend("flash_attention"), expect_backend("bias_act"), \
            expect_backend("conv2d"), expect_backend("layer_norm"):
        a = ours(input_ids=ids, pixel_values=px, attention_mask=mask, return_loss=True)
    b = hf(input_ids=ids, pixel_values=px, attention_mask=mask, return_loss=True)
    for name in ("logits_per_image", "logits_per_text", "image_embeds", "text_embeds"):
        assert_close(getattr(a, name), getattr(b, name), torch.float64, name, tol=MODEL_FLOAT64)
    assert_close(a.text_model_output.pooler_output, b.text_model_output.pooler_output, torch.float64, "text pooled",
                 tol=MODEL_FLOAT64)
    assert_close(a.loss, b.loss, torch.float64, "loss", tol=MODEL_FLOAT64)
    a.loss.backward()
    b.loss.backward()
    theirs = dict(hf.named_parameters())
    # Gradients that are zero in exact arithmetic (the key bias: softmax ignores a constant
    # per row) carry the rounding of their terms: absolute errors are judged against the
    # model's largest gradient.
    scale = max(p.grad.abs().max().item() for p in hf.parameters())
    for name, p in ours.named_parameters():
        assert p.grad is not None, name
        assert_close(p.grad, theirs[name].grad, torch.float64, f"grad {name}", min_scale=scale, tol=MODEL_FLOAT64)


def test_clip_state_dict_both_ways_and_feature_apis():
    hf, ours = _pair(dtype=torch.float32)
    assert set(ours.state_dict()) == set(hf.state_dict())
    ours2 = CLIPModel(_hf_config())
    ours2.load_state_dict(ours.state_dict())
    hf2 = transformers.CLIPModel(_hf_config()).to(DEVICE)
    hf2.load_state_dict(ours.state_dict())
    ids, mask, px = _batch()
    v5 = int(transformers.__version__.split(".")[0]) >= 5
    for got, want in ((ours.get_text_features(ids, mask), hf2.get_text_features(input_ids=ids, attention_mask=mask)),
                      (ours.get_image_features(px), hf2.get_image_features(pixel_values=px))):
        assert type(got) is type(want)
        got_t, want_t = (got.pooler_output, want.pooler_output) if v5 else (got, want)
        assert_close(got_t, want_t.double(), torch.float32, "features", tol=MODEL_TRAIN_FLOAT32)
    assert_close(ours.encode_image(px, normalize=True), F.normalize(ours.get_image_features(px).pooler_output
                                                                    if v5 else ours.get_image_features(px), dim=-1).double(),
                 torch.float32, "encode_image")
    # A config from the fastnets dataclass, no transformers involved: the same shapes.
    c = CLIPConfig.from_name("tiny")
    m = CLIPModel(c)
    assert m.logit_scale.item() == pytest.approx(2.6592) and m.logit_bias is None


def test_clip_training_step_without_logits_uses_the_tiled_loss():
    hf, ours = _pair(dtype=torch.float32)
    ids, mask, px = _batch(n=5)
    out = ours(input_ids=ids, pixel_values=px, attention_mask=mask, return_loss=True, return_logits=False)
    assert out.logits_per_image is None
    want = hf(input_ids=ids, pixel_values=px, attention_mask=mask, return_loss=True).loss
    assert abs(out.loss.item() - want.item()) < 1e-4


def test_siglip_variant_loss_and_bias():
    torch.manual_seed(0)
    m = CLIPModel(_hf_config(), loss="sigmoid").to(DEVICE, torch.float64)
    assert m.logit_bias is not None and m.logit_bias.item() == -10.0
    ids, mask, px = _batch(n=4, dtype=torch.float64)
    with expect_backend("clip_loss"):
        out = m(input_ids=ids, pixel_values=px, attention_mask=mask, return_loss=True)
    labels = 2 * torch.eye(4, dtype=torch.float64, device=DEVICE) - 1
    want = -F.logsigmoid(labels * out.logits_per_image).sum() / 4
    assert_close(out.loss, want, torch.float64, "siglip loss")
    out.loss.backward()
    assert m.logit_bias.grad is not None and m.logit_scale.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_patch_embed_matches_conv_cat_add(dtype):
    g = torch.Generator().manual_seed(1)
    px = torch.randn(2, 3, 12, 16, generator=g).to(DEVICE, dtype).requires_grad_()
    w = (torch.randn(8, 3, 4, 4, generator=g) * 0.2).to(DEVICE, dtype).requires_grad_()
    cls = torch.randn(8, generator=g).to(DEVICE, dtype).requires_grad_()
    pos = torch.randn(13, 8, generator=g).to(DEVICE, dtype).requires_grad_()
    with expect_backend("conv2d"):
        got = ops.patch_embed(px, w, cls, pos)
    args64 = [t.detach().double().requires_grad_() for t in (px, w, cls, pos)]
    tok = F.conv2d(args64[0], args64[1], stride=4).flatten(2).transpose(1, 2)
    want = torch.cat([args64[2].expand(2, 1, 8), tok], 1) + args64[3]
    assert_close(got, want, dtype, "patch_embed")
    gy = torch.randn(want.shape, generator=g).to(DEVICE)
    got_g = torch.autograd.grad(got, (px, w, cls, pos), gy.to(dtype))
    want_g = torch.autograd.grad(want, args64, gy.double())
    for name, a, b in zip(("pixels", "weight", "class", "position"), got_g, want_g):
        assert_close(a, b, dtype, f"patch_embed d {name}", tol=MODEL_TRAIN_FLOAT32
                     if dtype == torch.float32 else None)
    with pytest.raises(ValueError, match="smaller than the patch size"):
        ops.patch_embed(px[..., :3], w, cls, pos)
    with pytest.raises(ValueError, match="position_embedding must have shape"):
        ops.patch_embed(px, w, cls, pos[:5])


def _vit_embedding(px, w, cls, pos):
    """What a ViT's forward does: the strided conv, the class token, the position embedding."""
    tok = F.conv2d(px, w, stride=w.shape[-1]).flatten(2).transpose(1, 2)
    return torch.cat([cls.expand(px.shape[0], 1, -1), tok], 1) + pos


def test_patch_embed_non_multiple_size_and_autocast_like_torch():
    """Issue 24: an image that is not a multiple of the patch drops the remainder (torch's
    strided conv); under autocast the result has torch's dtype (a float32 position embedding
    promotes the bf16 conv output) and its values."""
    g = torch.Generator().manual_seed(2)
    px = torch.randn(2, 3, 13, 18, generator=g).to(DEVICE)      # 3 x 4 patches of 4, remainder dropped
    w = (torch.randn(8, 3, 4, 4, generator=g) * 0.2).to(DEVICE)
    cls, pos = torch.randn(8, generator=g).to(DEVICE), torch.randn(13, 8, generator=g).to(DEVICE)
    with expect_backend("conv2d"):
        got = ops.patch_embed(px, w, cls, pos)
    assert_close(got, _vit_embedding(*(t.double() for t in (px, w, cls, pos))), torch.float32, "non-multiple")
    for kw in (dict(class_embedding=cls, position_embedding=pos), dict(position_embedding=pos[1:]), {}):
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            with expect_backend("conv2d"):
                got = ops.patch_embed(px, w, **kw)
            tok = F.conv2d(px, w, stride=4).flatten(2).transpose(1, 2)
            if "class_embedding" in kw:
                tok = torch.cat([cls.expand(2, 1, -1), tok], 1)
            want = tok + kw["position_embedding"] if "position_embedding" in kw else tok
        assert got.dtype == want.dtype, (sorted(kw), got.dtype, want.dtype)
        assert_close(got, want.double(), torch.bfloat16, f"autocast {sorted(kw)}")


def test_zero_shot_logits_head():
    g = torch.Generator().manual_seed(2)
    feats, cls = torch.randn(5, 6, generator=g), F.normalize(torch.randn(6, 4, generator=g), dim=0)
    logits, top, idx = zero_shot_logits(feats, cls, 100.0, k=2)
    want = 100.0 * F.normalize(feats, dim=-1) @ cls
    assert torch.allclose(logits, want) and torch.equal(idx, want.topk(2, -1).indices)
    with pytest.raises(ValueError, match="agree on D"):
        zero_shot_logits(feats, cls[:5])
    with pytest.raises(ValueError, match="k must be"):
        zero_shot_logits(feats, cls, k=5)


def test_swap_runs_hf_clip_on_fastnets_kernels_and_unswap_restores():
    hf, _ = _pair(dtype=torch.float64)
    ids, mask, px = _batch(dtype=torch.float64)
    before = hf(input_ids=ids, pixel_values=px, attention_mask=mask, return_loss=True)
    report = fastnets.swap(hf)
    rules = {r[3] for r in report.replaced}
    assert {"transformers.clip_mlp", "transformers.clip_loss", "transformers.attention"} <= rules, rules
    with expect_backend("clip_loss"), expect_backend("flash_attention"), expect_backend("bias_act"):
        after = hf(input_ids=ids, pixel_values=px, attention_mask=mask, return_loss=True)
    assert_close(after.logits_per_image, before.logits_per_image, torch.float64, "swapped logits", tol=MODEL_FLOAT64)
    assert_close(after.loss, before.loss, torch.float64, "swapped loss", tol=MODEL_FLOAT64)
    fastnets.unswap(hf)
    assert type(hf) is transformers.CLIPModel
    again = hf(input_ids=ids, pixel_values=px, attention_mask=mask, return_loss=True)
    assert torch.equal(again.loss, before.loss)


def test_clip_config_errors():
    with pytest.raises(ValueError, match="loss must be"):
        CLIPConfig(loss="hinge")
    with pytest.raises(TypeError, match="config must be"):
        CLIPModel(42)
    m = CLIPModel(_hf_config())
    with pytest.raises(ValueError, match="doesn't match the model"):
        m.encode_image(torch.randn(1, 3, 20, 20))


def test_tokenizer_trains_round_trips_and_saves(tmp_path):
    from fastnets.datasets import shape_captions
    from fastnets.text import ByteBPETokenizer
    _, caps, _ = shape_captions(40, 16, seed=3)
    tok = ByteBPETokenizer.train(caps, vocab_size=320)
    assert tok.vocab_size <= 320 and tok.eot_token_id == tok.vocab_size - 1
    ids, mask = tok(caps[:5] + ["Ünïcode and a very long caption " * 4], context_length=16)
    assert ids.shape == (6, 16) and mask.dtype == torch.long
    for i in range(5):
        n = int(mask[i].sum())
        assert ids[i, 0] == tok.sot_token_id and ids[i, n - 1] == tok.eot_token_id
        assert (ids[i, n:] == tok.pad_token_id).all() and tok.decode(ids[i]) == caps[i]
        assert len(tok.encode(caps[i])) < len(caps[i].encode())          # merges were learned and used
    assert ids[5, -1] == tok.eot_token_id and mask[5].all()               # cut, keeping <eot>
    assert tok.decode(tok.encode("ünïcode")) == "ünïcode"                  # unseen bytes still round-trip
    tok.save(tmp_path / "tok.json")
    again = ByteBPETokenizer.load(tmp_path / "tok.json")
    assert torch.equal(again(caps, 16)[0], tok(caps, 16)[0])
    with pytest.raises(ValueError, match="vocab_size must be"):
        ByteBPETokenizer.train(caps, vocab_size=100)


def test_zero_shot_pipeline_end_to_end():
    from fastnets.datasets import CAPTION_SHAPES, caption, shape_captions
    from fastnets.text import ByteBPETokenizer
    images, caps, attrs = shape_captions(6, 32, seed=4)
    assert images.shape == (6, 3, 32, 32) and images.min() >= -1 and images.max() <= 1
    assert caps[0] == caption(list(fastnets.datasets.CAPTION_COLORS)[attrs["color"][0]],
                              CAPTION_SHAPES[attrs["shape"][0]],
                              fastnets.datasets.CAPTION_POSITIONS[attrs["position"][0]])
    tok = ByteBPETokenizer.train(caps * 3, vocab_size=280)
    c = CLIPConfig.from_name("tiny")
    c.text_config = dataclasses.replace(c.text_config, vocab_size=tok.vocab_size, eos_token_id=tok.eot_token_id,
                                        pad_token_id=tok.pad_token_id, bos_token_id=tok.sot_token_id)
    model = CLIPModel(c).to(DEVICE).eval()
    names = CAPTION_SHAPES[:3]
    templates = ["a red {} on the left", lambda s: f"a blue {s} in the center"]
    with expect_backend("flash_attention"):
        classifier = model.zero_shot_classifier(names, templates, lambda texts: tok(texts, 16))
        feats = model.encode_image(images.to(DEVICE), normalize=True)
    assert classifier.shape == (32, 3)
    assert torch.allclose(classifier.norm(dim=0), torch.ones(3), atol=1e-5)
    logits, top, idx = zero_shot_logits(feats, classifier, model.logit_scale.exp(), k=2, normalize=False)
    assert logits.shape == (6, 3) and idx.shape == (6, 2) and (idx < 3).all()
    assert torch.allclose(top[:, 0], logits.max(-1).values)


def test_cross_attention_matches_torch_with_unequal_lengths_and_padding():
    from fastnets.models.fusion import CrossAttention
    torch.manual_seed(3)
    att = CrossAttention(32, 48, 4).to(DEVICE, torch.float64)
    x, ctx = torch.randn(2, 5, 32, dtype=torch.float64, device=DEVICE), torch.randn(2, 9, 48, dtype=torch.float64,
                                                                                     device=DEVICE)
    keep = torch.ones(2, 9, dtype=torch.bool, device=DEVICE)
    keep[1, 6:] = False
    with expect_backend("flash_attention"):
        got = att(x, ctx, keep)
    q = att.q_proj(x).view(2, 5, 4, 8).transpose(1, 2)
    k = att.k_proj(ctx).view(2, 9, 4, 8).transpose(1, 2)
    v = att.v_proj(ctx).view(2, 9, 4, 8).transpose(1, 2)
    want = att.out_proj(F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
                        .transpose(1, 2).reshape(2, 5, 32))
    assert_close(got, want, torch.float64, "cross attention", tol=MODEL_FLOAT64)


def test_fusion_model_from_clip_learns_a_fixed_batch():
    from fastnets.datasets import shape_captions
    from fastnets.models import ImageTextFusionModel
    from fastnets.models.fusion import matching_batch
    from fastnets.text import ByteBPETokenizer
    images, caps, _ = shape_captions(6, 16, seed=5)
    tok = ByteBPETokenizer.train(caps * 4, vocab_size=320)
    c = CLIPConfig.from_name("tiny")
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    c.text_config = dataclasses.replace(c.text_config, vocab_size=tok.vocab_size, eos_token_id=tok.eot_token_id,
                                        pad_token_id=tok.pad_token_id, bos_token_id=tok.sot_token_id, **small)
    c.vision_config = dataclasses.replace(c.vision_config, image_size=16, patch_size=8, **small)
    torch.manual_seed(0)
    clip = CLIPModel(c).to(DEVICE)
    model = ImageTextFusionModel.from_clip(clip, num_labels=2, num_fusion_layers=1, num_attention_heads=2, dropout=0.0)
    assert torch.equal(model.vision_model.embeddings.class_embedding, clip.vision_model.embeddings.class_embedding)
    ids, mask = tok(caps, 16)
    ids, mask, labels = matching_batch(ids.to(DEVICE), mask.to(DEVICE), torch.Generator().manual_seed(1))
    px = images.to(DEVICE)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(2):
        with expect_backend("flash_attention"), expect_backend("cross_entropy"):
            logits, loss = model(ids, px, mask, labels)
        assert logits.shape == (6, 2)
        opt.zero_grad()
        loss.backward()
        assert model.vision_model.embeddings.patch_embedding.weight.grad.abs().sum() > 0
        assert model.text_model.embeddings.token_embedding.weight.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


def _siglip_pair():
    cfg = transformers.SiglipConfig(
        text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=12, projection_size=32),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=16, patch_size=4))
    torch.manual_seed(0)
    hf = transformers.SiglipModel(cfg).to(DEVICE, torch.float64)
    from fastnets.models import SiglipModel
    ours = SiglipModel(cfg).to(DEVICE, torch.float64)
    ours.load_state_dict(hf.state_dict())
    return hf, ours


def test_siglip_matches_hf_forward_and_every_gradient():
    hf, ours = _siglip_pair()
    assert set(ours.state_dict()) == set(hf.state_dict())
    ids, mask, px = _batch(dtype=torch.float64)
    with expect_backend("clip_loss"), expect_backend("scaled_dot_product_attention"), expect_backend("conv2d"):
        a = ours(input_ids=ids, pixel_values=px, attention_mask=mask, return_loss=True)
    b = hf(input_ids=ids, pixel_values=px, attention_mask=mask, return_loss=True)
    for name in ("logits_per_image", "image_embeds", "text_embeds", "loss"):
        assert_close(getattr(a, name), getattr(b, name), torch.float64, name, tol=MODEL_FLOAT64)
    a.loss.backward()
    b.loss.backward()
    theirs = dict(hf.named_parameters())
    scale = max(p.grad.abs().max().item() for p in hf.parameters())
    for name, p in ours.named_parameters():
        assert p.grad is not None, name
        assert_close(p.grad, theirs[name].grad, torch.float64, f"grad {name}", min_scale=scale, tol=MODEL_FLOAT64)
    v5 = int(transformers.__version__.split(".")[0]) >= 5
    got, want = ours.get_image_features(px), hf.get_image_features(pixel_values=px)
    assert type(got) is type(want)
    assert_close(got.pooler_output if v5 else got, want.pooler_output if v5 else want, torch.float64,
                 "siglip image features", tol=MODEL_FLOAT64)


def test_swap_runs_hf_siglip_loss_on_the_tiled_kernel():
    hf, _ = _siglip_pair()
    ids, mask, px = _batch(dtype=torch.float64)
    before = hf(input_ids=ids, pixel_values=px, attention_mask=mask, return_loss=True)
    report = fastnets.swap(hf)
    assert {"transformers.clip_mlp", "transformers.clip_loss"} <= {r[3] for r in report.replaced}
    with expect_backend("clip_loss"):
        after = hf(input_ids=ids, pixel_values=px, attention_mask=mask, return_loss=True)
    assert_close(after.loss, before.loss, torch.float64, "swapped siglip loss", tol=MODEL_FLOAT64)
    fastnets.unswap(hf)
    assert type(hf) is transformers.SiglipModel


def test_zero_shot_logits_under_autocast_like_torch():
    """Issue 24: under autocast torch's matmul gives the autocast dtype; so does the fused head."""
    g = torch.Generator().manual_seed(5)
    x, c = torch.randn(3, 8, generator=g).to(DEVICE), torch.randn(8, 5, generator=g).to(DEVICE)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        with expect_backend("zero_shot_logits"):
            logits, _, _ = ops.zero_shot_logits(x, c, 10.0)
        want = 10.0 * F.normalize(x) @ c
    assert logits.dtype == want.dtype == torch.bfloat16
    assert_close(logits, (10.0 * F.normalize(x.double()) @ c.double()), torch.bfloat16, "autocast zero-shot")
