"""Zero-shot CLIP baselines: one hand-written template per dataset (``ZeroshotCLIP``) and the
seven-template ImageNet ensemble (``ZeroshotCLIP2``)."""

from __future__ import annotations

import logging
from typing import List

import torch

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


@TRAINER_REGISTRY.register()
class ZeroshotCLIP(CLIPTrainer):
    """CLIP with one hand-written prompt per class; nothing is trained."""

    trains = False
    config_dir = "CoOp"  # run with CoOp's YAML files (backbone, test transform)

    def templates(self) -> List[str]:
        return [dataset_template(self.cfg.DATASET.NAME)]

    def build_model(self) -> None:
        cfg = self.cfg
        classnames = self.dm.dataset.classnames
        clip_model = load_clip_for(cfg)  # stays fp16 as built, as in the original
        clip_model.to(self.device)
        for param in clip_model.parameters():
            param.requires_grad_(False)

        self.clip_model = clip_model
        templates = self.templates()
        if len(templates) == 1:
            prompts = [templates[0].format(c.replace("_", " ")) for c in classnames]
            logger.info(f"Prompts: {prompts}")
        text_features = self.encode_templates(templates)
        self.text_features = text_features  # (n_cls, embed_dim)
        self.image_encoder = image_encoder(cfg, clip_model.visual)

    def encode_templates(self, templates: List[str]) -> torch.Tensor:
        """L2-normalised class text features (n_cls, embed_dim) of ``templates`` (``{}`` =
        class name): one template's, or the re-normalised mean of several (an ensemble)."""
        classnames = self.dm.dataset.classnames
        feats = []
        with torch.no_grad():
            for template in templates:
                prompts = [template.format(c.replace("_", " ")) for c in classnames]
                tokens = tokenize(prompts).to(self.device)
                text_features = self.clip_model.encode_text(tokens)
                feats.append(text_features / text_features.norm(dim=-1, keepdim=True))
        if len(feats) == 1:
            return feats[0]
        text_features = torch.stack(feats).mean(dim=0)
        return text_features / text_features.norm(dim=-1, keepdim=True)

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
