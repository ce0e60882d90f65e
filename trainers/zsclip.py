"""Zero-shot CLIP baselines: one hand-written template per dataset (``ZeroshotCLIP``) and the
seven-template ImageNet ensemble (``ZeroshotCLIP2``)."""

from __future__ import annotations

import logging
from typing import Callable, List, Optional, Sequence

import torch
from torch import nn

from coop.clip_adapter import tokenize
from coop.clip_trainer import CLIPTrainer
from coop.fast import image_encoder, load_clip_for
from coop.registry import TRAINER_REGISTRY
from coop.trainers.templates import CUSTOM_TEMPLATES, IMAGENET_TEMPLATES_SELECT

logger = logging.getLogger(__name__)


def dataset_template(dataset_name: str) -> str:
    """The dataset's own hand-written template (``{}`` = class name)."""
    # datasets added later without an entry fall back to the generic template
    return CUSTOM_TEMPLATES.get(dataset_name, "a photo of a {}.")


def ensemble_templates(dataset_name: str) -> List[str]:
    """ZeroshotCLIP2's ensemble: the seven selected ImageNet templates, plus the dataset's
    own template for datasets other than ImageNet."""
    templates = list(IMAGENET_TEMPLATES_SELECT)
    if dataset_name != "ImageNet":
        templates.append(dataset_template(dataset_name))
    return templates


def class_text_features(
    clip_model: nn.Module,
    classnames: Sequence[str],
    templates: Sequence[str],
    normalize: bool = True,
    encode: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> torch.Tensor:
    """CLIP's class text features (n_cls, embed_dim) of the prompts ``templates`` (``{}`` =
    class name, "_" read as a space), without gradients, in the model's dtype and on its
    device. ``normalize``: each template's features L2-normalised and the mean of several
    re-normalised (a prompt ensemble); else the plain mean of the unnormalised features.
    ``encode``: token ids (n_cls, 77) on the host -> features (default: the model's own
    ``encode_text`` on its device)."""
    if encode is None:
        device = clip_model.token_embedding.weight.device

        def encode(tokens: torch.Tensor) -> torch.Tensor:
            return clip_model.encode_text(tokens.to(device))

    names = [name.replace("_", " ") for name in classnames]
    if len(templates) == 1:
        logger.info(f"Prompts: {[templates[0].format(name) for name in names]}")
    feats = []
    with torch.no_grad():
        for template in templates:
            features = encode(tokenize([template.format(name) for name in names]))
            feats.append(features / features.norm(dim=-1, keepdim=True) if normalize else features)
    if len(feats) == 1:
        return feats[0]
    # each original's own layout (a reduction over another dimension may round differently):
    # the zero-shot ensemble stacks templates first, PromptSRC's references classes first
    if normalize:
        mean = torch.stack(feats).mean(dim=0)  # (T, n_cls, D) -> (n_cls, D)
        return mean / mean.norm(dim=-1, keepdim=True)
    return torch.stack(feats, dim=1).mean(dim=1)  # (n_cls, T, D) -> (n_cls, D)


@TRAINER_REGISTRY.register()
class ZeroshotCLIP(CLIPTrainer):
    """CLIP with one hand-written prompt per class; nothing is trained."""

    trains = False
    config_dir = "CoOp"  # run with CoOp's YAML files (backbone, test transform)

    def templates(self) -> List[str]:
        return [dataset_template(self.cfg.DATASET.NAME)]

    def build_model(self) -> None:
        cfg = self.cfg
        clip_model = load_clip_for(cfg)  # stays fp16 as built, as in the original
        clip_model.to(self.device)
        for param in clip_model.parameters():
            param.requires_grad_(False)

        self.clip_model = clip_model
        self.text_features = self.encode_templates(self.templates())  # (n_cls, embed_dim)
        self.image_encoder = image_encoder(cfg, clip_model.visual)

    def encode_templates(self, templates: List[str]) -> torch.Tensor:
        """L2-normalised class text features (n_cls, embed_dim) of ``templates`` (``{}`` =
        class name): one template's, or the re-normalised mean of several (an ensemble)."""
        return class_text_features(self.clip_model, self.dm.dataset.classnames, templates)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(images)

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        logit_scale = self.clip_model.logit_scale.exp()
        return logit_scale * features @ self.text_features.t()

    def clip_dtype(self) -> torch.dtype:
        return self.clip_model.dtype

    def image_channels_last(self) -> bool:
        return self.image_encoder.channels_last

    def image_bn_folded(self) -> bool:
        return self.image_encoder.bn_folded

    def model_inference(self, image: torch.Tensor) -> torch.Tensor:
        return self.logits_from_features(self.image_features(image))

    def train(self) -> None:  # nothing to train: evaluate
        logger.info("ZeroshotCLIP has nothing to train; evaluating")
        self.epoch = 0
        self.test()


@TRAINER_REGISTRY.register()
class ZeroshotCLIP2(ZeroshotCLIP):
    """Prompt ensembling: the seven selected ImageNet templates, plus the dataset's own
    template for datasets other than ImageNet; features averaged and re-normalised."""

    def templates(self) -> List[str]:
        return ensemble_templates(self.cfg.DATASET.NAME)
