"""The one transfer-learning API (fastnets.models.transfer) across models: checkpoint layouts
(Hugging Face with a prefix fixed, open_clip's CLIP with packed q/k/v), freezing by pattern
(frozen parameters bit-identical after an optimizer step), discriminative learning rates,
feature extraction, and the BERT and CLIP linear-probe recipes."""
import pytest
import torch
import torch.nn.functional as F

from fastnets.models import BertConfig, BertForSequenceClassification, CLIPConfig, CLIPModel, transfer
from helpers import DEVICE


def _tiny_bert():
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig.from_name("bert-tiny", num_labels=3, vocab_size=50,
                                                              hidden_dropout_prob=0.0,
                                                              attention_probs_dropout_prob=0.0)).to(DEVICE)


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_bert_recipe_hf_prefix_freeze_by_pattern_and_layerwise_lr(tmp_path):
    src = _tiny_bert()
    path = tmp_path / "bert_base.pt"
    torch.save(src.bert.state_dict(), path)               # a BertModel checkpoint: no "bert." prefix
    model = _tiny_bert()
    for p in model.parameters():
        torch.nn.init.zeros_(p)
    result = transfer.load_checkpoint(model, path, layout="hf", strict=False)
    assert set(result.missing_keys) == {"classifier.weight", "classifier.bias"} and not result.unexpected_keys
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, src.bert.embeddings.word_embeddings.weight)
    transfer.replace_head(model, 3)
    transfer.freeze(model, trainable=["bert.encoder.layer.1*", "bert.pooler", "classifier"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("bert.encoder.layer.1.", "bert.pooler.", "classifier.")) for n in trainable)
    groups = transfer.param_groups(model, lr=1e-3, decay=0.5, weight_decay=0.01)
    rates = {round(g["lr"], 8) for g in groups}
    assert rates == {1e-3, 5e-4}                          # layer 1 one step below the head
    before = _snapshot(model)
    opt = torch.optim.AdamW(groups)
    ids = torch.randint(0, 50, (4, 7), device=DEVICE)
    logits, loss = model(ids, labels=torch.tensor([0, 1, 2, 1], device=DEVICE))
    loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        if n in trainable:
            assert not torch.equal(p, before[n]), f"{n} did not train"
        else:
            assert torch.equal(p, before[n]), f"frozen {n} changed"
    feats = transfer.feature_extractor(model)(ids)
    assert feats.shape == (4, model.config.hidden_size)


def test_param_groups_per_pattern_and_errors():
    model = _tiny_bert()
    groups = transfer.param_groups(model, lr=1e-3, lrs={"bert.embeddings": 1e-5, "*.bias": 2e-3})
    by_rate = {g["lr"]: len(g["params"]) for g in groups}
    assert set(by_rate) == {1e-5, 2e-3, 1e-3}
    with pytest.raises(ValueError, match="matching no parameter"):
        transfer.param_groups(model, lr=1e-3, lrs={"nothing.*": 1.0})
    with pytest.raises(ValueError, match="decay must be"):
        transfer.param_groups(model, lr=1e-3, decay=0.0)
    with pytest.raises(ValueError, match="layout must be"):
        transfer.load_checkpoint(model, {}, layout="keras")


def _tiny_clip():
    torch.manual_seed(0)
    return CLIPModel(CLIPConfig.from_name("tiny")).to(DEVICE)


def test_open_clip_layout_round_trip_and_packed_attention():
    model = _tiny_clip()
    oc = transfer.to_open_clip_state_dict(model.state_dict())
    E, D = 64, 32
    assert oc["visual.proj"].shape == (E, D) and oc["text_projection"].shape == (E, D)
    assert oc["visual.transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * E, E)
    assert oc["transformer.resblocks.1.mlp.c_fc.weight"].shape == (128, E)
    assert oc["visual.conv1.weight"].shape == (E, 3, 8, 8) and oc["positional_embedding"].shape == (16, E)
    fresh = CLIPModel(CLIPConfig.from_name("tiny")).to(DEVICE)
    transfer.load_checkpoint(fresh, oc, layout="open_clip")
    for n, p in model.state_dict().items():
        assert torch.equal(p, fresh.state_dict()[n]), n
    # open_clip's blocks run torch's nn.MultiheadAttention on the packed in_proj: same output.
    mha = torch.nn.MultiheadAttention(E, 2, batch_first=True).to(DEVICE)
    with torch.no_grad():
        mha.in_proj_weight.copy_(oc["visual.transformer.resblocks.0.attn.in_proj_weight"])
        mha.in_proj_bias.copy_(oc["visual.transformer.resblocks.0.attn.in_proj_bias"])
        mha.out_proj.weight.copy_(oc["visual.transformer.resblocks.0.attn.out_proj.weight"])
        mha.out_proj.bias.copy_(oc["visual.transformer.resblocks.0.attn.out_proj.bias"])
    x = torch.randn(2, 5, E, device=DEVICE)
    want = mha(x, x, x, need_weights=False)[0]
    got = fresh.vision_model.encoder.layers[0].self_attn(x)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    x = torch.randn(3, E, device=DEVICE)
    assert torch.allclose(fresh.visual_projection(x), x @ oc["visual.proj"], atol=1e-6)
    with pytest.raises(KeyError, match="unexpected key"):
        transfer.from_open_clip_state_dict({"visual.trunk.stem.weight": torch.zeros(1)})


def test_clip_linear_probe_trains_only_the_head():
    clip = _tiny_clip()
    before = _snapshot(clip)
    probe = transfer.linear_probe(clip, num_classes=4)
    assert [n for n, p in probe.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]
    opt = torch.optim.AdamW([p for p in probe.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    probe.train()
    assert not clip.training
    x, y = torch.randn(6, 3, 32, 32, device=DEVICE), torch.tensor([0, 1, 2, 3, 0, 1], device=DEVICE)
    w0 = probe.head.weight.detach().clone()
    F.cross_entropy(probe(x), y).backward()
    opt.step()
    assert not torch.equal(probe.head.weight, w0)
    for n, p in clip.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None, n
    feats = transfer.feature_extractor(clip)(x)
    assert feats.shape == (6, 32) and torch.allclose(feats.norm(dim=-1), torch.ones(6, device=DEVICE), atol=1e-5)
