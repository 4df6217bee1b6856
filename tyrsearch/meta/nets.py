"""The meta-pruner's two network families, built from configs that record every prunable width, so a
pruned network is the same config with smaller numbers (and rebuilds from it alone).

resnet  a ResNet-style CNN for 28x28 images: 3x3 stem conv + BatchNorm, stages of basic residual blocks
        (conv3x3-BN-ReLU-conv3x3-BN, + shortcut, ReLU); the first block of every stage after the first
        halves the resolution and has a 1x1 conv + BN projection shortcut, the others an identity;
        global average pooling and a linear classifier.
vit     transformers' ViTForImageClassification (pre-LN encoder, CLS token), with the eager attention
        so that torch's FLOP counter sees the attention matmuls; a pruned layer keeps fewer heads
        (q/k/v/o sliced by whole heads) and fewer MLP channels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from transformers import AutoModelForImageClassification, ViTConfig

from tyrsearch.errors import UserError

ARCHS = ("resnet", "vit")


@dataclass(frozen=True)
class ResNetConfig:
    widths: tuple[int, ...] = (16, 32, 64)  # residual-stream channels of each stage (stage 0's = the stem's)
    blocks: int = 1  # residual blocks per stage
    inner: tuple[int, ...] = ()  # conv1 output channels of each block, stage-major; () = each stage's width
    in_channels: int = 1
    classes: int = 10
    image_size: int = 28
    arch: ClassVar[str] = "resnet"

    def __post_init__(self) -> None:
        if not self.inner:  # frozen: the default is filled in once, so every config is explicit
            object.__setattr__(self, "inner", tuple(w for w in self.widths for _ in range(self.blocks)))

    @property
    def num_blocks(self) -> int:
        return len(self.widths) * self.blocks

    def stage(self, block: int) -> int:
        return block // self.blocks

    def projects(self, block: int) -> bool:
        """The first block of every stage after the first: stride 2 and a 1x1 projection shortcut."""
        return block > 0 and block % self.blocks == 0

    def block_in(self, block: int) -> int:
        """Channels entering `block`: the previous stage's stream for a projecting block."""
        return self.widths[self.stage(block) - 1 if self.projects(block) else self.stage(block)]

    def resolution(self, stage: int) -> int:
        size = self.image_size
        for _ in range(stage):
            size = (size + 1) // 2  # 3x3 stride-2 conv with padding 1 (and the 1x1 stride-2 projection)
        return size


