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

from coop import fast
from coop.clip_adapter import (
    encode_image_deep,
    text_width,
    tokenize,
    vision_width,
)
from coop.clip_trainer import CLIPTrainer
from coop.config import CN, ConfigError
from coop.registry import TRAINER_REGISTRY

logger = logging.getLogger(__name__)


class MultiModalPromptLearner(nn.Module):
    """The text prompts of layers 0..J-1 and the coupling functions that project each into
    the vision prompt of its layer."""

    def __init__(self, cfg, classnames: List[str], clip_model: nn.Module) -> None:
        super().__init__()
        opts = cfg.TRAINER.MAPLE
        n_cls = len(classnames)
        n_ctx = opts.N_CTX
        ctx_init = opts.CTX_INIT
        dtype = clip_model.dtype
        ctx_dim = text_width(clip_model)  # 512 for ViT-B
        vis_dim = vision_width(clip_model)  # 768 for ViT-B
        clip_imsize = clip_model.visual.input_resolution
        if cfg.INPUT.SIZE[0] != clip_imsize:
            raise ValueError(
                f"INPUT.SIZE {tuple(cfg.INPUT.SIZE)} does not match the input resolution "
                f"{clip_imsize} of the CLIP backbone '{cfg.MODEL.BACKBONE.NAME}'; "
                f"set INPUT.SIZE ({clip_imsize}, {clip_imsize})"
            )

        if ctx_init and n_ctx <= 4:
            # the first n_ctx words start the context; the prompt keeps all the words, so
            # with "a photo of a" and 2 tokens "of a" stay fixed tokens before the class name
            ctx_init = ctx_init.replace("_", " ")
            with torch.no_grad():
                embedding = clip_model.token_embedding(tokenize(ctx_init)).type(dtype)
            ctx_vectors = embedding[0, 1 : 1 + n_ctx, :]
            prompt_prefix = ctx_init
        else:
            ctx_vectors = torch.empty(n_ctx, ctx_dim, dtype=dtype)
            nn.init.normal_(ctx_vectors, std=0.02)
            prompt_prefix = " ".join(["X"] * n_ctx)
        logger.info("MaPLe design: Multi-modal Prompt Learning")
        logger.info(f'Initial context: "{prompt_prefix}"')
        logger.info(f"Number of MaPLe context words (tokens): {n_ctx}")

        # layer 0: the coupling function in CLIP's dtype (the original's is always fp16)
        self.proj = nn.Linear(ctx_dim, vis_dim).to(dtype)
        self.ctx = nn.Parameter(ctx_vectors)  # (n_ctx, ctx_dim)
        # layers 1..J-1: fp32 text prompts, and projections that all start from one
        # initialisation
        depth = opts.PROMPT_DEPTH
        self.compound_prompts_text = nn.ParameterList(
            [nn.Parameter(torch.empty(n_ctx, ctx_dim)) for _ in range(depth - 1)]
        )
        for prompt in self.compound_prompts_text:
            nn.init.normal_(prompt, std=0.02)
        single = nn.Linear(ctx_dim, vis_dim)
        self.compound_prompt_projections = nn.ModuleList(
            [copy.deepcopy(single) for _ in range(depth - 1)]
        )

        classnames = [name.replace("_", " ") for name in classnames]
        prompts = [prompt_prefix + " " + name + "." for name in classnames]
        tokenized_prompts = torch.cat([tokenize(p) for p in prompts])  # (n_cls, 77)
        with torch.no_grad():
            embedding = clip_model.token_embedding(tokenized_prompts).type(dtype)
        # saved in checkpoints as in the original, rebuilt from the class names on loading
        self.register_buffer("token_prefix", embedding[:, :1, :])  # SOS
        self.register_buffer("token_suffix", embedding[:, 1 + n_ctx :, :])  # class, EOS
        self.n_cls = n_cls
        self.n_ctx = n_ctx
        self.tokenized_prompts = tokenized_prompts

    def text_prompts(self) -> tuple:
        """``(prompts (n_cls, 77, D), deep)``: [SOS, ctx, suffix] for layer 0 and the text
        prompts of layers 1..J-1."""
        ctx = self.ctx.unsqueeze(0).expand(self.n_cls, -1, -1)
        prompts = torch.cat([self.token_prefix, ctx, self.token_suffix], dim=1)
        return prompts, [None, *self.compound_prompts_text]

    def vision_prompts(self) -> List[torch.Tensor]:
        """The vision prompts of layers 0..J-1: each layer's text prompt, coupled."""
        deeper = [
            p(t) for p, t in zip(self.compound_prompt_projections, self.compound_prompts_text)
        ]
        return [self.proj(self.ctx), *deeper]


class CustomCLIP(nn.Module):
    """CLIP whose two towers take MaPLe's prompts."""

    def __init__(self, cfg, classnames: List[str], clip_model: nn.Module) -> None:
        super().__init__()
        self.prompt_learner = MultiModalPromptLearner(cfg, classnames, clip_model)
        self.tokenized_prompts = self.prompt_learner.tokenized_prompts
        self.image_encoder = clip_model.visual
        self.text_encoder = fast.deep_text_encoder(cfg, clip_model)
        self.logit_scale = clip_model.logit_scale
        self.dtype = clip_model.dtype
        self.text_features = fast.OncePerEvaluation(self.encode_text)

    def encode_text(self) -> torch.Tensor:
        """L2-normalised class text features of the prompts, (n_cls, embed_dim)."""
        prompts, deep = self.prompt_learner.text_prompts()
        features = self.text_encoder(prompts, self.tokenized_prompts, deep)
        return features / features.norm(dim=-1, keepdim=True)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """L2-normalised image features of the prompted image encoder, (B, embed_dim)."""
        deep = self.prompt_learner.vision_prompts()
        features = encode_image_deep(self.image_encoder, image.type(self.dtype), deep)
        return features / features.norm(dim=-1, keepdim=True)

    def logits(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.logit_scale.exp() * image_features @ self.text_features().t()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.logits(self.encode_image(image))  # (B, n_cls)


@TRAINER_REGISTRY.register()
class MaPLe(CLIPTrainer):
    """Multi-modal prompt learning: cross-entropy on the prompted CLIP's logits; the text
    prompts and their coupling functions are trained."""

    image_encoder_frozen = False
    model_name = "MultiModalPromptLearner"
    log_train_accuracy = False  # the original logs the loss only
    # the class-name token buffers, rebuilt from the current class names (the original's
    # load_model drops them)
    derived_state_keys = ("prompt_learner.token_prefix", "prompt_learner.token_suffix")
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

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.logits(features)

    def evaluation_scope(self):
        return self.model.text_features.frozen()  # the original recomputes them per batch
