"""CoOp: learnable prompt context for CLIP (Zhou et al., IJCV 2022).

Only the context vectors are trained; both CLIP encoders stay frozen (and in eval mode).
The model follows the original construction step by step, including the order in which it
draws random numbers, so a seeded run reproduces the original trajectory.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from coop.clip_adapter import (
    SharedPrefixTextEncoder,
    TextEncoder,
    suffix_lengths,
    token_length,
    tokenize,
)
from coop.clip_trainer import CLIPTrainer
from coop.fast import image_encoder, load_clip_for
from coop.fast.cuda_graphs import GraphedTextSide, warn_not_recorded
from coop.io import CheckpointError
from coop.optim import build_lr_scheduler, build_optimizer
from coop.registry import TRAINER_REGISTRY

logger = logging.getLogger(__name__)

PRECISIONS = ("fp16", "fp32", "amp", "bf16")
POSITIONS = ("end", "middle", "front")


class PromptLearner(nn.Module):
    """The learnable context and the fixed token embeddings of the class-name prompts."""

    def __init__(self, cfg, classnames: List[str], clip_model: nn.Module) -> None:
        super().__init__()
        opts = cfg.TRAINER.COOP
        n_cls = len(classnames)
        n_ctx = opts.N_CTX
        ctx_init = opts.CTX_INIT
        dtype = clip_model.dtype
        ctx_dim = clip_model.ln_final.weight.shape[0]
        clip_imsize = clip_model.visual.input_resolution
        cfg_imsize = cfg.INPUT.SIZE[0]
        if cfg_imsize != clip_imsize:
            raise ValueError(
                f"INPUT.SIZE {tuple(cfg.INPUT.SIZE)} does not match the input resolution "
                f"{clip_imsize} of the CLIP backbone '{cfg.MODEL.BACKBONE.NAME}'; "
                f"set INPUT.SIZE ({clip_imsize}, {clip_imsize})"
            )

        if ctx_init:
            # initialise the context from the word embeddings of the given words
            ctx_init = ctx_init.replace("_", " ")
            n_ctx = len(ctx_init.split(" "))
            prompt = tokenize(ctx_init)
            with torch.no_grad():
                embedding = clip_model.token_embedding(prompt).type(dtype)
            ctx_vectors = embedding[0, 1 : 1 + n_ctx, :]  # (n_ctx, ctx_dim)
            if opts.CSC:
                # class-specific contexts, each starting from the same words (the original
                # silently fell back to one generic context here)
                logger.info("Initializing class-specific contexts from the given words")
                ctx_vectors = ctx_vectors.unsqueeze(0).repeat(n_cls, 1, 1).clone()
            prompt_prefix = ctx_init
        else:
            if opts.CSC:
                logger.info("Initializing class-specific contexts")
                ctx_vectors = torch.empty(n_cls, n_ctx, ctx_dim, dtype=dtype)
            else:
                logger.info("Initializing a generic context")
                ctx_vectors = torch.empty(n_ctx, ctx_dim, dtype=dtype)
            nn.init.normal_(ctx_vectors, std=0.02)
            prompt_prefix = " ".join(["X"] * n_ctx)

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
        self.class_token_position = opts.CLASS_TOKEN_POSITION

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


def text_mode(
    cfg, prompt_learner: PromptLearner, device: str = "cpu", graphs: Optional[bool] = None
) -> str:
    """Which text-encoder path to use on ``device`` ("cpu", or a GPU: "cuda"): "plain",
    "truncate" or "shared_prefix". ``graphs``: whether the step replays its text side from
    CUDA graphs (default: as ``cfg`` asks, :func:`graphs_replay_text`).

    The shared prefix computes the fewest FLOPs but launches about 45% more operations than
    the original text tower. On a GPU a step with a few hundred classes is bound by the cost
    of launching operations, not by FLOPs (benchmarks/README.md, "Full run on a GPU"), so
    there ``auto`` truncates at the last end-of-text token (about a third fewer operations
    than the original, over fewer tokens; :func:`coop.clip_adapter.encode_causal`) below
    ``FAST.GPU_SHARED_PREFIX_MIN_CLASSES`` classes, unless the step replays the text side
    from CUDA graphs (``FAST.CUDA_GRAPHS``), where that cost is gone."""
    if graphs is None:
        graphs = graphs_replay_text(cfg)
    if not cfg.FAST.ENABLED or cfg.FAST.TEXT == "plain":
        return "plain"
    shared = prompt_learner.ctx.dim() == 2 and prompt_learner.class_token_position == "end"
    if not shared or cfg.FAST.TEXT == "truncate":
        return "truncate"
    if cfg.FAST.TEXT == "auto" and device != "cpu" and not graphs:
        if prompt_learner.n_cls < cfg.FAST.GPU_SHARED_PREFIX_MIN_CLASSES:
            return "truncate"
    return "shared_prefix"


def graphs_replay_text(cfg) -> bool:
    """Whether a CUDA training step replays its text side from CUDA graphs
    (``FAST.CUDA_GRAPHS`` with PREC fp16 or fp32), which takes away the per-operation cost
    that makes truncation the better GPU choice below ``FAST.GPU_SHARED_PREFIX_MIN_CLASSES``."""
    return bool(
        cfg.FAST.ENABLED and cfg.FAST.CUDA_GRAPHS and cfg.TRAINER.COOP.PREC in ("fp16", "fp32")
    )


class CustomCLIP(nn.Module):
    """CLIP with CoOp's prompt learner on the text side."""

    def __init__(self, cfg, classnames: List[str], clip_model: nn.Module) -> None:
        super().__init__()
        self.prompt_learner = PromptLearner(cfg, classnames, clip_model)
        self.tokenized_prompts = self.prompt_learner.tokenized_prompts
        self.image_encoder = image_encoder(cfg, clip_model.visual, cfg.TRAINER.COOP.PREC)
        self.logit_scale = clip_model.logit_scale
        self.dtype = clip_model.dtype
        self._cached_text_features: Optional[torch.Tensor] = None
        # the text path on a CPU and on a GPU; the one of the context's device is used
        self.text_modes = {d: text_mode(cfg, self.prompt_learner, d) for d in ("cpu", "cuda")}
        # the GPU's choice should the graphs fail to record (see text_features)
        self._eager_gpu_text_mode = text_mode(cfg, self.prompt_learner, "cuda", graphs=False)
        # both fast text paths run more classes than this in checkpointed chunks
        self.class_chunk = cfg.FAST.CLASS_CHUNK if cfg.FAST.ENABLED else 0
        self.text_encoder = TextEncoder(clip_model)
        self.shared_prefix_encoder = SharedPrefixTextEncoder(
            clip_model, class_chunk=self.class_chunk
        )
        # opt-in: the text side and the image encoder replayed as CUDA graphs (fp16 / fp32)
        self.cuda_graphs = graphs_replay_text(cfg)
        self._graphed_text: Optional[GraphedTextSide] = None
        self._record_text = True  # False once recording the text side has failed
        # What the fast text paths need of the token ids, read on the host once here and kept
        # on the model's device, so that a training step never waits for the device (the
        # plain path indexes with the CPU ids, as the original does).
        self.register_buffer("tokenized_on_device", self.tokenized_prompts, persistent=False)
        self.text_length = int(self.tokenized_prompts.argmax(dim=-1).max()) + 1
        self.suffix_lengths: Optional[Tuple[int, ...]] = None
        if "shared_prefix" in self.text_modes.values():
            p = self.prompt_learner.token_prefix.shape[1] + self.prompt_learner.n_ctx
            self.suffix_lengths = suffix_lengths(self.tokenized_prompts, p)

    @property
    def text_mode(self) -> str:
        """The text path on the device the prompt learner is on now."""
        on_cpu = self.prompt_learner.ctx.device.type == "cpu"
        return self.text_modes["cpu" if on_cpu else "cuda"]

    def text_features(self) -> torch.Tensor:
        """L2-normalised class text features, (n_cls, embed_dim)."""
        if self._cached_text_features is not None:
            return self._cached_text_features
        ctx = self.prompt_learner.ctx
        if self._graph_text_side(ctx):
            if self._graphed_text is None or not self._graphed_text.matches(ctx):
                try:
                    self._graphed_text = GraphedTextSide(self._text_features_of, ctx)
                except RuntimeError as e:  # the platform cannot record it: run eagerly
                    self._text_graph_failed(e)
                    return self._text_features_of(ctx)
                logger.info("Text side recorded as CUDA graphs (forward and backward)")
            return self._graphed_text(ctx)
        return self._text_features_of(ctx)

    def _text_graph_failed(self, error: BaseException) -> None:
        """``FAST.CUDA_GRAPHS`` could not record the text side: from now on it is computed
        eagerly (the same numbers; only the speed differs), on the text path the GPU takes
        without graphs. The image encoder's graphs are kept (they fall back on their own)."""
        warn_not_recorded("the text side", error)
        self._record_text = False
        self._graphed_text = None
        self.text_modes["cuda"] = self._eager_gpu_text_mode

    def _graph_text_side(self, ctx: torch.Tensor) -> bool:
        """Replay the text side from CUDA graphs: opted in, on a GPU, in a training pass
        (evaluation computes it once), without autocast and without class chunks (whose
        activation checkpointing recomputes in the backward)."""
        return (
            self.cuda_graphs
            and self._record_text
            and ctx.is_cuda
            and ctx.requires_grad
            and torch.is_grad_enabled()
            and not torch.is_autocast_enabled()
            and not (0 < self.class_chunk < self.prompt_learner.n_cls)
        )

    def _text_features_of(self, ctx: torch.Tensor) -> torch.Tensor:
        pl = self.prompt_learner
        mode = self.text_mode
        tokenized = self.tokenized_on_device
        if mode == "shared_prefix":
            prefix = torch.cat([pl.token_prefix[0], ctx], dim=0)  # (1 + n_ctx, D)
            text_features = self.shared_prefix_encoder(
                prefix, pl.token_suffix, tokenized, lengths=self.suffix_lengths
            )
        elif mode == "truncate":
            text_features = self._truncated_features(pl(ctx), tokenized)
        elif self.cuda_graphs:
            # the original's computation over all 77 positions, without host copies (which
            # a CUDA graph cannot record)
            text_features = self.text_encoder.forward_truncated(
                pl(ctx), tokenized, length=tokenized.shape[1]
            )
        else:
            text_features = self.text_encoder(pl(ctx), self.tokenized_prompts.to(ctx.device))
        return text_features / text_features.norm(dim=-1, keepdim=True)

    def _truncated_features(self, prompts: torch.Tensor, tokenized: torch.Tensor) -> torch.Tensor:
        """The truncated text path; with more classes than ``FAST.CLASS_CHUNK`` in a pass
        that records gradients, over chunks of that many classes with activation
        checkpointing, as the shared prefix runs them (each class's features depend only on
        its own prompt)."""
        encode = self.text_encoder.forward_truncated
        n, chunk = prompts.shape[0], self.class_chunk
        if not (chunk and torch.is_grad_enabled() and n > chunk):
            return encode(prompts, tokenized, length=self.text_length)
        from torch.utils.checkpoint import checkpoint

        parts = [
            checkpoint(
                encode, prompts[a : a + chunk], tokenized[a : a + chunk], self.text_length,
                use_reentrant=False,
            )
            for a in range(0, n, chunk)
        ]  # fmt: skip
        return torch.cat(parts)

    @contextlib.contextmanager
    def frozen_text_features(self) -> Iterator[None]:
        """Compute the class text features once and reuse them for every batch inside."""
        with torch.no_grad():
            self._cached_text_features = self.text_features()
        try:
            yield
        finally:
            self._cached_text_features = None

    @property
    def channels_last(self) -> bool:
        return self.image_encoder.channels_last

    @property
    def bn_folded(self) -> bool:
        return self.image_encoder.bn_folded

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """L2-normalised image features of the frozen encoder, (B, embed_dim)."""
        return self.image_encoder(image)

    def logits(self, image_features: torch.Tensor) -> torch.Tensor:
        text_features = self.text_features()
        logit_scale = self.logit_scale.exp()
        # the scale multiplies the image features before the matmul, as in the original
        return logit_scale * image_features @ text_features.t()  # (B, n_cls)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.logits(self.encode_image(image))


