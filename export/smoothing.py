"""SmoothQuant (Xiao et al.) for the gated MLPs' down projections, before dynamic int8.

A gated MLP computes down(act(gate x) * up x). The down projection's input has a few channels far larger
than the rest, and dynamic int8 gives each activation tensor one scale, so those channels flatten all
the others (SmolLM2: held-out perplexity 1.85x fp32's with every MatMul int8). Channel j's input is
linear in up_proj's row j, so dividing that row by s_j and multiplying down_proj's column j by s_j
computes the same function in exact arithmetic while the activation's range shrinks by s_j, with

    s_j = max|a_j|^alpha / max|W_down[:, j]|^(1 - alpha)

(max |a_j| over calibration tokens): alpha of the outlier moves into the weights, which are quantized
per output channel. Only modules with `up_proj` and `down_proj` linear layers (Llama, Gemma-3, shared
experts) are smoothed; fused expert weights are left as they are.
"""

from __future__ import annotations

import torch
from torch import nn


def gated_mlps(model: nn.Module) -> list[nn.Module]:
    """Modules whose `up_proj` feeds `down_proj` through a gate (each with at least one channel)."""
    return [m for m in model.modules() if isinstance(getattr(m, "up_proj", None), nn.Linear)
            and isinstance(getattr(m, "down_proj", None), nn.Linear) and m.down_proj.in_features > 0]


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

    handles = [mlp.down_proj.register_forward_pre_hook(record) for mlp in mlps]
    try:
        for chunk in batches.split(batch_size):
            model(input_ids=chunk, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    for mlp in mlps:
        down = mlp.down_proj.weight  # [H, I]
        scale = peaks[mlp.down_proj].float().clamp_min(1e-5) ** alpha \
            / down.abs().amax(dim=0).float().clamp_min(1e-5) ** (1 - alpha)  # [I]
        mlp.up_proj.weight.div_(scale[:, None].to(down.dtype))  # [I, H]: row j / s_j
        if mlp.up_proj.bias is not None:
            mlp.up_proj.bias.div_(scale.to(down.dtype))
        down.mul_(scale[None, :].to(down.dtype))  # column j * s_j
    return len(mlps)
