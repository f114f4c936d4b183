"""GPT, BERT and T5 against Hugging Face transformers' eager PyTorch implementations loaded
with the same weights (random small configs, nothing downloaded): logits, losses, gradients,
generation with and without the KV cache."""
import pytest
import torch

import fastnets
from fastnets import models
from fastnets.models.gpt import from_hf_gpt2_state_dict, to_hf_gpt2_state_dict
from helpers import DEVICE, assert_close, expect_backend

transformers = pytest.importorskip("transformers")


def _close(a, b, what, tol=2e-4):
    err = (a.float() - b.float()).abs().max().item()
    scale = b.float().abs().max().item()
    assert err <= tol * max(1.0, scale), f"{what}: max abs err {err:.3g} (scale {scale:.3g})"


def _eager(model):
    """transformers' eager attention is the reference (not its SDPA path)."""
    model.set_attn_implementation("eager")
    return model


def _all_grads(ours, theirs, what, transpose=(), aliases=None):
    """Every parameter gradient of `ours` against the same-named one of `theirs` (aliases: one
    of ours against the sum over theirs' distinct parameters of those names, e.g. an embedding
    that transformers keeps as separate copies)."""
    named = dict(theirs.named_parameters(remove_duplicate=False))
    checked = 0
    for name, p in ours.named_parameters():
        copies = {id(named[n]): named[n] for n in (aliases or {}).get(name, [name]) if n in named}
        grads = [c.grad for c in copies.values() if c.grad is not None]
        ref = torch.stack(grads).sum(0) if grads else None
        ref = ref.t() if ref is not None and name.endswith(transpose) else ref
        _close(p.grad if p.grad is not None else torch.zeros_like(p), ref if ref is not None else torch.zeros_like(p),
               f"{what} grad {name}")
        checked += 1
    assert checked == len(list(ours.parameters()))


def _gpt_pair():
    torch.manual_seed(0)
    cfg = models.GPTConfig(vocab_size=97, block_size=64, n_layer=2, n_head=4, n_embd=64)
    ours = models.GPT(cfg).to(DEVICE)
    hf_cfg = transformers.GPT2Config(vocab_size=97, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     activation_function="gelu_new", layer_norm_epsilon=1e-5)
    hf = _eager(transformers.GPT2LMHeadModel(hf_cfg).to(DEVICE))
    missing, unexpected = hf.load_state_dict(to_hf_gpt2_state_dict(ours.state_dict()), strict=False)
    assert not unexpected and all(k.endswith((".attn.bias", ".attn.masked_bias")) for k in missing), (missing,
                                                                                                        unexpected)
    return ours, hf


def test_gpt_matches_hf_gpt2_logits_loss_and_grads():
    ours, hf = _gpt_pair()
    idx = torch.randint(0, 97, (2, 19), device=DEVICE)
    targets = torch.randint(0, 97, (2, 19), device=DEVICE)
    with expect_backend("flash_attention"):
        logits, _ = ours(idx)
    ref = hf(idx).logits
    _close(logits, ref, "logits")
    _, loss = ours(idx, targets)
    ref_loss = torch.nn.functional.cross_entropy(ref.flatten(0, 1), targets.flatten())
    _close(loss, ref_loss, "loss")
    loss.backward()
    ref_loss.backward()
    # GPT-2's Conv1D weights are stored (in, out); ours are nn.Linear's (out, in).
    _all_grads(ours, hf, "gpt", transpose=(".c_attn.weight", ".c_proj.weight", ".c_fc.weight"))
    # And the converter in the loading direction.
    back = from_hf_gpt2_state_dict(hf.state_dict())
    for k, v in ours.state_dict().items():
        assert torch.equal(back[k], v), k


def test_gpt_generate_with_kv_cache():
    """Greedy decoding: the KV cache (decode kernels) gives the same tokens as re-running the
    whole sequence, and the same as transformers' greedy generate."""
    ours, hf = _gpt_pair()
    prompt = torch.randint(0, 97, (2, 5), device=DEVICE)
    with expect_backend("flash_attention"):
        with_cache = ours.generate(prompt, 8, temperature=0.0)
    without = ours.generate(prompt, 8, temperature=0.0, use_cache=False)
    assert torch.equal(with_cache, without)
    hf_out = hf.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0,
                         attention_mask=torch.ones_like(prompt))
    assert torch.equal(with_cache, hf_out)
    g = torch.Generator(device=DEVICE).manual_seed(3)
    sampled = ours.generate(prompt, 6, temperature=0.8, top_k=20, top_p=0.9, generator=g)
    assert sampled.shape == (2, 11) and torch.equal(sampled[:, :5], prompt)


