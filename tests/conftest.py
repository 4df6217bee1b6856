"""Shared fixtures: tiny random models of each family (fast) and the real SmolLM2 (integration)."""

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import tyrsearch  # noqa: F401  (registers the per-layer-shaped classes)

VOCAB = 96


def tiny_llama(*, vocab: int = VOCAB, layers: int = 3, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=48, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=6, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def tiny_gemma3(*, seed: int = 0) -> Gemma3ForCausalLM:
    torch.manual_seed(seed)
    config = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=8, sliding_window=8,
                              layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    return Gemma3ForCausalLM(config).eval()


def tiny_qwen2(*, seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=3, head_dim=8)
    return Qwen2ForCausalLM(config).eval()


FAMILIES = {"llama": tiny_llama, "gemma3": tiny_gemma3, "qwen2": tiny_qwen2}


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    """(name, factory) for each tiny family."""
    return request.param, FAMILIES[request.param]


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (6, 24), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def smollm2_folder():
    from tyrsearch.assets import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope="module")
def one_thread():
    """Networks a few channels wide (the meta-pruner's): intra-op threads cost more in synchronisation than
    they give."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """A small plain-text corpus for CLI runs (calibration and evaluation)."""
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(" ".join(f"The river {i} flows into the sea near the old town." for i in range(400)))
    return path
