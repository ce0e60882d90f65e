"""CoCoOp: conditional prompt learning for CLIP (Zhou et al., CVPR 2022).

CoOp's learnable context plus a small meta-net that turns each image's features into a bias
added to every context token, so each image gets its own prompts. Both CLIP encoders stay
frozen; the context and the meta-net are trained. The class token is always at the end.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import List

import torch
from torch import nn

from coop import fast
from coop.clip_trainer import CLIPTrainer
from coop.config import CN, ConfigError
from coop.registry import TRAINER_REGISTRY
from coop.trainers.coop import PromptLearner as CoOpPromptLearner
from coop.trainers.coop import check_context_fits, context_tokens

logger = logging.getLogger(__name__)


class PromptLearner(CoOpPromptLearner):
    """CoOp's generic context and class-name prompts, and the meta-net."""

    def __init__(self, cfg, classnames: List[str], clip_model: nn.Module) -> None:
        opts = cfg.TRAINER.COCOOP
        super().__init__(cfg, classnames, clip_model, opts)  # draws the context first
        vis_dim = clip_model.visual.output_dim
        ctx_dim = clip_model.ln_final.weight.shape[0]
        self.meta_net = nn.Sequential(
            OrderedDict(
                [
                    ("linear1", nn.Linear(vis_dim, vis_dim // 16)),
                    ("relu", nn.ReLU(inplace=True)),
                    ("linear2", nn.Linear(vis_dim // 16, ctx_dim)),
                ]
            )
        )
        if opts.PREC == "fp16":
            self.meta_net.half()

    def instance_context(self, im_features: torch.Tensor) -> torch.Tensor:
        """Each image's context, (B, n_ctx, D): the learned context shifted by the meta-net's
        bias of the image's (L2-normalised) features, the same bias on every token."""
        bias = self.meta_net(im_features).unsqueeze(1)  # (B, 1, D)
        return self.ctx.unsqueeze(0) + bias

    def prompts_for(self, ctx: torch.Tensor) -> torch.Tensor:
        """The class prompts of each context: (B, n_ctx, D) -> (B, n_cls, 77, D), the class
        name at the end."""
        b = ctx.shape[0]
        prefix = self.token_prefix.unsqueeze(0).expand(b, -1, -1, -1)  # SOS
        suffix = self.token_suffix.unsqueeze(0).expand(b, -1, -1, -1)  # class, ".", EOS
        ctx = ctx.unsqueeze(1).expand(-1, self.n_cls, -1, -1)
        return torch.cat([prefix, ctx, suffix], dim=2)

    def forward(self, im_features: torch.Tensor) -> torch.Tensor:
        """The prompts of each image, (B, n_cls, 77, D)."""
        return self.prompts_for(self.instance_context(im_features))


class CustomCLIP(nn.Module):
    """CLIP whose class prompts are conditioned on the image."""

    def __init__(self, cfg, classnames: List[str], clip_model: nn.Module) -> None:
        super().__init__()
        self.prompt_learner = PromptLearner(cfg, classnames, clip_model)
        self.image_encoder = fast.image_encoder(cfg, clip_model.visual, cfg.TRAINER.COCOOP.PREC)
        self.text_encoder = fast.instance_text_encoder(cfg, clip_model, self.prompt_learner)
        self.logit_scale = clip_model.logit_scale
        self.dtype = clip_model.dtype

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """L2-normalised image features of the frozen encoder, (B, embed_dim)."""
        return self.image_encoder(image)

    def logits(self, image_features: torch.Tensor) -> torch.Tensor:
        ctx = self.prompt_learner.instance_context(image_features)  # (B, n_ctx, D)
        text_features = self.text_encoder(ctx)  # (B, n_cls, embed_dim)
        logit_scale = self.logit_scale.exp()
        # each image against its own class features; the scale first, as in the original
        logits = [logit_scale * f @ t.t() for f, t in zip(image_features, text_features)]
        return torch.stack(logits)  # (B, n_cls)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.logits(self.encode_image(image))

    @property
    def channels_last(self) -> bool:
        return self.image_encoder.channels_last

    @property
    def bn_folded(self) -> bool:
        return self.image_encoder.bn_folded


@TRAINER_REGISTRY.register()
class CoCoOp(CLIPTrainer):
    """Conditional Context Optimization: cross-entropy on the logits of image-conditioned
    prompts; the context and the meta-net (the prompt learner) trained."""

    # scripts/cocoop/*.sh: base-to-new and cross-dataset (ImageNet) training, 16 shots,
    # the default folders and arguments (xd_test.sh also on the domain-generalisation
    # targets); no few-shot script
    protocol_configs = {
        "base2new": "vit_b16_c4_ep10_batch1_ctxv1",
        "xd": "vit_b16_c4_ep10_batch1_ctxv1",
    }
    derived_state_keys = ("token_prefix", "token_suffix")  # the original's checkpoints hold them
    log_train_accuracy = False  # the original logs the loss only

    @classmethod
    def add_config(cls, cfg) -> None:
        cfg.TRAINER.COCOOP = CN()
        cfg.TRAINER.COCOOP.N_CTX = 16  # number of context vectors
        cfg.TRAINER.COCOOP.CTX_INIT = ""  # initialisation words ("" = random)
        cfg.TRAINER.COCOOP.PREC = "fp16"  # fp16, fp32, amp (and our bf16)

    @classmethod
    def check_cfg(cls, cfg) -> None:
        super().check_cfg(cfg)
        opts = cfg.TRAINER.COCOOP
        if opts.N_CTX < 1 and not opts.CTX_INIT:
            raise ConfigError(f"TRAINER.COCOOP.N_CTX must be at least 1, got {opts.N_CTX}")

    def build_custom_clip(self, clip_model: nn.Module) -> nn.Module:
        return CustomCLIP(self.cfg, self.dm.dataset.classnames, clip_model)

    def after_model_built(self) -> None:
        self.model.text_encoder.log_setup(self.device)

    def check_checkpoint(self, state_dict, path: str) -> None:
        """The learned context must fit the number of context tokens and (for a named
        backbone) the text width."""
        check_context_fits(self, state_dict, path, context_tokens(self.cfg.TRAINER.COCOOP))

    def model_description(self) -> str:
        return (
            f"{self.num_classes} classes, N_CTX {self.model.prompt_learner.n_ctx}, "
            f"backbone {self.cfg.MODEL.BACKBONE.NAME}"
        )
