"""Meta-training: an interrupted run resumed from its safetensors checkpoint ends exactly where an
uninterrupted one does, a checkpoint from other settings is refused, and a saved metanetwork reloads."""

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import CONFIGS
from tyrsearch.errors import UserError
from tyrsearch.meta import train as meta_train_module
from tyrsearch.meta.data import Split
from tyrsearch.meta.gnn import MetaNet, MetaNetConfig
from tyrsearch.meta.graph import layout_for
from tyrsearch.meta.nets import build
from tyrsearch.meta.train import CHECKPOINT, Member, MetaTrainConfig, load_metanet, meta_train, save_metanet

CONFIG = MetaTrainConfig(steps=4, batch_size=4, checkpoint_every=2, warmup=1, sparsity_weight=0.5)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: see conftest


@pytest.fixture(scope="module")
def setting():
    """Two tiny ResNets and 16 random images (meta-training only needs shapes and a loss here)."""
    config = CONFIGS["resnet"]
    members = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        members.append(Member.of(f"net-{seed}", build(config).eval(), config))
    generator = torch.Generator().manual_seed(0)
    split = Split(images=torch.randn(16, 1, 28, 28, generator=generator),
                  labels=torch.randint(0, 10, (16,), generator=generator))
    layout = layout_for(config)
    return members, split, MetaNetConfig(node_dim=layout.node_dim, edge_dim=layout.edge_dim, hidden=8, layers=1)


def fresh(net_config: MetaNetConfig) -> MetaNet:
    torch.manual_seed(0)
    return MetaNet(config=net_config)


def test_resumed_training_equals_an_uninterrupted_run(setting, tmp_path, monkeypatch):
    members, split, net_config = setting
    straight = fresh(net_config)
    history = meta_train(straight, members, split, config=CONFIG, folder=tmp_path / "straight")

    real_losses, calls = meta_train_module.losses, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 3:  # after the step-2 checkpoint
            raise KeyboardInterrupt
        return real_losses(*args)

    monkeypatch.setattr(meta_train_module, "losses", interrupted)
    with pytest.raises(KeyboardInterrupt):
        meta_train(fresh(net_config), members, split, config=CONFIG, folder=tmp_path / "resumed")
    monkeypatch.setattr(meta_train_module, "losses", real_losses)
    resumed = fresh(net_config)
    resumed_history = meta_train(resumed, members, split, config=CONFIG, folder=tmp_path / "resumed")

    assert resumed_history == history and [h["step"] for h in history] == [2, 4]
    assert all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(),
                                                 strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(),
                                                     fresh(net_config).state_dict().values(), strict=True))
    checkpoint = load_file(tmp_path / "resumed" / CHECKPOINT)  # safetensors: weights, AdamW moments, generator
    assert "generator" in checkpoint and any(k.startswith("optimizer.") for k in checkpoint)


def test_checkpoint_from_other_settings_is_refused(setting, tmp_path):
    members, split, net_config = setting
    meta_train(fresh(net_config), members, split, config=CONFIG, folder=tmp_path)
    with pytest.raises(UserError, match="other settings"):
        meta_train(fresh(net_config), members, split, config=MetaTrainConfig(steps=6, batch_size=4), folder=tmp_path)


def test_saved_metanetwork_reloads(setting, tmp_path):
    _, _, net_config = setting
    metanet = fresh(net_config)
    save_metanet(tmp_path, metanet, {"arch": "resnet"})
    loaded, info = load_metanet(tmp_path)
    assert info == {"arch": "resnet"} and loaded.config == net_config
    assert all(torch.equal(a, b) for a, b in zip(metanet.state_dict().values(), loaded.state_dict().values(),
                                                 strict=True))
    with pytest.raises(UserError, match="no trained metanetwork"):
        load_metanet(tmp_path / "elsewhere")
