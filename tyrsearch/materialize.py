"""A model whose layers were cut in place -> a per-layer-shaped model that saves and reloads.

The saved folder holds the weights (safetensors), a config whose `block_configs` records each layer's
shape, the tokenizer, and `modeling_tyr.py` with an `auto_map`, so it loads with
`AutoModelForCausalLM.from_pretrained(folder)` after `import tyrsearch`, or with
`trust_remote_code=True` where tyrsearch is not installed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn
from transformers import PretrainedConfig

from tyrsearch.atomic import atomic_folder
from tyrsearch.errors import UserError
from tyrsearch.modeling import PRUNED_CLASSES
from tyrsearch.modeling import modeling_tyr as modeling_file
from tyrsearch.models import adapter_for, base_model_type

# config entries that describe where a model came from, not what it is
_DROPPED_CONFIG_KEYS = ("model_type", "architectures", "auto_map", "quantization_config", "block_configs",
                        "transformers_version", "_name_or_path")


def block_configs(model: nn.Module) -> list[dict]:
    """Per layer: head counts, intermediate size and whether o_proj / down_proj carry a bias."""
    adapter = adapter_for(model)
    configs = []
    for layer in adapter.layers(model):
        state = layer.state_dict()
        configs.append(adapter.shape(layer).block_config(
            o_proj_bias="self_attn.o_proj.bias" in state, down_proj_bias="mlp.down_proj.bias" in state,
        ))
    return configs


def pruned_config(config: PretrainedConfig, blocks: list[dict], **changes) -> PretrainedConfig:
    """The per-layer-shaped config of a supported family: `config`'s fields (with `changes`) and one block
    config per layer."""
    config_cls, model_cls = PRUNED_CLASSES[base_model_type(config.model_type)]
    fields = {k: v for k, v in config.to_dict().items() if k not in _DROPPED_CONFIG_KEYS} | changes
    if fields.get("layer_types"):  # Gemma-3: one entry per layer, the pattern repeating
        types = fields["layer_types"]
        fields["layer_types"] = [types[i % len(types)] for i in range(fields["num_hidden_layers"])]
    pruned = config_cls(**fields, block_configs=blocks)
    pruned.architectures = [model_cls.__name__]
    pruned.auto_map = {"AutoConfig": f"modeling_tyr.{config_cls.__name__}",
                       "AutoModelForCausalLM": f"modeling_tyr.{model_cls.__name__}"}
    return pruned


def to_pruned(model: nn.Module) -> nn.Module:
    """The same weights in the registered per-layer-shaped class (shares no storage with `model`)."""
    base = base_model_type(model.config.model_type)
    if base not in PRUNED_CLASSES:
        adapter_for(model)  # raises the user-facing error for unsupported families
        raise UserError(f"no per-layer-shaped class for {base!r}")
    model_cls = PRUNED_CLASSES[base][1]
    config = pruned_config(model.config, block_configs(model))
    with torch.device("meta"):
        pruned = model_cls(config)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    pruned.load_state_dict(state, strict=True, assign=True)
    # non-persistent buffers (RoPE inverse frequencies) are not in the state dict: take them over too
    buffers = dict(model.named_buffers())
    for name, buffer in list(pruned.named_buffers()):
        if buffer.is_meta:
            module_name, _, buffer_name = name.rpartition(".")
            pruned.get_submodule(module_name).register_buffer(buffer_name, buffers[name].clone(), persistent=False)
    pruned.tie_weights()
    if getattr(model, "generation_config", None) is not None:
        pruned.generation_config = model.generation_config
    return pruned.eval()


def save_pruned(model: nn.Module, tokenizer, out_dir: str | Path, *, result: dict | None = None) -> Path:
    """Write the per-layer-shaped model (and `result.json` if given) to `out_dir`, atomically.

    Everything is written into a temporary sibling folder that is renamed at the end, so an
    interrupted save leaves nothing half-written under `out_dir`.
    """
    out_dir = Path(out_dir)
    pruned = to_pruned(model)
    with atomic_folder(out_dir) as tmp:
        pruned.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        shutil.copy(modeling_file.__file__, tmp / "modeling_tyr.py")
        if result is not None:
            (tmp / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return out_dir
