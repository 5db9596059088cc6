"""The seed's cropped-VGG small CNN for CIFAR-sized images, split into layer groups for fastai."""

from __future__ import annotations

from collections.abc import Sequence

from fastai.torch_core import params
from torch import nn

__all__ = ["small_cnn", "small_cnn_splitter"]


def _vgg_block(in_ch: int, out_ch: int, bn: bool, n_convs: int = 2) -> nn.Sequential:
    """`n_convs` 3x3 convs (+BN) + ReLU, then a 2x2 max-pool that halves the spatial size."""
    layers: list[nn.Module] = []
    for c_in in (in_ch, *[out_ch] * (n_convs - 1)):
        # the conv bias is redundant right before BatchNorm
        layers.append(nn.Conv2d(c_in, out_ch, 3, padding=1, bias=not bn))
        if bn:
            layers.append(nn.BatchNorm2d(out_ch))
        layers.append(nn.ReLU(inplace=True))
    layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


def small_cnn(n_classes: int, channels: Sequence[int] = (64, 128), fc: Sequence[int] = (1024,),
              dropout: float = 0.0, in_ch: int = 3, size: int = 32, bn: bool = True,
              convs_per_block: int = 2) -> nn.Sequential:
    """Cropped VGG: one block per entry of `channels`, then `fc` hidden layers, then the classifier.

    Returns ``nn.Sequential(body, head)``:

    - ``body[i]`` = `convs_per_block` x (conv3x3(channels[i]) [+BN] + ReLU), then maxpool 2x2.
    - ``head`` = adaptive max-pool to ``size // 2**len(channels)`` pixels (the identity at the design
      input ``size``; it lets larger images through without changing the FC sizes), flatten, then for
      each entry of ``fc``: Linear + ReLU (+ Dropout(dropout) when dropout > 0), then Linear(n_classes).

    Dropout is applied after every hidden FC layer, as in the seed's Keras model.

    The seed's networks are ``convs_per_block=1, bn=False`` (one conv per block, no BatchNorm; with
    ``channels=(64, 128)`` that is its two conv layers). The defaults (two convs per block, BatchNorm,
    conv bias dropped before BN) are VGG's own block and train faster and further on CIFAR-10.
    """
    channels, fc = tuple(int(c) for c in channels), tuple(int(f) for f in fc)
    if n_classes < 1:
        raise ValueError(f"n_classes={n_classes}: need at least 1 class")
    if not channels or min(channels) < 1:
        raise ValueError(f"channels={channels}: give one or more positive feature-map counts, e.g. (64, 128)")
    if fc and min(fc) < 1:
        raise ValueError(f"fc={fc}: FC sizes must be positive, e.g. (1024,) or () for none")
    if isinstance(convs_per_block, bool) or not isinstance(convs_per_block, int) or convs_per_block < 1:
        raise ValueError(f"convs_per_block={convs_per_block!r}: need an integer >= 1 "
                         f"(1 = the seed's cropped VGG, 2 = VGG's block)")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout={dropout}: must be in [0, 1)")
    side = size // 2 ** len(channels)
    if side < 1:
        raise ValueError(f"size={size} px is too small for {len(channels)} max-pool blocks; "
                         f"use fewer channels entries or size >= {2 ** len(channels)}")

    blocks, c_in = [], in_ch
    for c in channels:
        blocks.append(_vgg_block(c_in, c, bn, convs_per_block))
        c_in = c
    head: list[nn.Module] = [nn.AdaptiveMaxPool2d(side), nn.Flatten()]
    n_in = c_in * side * side
    for n_out in fc:
        head += [nn.Linear(n_in, n_out), nn.ReLU(inplace=True)]
        if dropout > 0:
            head.append(nn.Dropout(dropout))
        n_in = n_out
    head.append(nn.Linear(n_in, n_classes))
    return nn.Sequential(nn.Sequential(*blocks), nn.Sequential(*head))


def small_cnn_splitter(model: nn.Module) -> list:
    """fastai splitter for `small_cnn`: one group per conv block, then the FC head (last group)."""
    body, head = model[0], model[1]
    return [params(block) for block in body] + [params(head)]
