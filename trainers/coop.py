"""CoOp: learnable prompt context for CLIP (Zhou et al., IJCV 2022).

Only the context vectors are trained; both CLIP encoders stay frozen (and in eval mode).
The model follows the original construction step by step, including the order in which it
draws random numbers, so a seeded run reproduces the original trajectory.
"""

from __future__ import annotations

import logging
from typing import ContextManager, List, Optional, Tuple

import torch
from torch import nn

from coop import fast
from coop.clip_adapter import token_length, tokenize
from coop.clip_trainer import CLIPTrainer, check_input_size
from coop.config import CN, ConfigError
from coop.io import CheckpointError
from coop.registry import TRAINER_REGISTRY
from coop.validation import BACKBONE_CTX_DIM

logger = logging.getLogger(__name__)

POSITIONS = ("end", "middle", "front")


class PromptLearner(nn.Module):
    """The learnable context and the fixed token embeddings of the class-name prompts."""

    def __init__(
        self, cfg, classnames: List[str], clip_model: nn.Module, opts: Optional[CN] = None
    ) -> None:
        """``opts``: the method's config node (default ``TRAINER.COOP``); a node without
        ``CSC`` / ``CLASS_TOKEN_POSITION`` gets a generic context with the class at the end."""
        super().__init__()
        opts = cfg.TRAINER.COOP if opts is None else opts
        self.opts = opts
        n_cls = len(classnames)
        dtype = clip_model.dtype
        check_input_size(cfg, clip_model)

        ctx_vectors, prompt_prefix = self.init_context(cfg, n_cls, clip_model)
        n_ctx = ctx_vectors.shape[-2]

        logger.info(f'Initial context: "{prompt_prefix}"')
        logger.info(f"Number of context words (tokens): {n_ctx}")

        self.ctx = nn.Parameter(ctx_vectors)  # (n_ctx, D) or (n_cls, n_ctx, D)

        classnames = [name.replace("_", " ") for name in classnames]
        name_lens = [token_length(name) for name in classnames]
        prompts = [prompt_prefix + " " + name + "." for name in classnames]
        tokenized_prompts = torch.cat([tokenize(p) for p in prompts])  # (n_cls, 77)
        with torch.no_grad():
            embedding = clip_model.token_embedding(tokenized_prompts).type(dtype)

        # Derived from the class names: rebuilt at construction, not stored in checkpoints.
        self.register_buffer("token_prefix", embedding[:, :1, :], persistent=False)  # SOS
        self.register_buffer(
            "token_suffix", embedding[:, 1 + n_ctx :, :], persistent=False
        )  # CLS, EOS
        self.n_cls = n_cls
        self.n_ctx = n_ctx
        self.tokenized_prompts = tokenized_prompts
        self.name_lens = name_lens
        self.class_token_position = opts.get("CLASS_TOKEN_POSITION", "end")

    def init_context(self, cfg, n_cls: int, clip_model: nn.Module) -> Tuple[torch.Tensor, str]:
        """The initial context, (n_ctx, D) or (n_cls, n_ctx, D), and the text that holds its
        place in the tokenized prompts."""
        opts = self.opts
        csc = bool(opts.get("CSC", False))
        if opts.CTX_INIT:
            ctx_vectors, prompt_prefix = self.context_from_words(opts.CTX_INIT, clip_model)
            if csc:
                # class-specific contexts, each starting from the same words (the original
                # silently fell back to one generic context here)
                logger.info("Initializing class-specific contexts from the given words")
                ctx_vectors = ctx_vectors.unsqueeze(0).repeat(n_cls, 1, 1).clone()
            return ctx_vectors, prompt_prefix
        dtype = clip_model.dtype
        ctx_dim = clip_model.ln_final.weight.shape[0]
        if csc:
            logger.info("Initializing class-specific contexts")
            ctx_vectors = torch.empty(n_cls, opts.N_CTX, ctx_dim, dtype=dtype)
        else:
            logger.info("Initializing a generic context")
            ctx_vectors = torch.empty(opts.N_CTX, ctx_dim, dtype=dtype)
        nn.init.normal_(ctx_vectors, std=0.02)
        return ctx_vectors, " ".join(["X"] * opts.N_CTX)

    @staticmethod
    def context_from_words(words: str, clip_model: nn.Module) -> Tuple[torch.Tensor, str]:
        """A generic context initialised from the word embeddings of ``words`` (one vector
        per space-separated word), (n_words, D), and the words as the prompt text."""
        words = words.replace("_", " ")
        n_ctx = len(words.split(" "))
        with torch.no_grad():
            embedding = clip_model.token_embedding(tokenize(words)).type(clip_model.dtype)
        return embedding[0, 1 : 1 + n_ctx, :], words

    def forward(self, ctx: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Prompt embeddings, (n_cls, 77, ctx_dim), of the context ``ctx`` (default: the
        learnable context itself)."""
        ctx = self.ctx if ctx is None else ctx
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(self.n_cls, -1, -1)
        prefix = self.token_prefix
        suffix = self.token_suffix

        if self.class_token_position == "end":
            return torch.cat([prefix, ctx, suffix], dim=1)

        if self.class_token_position == "middle":
            half_n_ctx = self.n_ctx // 2
            prompts = []
            for i in range(self.n_cls):
                name_len = self.name_lens[i]
                prompts.append(
                    torch.cat(
                        [
                            prefix[i : i + 1, :, :],
                            ctx[i : i + 1, :half_n_ctx, :],
                            suffix[i : i + 1, :name_len, :],
                            ctx[i : i + 1, half_n_ctx:, :],
                            suffix[i : i + 1, name_len:, :],
                        ],
                        dim=1,
                    )
                )
            return torch.cat(prompts, dim=0)

        if self.class_token_position == "front":
            prompts = []
            for i in range(self.n_cls):
                name_len = self.name_lens[i]
                prompts.append(
                    torch.cat(
                        [
                            prefix[i : i + 1, :, :],
                            suffix[i : i + 1, :name_len, :],
                            ctx[i : i + 1, :, :],
                            suffix[i : i + 1, name_len:, :],
                        ],
                        dim=1,
                    )
                )
            return torch.cat(prompts, dim=0)

        raise ValueError(
            f"TRAINER.COOP.CLASS_TOKEN_POSITION must be one of {POSITIONS}, "
            f"got '{self.class_token_position}'"
        )


class CustomCLIP(nn.Module):
    """CLIP with CoOp's prompt learner on the text side."""

    prompt_learner_class = PromptLearner  # a sibling method's own learner

    def __init__(self, cfg, classnames: List[str], clip_model: nn.Module) -> None:
        super().__init__()
        prec = cfg.TRAINER.COOP.PREC
        self.prompt_learner = self.prompt_learner_class(cfg, classnames, clip_model)
        self.image_encoder = fast.image_encoder(cfg, clip_model.visual, prec)
        self.text_encoder = fast.prompt_text_encoder(cfg, clip_model, self.prompt_learner, prec)
        self.logit_scale = clip_model.logit_scale
        self.dtype = clip_model.dtype

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """L2-normalised image features of the frozen encoder, (B, embed_dim)."""
        return self.image_encoder(image)

    def text_features(self) -> torch.Tensor:
        """L2-normalised class text features of the learned context, (n_cls, embed_dim)."""
        return self.text_encoder()

    def logits(
        self, image_features: torch.Tensor, text_features: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Logits of the image features against the class text features (default: those of
        the current context)."""
        if text_features is None:
            text_features = self.text_features()
        logit_scale = self.logit_scale.exp()
        # the scale multiplies the image features before the matmul, as in the original
        return logit_scale * image_features @ text_features.t()  # (B, n_cls)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.logits(self.encode_image(image))

    # what the trainer reads of the speed paths
    @property
    def text_mode(self) -> str:
        return self.text_encoder.text_mode

    @property
    def channels_last(self) -> bool:
        return self.image_encoder.channels_last

    @property
    def bn_folded(self) -> bool:
        return self.image_encoder.bn_folded

    def frozen_text_features(self) -> ContextManager[None]:
        """Compute the class text features once and reuse them for every batch inside."""
        return self.text_encoder.frozen()


@TRAINER_REGISTRY.register()
class CoOp(CLIPTrainer):
    """Context Optimization (CoOp): cross-entropy on CLIP's logits, the prompt learner
    trained alone."""

    derived_state_keys = ("token_prefix", "token_suffix")  # the original's checkpoints hold them

    # the paper's schedule (COOP.md): 1 shot 50 epochs, 2 and 4 shots 100, 8 and 16 shots
    # 200, ImageNet 50; base-to-new and cross-dataset as CoCoOp's scripts run CoOp; domain
    # generalisation as eval.sh (the 16-shot ImageNet runs of main.sh)
    protocol_configs = {
        "fewshot": "rn50",
        "fewshot.1shots": "rn50_ep50",
        "fewshot.2shots": "rn50_ep100",
        "fewshot.4shots": "rn50_ep100",
        "fewshot.imagenet": "rn50_ep50",
        "base2new": "vit_b16_ctxv1",
        "base2new.imagenet": "vit_b16_ep50_ctxv1",
        "xd": "vit_b16_ep50_ctxv1",
        "dg": "rn50_ep50",
    }
    # eval.sh: the model of main.sh's ImageNet folder, evaluated into evaluation/...
    protocol_dirs = {
        "dg_train": "{dataset}/{trainer}/{cfg}_{shots}shots/"
        "nctx{N_CTX}_csc{CSC}_ctp{CLASS_TOKEN_POSITION}/seed{seed}",
        "dg_test": "evaluation/{trainer}/{cfg}_{shots}shots/"
        "nctx{N_CTX}_csc{CSC}_ctp{CLASS_TOKEN_POSITION}/{dataset}/seed{seed}",
    }

    @classmethod
    def add_config(cls, cfg) -> None:
        # sibling methods read this node too and add their keys to it: only what is missing
        # is added, whichever method's hook runs first
        if "COOP" not in cfg.TRAINER:
            cfg.TRAINER.COOP = CN()
        defaults = {
            "N_CTX": 16,  # number of context vectors
            "CSC": False,  # class-specific context
            "CTX_INIT": "",  # initialisation words ("" = random)
            "PREC": "fp16",  # fp16, fp32, amp (and our bf16)
            "CLASS_TOKEN_POSITION": "end",  # end, middle or front
        }
        for key, value in defaults.items():
            cfg.TRAINER.COOP.setdefault(key, value)

    @classmethod
    def check_cfg(cls, cfg) -> None:
        super().check_cfg(cfg)
        opts = cfg.TRAINER.COOP
        if opts.CLASS_TOKEN_POSITION not in POSITIONS:
            raise ConfigError(
                f"TRAINER.COOP.CLASS_TOKEN_POSITION must be one of {POSITIONS}, "
                f"got '{opts.CLASS_TOKEN_POSITION}'"
            )
        if opts.N_CTX < 1 and not opts.CTX_INIT:
            raise ConfigError(f"TRAINER.COOP.N_CTX must be at least 1, got {opts.N_CTX}")

    def build_custom_clip(self, clip_model: nn.Module) -> nn.Module:
        return CustomCLIP(self.cfg, self.dm.dataset.classnames, clip_model)

    def after_model_built(self) -> None:
        self.model.text_encoder.log_setup(self.device)

    def evaluation_scope(self):
        return self.model.frozen_text_features()  # the original recomputes them per batch

    def check_checkpoint(self, state_dict, path: str) -> None:
        """The learned context must fit the class count, the number of context tokens, CSC
        and (for a named backbone) the text width."""
        n_ctx, csc = self.context_layout(self.cfg)
        check_context_fits(self, state_dict, path, n_ctx, csc)

    @classmethod
    def context_layout(cls, cfg) -> Tuple[int, bool]:
        """(number of context vectors, class-specific) of the context the config builds."""
        return context_tokens(cfg.TRAINER.COOP), bool(cfg.TRAINER.COOP.CSC)

    def prepare_loaded_state_dict(self, name, state_dict, path):
        state_dict = dict(state_dict)
        own = self._models[name].state_dict()
        ctx = state_dict.get("ctx")
        if ctx is not None and ctx.dim() == 2 and own["ctx"].dim() == 3:
            if tuple(ctx.shape) == tuple(own["ctx"].shape[1:]):
                # a generic context (e.g. the original's CSC + CTX_INIT runs) shared by all
                # classes gives the same logits as that generic model
                logger.info(f"Using the generic context of {path} for every class")
                state_dict["ctx"] = ctx.unsqueeze(0).expand_as(own["ctx"]).clone()
        return super().prepare_loaded_state_dict(name, state_dict, path)

    def model_description(self) -> str:
        return (
            f"{self.num_classes} classes, N_CTX {self.model.prompt_learner.n_ctx}, "
            f"CSC {self.cfg.TRAINER.COOP.CSC}, backbone {self.cfg.MODEL.BACKBONE.NAME}"
        )


def context_tokens(opts: CN) -> int:
    """The number of context tokens a config node asks for: the words of ``CTX_INIT``,
    else ``N_CTX``."""
    ctx_init = str(opts.CTX_INIT).replace("_", " ")
    return len(ctx_init.split(" ")) if ctx_init else int(opts.N_CTX)


def check_context_fits(
    trainer: CLIPTrainer, state_dict, path: str, n_ctx: int, csc: Optional[bool] = None
) -> None:
    """Stop with a :class:`CheckpointError` when the checkpoint's ``ctx`` cannot fit a
    context of ``n_ctx`` tokens (class-specific if ``csc``; None: the method has no such
    option) for the trainer's classes and (for a named backbone) text width; called before
    CLIP is loaded."""
    ctx = state_dict.get("ctx")
    if not isinstance(ctx, torch.Tensor) or ctx.dim() not in (2, 3):
        return
    backbone = trainer.cfg.MODEL.BACKBONE.NAME
    dim = BACKBONE_CTX_DIM.get(backbone, int(ctx.shape[-1]))
    expected = (trainer.num_classes, n_ctx, dim) if csc else (n_ctx, dim)
    got = tuple(ctx.shape)
    if got == expected or (csc and got == expected[1:]):  # a generic context fits CSC
        return
    settings = f"N_CTX {n_ctx}" if csc is None else f"N_CTX {n_ctx}, CSC {csc}"
    raise CheckpointError(
        f"The checkpoint {path} does not fit this model: 'ctx' has shape {got} there "
        f"but {expected} here ({trainer.num_classes} classes, {settings}, "
        f"backbone {backbone})"
    )
