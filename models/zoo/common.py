"""Building blocks shared by the zoo models.

Everything here is written with the small op set the graph importer translates
(conv, batch norm, activations, explicit zero padding, linear); nothing is in place.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["ConvBNAct", "check_size", "count_params", "finalize", "init_cnn", "seeded", "sym_same_padding",
           "tf_same_padding"]

_ACTS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "relu6": nn.ReLU6}


class ConvBNAct(nn.Module):
    """Optional explicit zero pad -> Conv2d -> BatchNorm2d -> optional activation.

    ``pad`` (left, right, top, bottom) is only used where pretrained weights were trained
    with TensorFlow's asymmetric "SAME" padding; otherwise ``padding`` goes to the conv.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int | tuple[int, int], stride: int = 1, *,
                 groups: int = 1, padding: int | tuple[int, int] = 0, bias: bool = False,
                 act: str | None = "relu", bn_eps: float = 1e-5,
                 pad: tuple[int, int, int, int] | None = None) -> None:
        super().__init__()
        self.pad = nn.ZeroPad2d(pad) if pad is not None else None
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=padding, groups=groups,
                              bias=bias)
        self.bn = nn.BatchNorm2d(out_ch, eps=bn_eps)
        self.act = _ACTS[act]() if act is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad is not None:
            x = self.pad(x)
        x = self.bn(self.conv(x))
        if self.act is not None:
            x = self.act(x)
        return x


def tf_same_padding(size: tuple[int, int], kernel: int, stride: int
                    ) -> tuple[tuple[int, int], tuple[int, int, int, int] | None]:
    """TensorFlow "SAME" padding for a static (H, W): (conv padding, explicit pad or None).

    TF puts the odd pixel at the bottom/right; when that makes the padding asymmetric the
    conv gets padding 0 and the second item is the ZeroPad2d (left, right, top, bottom).
    """
    pads = []
    for n in size:
        out = -(-n // stride)
        total = max((out - 1) * stride + kernel - n, 0)
        pads.append((total // 2, total - total // 2))
    (top, bottom), (left, right) = pads
    if top == bottom and left == right:
        return (top, left), None
    return (0, 0), (left, right, top, bottom)


def sym_same_padding(n: int, kernel: int, stride: int) -> int:
    """Smallest symmetric padding whose output size is ceil(n / stride), as TF "SAME" gives."""
    out = -(-n // stride)
    total = max((out - 1) * stride + kernel - n, 0)
    return (total + 1) // 2


def init_cnn(model: nn.Module) -> None:
    """He-normal convs (as the Keras references), unit BN, PyTorch-default Linear."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Deterministic construction without disturbing the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def count_params(model: nn.Module) -> int:
    """Trainable + frozen parameters (BN running statistics are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters())


def finalize(model: nn.Module, **meta: Any) -> nn.Module:
    """Eval mode (BN uses running stats: what export and the device see) + ``zoo_meta``."""
    model.eval()
    meta.setdefault("params", count_params(model))
    model.zoo_meta = meta  # plain dict attribute: ignored by state_dict and torch.export
    return model


def check_size(size: int | tuple[int, int]) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if h < 1 or w < 1:
        raise ValueError(f"input size must be positive, got {size!r}")
    return h, w

