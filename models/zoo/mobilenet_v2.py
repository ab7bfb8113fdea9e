"""MobileNetV2 (Sandler et al., CVPR 2018), laid out as torchvision's ``mobilenet_v2``.

Width multiplier ``width`` (1.0 and 0.35 are the benchmark points); channels are rounded
to multiples of 8 as in the paper's reference code, and the 1280-wide head is only
widened, never narrowed. No pretrained weights ship here (torchvision's are not usable
in this environment), so it is randomly initialised from ``seed``.
"""

from __future__ import annotations

import torch
from torch import nn

from .common import ConvBNAct, check_size, finalize, init_cnn, seeded

__all__ = ["MobileNetV2", "make_divisible", "mobilenet_v2"]

# (expansion t, output channels c, repeats n, first stride s), Table 2 of the paper.
_CONFIG = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
           (6, 320, 1, 1)]


def make_divisible(v: float, divisor: int = 8) -> int:
    """Round to a multiple of ``divisor``, never more than 10% below ``v`` (reference rule)."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new < 0.9 * v:
        new += divisor
    return new


class InvertedResidual(nn.Module):
    """1x1 expand + ReLU6, 3x3 depthwise + ReLU6, 1x1 linear projection, residual if shapes match."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = in_ch * expand
        self.expand = ConvBNAct(in_ch, mid, 1, act="relu6") if expand != 1 else None
        self.dw = ConvBNAct(mid, mid, 3, stride, groups=mid, padding=1, act="relu6")
        self.project = ConvBNAct(mid, out_ch, 1, act=None)
        self.use_res = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.expand(x) if self.expand is not None else x
        y = self.project(self.dw(y))
        return x + y if self.use_res else y


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000, width: float = 1.0, in_channels: int = 3) -> None:
        super().__init__()
        ch = make_divisible(32 * width)
        self.last_channel = make_divisible(1280 * max(1.0, width))
        self.stem = ConvBNAct(in_channels, ch, 3, 2, padding=1, act="relu6")
        blocks: list[nn.Module] = []
        for t, c, n, s in _CONFIG:
            out = make_divisible(c * width)
            for i in range(n):
                blocks.append(InvertedResidual(ch, out, s if i == 0 else 1, t))
                ch = out
        self.blocks = nn.Sequential(*blocks)
        self.head = ConvBNAct(ch, self.last_channel, 1, act="relu6")
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(self.last_channel, num_classes)  # torchvision's dropout left out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.pool(self.head(self.blocks(self.stem(x))))))


def mobilenet_v2(*, num_classes: int = 1000, width: float = 1.0, input_size: int | tuple[int, int] = 224,
                 seed: int = 0, pretrained: bool = False) -> nn.Module:
    """MobileNetV2: 3xSxS -> ``num_classes`` logits (3,504,872 parameters at width 1.0)."""
    if pretrained:
        raise ValueError("mobilenet-v2 has no pretrained weights in the zoo; build it with pretrained=False")
    h, w = check_size(input_size)
    with seeded(seed):
        model = MobileNetV2(num_classes, width)
        init_cnn(model)
        nn.init.normal_(model.classifier.weight, 0.0, 0.01)  # torchvision's head init
        nn.init.zeros_(model.classifier.bias)
    return finalize(model, name="mobilenet-v2", input_shape=(3, h, w), input_dtype="float32",
                    feature_dim=model.last_channel, width=width, preprocessing=None, weights=None)
