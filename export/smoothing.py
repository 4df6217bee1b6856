"""SmoothQuant (Xiao et al.) for the gated MLPs' down projections, before dynamic int8.

A gated MLP computes down(act(gate x) * up x). The down projection's input has a few channels far larger
than the rest, and dynamic int8 gives each activation tensor one scale, so those channels flatten all
the others (SmolLM2: held-out perplexity 1.85x fp32's with every MatMul int8). Channel j's input is
linear in up_proj's row j, so dividing that row by s_j and multiplying down_proj's column j by s_j
computes the same function in exact arithmetic while the activation's range shrinks by s_j, with

    s_j = max|a_j|^alpha / max|W_down[:, j]|^(1 - alpha)

(max |a_j| over calibration tokens): alpha of the outlier moves into the weights, which are quantized
per output channel. The family adapter names the gated MLPs (dense ones and Qwen2-MoE's shared expert);
fused routed-expert weights are left as they are.
"""

from __future__ import annotations

import torch
from torch import nn

from tyrsearch.models import GatedMLP, adapter_for


def gated_mlps(model: nn.Module) -> list[GatedMLP]:
    """Every gated MLP of the decoder that has at least one channel."""
    adapter = adapter_for(model)
    return [mlp for layer in adapter.layers(model) for mlp in adapter.gated_mlps(layer) if mlp.down.in_features]


@torch.no_grad()
def smooth_down_projections(model: nn.Module, batches: torch.Tensor, *, alpha: float,
                            batch_size: int = 4) -> int:
    """Smooth every gated MLP of `model` in place with the activations of `batches` [n, L]; returns how
    many MLPs were smoothed."""
    mlps = gated_mlps(model)
    peaks: dict[nn.Module, torch.Tensor] = {}

    def record(module: nn.Module, args: tuple) -> None:
        peak = args[0].detach().abs().reshape(-1, module.in_features).amax(dim=0)  # [I]
        peaks[module] = torch.maximum(peaks[module], peak) if module in peaks else peak

    handles = [mlp.down.register_forward_pre_hook(record) for mlp in mlps]
    try:
        for chunk in batches.split(batch_size):
            model(input_ids=chunk.to(model.device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    for mlp in mlps:
        down = mlp.down.weight  # [H, I]
        scale = peaks[mlp.down].float().clamp_min(1e-5) ** alpha \
            / down.abs().amax(dim=0).float().clamp_min(1e-5) ** (1 - alpha)  # [I]
        mlp.up.weight.div_(scale[:, None].to(down.dtype))  # [I, H]: row j / s_j
        if mlp.up.bias is not None:
            mlp.up.bias.div_(scale.to(down.dtype))
        down.mul_(scale[None, :].to(down.dtype))  # column j * s_j
    return len(mlps)
