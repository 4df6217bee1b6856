"""Llama-like decoders: Llama, Mistral, Qwen2 (q/k/v biases), SmolLM2 (a Llama)."""

from tyrsearch.models.base import FamilyAdapter


class LlamaAdapter(FamilyAdapter):
    model_types = ("llama", "mistral", "qwen2")
    search_space = "llama"