def test_gpt_rope_gqa_swiglu_against_torch_backend():
    """The Llama-style configuration: every op on the kernels vs every op on the torch
    references, and KV-cache decoding (GQA decode path) against full recomputation."""
    torch.manual_seed(0)
    cfg = models.GPTConfig.from_name("llama-tiny", vocab_size=101, n_layer=2, n_embd=64, n_head=4, n_kv_head=2,
                                     block_size=64)
    model = models.GPT(cfg).to(DEVICE)
    idx = torch.randint(0, 101, (2, 13), device=DEVICE)
    with expect_backend("apply_rotary_emb"):
        logits, _ = model(idx)
    with fastnets.backend("torch"):
        ref, _ = model(idx)
    assert_close(logits, ref.double(), torch.float32, "llama-style logits")
    a = model.generate(idx[:, :4], 6, temperature=0.0)
    b = model.generate(idx[:, :4], 6, temperature=0.0, use_cache=False)
    assert torch.equal(a, b)


def test_gpt2_124m_config():
    cfg = models.GPTConfig.from_name("gpt2")
    with torch.device("meta"):
        model = models.GPT(cfg)
    assert abs(model.num_params() - 124_000_000) < 1_500_000
    with pytest.raises(ValueError, match="unknown config"):
        models.GPTConfig.from_name("gpt5")


def test_bert_matches_hf():
    torch.manual_seed(0)
    cfg = models.BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=96, max_position_embeddings=40, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0, num_labels=3)
    hf_cfg = transformers.BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=96, max_position_embeddings=40, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0, num_labels=3, hidden_act="gelu")
    ids = torch.randint(1, 120, (3, 17), device=DEVICE)
    mask = torch.ones(3, 17, dtype=torch.long, device=DEVICE)
    mask[1, 11:] = 0
    mask[2, 5:] = 0
    labels = torch.full((3, 17), -100, device=DEVICE)
    labels[:, 2:6] = torch.randint(0, 120, (3, 4), device=DEVICE)
    mlm = models.BertForMaskedLM(cfg).to(DEVICE)
    hf = _eager(transformers.BertForMaskedLM(hf_cfg).to(DEVICE))
    missing, unexpected = hf.load_state_dict(mlm.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"cls.predictions.bias", "bert.embeddings.position_ids"}, missing
    hf.eval()
    logits, _ = mlm(ids, mask)
    ref = hf(input_ids=ids, attention_mask=mask)
    keep = mask.bool()
    _close(logits[keep], ref.logits[keep], "mlm logits (real tokens)")
    _, loss = mlm(ids, mask, labels=labels)
    _close(loss, hf(input_ids=ids, attention_mask=mask, labels=labels).loss, "mlm loss")
    cls = models.BertForSequenceClassification(cfg).to(DEVICE)
    hf_cls = _eager(transformers.BertForSequenceClassification(hf_cfg).to(DEVICE).eval())
    missing, unexpected = hf_cls.load_state_dict(cls.state_dict(), strict=False)
    assert not unexpected
    y = torch.tensor([0, 2, 1], device=DEVICE)
    with expect_backend("flash_attention"), expect_backend("layer_norm"):
        logits, loss = cls(ids, mask, labels=y)
    ref = hf_cls(input_ids=ids, attention_mask=mask, labels=y)
    _close(logits, ref.logits, "classification logits")
    loss.backward()
    ref.loss.backward()
    _all_grads(cls, hf_cls, "bert")


@pytest.mark.parametrize("ff,tied", [("relu", True), ("gated-gelu", False)])
def test_t5_matches_hf(ff, tied):
    torch.manual_seed(0)
    kw = dict(vocab_size=90, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, dropout_rate=0.0,
              feed_forward_proj=ff, tie_word_embeddings=tied, relative_attention_num_buckets=8,
              relative_attention_max_distance=20)
    ours = models.T5ForConditionalGeneration(models.T5Config(**kw)).to(DEVICE)
    hf_cfg = transformers.T5Config(**kw, decoder_start_token_id=0)
    hf_cfg.tie_word_embeddings = tied   # some transformers versions drop the constructor argument
    hf = _eager(transformers.T5ForConditionalGeneration(hf_cfg).to(DEVICE))
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and not [k for k in missing if "embed_tokens" not in k], missing
    hf.eval()
    src = torch.randint(2, 90, (2, 15), device=DEVICE)
    mask = torch.ones_like(src)
    mask[1, 10:] = 0
    labels = torch.randint(2, 90, (2, 9), device=DEVICE)
    with expect_backend("flash_attention"):
        _, loss = ours(src, mask, labels=labels)
    ref = hf(input_ids=src, attention_mask=mask, labels=labels)
    _close(loss, ref.loss, "t5 loss")
    logits, _ = ours(src, mask, decoder_input_ids=ours.shift_right(labels))
    _close(logits, ref.logits, "t5 logits")
    loss.backward()
    ref.loss.backward()
    _all_grads(ours, hf, "t5", aliases={"shared.weight": ["shared.weight", "encoder.embed_tokens.weight",
                                                          "decoder.embed_tokens.weight"]})
    out = ours.generate(src, mask, max_new_tokens=6)
    assert torch.equal(out, ours.generate(src, mask, max_new_tokens=6, use_cache=False))
    hf_out = hf.generate(input_ids=src, attention_mask=mask, max_new_tokens=6, do_sample=False)
    n = min(out.shape[1], hf_out.shape[1])
    assert torch.equal(out[:, :n], hf_out[:, :n])
