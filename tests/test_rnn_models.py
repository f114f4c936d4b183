"""The recurrent models: the fastnets build equals the torch.nn build with the same weights
(outputs and gradients), sampling honours temperature / top-k, and the classifier's padded
lengths path equals packing."""
import pytest
import torch

from fastnets.models import CharLM, CharLMConfig, CharVocab, SequenceClassifier, python_text
from helpers import DEVICE, assert_close, expect_backend
from tolerances import MODEL_TRAIN_FLOAT32


@pytest.mark.parametrize("cell, proj", [("lstm", 0), ("gru", 0), ("lstm", 6)])
def test_char_lm_matches_torch_build(cell, proj):
    torch.manual_seed(0)
    cfg = CharLMConfig(vocab_size=11, embed=5, hidden=9, num_layers=2, dropout=0.0, cell=cell, proj_size=proj)
    ours, theirs = CharLM(cfg).to(DEVICE), CharLM(cfg, use_torch=True).to(DEVICE)
    theirs.load_state_dict(ours.state_dict())
    idx = torch.randint(0, 11, (3, 7), device=DEVICE)
    with expect_backend("rnn"), expect_backend("cross_entropy"):
        logits, _, loss = ours(idx, targets=idx)
        loss.backward()
    ref_logits, _, ref_loss = theirs(idx, targets=idx)
    ref_loss.backward()
    assert_close(logits, ref_logits.double(), torch.float32, "logits", tol=MODEL_TRAIN_FLOAT32)
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        assert_close(p.grad, q.grad.double(), torch.float32, f"grad {name}", tol=MODEL_TRAIN_FLOAT32)


def test_generate_greedy_top_k_and_state():
    torch.manual_seed(0)
    model = CharLM(CharLMConfig(vocab_size=7, embed=4, hidden=8, num_layers=1, dropout=0.0)).to(DEVICE)
    prompt = torch.tensor([[1, 2, 3]], device=DEVICE)
    with expect_backend("rnn"):
        a = model.generate(prompt, 6, temperature=0)
    b = model.generate(prompt, 6, temperature=0)
    assert a.shape == (1, 9) and torch.equal(a, b) and torch.equal(a[:, :3], prompt)
    # Greedy decoding step by step (carrying the state) equals re-running the whole prefix.
    logits, _, _ = model(a[:, :-1])
    assert torch.equal(logits[0, 2:].argmax(-1), a[0, 3:])
    g = torch.Generator(DEVICE).manual_seed(0)
    c = model.generate(prompt, 20, temperature=1.0, top_k=1, generator=g)
    assert torch.equal(c[:, :9], a)   # top_k = 1 is greedy
    with pytest.raises(ValueError, match="top_k"):
        model.generate(prompt, 2, top_k=0)
    with pytest.raises(ValueError, match="prompt"):
        model.generate(prompt[0], 2)


def test_vocab_and_bundled_text():
    text = python_text(5000)
    assert len(text) == 5000
    vocab = CharVocab.from_text(text)
    ids = vocab.encode(text[:100])
    assert vocab.decode(ids) == text[:100]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        CharVocab("ab").encode("abc")


def test_sequence_classifier_lengths_match_packing():
    torch.manual_seed(0)
    ours = SequenceClassifier(20, 3, embed=6, hidden=5).to(DEVICE)
    theirs = SequenceClassifier(20, 3, embed=6, hidden=5, use_torch=True).to(DEVICE)
    theirs.load_state_dict(ours.state_dict())
    tokens = torch.randint(1, 20, (4, 9), device=DEVICE)
    lengths = torch.tensor([9, 2, 5, 1])
    with expect_backend("rnn"):
        out = ours(tokens, lengths)
    ref = theirs(tokens, lengths)
    assert_close(out, ref.double(), torch.float32, "classifier logits", tol=MODEL_TRAIN_FLOAT32)
    out.sum().backward()
    ref.sum().backward()
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        assert_close(p.grad, q.grad.double(), torch.float32, f"grad {name}", tol=MODEL_TRAIN_FLOAT32)
    assert ours(tokens).shape == (4, 3)
