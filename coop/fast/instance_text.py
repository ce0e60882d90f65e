"""The class text features of prompts conditioned on each image (CoCoOp's instance
prompts): every image has its own context, so every image needs its own pass over all class
prompts through the frozen text tower.

Three computations of the same features, equal up to float rounding (``text_mode``):

- ``loop`` (``FAST.ENABLED False``): the original's, CLIP's text tower once per image over
  that image's class prompts (:class:`coop.clip_adapter.TextEncoder`);
- ``truncate`` (the default): the prompts of several images in one pass, at most
  ``FAST.CLASS_CHUNK`` prompts per pass on a GPU (0: the whole batch at once) and at most
  :data:`CPU_PROMPTS_PER_PASS` on a CPU, only up to the last end-of-text token (:class:`coop.fast.text.TruncatedTextEncoder`; the tower is causal, so
  later positions cannot change the features);
- ``plain`` (``FAST.TEXT plain``): batched the same way, over all positions, through CLIP's
  own text tower.

The shared-prefix path does not apply: the context, and with it the prefix, differs from
image to image.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from coop.clip_adapter import TextEncoder
from coop.fast.text import TruncatedTextEncoder

logger = logging.getLogger(__name__)

# Prompts per pass on a CPU. A GPU needs large passes to be kept busy; a CPU gains nothing
# from them and loses the activations' cache residency: its text side was slowest at 1024
# prompts per pass and about equally fast from 40 to 500 (benchmarks/README.md, "CoCoOp").
CPU_PROMPTS_PER_PASS = 256


def instance_text_mode(cfg) -> str:
    """ "loop", "plain" or "truncate" (see the module docstring)."""
    if not cfg.FAST.ENABLED:
        return "loop"
    return "plain" if cfg.FAST.TEXT == "plain" else "truncate"


class InstanceTextEncoder(nn.Module):
    """``forward(ctx (B, n_ctx, D)) -> (B, n_cls, embed_dim)``: the L2-normalised class text
    features of each image's context ``ctx[b]``, on the path ``text_mode`` says.

    What the prompt learner must provide:

    - ``prompts_for(ctx)``: ``(G, n_ctx, D) -> (G, n_cls, 77, D)``, the class prompts of each
      of ``G`` contexts;
    - ``n_cls`` and ``tokenized_prompts``, the prompts' token ids (n_cls, 77) on the CPU; each
      feature is read at the end-of-text token, the largest id.

    The prompt learner is not a submodule (its owner holds, moves, trains and saves it); the
    frozen text tower's modules are (shared with the CLIP model).
    """

    def __init__(self, cfg, clip_model: nn.Module, prompt_learner: nn.Module) -> None:
        super().__init__()
        self._learner = (prompt_learner,)  # a tuple: not registered as a submodule
        self.text_mode = instance_text_mode(cfg)
        # prompts per pass on a GPU's batched paths; more classes than that: one image per
        # pass, its classes in checkpointed chunks where gradients are recorded (as CoOp's)
        self.chunk = int(cfg.FAST.CLASS_CHUNK) if cfg.FAST.ENABLED else 0
        self.plain = TextEncoder(clip_model)
        self.truncated = TruncatedTextEncoder(clip_model, class_chunk=self.chunk)
        tokenized = prompt_learner.tokenized_prompts
        # the token ids on the model's device and the truncation length, read on the host
        # once here so that a step never waits for the device
        self.register_buffer("tokenized_on_device", tokenized, persistent=False)
        self.text_length = int(tokenized.argmax(dim=-1).max()) + 1

    @property
    def prompt_learner(self) -> nn.Module:
        return self._learner[0]

    def prompts_per_pass(self, device_type: str) -> int:
        """At most how many prompts go through the text tower together on a device of that
        type (0: no bound)."""
        if device_type == "cpu":
            return min(self.chunk, CPU_PROMPTS_PER_PASS) if self.chunk else CPU_PROMPTS_PER_PASS
        return self.chunk

    def images_per_pass(self, batch: int, device_type: str = "cpu") -> int:
        """How many of a batch of ``batch`` images' prompts go through the text tower
        together on a device of that type."""
        if self.text_mode == "loop":
            return 1
        budget = self.prompts_per_pass(device_type)
        if not budget:
            return max(batch, 1)
        return max(1, min(batch, budget // self.prompt_learner.n_cls))

    def log_setup(self, device: torch.device) -> None:
        if self.text_mode != "loop":
            budget = self.prompts_per_pass(device.type)
            logger.info(
                f"Text encoder fast path: {self.text_mode}, the prompts of several images "
                f"per pass (at most {budget or 'all'} prompts on {device.type})"
            )

    def forward(self, ctx: torch.Tensor) -> torch.Tensor:
        pl = self.prompt_learner
        tokenized = self.tokenized_on_device
        if self.text_mode == "loop":
            prompts = pl.prompts_for(ctx)  # (B, n_cls, 77, D), as the original builds them
            feats = []
            for prompts_i in prompts:
                f = self.plain(prompts_i, tokenized)  # (n_cls, embed_dim)
                feats.append(f / f.norm(dim=-1, keepdim=True))
            return torch.stack(feats)

        step = self.images_per_pass(ctx.shape[0], ctx.device.type)
        parts = []
        for a in range(0, ctx.shape[0], step):
            prompts = pl.prompts_for(ctx[a : a + step])  # (G, n_cls, 77, D)
            g, n_cls = prompts.shape[:2]
            flat = prompts.flatten(0, 1)  # (G * n_cls, 77, D), image-major
            ids = tokenized.repeat(g, 1)
            if self.text_mode == "truncate":
                f = self.truncated(flat, ids, length=self.text_length)
            else:
                f = self.plain(flat, ids)
            parts.append(f.view(g, n_cls, -1))
        feats = torch.cat(parts)  # (B, n_cls, embed_dim)
        return feats / feats.norm(dim=-1, keepdim=True)
