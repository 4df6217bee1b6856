"""Perplexity, KL to a reference, zero-shot scoring and parameter counts on tiny random models."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from tests.conftest import char_tokenizer
from tyrsearch import assets, data, metrics, texts
from tyrsearch.errors import UserError

VOCAB = 128


def tiny_llama(*, seed: int = 0, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def perturbed(model: LlamaForCausalLM, scale: float = 0.05) -> LlamaForCausalLM:
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in other.model.layers.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return other


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture(scope="module")
def batches() -> torch.Tensor:
    return torch.randint(0, VOCAB, (5, 12), generator=torch.Generator().manual_seed(0))


def test_perplexity_is_exp_of_mean_cross_entropy(model, batches):
    with torch.no_grad():
        logits = model(batches).logits
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), batches[:, 1:].reshape(-1))
    for bs in (1, 2, 5):
        result = metrics.perplexity(model, batches, batch_size=bs, progress=False)
        assert result["tokens"] == 5 * 11
        assert result["nll"] == pytest.approx(ce.item(), rel=1e-5)
        assert result["ppl"] == pytest.approx(math.exp(ce.item()), rel=1e-5)


def test_kl_to_itself_is_zero(model, batches):
    assert abs(metrics.kl_divergence(model, model, batches, batch_size=2)) < 1e-6
    assert abs(metrics.kl_divergence(model, model, batches, top_k=5)) < 1e-6
    full = metrics.dense_topk(model, batches, k=None, batch_size=3, progress=False)
    top = metrics.dense_topk(model, batches, k=8, batch_size=3, progress=False)
    assert full.log_probs.shape == (5, 11, VOCAB) and full.indices is None
    assert top.log_probs.shape == (5, 11, 8) and top.indices.shape == (5, 11, 8)
    assert abs(metrics.kl_divergence(model, full)) < 1e-6
    assert abs(metrics.kl_divergence(model, top)) < 1e-6


def test_kl_to_perturbed_copy_and_top_k_bounds(model, batches):
    other = perturbed(model)
    full = metrics.kl_divergence(other, model, batches)
    assert full > 1e-4
    # Against a hand computation.
    with torch.no_grad():
        p = torch.log_softmax(model(batches).logits[:, :-1], -1)
        q = torch.log_softmax(other(batches).logits[:, :-1], -1)
    assert full == pytest.approx((p.exp() * (p - q)).sum(-1).mean().item(), rel=1e-4)

    ref_full = metrics.dense_topk(model, batches, k=None, progress=False)
    assert metrics.kl_divergence(other, ref_full) == pytest.approx(full, rel=1e-5)
    previous = 0.0
    for k in (1, 4, 16, 64):  # coarse-grained KL: non-negative, grows with k, never above the full KL
        kl_k = metrics.kl_divergence(other, model, batches, top_k=k)
        assert previous - 1e-9 <= kl_k <= full + 1e-9
        previous = kl_k
    assert metrics.kl_divergence(other, model, batches, top_k=VOCAB) == pytest.approx(full, rel=1e-6)

    # A stored top-16 reference gives the same value as the live model, also sliced to a smaller k,
    # and the full stored reference gives it for any top_k.
    ref16 = metrics.dense_topk(model, batches, k=16, batch_size=2, progress=False)
    for k in (4, 16):
        live = metrics.kl_divergence(other, model, batches, top_k=k)
        assert metrics.kl_divergence(other, ref16, top_k=k) == pytest.approx(live, rel=1e-5)
        assert metrics.kl_divergence(other, ref_full, top_k=k) == pytest.approx(live, rel=1e-5)
    assert metrics.kl_divergence(other, ref16) == pytest.approx(
        metrics.kl_divergence(other, model, batches, top_k=16), rel=1e-5
    )
    with pytest.raises(ValueError, match="exceeds"):
        metrics.kl_divergence(other, ref16, top_k=32)
    with pytest.raises(ValueError, match="differ"):
        metrics.kl_divergence(other, ref16, batches.flip(0))


def test_kl_works_across_different_layer_shapes(batches):
    """The evaluator sees only logits: a model with other widths compares fine."""
    small = tiny_llama(seed=1, layers=1)
    assert metrics.kl_divergence(small, tiny_llama(), batches, top_k=8) > 0


def test_param_counts(model):
    cfg = model.config
    per_layer = (
        cfg.hidden_size * cfg.head_dim * (cfg.num_attention_heads * 2 + cfg.num_key_value_heads * 2)
        + 3 * cfg.hidden_size * cfg.intermediate_size
        + 2 * cfg.hidden_size
    )
    assert metrics.decoder_params(model) == cfg.num_hidden_layers * per_layer
    # Tied LM head counted once: embeddings + final norm on top of the layers.
    assert metrics.total_params(model) == metrics.decoder_params(model) + VOCAB * 32 + 32


# ---------------------------------------------------------------------------------------------------------
# zero-shot


def test_formats_follow_the_harness():
    arc = metrics._arc({"question": "Q?", "choices": {"text": ["a b", "c"], "label": ["1", "2"]}, "answerKey": "2"})
    assert arc.contexts == ("Question: Q?\nAnswer:",) * 2
    assert arc.continuations == (" a b", " c") and arc.norm_lengths == (3, 1) and arc.gold == 1
    hs = metrics._hellaswag(
        {
            "activity_label": "Roof",
            "ctx_a": "A man [title] sits.",
            "ctx_b": "he",
            "endings": ["falls [step] down.", "waves."],
            "label": "1",
        }
    )
    assert hs.contexts[0] == "Roof: A man. sits. He"
    assert hs.continuations == (" falls down.", " waves.") and hs.gold == 1
    wg = metrics._winogrande(
        {"sentence": "Sarah beat Maria so _ won the cup.", "option1": "Sarah", "option2": "Maria", "answer": "1"}
    )
    assert wg.contexts == ("Sarah beat Maria so Sarah", "Sarah beat Maria so Maria")
    assert wg.continuations == (" won the cup.",) * 2 and wg.gold == 0
    piqa = metrics._piqa({"goal": "G", "sol1": "x", "sol2": "yy", "label": 1})
    assert piqa.contexts == ("Question: G\nAnswer:",) * 2 and piqa.gold == 1


def test_batched_scoring_matches_one_by_one(model):
    tok = char_tokenizer(bos=True)
    pairs = [("Question: why?\nAnswer:", " because"), ("ab", " c"), ("a much longer context here", " yes no")]
    requests = [metrics._encode_request(tok, c, x, data.bos_id(tok)) for c, x in pairs]
    for (ids, start), (ctx, cont) in zip(requests, pairs, strict=True):
        assert ids[0] == 1 and tok.decode(ids[1:start]) == ctx and tok.decode(ids[start:]) == cont
    batched = metrics._score(model, requests, batch_size=3, progress=False, desc="t")
    for (ids, start), score in zip(requests, batched, strict=True):
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
        expected = sum(lp[t - 1, ids[t]].item() for t in range(start, len(ids)))
        assert score == pytest.approx(expected, abs=1e-4)


def test_zero_shot_on_tiny_model(model):
    tok = char_tokenizer(bos=True)
    first = metrics.zero_shot(model, tok, limit=6, batch_size=4, progress=False)
    assert set(first) == {"arc_easy", "piqa", "hellaswag", "winogrande"}
    for scores in first.values():
        assert scores["n"] == 6
        assert 0.0 <= scores["acc"] <= 1.0 and 0.0 <= scores["acc_norm"] <= 1.0
    assert first["winogrande"]["acc"] == first["winogrande"]["acc_norm"]  # same continuation per choice
    again = metrics.zero_shot(model, tok, tasks=("piqa",), limit=6, batch_size=2, progress=False)
    assert again["piqa"] == first["piqa"]
    # The selection is a seeded shuffle: same seed, same examples; another seed, others.
    a = metrics._load_examples("hellaswag", limit=5, seed=0)
    b = metrics._load_examples("hellaswag", limit=5, seed=1)
    assert a == metrics._load_examples("hellaswag", limit=5, seed=0) and a != b


def test_zero_shot_errors(model):
    tok = char_tokenizer()
    with pytest.raises(UserError, match="unknown zero-shot task.*mmlu.*choose from arc_easy"):
        metrics.zero_shot(model, tok, tasks=("mmlu",), progress=False)
    with pytest.raises(UserError, match="at least 1"):
        metrics.zero_shot(model, tok, limit=0, progress=False)


# ---------------------------------------------------------------------------------------------------------
# integration: the real SmolLM2


@pytest.mark.integration
def test_smollm2_perplexity_on_wiki_summaries():
    model, tok = assets.load_model("smollm2-135m")
    batches = data.eval_batches(tok, texts.read_text("wiki-summaries"), seq_len=512, max_tokens=1024)
    assert batches.shape == (2, 512)
    result = metrics.perplexity(model, batches, batch_size=2, progress=False)
    assert result["tokens"] == 2 * 511
    assert 5.0 < result["ppl"] < 60.0
    assert metrics.decoder_params(model) == 30 * (576 * 64 * (9 * 2 + 3 * 2) + 3 * 576 * 1536 + 2 * 576)
