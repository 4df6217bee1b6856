"""SmoothQuant for the gated MLPs' down projections: the same function, a flatter activation."""

import pytest
import torch

from tests.conftest import VOCAB, tiny_gemma3, tiny_llama
from tyrsearch.exporters.smoothing import gated_mlps, smooth_down_projections


def _peaks(model, ids) -> list[torch.Tensor]:
    """Per gated MLP, each down_proj input channel's max |activation| [I] on ids."""
    peaks = []
    hooks = [m.down.register_forward_pre_hook(lambda _, args: peaks.append(args[0].abs().amax(dim=(0, 1))))
             for m in gated_mlps(model)]
    model(input_ids=ids)
    for hook in hooks:
        hook.remove()
    return peaks


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3])
def test_smoothing_keeps_the_logits_and_flattens_an_outlier_channel(make):
    model = make()
    ids = torch.randint(0, VOCAB, (4, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for mlp in gated_mlps(model):  # an outlier channel 0, the function unchanged
            mlp.up.weight[0] *= 50
            mlp.down.weight[:, 0] /= 50
        before = model(input_ids=ids).logits
        spread = [float(p.max() / p.median()) for p in _peaks(model, ids)]
        assert smooth_down_projections(model, ids, alpha=0.75, batch_size=2) == len(model.model.layers)
        after = model(input_ids=ids).logits
        smoothed = [float(p.max() / p.median()) for p in _peaks(model, ids)]
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    assert all(new < old / 4 for new, old in zip(smoothed, spread, strict=True)), (spread, smoothed)
    assert all(torch.isfinite(p).all() for p in model.parameters())
