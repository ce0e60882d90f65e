"""CUDA graphs for CoOp's fixed-shape work (``FAST.CUDA_GRAPHS``, opt-in).

On a GPU a CoOp step with a few hundred classes is bound by the host's cost of launching
operations, not by arithmetic (benchmarks/README.md, "Full run on a GPU"). Two parts of the
step have the same shapes every time and can be recorded once and replayed as one launch:

- the text side, context -> class text features, forward and backward
  (:class:`GraphedTextSide`, through ``torch.cuda.make_graphed_callables``): the context is
  its only input; the frozen encoder's weights are constants of the graph;
- the frozen image encoder's forward for each batch shape (:class:`GraphedImageEncoder`).

A replay computes what the eager code computes, with the same kernels. Only fp16 and fp32
are graphed (autocast, as amp and bf16 use, is not); the CPU and any other device run
eagerly.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch

logger = logging.getLogger(__name__)

# graphs kept per image encoder: the training batch, a smaller last batch, the test batches
MAX_IMAGE_SHAPES = 4
# precisions whose step runs without autocast (autocast is not graphed)
GRAPHED_PRECISIONS = ("fp16", "fp32")


def cuda_graphs_for(cfg, prec: Optional[str]) -> bool:
    """Whether ``FAST.CUDA_GRAPHS`` applies to a method that computes in ``prec`` (its
    ``TRAINER.<NAME>.PREC``): with fp16 and fp32 only; ``None``: never. Only a CUDA device
    records graphs; elsewhere the same work runs eagerly."""
    return bool(cfg.FAST.ENABLED and cfg.FAST.CUDA_GRAPHS and prec in GRAPHED_PRECISIONS)


def warn_not_recorded(what: str, error: BaseException) -> None:
    """The one warning of a part of the step that could not be recorded as a CUDA graph and
    is computed eagerly from then on."""
    text = str(error).strip()
    logger.warning(
        f"FAST.CUDA_GRAPHS: recording {what} as a CUDA graph failed "
        f"({text.splitlines()[0] if text else type(error).__name__}); it runs eagerly from "
        "now on (the same numbers, without the speed-up)"
    )


@contextlib.contextmanager
def _stream_kept_on_failure(device: torch.device) -> Iterator[None]:
    """Restore the current CUDA stream if recording fails: ``torch.cuda.graph`` enters its
    side stream before it begins the capture and leaves it only after a successful end, so a
    capture the platform refuses would leave every later operation on that side stream."""
    stream = torch.cuda.current_stream(device)
    try:
        yield
    except BaseException:
        torch.cuda.set_stream(stream)
        raise


class _OwnGradient(torch.autograd.Function):
    """Identity whose backward hands on a copy of the gradient. A graphed callable's backward
    returns views of its graph's static gradient buffer, which autograd may install as the
    leaf's ``.grad`` as it is; a ``zero_grad(set_to_none=False)`` would then zero the graph's
    buffer, and the next backward would add the new gradient to itself (twice the gradient).
    With the copy, ``.grad`` never shares memory with the graph."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad.clone()


def own_gradient(x: torch.Tensor) -> torch.Tensor:
    """``x`` for the forward; its gradient is a fresh copy (see :class:`_OwnGradient`)."""
    return _OwnGradient.apply(x)


class GraphedTextSide:
    """``fn(ctx) -> text features`` recorded as a forward and a backward CUDA graph.

    ``ctx`` is the prompt learner's context parameter; calling the graphed side with it
    copies its values into the graph's input, replays the forward and, in the backward,
    replays the backward graph, whose gradient reaches ``ctx.grad`` as an eager backward's
    would. The graphs are recorded on first use, after ``warmup`` eager passes on a side
    stream (on a clone of the context, so its gradient is not touched). The features it
    returns live in the graph's output buffer: the next call overwrites them, so a step
    calls it once and runs its backward before the next step (as CoOp's steps do)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], ctx: torch.Tensor, warmup=3):
        if ctx.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the context on a CUDA device, not {ctx.device}")
        sample = ctx.detach().clone().requires_grad_(True)
        self.shape, self.dtype, self.device = ctx.shape, ctx.dtype, ctx.device
        with _stream_kept_on_failure(ctx.device):
            self._graphed = torch.cuda.make_graphed_callables(
                fn, (sample,), num_warmup_iters=warmup
            )

    def matches(self, ctx: torch.Tensor) -> bool:
        return ctx.shape == self.shape and ctx.dtype == self.dtype and ctx.device == self.device

    def __call__(self, ctx: torch.Tensor) -> torch.Tensor:
        return self._graphed(own_gradient(ctx))


class GraphedImageEncoder:
    """A frozen image encoder's forward, ``fn(images) -> features``, replayed from a CUDA
    graph recorded per input shape, dtype and memory layout (at most ``max_shapes``; other
    shapes run eagerly). No gradient is recorded: the encoder is frozen. The features are
    returned as a copy, so a later replay cannot overwrite them."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], max_shapes=MAX_IMAGE_SHAPES):
        self.fn = fn
        self.max_shapes = max_shapes
        self._graphs: Dict[Tuple, Tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}

    @staticmethod
    def _key(x: torch.Tensor) -> Tuple:
        # inference mode too: a graph's input recorded there cannot be written outside it
        inference = torch.is_inference_mode_enabled()
        return (tuple(x.shape), tuple(x.stride()), x.dtype, x.device, inference)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        key = self._key(x)
        entry = self._graphs.get(key)
        if entry is None:
            if len(self._graphs) >= self.max_shapes or not self._recordable(x):
                with torch.no_grad():
                    return self.fn(x)
            try:
                with _stream_kept_on_failure(x.device):
                    entry = self._record(x)
            except RuntimeError as e:  # the platform cannot record it: eager from now on
                warn_not_recorded("the image encoder", e)
                self.max_shapes = 0
                with torch.no_grad():
                    return self.fn(x)
            self._graphs[key] = entry
        graph, static_in, static_out = entry
        static_in.copy_(x)
        graph.replay()
        return static_out.clone()

    @staticmethod
    def _recordable(x: torch.Tensor) -> bool:
        return x.device.type == "cuda"

    def _record(self, x: torch.Tensor):
        static_in = x.detach().clone()
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(2):  # let cudnn pick its algorithms before recording
                self.fn(static_in)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            static_out = self.fn(static_in)
        logger.info(f"Image encoder recorded as a CUDA graph for input {tuple(x.shape)}")
        return graph, static_in, static_out