@dataclass(frozen=True)
class ViTNetConfig:
    hidden: int = 64
    layers: int = 4
    heads: int = 4
    mlp: int = 128
    patch: int = 7
    layer_heads: tuple[int, ...] = ()  # heads kept in each layer; () = `heads` everywhere
    layer_mlp: tuple[int, ...] = ()  # MLP channels kept in each layer; () = `mlp` everywhere
    in_channels: int = 1
    classes: int = 10
    image_size: int = 28
    arch: ClassVar[str] = "vit"

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise UserError(f"ViT hidden size {self.hidden} is not a multiple of its {self.heads} heads")
        if not self.layer_heads:
            object.__setattr__(self, "layer_heads", (self.heads,) * self.layers)
        if not self.layer_mlp:
            object.__setattr__(self, "layer_mlp", (self.mlp,) * self.layers)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def tokens(self) -> int:
        return 1 + (self.image_size // self.patch) ** 2  # CLS + patches

    def hf_config(self) -> ViTConfig:
        return ViTConfig(image_size=self.image_size, patch_size=self.patch, num_channels=self.in_channels,
                         hidden_size=self.hidden, num_hidden_layers=self.layers, num_attention_heads=self.heads,
                         intermediate_size=self.mlp, num_labels=self.classes, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)


NetConfig = ResNetConfig | ViTNetConfig
_CONFIGS = {"resnet": ResNetConfig, "vit": ViTNetConfig}


def config_to_dict(config: NetConfig) -> dict:
    return {"arch": config.arch, **asdict(config)}


def config_from_dict(data: dict) -> NetConfig:
    fields = dict(data)
    arch = fields.pop("arch", None)
    if arch not in _CONFIGS:
        raise UserError(f"unknown network architecture {arch!r}: the meta-pruner knows {', '.join(ARCHS)}")
    return _CONFIGS[arch](**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def resized(config: NetConfig, field: str, index: int, width: int) -> NetConfig:
    """`config` with entry `index` of the width tuple `field` set to `width`."""
    values = list(getattr(config, field))
    values[index] = width
    return replace(config, **{field: tuple(values)})


class BasicBlock(nn.Module):
    def __init__(self, *, cin: int, inner: int, cout: int, project: bool) -> None:
        super().__init__()
        stride = 2 if project else 1
        self.conv1 = nn.Conv2d(cin, inner, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.proj = nn.Conv2d(cin, cout, 1, stride=stride, bias=False) if project else None
        self.proj_bn = nn.BatchNorm2d(cout) if project else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, cin, R, R] -> [B, cout, R', R']
        shortcut = self.proj_bn(self.proj(x)) if self.proj is not None else x
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + shortcut)


class ResNet(nn.Module):
    def __init__(self, *, config: ResNetConfig) -> None:
        super().__init__()
        self.stem = nn.Conv2d(config.in_channels, config.widths[0], 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(config.widths[0])
        self.blocks = nn.ModuleList(
            BasicBlock(cin=config.block_in(b), inner=config.inner[b], cout=config.widths[config.stage(b)],
                       project=config.projects(b))
            for b in range(config.num_blocks))
        self.head = nn.Linear(config.widths[-1], config.classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # [B, C, 28, 28] -> logits [B, classes]
        x = F.relu(self.stem_bn(self.stem(images)))
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(dim=(2, 3)))


def _vit(config: ViTNetConfig) -> nn.Module:
    model = AutoModelForImageClassification.from_config(config.hf_config(), attn_implementation="eager")
    bias = model.config.qkv_bias
    for layer, heads, channels in zip(model.vit.layers, config.layer_heads, config.layer_mlp, strict=True):
        attention, width = layer.attention, heads * config.head_dim
        if heads != config.heads:  # ViTAttention reshapes by head_dim, so any head count runs
            attention.q_proj = nn.Linear(config.hidden, width, bias=bias)
            attention.k_proj = nn.Linear(config.hidden, width, bias=bias)
            attention.v_proj = nn.Linear(config.hidden, width, bias=bias)
            attention.o_proj = nn.Linear(width, config.hidden)
        if channels != config.mlp:
            layer.mlp.fc1 = nn.Linear(config.hidden, channels)
            layer.mlp.fc2 = nn.Linear(channels, config.hidden)
    return model


def build(config: NetConfig) -> nn.Module:
    """A freshly initialised network of `config` (its current random state decides the weights)."""
    return ResNet(config=config) if isinstance(config, ResNetConfig) else _vit(config)


def logits(model: nn.Module, images: torch.Tensor, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """[B, C, 28, 28] -> [B, classes]; with `params`, the network runs on them (torch.func.functional_call)."""
    out = model(images) if params is None else functional_call(model, params, (images,))
    return out if isinstance(out, torch.Tensor) else out.logits  # ViT returns an ImageClassifierOutput


def flops(config: NetConfig) -> int:
    """FLOPs of one image's forward pass, counted as torch.utils.flop_counter counts them: 2 x the
    multiply-adds of the convolutions, linear layers and attention matmuls (norms and activations free)."""
    if isinstance(config, ResNetConfig):
        macs = config.widths[0] * config.in_channels * 9 * config.image_size ** 2
        for b in range(config.num_blocks):
            area = config.resolution(config.stage(b)) ** 2
            cin, inner, cout = config.block_in(b), config.inner[b], config.widths[config.stage(b)]
            macs += (cin * inner * 9 + inner * cout * 9 + (cin * cout if config.projects(b) else 0)) * area
        macs += config.widths[-1] * config.classes
    else:
        tokens, hidden = config.tokens, config.hidden
        macs = hidden * config.in_channels * config.patch ** 2 * (tokens - 1)
        for heads, channels in zip(config.layer_heads, config.layer_mlp, strict=True):
            width = heads * config.head_dim
            # q, k, v and o projections; scores and weighted values; fc1 and fc2
            macs += 4 * tokens * hidden * width + 2 * tokens ** 2 * width + 2 * tokens * hidden * channels
        macs += hidden * config.classes  # the classifier reads the CLS token only
    return 2 * macs
