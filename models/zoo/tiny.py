"""The MLPerf Tiny v1 reference models, in PyTorch.

Each follows the Keras reference in github.com/mlcommons/tiny (benchmark/training/...):
the convolutions keep their biases (Keras' default), so the parameter counts equal the
references' trainable counts. There are no public PyTorch weights: all are randomly
initialised (deterministically, from ``seed``). Dropout is left out (eval-only graphs).
TF "SAME" padding is replaced by symmetric padding with the same output size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .common import ConvBNAct, check_size, finalize, init_cnn, seeded, sym_same_padding

__all__ = ["DSCNN", "FCAutoencoder", "MobileNetV1", "ResNet8", "ds_cnn", "fc_autoencoder",
           "mobilenet_v1_025", "resnet8"]


def _no_pretrained(name: str, pretrained: bool) -> None:
    if pretrained:
        raise ValueError(f"{name} has no pretrained weights in the zoo; build it with pretrained=False")


class DSCNN(nn.Module):
    """Keyword-spotting DS-CNN (keyword_spotting/keras_model.py, model_name='ds_cnn')."""

    def __init__(self, num_classes: int = 12, input_shape: Sequence[int] = (1, 49, 10), filters: int = 64,
                 blocks: int = 4) -> None:
        super().__init__()
        c, h, w = (int(s) for s in input_shape)
        pad = (sym_same_padding(h, 10, 2), sym_same_padding(w, 4, 2))  # 49x10 -> 25x5, like TF
        self.stem = ConvBNAct(c, filters, (10, 4), 2, padding=pad, bias=True)
        layers: list[nn.Module] = []
        for _ in range(blocks):  # depthwise-separable: dw 3x3 + BN + ReLU, pw 1x1 + BN + ReLU
            layers.append(ConvBNAct(filters, filters, 3, groups=filters, padding=1, bias=True))
            layers.append(ConvBNAct(filters, filters, 1, bias=True))
        self.blocks = nn.Sequential(*layers)
        # The Keras reference pools with a fixed (24, 5) window over the 25x5 map (dropping
        # the last row); a global average is the size-independent equivalent.
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(filters, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.pool(self.blocks(self.stem(x)))))


class _ResidualStack(nn.Module):
    """conv3x3(stride)+BN+ReLU, conv3x3+BN, add the (1x1-conv if reshaped) shortcut, ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = ConvBNAct(in_ch, out_ch, 3, stride, padding=1, bias=True)
        self.conv2 = ConvBNAct(out_ch, out_ch, 3, 1, padding=1, bias=True, act=None)
        # The reference's shortcut conv has no BN.
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1, stride) if stride != 1 or in_ch != out_ch else None
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.conv1(x))
        s = self.shortcut(x) if self.shortcut is not None else x
        return self.relu(s + y)


class ResNet8(nn.Module):
    """Image-classification ResNet-8 (image_classification/keras_model.py, resnet_v1_eembc)."""

    def __init__(self, num_classes: int = 10, filters: Sequence[int] = (16, 32, 64), in_channels: int = 3
                 ) -> None:
        super().__init__()
        self.stem = ConvBNAct(in_channels, filters[0], 3, padding=1, bias=True)
        stacks, prev = [], filters[0]
        for i, f in enumerate(filters):
            stacks.append(_ResidualStack(prev, f, 1 if i == 0 else 2))
            prev = f
        self.stacks = nn.Sequential(*stacks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.pool(self.stacks(self.stem(x)))))


# MobileNetV1 (Howard et al. 2017) at width 1.0: (pointwise output channels, depthwise stride).
_MBV1 = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [(1024, 2), (1024, 1)]


class MobileNetV1(nn.Module):
    """Visual-wake-words MobileNetV1 (visual_wake_words/vww_model.py: alpha 0.25, 96x96, 2 classes)."""

    def __init__(self, num_classes: int = 2, width: float = 0.25, in_channels: int = 3) -> None:
        super().__init__()
        ch = int(32 * width)
        self.stem = ConvBNAct(in_channels, ch, 3, 2, padding=1, bias=True)
        layers: list[nn.Module] = []
        for out, stride in _MBV1:
            out = int(out * width)
            layers.append(ConvBNAct(ch, ch, 3, stride, groups=ch, padding=1, bias=True))
            layers.append(ConvBNAct(ch, out, 1, bias=True))
            ch = out
        self.blocks = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.pool(self.blocks(self.stem(x)))))


