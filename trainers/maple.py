"""MaPLe: multi-modal prompt learning (Khattak et al., CVPR 2023).

Learnable prompt tokens enter both CLIP towers at layers 0..J-1 (J = ``PROMPT_DEPTH``). The
text prompts are learned; each vision prompt is a linear function of the text prompt of its
layer (the coupling function), so the two towers' prompts are learned together. The image
encoder therefore changes during training: no cached image features are used. The whole
CustomCLIP is registered (its checkpoints hold CLIP too), as in the original.
"""

from __future__ import annotations

import copy
import logging
from typing import List

import torch
from torch import nn

from coop.clip_adapter import text_width, vision_width
from coop.config import CN, ConfigError
from coop.deep_prompts import DeepPromptCLIP, DeepPromptTrainer, TextContextLearner
from coop.registry import TRAINER_REGISTRY

logger = logging.getLogger(__name__)


class MultiModalPromptLearner(TextContextLearner):
    """The text prompts of layers 0..J-1 and the coupling functions that project each into
    the vision prompt of its layer."""

    def __init__(self, cfg, classnames: List[str], clip_model: nn.Module) -> None:
        opts = cfg.TRAINER.MAPLE
        super().__init__(cfg, classnames, clip_model, opts.N_CTX, opts.CTX_INIT)
        dtype = clip_model.dtype
        ctx_dim = text_width(clip_model)  # 512 for ViT-B
        vis_dim = vision_width(clip_model)  # 768 for ViT-B
        logger.info("MaPLe design: Multi-modal Prompt Learning")
        logger.info(f'Initial context: "{self.prompt_prefix}"')
        logger.info(f"Number of MaPLe context words (tokens): {self.n_ctx}")

        # layer 0: the coupling function in CLIP's dtype (the original's is always fp16)
        self.proj = nn.Linear(ctx_dim, vis_dim).to(dtype)
        # layers 1..J-1: fp32 text prompts, and projections that all start from one
        # initialisation
        depth = opts.PROMPT_DEPTH
        self.compound_prompts_text = nn.ParameterList(
            [nn.Parameter(torch.empty(self.n_ctx, ctx_dim)) for _ in range(depth - 1)]
        )
        for prompt in self.compound_prompts_text:
            nn.init.normal_(prompt, std=0.02)
        single = nn.Linear(ctx_dim, vis_dim)
        self.compound_prompt_projections = nn.ModuleList(
            [copy.deepcopy(single) for _ in range(depth - 1)]
        )

    def text_prompts(self) -> tuple:
        """``(prompts (n_cls, 77, D), deep)``: [SOS, ctx, suffix] for layer 0 and the text
        prompts of layers 1..J-1."""
        return self(), [None, *self.compound_prompts_text]

    def vision_prompts(self) -> List[torch.Tensor]:
        """The vision prompts of layers 0..J-1: each layer's text prompt, coupled."""
        deeper = [
            p(t) for p, t in zip(self.compound_prompt_projections, self.compound_prompts_text)
        ]
        return [self.proj(self.ctx), *deeper]


class CustomCLIP(DeepPromptCLIP):
    """CLIP whose two towers take MaPLe's prompts."""

    def __init__(self, cfg, classnames: List[str], clip_model: nn.Module) -> None:
        super().__init__(cfg, clip_model, MultiModalPromptLearner(cfg, classnames, clip_model))


@TRAINER_REGISTRY.register()
class MaPLe(DeepPromptTrainer):
    """Multi-modal prompt learning: cross-entropy on the prompted CLIP's logits; the text
    prompts and their coupling functions are trained."""

    model_name = "MultiModalPromptLearner"
    # scripts/maple/: base2new_{train,test}_maple.sh, xd_{train,test}_maple.sh (also the
    # domain-generalisation targets), with CoCoOp's folders and arguments; no few-shot script
    protocol_configs = {
        "base2new": "vit_b16_c2_ep5_batch4_2ctx",
        "xd": "vit_b16_c2_ep5_batch4_2ctx_cross_datasets",
    }

    @classmethod
    def add_config(cls, cfg) -> None:
        cfg.TRAINER.MAPLE = CN()
        cfg.TRAINER.MAPLE.N_CTX = 2  # prompt tokens per layer, both towers
        cfg.TRAINER.MAPLE.CTX_INIT = "a photo of a"  # used when N_CTX <= 4
        cfg.TRAINER.MAPLE.PREC = "fp16"  # fp16, fp32, amp (and our bf16)
        cfg.TRAINER.MAPLE.PROMPT_DEPTH = 9  # layers with prompts, counting layer 0

    @classmethod
    def check_cfg(cls, cfg) -> None:
        super().check_cfg(cfg)
        opts = cfg.TRAINER.MAPLE
        if opts.PROMPT_DEPTH < 1:
            raise ConfigError(f"TRAINER.MAPLE.PROMPT_DEPTH must be >= 1, got {opts.PROMPT_DEPTH}")
        if opts.N_CTX < 1:
            raise ConfigError(f"TRAINER.MAPLE.N_CTX must be >= 1, got {opts.N_CTX}")

    def build_custom_clip(self, clip_model: nn.Module) -> nn.Module:
        return CustomCLIP(self.cfg, self.dm.dataset.classnames, clip_model)

    def is_learnable(self, name: str) -> bool:
        return "prompt_learner" in name or "VPT" in name
