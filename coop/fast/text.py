"""The class text features of a prompt learner on the fast paths (``FAST.TEXT``,
``FAST.CLASS_CHUNK``, ``FAST.CUDA_GRAPHS``).

Three computations of the same features, equal up to float rounding:

- ``plain``: CLIP's text tower over all 77 positions, the original computation
  (:class:`coop.clip_adapter.TextEncoder`);
- ``truncate``: only up to the last end-of-text token, the attention causal without CLIP's
  mask (:class:`TruncatedTextEncoder`, :func:`encode_causal`);
- ``shared_prefix``: the start token and context shared by every class computed once
  (:mod:`coop.fast.shared_prefix`).

:func:`text_mode` chooses one per device; :class:`PromptTextEncoder` runs it for a prompt
learner, replays it from CUDA graphs where asked, and computes it once per evaluation inside
:meth:`PromptTextEncoder.frozen`.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Dict, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from coop.clip_adapter import TextEncoder
from coop.fast.cuda_graphs import GraphedTextSide, cuda_graphs_for, warn_not_recorded
from coop.fast.shared_prefix import SharedPrefixTextEncoder, suffix_lengths

logger = logging.getLogger(__name__)


def encode_causal(transformer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """CLIP's text transformer over ``x`` (n, L, D), batch first, under its causal mask.

    The same computation as ``transformer(x.permute(1, 0, 2))`` with CLIP's (77, 77) causal
    mask cut to L, written with fewer operations: each block's packed query/key/value
    projection is split into heads by views and attended with
    ``scaled_dot_product_attention(is_causal=True)``, without ``nn.MultiheadAttention``'s
    layout copies and without the mask (CLIP keeps it on the CPU and copies it to the
    activations' device in every block: on a GPU a blocking copy from host memory). About a
    third fewer operations in the forward and backward than the original text tower (821
    against 1290 ATen calls at 12 layers and 100 classes), and operations are what bound a
    GPU step with a few hundred classes (benchmarks/README.md); equal to it up to float
    rounding. Nothing is read back from the device."""
    for block in transformer.resblocks:
        x = causal_block(block, x)
    return x


def causal_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One of CLIP's text residual blocks over ``x`` (n, L, D), batch first, causal (the
    step of :func:`encode_causal`)."""
    n, length, d = x.shape
    heads = block.attn.num_heads
    h = block.ln_1(x)
    qkv = F.linear(h, block.attn.in_proj_weight, block.attn.in_proj_bias)
    q, k, v = qkv.view(n, length, 3, heads, d // heads).permute(2, 0, 3, 1, 4).unbind(0)
    a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (n, heads, L, d / heads)
    a = a.transpose(1, 2).reshape(n, length, d)
    x = x + F.linear(a, block.attn.out_proj.weight, block.attn.out_proj.bias)
    return x + block.mlp(block.ln_2(x))


class TruncatedTextEncoder(TextEncoder):
    """CLIP's text tower over the first positions only, up to the last end-of-text token.

    The causal mask makes later positions irrelevant to the EOT features, so the result
    equals :class:`~coop.clip_adapter.TextEncoder`'s up to float rounding. ``class_chunk`` >
    0: in a pass that records gradients, more classes than that run in chunks of that many
    with activation checkpointing (each class's features depend only on its own prompt),
    bounding the memory of many classes, as the shared prefix runs them.
    """

    def __init__(self, clip_model: nn.Module, class_chunk: int = 0) -> None:
        super().__init__(clip_model)
        self.class_chunk = class_chunk

    def forward(  # type: ignore[override]
        self,
        prompts: torch.Tensor,
        tokenized_prompts: torch.Tensor,
        length: Optional[int] = None,
    ) -> torch.Tensor:
        """``prompts`` (n, 77, D), ``tokenized_prompts`` (n, 77) -> (n, embed_dim), over the
        first ``length`` positions (default: up to the last EOT token), in class chunks where
        ``class_chunk`` says so."""
        n, chunk = prompts.shape[0], self.class_chunk
        if not (chunk and torch.is_grad_enabled() and n > chunk):
            return self.encode(prompts, tokenized_prompts, length)
        if length is None:
            length = int(tokenized_prompts.argmax(dim=-1).max()) + 1
        from torch.utils.checkpoint import checkpoint

        parts = [
            checkpoint(
                self.encode, prompts[a : a + chunk], tokenized_prompts[a : a + chunk], length,
                use_reentrant=False,
            )
            for a in range(0, n, chunk)
        ]  # fmt: skip
        return torch.cat(parts)

    def encode(
        self,
        prompts: torch.Tensor,
        tokenized_prompts: torch.Tensor,
        length: Optional[int] = None,
    ) -> torch.Tensor:
        """The EOT features computed over the first ``length`` positions only (default: up to
        the last EOT token), all classes at once. With ``length`` given and
        ``tokenized_prompts`` on the prompts' device, nothing waits for the device: no value
        is read back to the host, and nothing is copied from host memory (the attention is
        causal without CLIP's mask; see :func:`encode_causal`)."""
        eot = tokenized_prompts.argmax(dim=-1)  # (n,)
        if length is None:
            length = int(eot.max()) + 1
        x = prompts[:, :length] + self.positional_embedding[:length].type(self.dtype)
        x = encode_causal(self.transformer, x)  # (n, L, D), L = length
        x = self.ln_final(x).type(self.dtype)
        rows = torch.arange(x.shape[0], device=x.device)
        x = x[rows, eot.to(x.device)] @ self.text_projection
        return x


def text_mode(cfg, prompt_learner: nn.Module, device: str = "cpu", graphs: bool = False) -> str:
    """Which text path to use on ``device`` ("cpu", or a GPU: "cuda"): "plain", "truncate"
    or "shared_prefix". ``graphs``: whether the step replays its text side from CUDA graphs
    (:func:`~coop.fast.cuda_graphs.cuda_graphs_for`).

    The shared prefix computes the fewest FLOPs but launches about 45% more operations than
    the original text tower. On a GPU a step with a few hundred classes is bound by the cost
    of launching operations, not by FLOPs (benchmarks/README.md, "Full run on a GPU"), so
    there ``auto`` truncates at the last end-of-text token (about a third fewer operations
    than the original, over fewer tokens; :func:`encode_causal`) below
    ``FAST.GPU_SHARED_PREFIX_MIN_CLASSES`` classes, unless the step replays the text side
    from CUDA graphs (``FAST.CUDA_GRAPHS``), where that cost is gone."""
    if not cfg.FAST.ENABLED or cfg.FAST.TEXT == "plain":
        return "plain"
    shared = prompt_learner.ctx.dim() == 2 and prompt_learner.class_token_position == "end"
    if not shared or cfg.FAST.TEXT == "truncate":
        return "truncate"
    if cfg.FAST.TEXT == "auto" and device != "cpu" and not graphs:
        if prompt_learner.n_cls < cfg.FAST.GPU_SHARED_PREFIX_MIN_CLASSES:
            return "truncate"
    return "shared_prefix"


class PromptTextEncoder(nn.Module):
    """``forward() -> (n_cls, embed_dim)``: the L2-normalised class text features of a
    prompt learner's current context, on the text path ``FAST`` chooses for the device the
    context is on (:func:`text_mode`; ``text_mode`` says which), replayed from CUDA graphs
    in a training step where ``FAST.CUDA_GRAPHS`` applies, and the same features for every
    batch inside :meth:`frozen`.

    What the prompt learner (any method's) must provide:

    - ``ctx``: the learnable context, (n_ctx, D) shared by every class or (n_cls, n_ctx, D);
    - ``token_prefix`` (n_cls, P0, D) and ``token_suffix`` (n_cls, 77 - P0 - n_ctx, D): the
      fixed token embeddings before and after the context (CoOp: P0 = 1, the start token;
      the suffix holds the class name, ".", the end-of-text token and the padding);
    - ``n_ctx``, ``n_cls`` and ``class_token_position`` ("end", "middle" or "front");
    - ``tokenized_prompts``: the prompts' token ids, (n_cls, 77) on the CPU; each feature is
      read at the end-of-text token, the largest id;
    - ``forward(ctx) -> (n_cls, 77, D)``: the full prompt embeddings of the context ``ctx``
      (shaped like ``ctx``; the CUDA-graph path passes its own copy).

    The shared prefix applies where ``ctx`` is (n_ctx, D) and ``class_token_position`` is
    "end": every prompt then begins with ``token_prefix[0]`` and ``ctx`` (``token_prefix``
    must be the same for every class, as CoOp's start token is). The prompt
    learner is not a submodule: its owner holds it (and moves, trains and saves it); the
    frozen text tower's modules are (shared with the CLIP model).
    """

    def __init__(
        self, cfg, clip_model: nn.Module, prompt_learner: nn.Module, prec: Optional[str]
    ) -> None:
        super().__init__()
        self._learner = (prompt_learner,)  # a tuple: not registered as a submodule
        fast = cfg.FAST
        self.prec = prec
        self.graphs_asked = bool(fast.ENABLED and fast.CUDA_GRAPHS)
        # opt-in: the text side replayed as CUDA graphs (fp16 / fp32)
        self.cuda_graphs = cuda_graphs_for(cfg, prec)
        # the text path on a CPU and on a GPU; the one of the context's device is used
        self.text_modes: Dict[str, str] = {
            d: text_mode(cfg, prompt_learner, d, self.cuda_graphs) for d in ("cpu", "cuda")
        }
        # the GPU's choice should the graphs fail to record (see forward)
        self._eager_gpu_text_mode = text_mode(cfg, prompt_learner, "cuda", graphs=False)
        # both fast text paths run more classes than this in checkpointed chunks
        self.class_chunk = fast.CLASS_CHUNK if fast.ENABLED else 0
        self.plain = TextEncoder(clip_model)
        self.truncated = TruncatedTextEncoder(clip_model, class_chunk=self.class_chunk)
        self.shared_prefix = SharedPrefixTextEncoder(clip_model, class_chunk=self.class_chunk)
        self._graphed: Optional[GraphedTextSide] = None
        self._record = True  # False once recording the text side has failed
        self._frozen: Optional[torch.Tensor] = None
        # What the fast text paths need of the token ids, read on the host once here and kept
        # on the model's device, so that a training step never waits for the device (the
        # plain path indexes with the CPU ids, as the original does).
        tokenized = prompt_learner.tokenized_prompts
        self.register_buffer("tokenized_on_device", tokenized, persistent=False)
        self.text_length = int(tokenized.argmax(dim=-1).max()) + 1
        self.suffix_lengths: Optional[Tuple[int, ...]] = None
        if "shared_prefix" in self.text_modes.values():
            p = prompt_learner.token_prefix.shape[1] + prompt_learner.n_ctx
            self.suffix_lengths = suffix_lengths(tokenized, p)

    @property
    def prompt_learner(self) -> nn.Module:
        return self._learner[0]

    @property
    def text_mode(self) -> str:
        """The text path on the device the prompt learner is on now."""
        on_cpu = self.prompt_learner.ctx.device.type == "cpu"
        return self.text_modes["cpu" if on_cpu else "cuda"]

    def forward(self) -> torch.Tensor:
        """L2-normalised class text features, (n_cls, embed_dim)."""
        if self._frozen is not None:
            return self._frozen
        ctx = self.prompt_learner.ctx
        if self._graph_text_side(ctx):
            if self._graphed is None or not self._graphed.matches(ctx):
                try:
                    self._graphed = GraphedTextSide(self._features_of, ctx)
                except RuntimeError as e:  # the platform cannot record it: run eagerly
                    self._graph_failed(e)
                    return self._features_of(ctx)
                logger.info("Text side recorded as CUDA graphs (forward and backward)")
            return self._graphed(ctx)
        return self._features_of(ctx)

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Compute the class text features once and reuse them for every batch inside (the
        context does not change during an evaluation)."""
        with torch.no_grad():
            self._frozen = self()
        try:
            yield
        finally:
            self._frozen = None

    def log_setup(self, device: torch.device) -> None:
        """Log the text path taken on ``device`` and what ``FAST.CUDA_GRAPHS`` does there
        (once, after the model is built and moved)."""
        mode = self.text_modes["cpu" if device.type == "cpu" else "cuda"]
        if mode != "plain":
            logger.info(f"Text encoder fast path: {mode}")
        if not self.graphs_asked:
            return
        if not self.cuda_graphs:
            logger.warning(
                f"FAST.CUDA_GRAPHS works with PREC fp16 and fp32 only; PREC {self.prec} runs "
                "without CUDA graphs"
            )
        elif device.type != "cuda":
            logger.warning(
                f"FAST.CUDA_GRAPHS needs a CUDA device; on {device.type} the run is "
                "computed without CUDA graphs"
            )
        else:
            logger.info("CUDA graphs (opt-in): text side and image encoder are replayed")

    def _graph_failed(self, error: BaseException) -> None:
        """``FAST.CUDA_GRAPHS`` could not record the text side: from now on it is computed
        eagerly (the same numbers; only the speed differs), on the text path the GPU takes
        without graphs. The image encoder's graphs are kept (they fall back on their own)."""
        warn_not_recorded("the text side", error)
        self._record = False
        self._graphed = None
        self.text_modes["cuda"] = self._eager_gpu_text_mode

    def _graph_text_side(self, ctx: torch.Tensor) -> bool:
        """Replay the text side from CUDA graphs: opted in, on a GPU, in a training pass
        (evaluation computes it once), without autocast and without class chunks (whose
        activation checkpointing recomputes in the backward)."""
        return (
            self.cuda_graphs
            and self._record
            and ctx.is_cuda
            and ctx.requires_grad
            and torch.is_grad_enabled()
            and not torch.is_autocast_enabled()
            and not (0 < self.class_chunk < self.prompt_learner.n_cls)
        )

    def _features_of(self, ctx: torch.Tensor) -> torch.Tensor:
        pl = self.prompt_learner
        mode = self.text_mode
        tokenized = self.tokenized_on_device
        if mode == "shared_prefix":
            prefix = torch.cat([pl.token_prefix[0], ctx], dim=0)  # (P0 + n_ctx, D)
            text_features = self.shared_prefix(
                prefix, pl.token_suffix, tokenized, lengths=self.suffix_lengths
            )
        elif mode == "truncate":
            text_features = self.truncated(pl(ctx), tokenized, length=self.text_length)
        elif self.cuda_graphs:
            # the original's computation over all 77 positions, without host copies (which
            # a CUDA graph cannot record)
            text_features = self.truncated.encode(pl(ctx), tokenized, length=tokenized.shape[1])
        else:
            text_features = self.plain(pl(ctx), pl.tokenized_prompts.to(ctx.device))
        return text_features / text_features.norm(dim=-1, keepdim=True)