class _DenseBNReLU(nn.Sequential):
    def __init__(self, i: int, o: int) -> None:
        super().__init__(nn.Linear(i, o), nn.BatchNorm1d(o), nn.ReLU())


class FCAutoencoder(nn.Module):
    """Anomaly-detection dense autoencoder (anomaly_detection/keras_model.py).

    640 -> 128 x4 -> 8 -> 128 x4 -> 640, each hidden Dense followed by BN + ReLU. The
    output is the reconstruction; ``encoder``'s output (the 8-unit bottleneck) is the
    feature point.
    """

    def __init__(self, input_dim: int = 640, hidden: int = 128, depth: int = 4, bottleneck: int = 8) -> None:
        super().__init__()
        enc = [_DenseBNReLU(input_dim if i == 0 else hidden, hidden) for i in range(depth)]
        self.encoder = nn.Sequential(*enc, _DenseBNReLU(hidden, bottleneck))
        dec = [_DenseBNReLU(bottleneck if i == 0 else hidden, hidden) for i in range(depth)]
        self.decoder = nn.Sequential(*dec, nn.Linear(hidden, input_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


def ds_cnn(*, num_classes: int = 12, input_shape: Sequence[int] = (1, 49, 10), seed: int = 0,
           pretrained: bool = False) -> nn.Module:
    """MLPerf Tiny KWS DS-CNN: 1x49x10 MFCC -> 12 logits (23,756 parameters)."""
    _no_pretrained("ds-cnn", pretrained)
    with seeded(seed):
        model = DSCNN(num_classes, input_shape)
        init_cnn(model)
    return finalize(model, name="ds-cnn", input_shape=tuple(int(s) for s in input_shape),
                    input_dtype="float32", feature_dim=64, preprocessing=None, weights=None)


def resnet8(*, num_classes: int = 10, input_size: int | tuple[int, int] = 32, seed: int = 0,
            pretrained: bool = False) -> nn.Module:
    """MLPerf Tiny IC ResNet-8: 3x32x32 (NCHW) -> 10 logits (78,186 parameters)."""
    _no_pretrained("resnet8", pretrained)
    h, w = check_size(input_size)
    with seeded(seed):
        model = ResNet8(num_classes)
        init_cnn(model)
    return finalize(model, name="resnet8", input_shape=(3, h, w), input_dtype="float32", feature_dim=64,
                    preprocessing=None, weights=None)


def mobilenet_v1_025(*, num_classes: int = 2, input_size: int | tuple[int, int] = 96, width: float = 0.25,
                     seed: int = 0, pretrained: bool = False) -> nn.Module:
    """MLPerf Tiny VWW MobileNetV1 alpha 0.25: 3x96x96 -> 2 logits (216,322 parameters)."""
    _no_pretrained("mobilenet-v1-0.25", pretrained)
    h, w = check_size(input_size)
    with seeded(seed):
        model = MobileNetV1(num_classes, width)
        init_cnn(model)
    return finalize(model, name="mobilenet-v1-0.25", input_shape=(3, h, w), input_dtype="float32",
                    feature_dim=model.classifier.in_features, preprocessing=None, weights=None)


def fc_autoencoder(*, input_dim: int = 640, bottleneck: int = 8, seed: int = 0, pretrained: bool = False
                   ) -> nn.Module:
    """MLPerf Tiny AD autoencoder: 640 -> 640 reconstruction (267,928 parameters)."""
    _no_pretrained("fc-autoencoder", pretrained)
    with seeded(seed):
        model = FCAutoencoder(input_dim, bottleneck=bottleneck)
        init_cnn(model)
    return finalize(model, name="fc-autoencoder", input_shape=(input_dim,), input_dtype="float32",
                    feature_dim=bottleneck, preprocessing=None, weights=None)
