"""The frozen CLIP image encoder on the fast path: batch norms folded into the convolutions
(``FAST.FOLD_BN``), channels-last memory format (``FAST.CHANNELS_LAST``) and, opt-in, CUDA
graphs (``FAST.CUDA_GRAPHS``), behind :class:`ImageEncoder`."""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn

from coop.clip_adapter import image_dtype
from coop.fast.cuda_graphs import GraphedImageEncoder


def use_channels_last(visual: nn.Module) -> bool:
    """Store a convolutional (ModifiedResNet) image encoder's weights in channels-last
    memory format, which convolution kernels on CPUs and GPUs run faster; returns whether
    it did. Inputs must then be made channels-last too (:func:`channels_last_input`).
    Vision transformers (one patch convolution) are left as they are."""
    if not hasattr(visual, "attnpool"):
        return False
    visual.to(memory_format=torch.channels_last)
    return True


def _conv_bn_pairs(visual: nn.Module) -> List[Tuple[nn.Module, str, nn.Conv2d, nn.BatchNorm2d]]:
    """Every (parent, name of the norm, convolution, batch norm right after it) of a
    ModifiedResNet: the stem's and each bottleneck's ``conv{i}``/``bn{i}`` and the
    downsampling ``Sequential(AvgPool2d, Conv2d, BatchNorm2d)``."""
    pairs = []
    for module in visual.modules():
        for i in (1, 2, 3):
            conv, bn = getattr(module, f"conv{i}", None), getattr(module, f"bn{i}", None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                pairs.append((module, f"bn{i}", conv, bn))
        if isinstance(module, nn.Sequential):  # its children are named "-1", "0", "1"
            children = list(module.named_children())
            for (_, conv), (name, bn) in zip(children, children[1:]):
                if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                    pairs.append((module, name, conv, bn))
    return pairs


def fold_batch_norms(visual: nn.Module) -> bool:
    """Fold the batch norms of a frozen ResNet image encoder in eval mode into the
    convolutions before them (in place): ``bn(conv(x)) = conv'(x)`` with the weights scaled
    by ``gamma / sqrt(var + eps)`` and a bias ``beta - mean * gamma / sqrt(var + eps)``
    (computed in float64, stored in the weights' dtype), the norms replaced by identities.
    The same features up to float rounding, without the norms' passes over every activation.
    Returns whether it folded; vision transformers, and encoders with a norm in training mode
    or one that does not follow a convolution, are left as they are."""
    if not hasattr(visual, "attnpool"):
        return False
    pairs = _conv_bn_pairs(visual)
    norms = [m for m in visual.modules() if isinstance(m, nn.BatchNorm2d)]
    if not pairs or len(pairs) != len(norms):
        return False
    if any(bn.training or bn.running_var is None or conv.groups != 1 for _, _, conv, bn in pairs):
        return False
    with torch.no_grad():
        for parent, name, conv, bn in pairs:
            scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
            shift = bn.bias.double() - bn.running_mean.double() * scale
            if conv.bias is not None:
                shift = shift + conv.bias.double() * scale
            weight = conv.weight.double() * scale.view(-1, 1, 1, 1)
            conv.weight = nn.Parameter(weight.to(conv.weight.dtype), requires_grad=False)
            conv.bias = nn.Parameter(shift.to(conv.weight.dtype), requires_grad=False)
            setattr(parent, name, nn.Identity())
    if any(isinstance(m, nn.BatchNorm2d) for m in visual.modules()):
        raise RuntimeError("fold_batch_norms left a batch norm in place")  # never expected
    return True


def channels_last_input(images: torch.Tensor) -> torch.Tensor:
    """A batch of images (B, C, H, W) in channels-last memory format (other shapes as given)."""
    return images.contiguous(memory_format=torch.channels_last) if images.dim() == 4 else images


class ImageEncoder(nn.Module):
    """A frozen CLIP image encoder: ``forward(images (B, 3, H, W)) -> (B, embed_dim)``
    L2-normalised features (``normalize=False``: the encoder's raw output), computed in the
    encoder's dtype.

    ``fold_bn`` and ``channels_last`` rewrite a ResNet encoder in place (a vision transformer
    is left as it is); ``bn_folded`` and ``channels_last`` say what was done (they change float
    rounding, so the feature caches' keys include them). With ``cuda_graphs`` the forward on
    a CUDA device outside autocast is replayed from a CUDA graph per batch shape.
    """

    def __init__(
        self,
        visual: nn.Module,
        fold_bn: bool = False,
        channels_last: bool = False,
        cuda_graphs: bool = False,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        self.visual = visual
        self.normalize = normalize
        self.dtype = image_dtype(visual)
        self.bn_folded = bool(fold_bn and fold_batch_norms(visual))  # before channels-last
        self.channels_last = bool(channels_last and use_channels_last(visual))
        self.cuda_graphs = cuda_graphs
        self._graphed: Optional[GraphedImageEncoder] = None

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        image = image.type(self.dtype)
        if self.channels_last:
            image = channels_last_input(image)
        if self.cuda_graphs and image.is_cuda and not torch.is_autocast_enabled():
            if self._graphed is None:
                self._graphed = GraphedImageEncoder(self._features)
            return self._graphed(image)
        return self._features(image)

    def _features(self, image: torch.Tensor) -> torch.Tensor:
        image_features = self.visual(image)  # (B, embed_dim)
        if not self.normalize:
            return image_features
        return image_features / image_features.norm(dim=-1, keepdim=True)
