"""The text side of methods with deep prompts (MaPLe, PromptSRC, ...) on the fast paths.

- :func:`deep_text_encoder`: CLIP's text tower with deep prompts, plain (all 77 positions,
  :class:`coop.clip_adapter.DeepTextEncoder`) or truncated after the last end-of-text token
  (:class:`TruncatedDeepTextEncoder`). The text attention is causal and the deep prompts sit
  before the class name, so the end-of-text features do not depend on the positions cut:
  equal up to float rounding.
- :class:`OncePerEvaluation`: the class text features computed once for a whole evaluation
  (the prompts do not depend on the image) instead of once per batch.
- :func:`encode_text`: CLIP's ``encode_text`` of token ids (e.g. a frozen teacher's template
  prompts), truncated after the last end-of-text token.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from coop.clip_adapter import (
    DeepTextEncoder,
    check_text_deep,
    layer_prompt,
    replace_text_prompt,
)
from coop.fast.text import TruncatedTextEncoder, causal_block


class TruncatedDeepTextEncoder(DeepTextEncoder):
    """:class:`~coop.clip_adapter.DeepTextEncoder` computed over the positions up to the last
    end-of-text token only, batch first, each block causal without CLIP's mask
    (:func:`coop.fast.text.causal_block`). Same arguments, same state dict keys."""

    def forward(  # type: ignore[override]
        self,
        prompts: torch.Tensor,
        tokenized_prompts: torch.Tensor,
        deep: Sequence[Optional[torch.Tensor]] = (),
    ) -> torch.Tensor:
        check_text_deep(deep)
        eot = tokenized_prompts.argmax(dim=-1)  # (n,), on the host: reading it costs nothing
        length = int(eot.max()) + 1
        x = prompts[:, :length] + self.positional_embedding[:length].type(self.dtype)
        for i, block in enumerate(self.transformer.resblocks):
            prompt = layer_prompt(deep, i)
            if prompt is not None:
                x = replace_text_prompt(x, prompt, seq_dim=1)
            x = causal_block(block, x)  # (n, L, D)
        x = self.ln_final(x).type(self.dtype)
        rows = torch.arange(x.shape[0], device=x.device)
        return x[rows, eot.to(x.device)] @ self.text_projection


def deep_text_encoder(cfg, clip_model: nn.Module) -> DeepTextEncoder:
    """CLIP's text tower with deep prompts on the path ``FAST`` says: plain where
    ``FAST.ENABLED`` is off or ``FAST.TEXT`` is "plain", else truncated (the shared prefix
    does not apply: every layer's prompt enters the sequence)."""
    if cfg.FAST.ENABLED and cfg.FAST.TEXT != "plain":
        return TruncatedDeepTextEncoder(clip_model)
    return DeepTextEncoder(clip_model)


class OncePerEvaluation:
    """``fn()`` (e.g. the class text features of the current prompts), computed once for
    every call inside :meth:`frozen` (an evaluation pass, where the prompts do not change)
    and afresh outside it."""

    def __init__(self, fn: Callable[[], torch.Tensor]) -> None:
        self.fn = fn
        self.value: Optional[torch.Tensor] = None

    def __call__(self) -> torch.Tensor:
        return self.fn() if self.value is None else self.value

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        with torch.no_grad():
            self.value = self.fn()
        try:
            yield
        finally:
            self.value = None


def encode_text(cfg, clip_model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``clip_model.encode_text(tokens)`` for the token ids ``tokens`` (n, 77) on the host ->
    (n, embed_dim) on the model's device, over the positions up to the last end-of-text token
    where ``FAST`` truncates (equal up to float rounding)."""
    device = clip_model.positional_embedding.device
    if not (cfg.FAST.ENABLED and cfg.FAST.TEXT != "plain"):
        return clip_model.encode_text(tokens.to(device))
    length = int(tokens.argmax(dim=-1).max()) + 1  # read on the host
    tokens = tokens.to(device)
    embedded = clip_model.token_embedding(tokens).type(clip_model.dtype)
    return TruncatedTextEncoder(clip_model).encode(embedded, tokens, length)
