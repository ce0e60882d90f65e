"""What methods with learnable prompts inside both CLIP towers share.

- :class:`TextContextLearner`: the learnable text context of layer 0 and the fixed token
  embeddings of the class prompts "<context words> <class name>.", built as the deep-prompt
  originals build them (a method's learner subclasses it and adds its deeper prompts);
- :class:`DeepPromptCLIP`: CLIP whose towers take the method's prompts of each layer, the
  class text features once per evaluation;
- :class:`DeepPromptTrainer`: the trainer base of such methods (the image encoder learns).

A method file keeps its prompts of each layer, its loss and its config node.
"""

from __future__ import annotations

import logging
from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import nn

from coop import fast
from coop.clip_adapter import encode_image_deep, text_width, tokenize
from coop.clip_trainer import CLIPTrainer, check_input_size

logger = logging.getLogger(__name__)


class TextContextLearner(nn.Module):
    """The learnable text context ``ctx`` (n_ctx, D) of layer 0 and the class prompts'
    ``token_prefix`` (SOS) and ``token_suffix`` (class name, ".", EOS).

    With ``ctx_init`` and at most 4 tokens the context starts from the first ``n_ctx`` word
    embeddings of ``ctx_init`` and the prompt keeps all its words (with "a photo of a" and 2
    tokens, "of a" stay fixed tokens before the class name), as the originals do; otherwise
    it is drawn from N(0, 0.02²) and held in the prompt by "X" tokens. The class-token
    buffers are saved in checkpoints, as the originals save them, and rebuilt from the class
    names on loading (the trainer's ``derived_state_keys``)."""

    def __init__(
        self, cfg: Any, classnames: List[str], clip_model: nn.Module, n_ctx: int, ctx_init: str
    ) -> None:
        super().__init__()
        dtype = clip_model.dtype
        check_input_size(cfg, clip_model)
        if ctx_init and n_ctx <= 4:
            ctx_init = ctx_init.replace("_", " ")
            with torch.no_grad():
                embedding = clip_model.token_embedding(tokenize(ctx_init)).type(dtype)
            ctx_vectors = embedding[0, 1 : 1 + n_ctx, :]
            prompt_prefix = ctx_init
        else:
            ctx_vectors = torch.empty(n_ctx, text_width(clip_model), dtype=dtype)
            nn.init.normal_(ctx_vectors, std=0.02)
            prompt_prefix = " ".join(["X"] * n_ctx)
        self.ctx = nn.Parameter(ctx_vectors)  # (n_ctx, D)

        classnames = [name.replace("_", " ") for name in classnames]
        prompts = [prompt_prefix + " " + name + "." for name in classnames]
        tokenized_prompts = torch.cat([tokenize(p) for p in prompts])  # (n_cls, 77)
        with torch.no_grad():
            embedding = clip_model.token_embedding(tokenized_prompts).type(dtype)
        self.register_buffer("token_prefix", embedding[:, :1, :])  # SOS
        self.register_buffer("token_suffix", embedding[:, 1 + n_ctx :, :])  # class, EOS
        self.n_cls = len(classnames)
        self.n_ctx = n_ctx
        self.prompt_prefix = prompt_prefix
        self.tokenized_prompts = tokenized_prompts

    def forward(self) -> torch.Tensor:
        """The text prompts of layer 0: [SOS, ctx, suffix], (n_cls, 77, D)."""
        ctx = self.ctx.unsqueeze(0).expand(self.n_cls, -1, -1)
        return torch.cat([self.token_prefix, ctx, self.token_suffix], dim=1)


class DeepPromptCLIP(nn.Module):
    """CLIP whose two towers take a method's prompts of each layer (the towers' own weights
    stay CLIP's). A method gives :meth:`text_prompts` and :meth:`vision_prompts` (default:
    its prompt learner's); ``text_features()`` is computed once inside
    ``text_features.frozen()`` (an evaluation pass) and afresh otherwise."""

    def __init__(self, cfg: Any, clip_model: nn.Module, prompt_learner: nn.Module) -> None:
        super().__init__()
        self.prompt_learner = prompt_learner
        self.tokenized_prompts = prompt_learner.tokenized_prompts
        self.image_encoder = clip_model.visual
        self.text_encoder = fast.deep_text_encoder(cfg, clip_model)
        self.logit_scale = clip_model.logit_scale
        self.dtype = clip_model.dtype
        self.text_features = fast.OncePerEvaluation(self.encode_text)

    def text_prompts(self) -> Tuple[torch.Tensor, Sequence[Optional[torch.Tensor]]]:
        """``(prompts (n_cls, 77, D), deep)``: the layer-0 prompt embeddings and the text
        prompts of the deeper layers (:class:`coop.clip_adapter.DeepTextEncoder`)."""
        return self.prompt_learner.text_prompts()

    def vision_prompts(self) -> Sequence[Optional[torch.Tensor]]:
        """The image tower's prompts of each layer (:func:`coop.clip_adapter.encode_image_deep`)."""
        return self.prompt_learner.vision_prompts()

    def encode_text(self) -> torch.Tensor:
        """L2-normalised class text features of the prompts, (n_cls, embed_dim)."""
        prompts, deep = self.text_prompts()
        features = self.text_encoder(prompts, self.tokenized_prompts, deep)
        return features / features.norm(dim=-1, keepdim=True)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """L2-normalised image features of the prompted image encoder, (B, embed_dim)."""
        deep = self.vision_prompts()
        features = encode_image_deep(self.image_encoder, image.type(self.dtype), deep)
        return features / features.norm(dim=-1, keepdim=True)

    def logits(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.logit_scale.exp() * image_features @ self.text_features().t()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.logits(self.encode_image(image))  # (B, n_cls)


class DeepPromptTrainer(CLIPTrainer):
    """The trainer base of methods whose prompts sit inside both towers: the image encoder
    changes during training (no cached image features), the class-token buffers are rebuilt
    from the current class names (the originals' load_model drops them), the training log
    shows the loss only (as the originals'), and an evaluation computes the class text
    features once (the originals recompute them per batch)."""

    image_encoder_frozen = False
    log_train_accuracy = False
    derived_state_keys = ("prompt_learner.token_prefix", "prompt_learner.token_suffix")

    def evaluation_scope(self) -> Any:
        return self.model.text_features.frozen()