@TRAINER_REGISTRY.register()
class CoOp(CLIPTrainer):
    """Context Optimization (CoOp)."""

    def check_cfg(self, cfg) -> None:
        if cfg.TRAINER.COOP.PREC not in PRECISIONS:
            raise ValueError(
                f"TRAINER.COOP.PREC must be one of {PRECISIONS}, got '{cfg.TRAINER.COOP.PREC}'"
            )
        if cfg.TRAINER.COOP.CLASS_TOKEN_POSITION not in POSITIONS:
            raise ValueError(
                f"TRAINER.COOP.CLASS_TOKEN_POSITION must be one of {POSITIONS}, "
                f"got '{cfg.TRAINER.COOP.CLASS_TOKEN_POSITION}'"
            )

    def build_model(self) -> None:
        cfg = self.cfg
        classnames = self.dm.dataset.classnames
        prec = cfg.TRAINER.COOP.PREC

        clip_model = load_clip_for(cfg)
        if prec in ("fp32", "amp", "bf16"):
            clip_model.float()
        elif self.device.type == "cpu":
            logger.warning(
                "PREC fp16 on a CPU is slow and numerically fragile; "
                "pass TRAINER.COOP.PREC fp32 for CPU runs"
            )

        logger.info("Building custom CLIP")
        self.model = CustomCLIP(cfg, classnames, clip_model)

        logger.info("Turning off gradients in both the image and the text encoder")
        for name, param in self.model.named_parameters():
            if "prompt_learner" not in name:
                param.requires_grad_(False)

        if cfg.MODEL.INIT_WEIGHTS:
            self.load_pretrained_prompt(cfg.MODEL.INIT_WEIGHTS)

        self.model.to(self.device)
        if self.model.text_mode != "plain":
            logger.info(f"Text encoder fast path: {self.model.text_mode}")
        if cfg.FAST.ENABLED and cfg.FAST.CUDA_GRAPHS:
            if not self.model.cuda_graphs:
                logger.warning(
                    f"FAST.CUDA_GRAPHS works with PREC fp16 and fp32 only; PREC {prec} runs "
                    "without CUDA graphs"
                )
            elif self.device.type != "cuda":
                logger.warning(
                    f"FAST.CUDA_GRAPHS needs a CUDA device; on {self.device.type} the run is "
                    "computed without CUDA graphs"
                )
            else:
                logger.info("CUDA graphs (opt-in): text side and image encoder are replayed")
        self.optim = build_optimizer(self.model.prompt_learner, cfg.OPTIM)
        self.sched = build_lr_scheduler(self.optim, cfg.OPTIM)
        self.register_model("prompt_learner", self.model.prompt_learner, self.optim, self.sched)

        use_amp = prec == "amp" and self.device.type == "cuda"
        if prec == "amp" and not use_amp:
            logger.warning("PREC amp needs CUDA; on this device it trains exactly like fp32")
        self.scaler = torch.amp.GradScaler("cuda") if use_amp else None
        self.use_amp = use_amp
        # bf16 (our option): fp32 weights, bf16 autocast in training and evaluation
        self.use_bf16 = prec == "bf16"

    def load_pretrained_prompt(self, path: str) -> None:
        """MODEL.INIT_WEIGHTS: copy the keys whose name and shape match."""
        from coop.io import load_checkpoint

        ckpt = load_checkpoint(path)
        own = self.model.prompt_learner.state_dict()
        matched = {
            k: v for k, v in ckpt["state_dict"].items() if k in own and own[k].shape == v.shape
        }
        if not matched:
            raise CheckpointError(f"No weights in {path} match the prompt learner")
        self.model.prompt_learner.load_state_dict(matched, strict=False)
        logger.info(f"Initialized the prompt learner from {path}: {sorted(matched)}")

    def autocast(self):
        if self.use_bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.model.encode_image(images)

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.model.logits(features)

    def model_inference(self, input: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.model(input)

    def clip_dtype(self) -> torch.dtype:
        """The precision the image features are computed in (part of the cache key)."""
        return torch.bfloat16 if self.use_bf16 else self.model.dtype

    def image_channels_last(self) -> bool:
        return self.model.channels_last

    def image_bn_folded(self) -> bool:
        return self.model.bn_folded

    def forward_backward(self, batch) -> Dict[str, float]:
        image, label = self.parse_batch_train(batch)
        return self.train_step(lambda: self.model(image), label)

    def train_step(self, logits_fn, label: torch.Tensor) -> Dict[str, float]:
        if self.use_amp:
            with torch.autocast("cuda"):
                output = logits_fn()
                loss = F.cross_entropy(output, label)
            self.optim.zero_grad()
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optim)
            self.scaler.update()
        else:
            with self.autocast():
                output = logits_fn()
                loss = F.cross_entropy(output, label)
            self.model_backward_and_update(loss)

        loss_summary = {
            "loss": loss.item(),
            "acc": compute_accuracy(output, label),
        }
        if (self.batch_idx + 1) == self.num_batches:
            self.update_lr()
        return loss_summary

    def evaluation_context(self):
        if not self.cfg.FAST.ENABLED:  # the original recomputes them for every batch
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(super().evaluation_context())  # inference mode
        stack.enter_context(self.model.frozen_text_features())
        return stack

    def prepare_loaded_state_dict(self, name, state_dict, path):
        state_dict = dict(state_dict)
        # old-format checkpoints (the original's) store the class-name token buffers
        state_dict.pop("token_prefix", None)
        state_dict.pop("token_suffix", None)
        own = self._models[name].state_dict()
        ctx = state_dict.get("ctx")
        if ctx is not None and ctx.dim() == 2 and own["ctx"].dim() == 3:
            if tuple(ctx.shape) == tuple(own["ctx"].shape[1:]):
                # a generic context (e.g. the original's CSC + CTX_INIT runs) shared by all
                # classes gives the same logits as that generic model
                logger.info(f"Using the generic context of {path} for every class")
                state_dict["ctx"] = ctx.unsqueeze(0).expand_as(own["ctx"]).clone()
        for key, value in state_dict.items():
            if key in own and own[key].shape != value.shape:
                raise CheckpointError(
                    f"The checkpoint {path} does not fit this model: '{key}' has shape "
                    f"{tuple(value.shape)} there but {tuple(own[key].shape)} here "
                    f"({self.num_classes} classes, N_CTX {self.model.prompt_learner.n_ctx}, "
                    f"CSC {self.cfg.TRAINER.COOP.CSC}, backbone {self.cfg.MODEL.BACKBONE.NAME})"
                )
        missing = [k for k in own if k not in state_dict]
        if missing:
            raise CheckpointError(f"The checkpoint {path} lacks the weights {missing}")
        # keep the model's dtype (e.g. an fp16 checkpoint evaluated in fp32)
        return {k: v.to(own[k].dtype) if k in own else v for k, v in state_dict.items()}


def compute_accuracy(output: torch.Tensor, target: torch.Tensor) -> float:
    """Top-1 batch accuracy in percent, computed as Dassl does."""
    batch_size = target.size(0)
    _, pred = output.topk(1, 1, True, True)
    pred = pred.t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    correct_k = correct[:1].view(-1).float().sum(0, keepdim=True)
    return correct_k.mul_(100.0 / batch_size).item()
