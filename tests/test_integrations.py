"""fastnets.integrations.transformers: attn_implementation="fastnets" and apply_fastnets on
randomly initialised small GPT-2, BERT and Llama configs, against the same models on
transformers' eager attention (nothing downloaded)."""
import copy

import pytest
import torch

from helpers import DEVICE, expect_backend

transformers = pytest.importorskip("transformers", minversion="4.48")   # the attention registry
from fastnets.integrations.transformers import apply_fastnets, register  # noqa: E402


def _close(a, b, what, tol=3e-4):
    err = (a.float() - b.float()).abs().max().item()
    scale = max(1.0, b.float().abs().max().item())
    assert err <= tol * scale, f"{what}: max abs err {err:.3g} (scale {scale:.3g})"


def _pair(cfg, auto=transformers.AutoModelForCausalLM):
    torch.manual_seed(0)
    ref = auto.from_config(cfg, attn_implementation="eager").to(DEVICE).eval()
    register()
    fast = auto.from_config(copy.deepcopy(cfg), attn_implementation="fastnets").to(DEVICE).eval()
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def _check(ref, fast, inputs):
    with expect_backend("flash_attention"):
        out = fast(**inputs)
    want = ref(**inputs)
    keep = inputs["attention_mask"].bool() if "attention_mask" in inputs else slice(None)
    _close(out.logits[keep], want.logits[keep], "logits")
    if "labels" in inputs:
        _close(out.loss, want.loss, "loss")
        out.loss.backward()
        want.loss.backward()
        ref_params = dict(ref.named_parameters())
        for name, p in fast.named_parameters():   # every parameter, not a sample
            _close(p.grad, ref_params[name].grad, f"grad {name}")


def test_gpt2_attn_implementation():
    cfg = transformers.GPT2Config(vocab_size=101, n_positions=64, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0)
    ref, fast = _pair(cfg)
    ids = torch.randint(0, 101, (2, 13), device=DEVICE)
    _check(ref, fast, dict(input_ids=ids, labels=ids))


def test_llama_gqa_with_padding_and_apply_fastnets():
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    ref, fast = _pair(cfg)
    done = apply_fastnets(fast)
    assert done["norms"] and done["mlp"] and done["cross_entropy"] == [""]
    ids = torch.randint(0, 97, (2, 11), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0   # left padding
    labels = ids.masked_fill(mask == 0, -100)
    # The last padded position predicts the first real token; its query row sees no key at all
    # (fastnets: zeros, eager: a uniform average), so that prediction is left out.
    labels[1, 3] = -100
    with expect_backend("rms_norm"), expect_backend("bias_act"), expect_backend("cross_entropy"):
        _check(ref, fast, dict(input_ids=ids, attention_mask=mask, labels=labels))
    # Generation with a KV cache (decode kernels) agrees with eager attention.
    prompt = ids[:1, :6]
    a = fast.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
    b = ref.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)


def test_bert_masked_lm_apply_fastnets():
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=96, max_position_embeddings=40, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    ref, fast = _pair(cfg, transformers.AutoModelForMaskedLM)
    done = apply_fastnets(fast)
    assert done["mlp"] and done["norms"] and done["cross_entropy"] == [""]
    ids = torch.randint(1, 120, (2, 15), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0
    labels = torch.full_like(ids, -100)
    labels[:, 3:6] = ids[:, 3:6]
    with expect_backend("layer_norm"):
        _check(ref, fast, dict(input_ids=ids, attention_mask=mask, labels=labels))
