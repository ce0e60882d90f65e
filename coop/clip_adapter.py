"""The one module that touches OpenAI CLIP's internals.

Everything else in ``coop`` reaches CLIP through this module: importing the package (with a
``pkg_resources`` shim for setuptools>=82), resolving a backbone name or a local file to a
checkpoint, building the model exactly as CoOp's ``load_clip_to_cpu`` does (so the torch RNG
is consumed identically), tokenization, and the text encoder used by the prompt learners.

Nothing is imported or loaded at module import time beyond the standard library and torch.
"""

from __future__ import annotations

import functools
import http.client
import importlib
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import types
import warnings
from typing import (
    Any,
    Callable,
    Dict,
    List,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import torch
import torch.nn.functional as F
from torch import nn

from coop.io import sha256_file

logger = logging.getLogger(__name__)

__all__ = [
    "CLIPWeightsError",
    "TextEncoder",
    "available_models",
    "clip_dtype",
    "context_length",
    "default_cache_dir",
    "download_weights",
    "embed_dim",
    "get_tokenizer",
    "image_dtype",
    "import_clip",
    "input_resolution",
    "load_clip",
    "resolve_weights",
    "text_heads",
    "text_width",
    "token_length",
    "tokenize",
]

CACHE_ENV_VAR = "COOP_CLIP_CACHE"
DEFAULT_CACHE_DIR = "~/.cache/clip"
_MISSING = object()


class CLIPWeightsError(RuntimeError):
    """CLIP weights cannot be found, downloaded, read or built into a model."""


# --------------------------------------------------------------------------------------------
# Importing the `clip` package


def _pkg_resources_usable() -> bool:
    """True when ``from pkg_resources import packaging`` can work without our shim."""
    mod = sys.modules.get("pkg_resources", _MISSING)
    if mod is None:  # explicitly blocked
        return False
    if mod is not _MISSING:
        return hasattr(mod, "packaging")
    try:
        return importlib.util.find_spec("pkg_resources") is not None
    except (ImportError, ValueError):
        return False


def import_clip() -> types.ModuleType:
    """Import and return the ``clip.clip`` module of the installed CLIP package.

    clip-anytorch and openai-clip run ``from pkg_resources import packaging`` at import time,
    and setuptools>=82 no longer ships ``pkg_resources``. When the real one is unavailable, a
    tiny stand-in module exposing the real ``packaging`` package is placed in ``sys.modules``
    for the duration of the import only (so other libraries still see ``pkg_resources`` as
    absent afterwards).
    """
    mod = sys.modules.get("clip.clip")
    if mod is not None:
        return mod
    if _pkg_resources_usable():
        return importlib.import_module("clip.clip")

    try:
        import packaging
        import packaging.version  # noqa: F401  (clip calls packaging.version.parse)
    except ImportError as e:  # pragma: no cover - packaging is a declared dependency
        raise ImportError(
            "Importing CLIP needs `pkg_resources` (setuptools<82) or the `packaging` package; "
            "install `packaging`."
        ) from e
    shim = types.ModuleType("pkg_resources")
    shim.__doc__ = "coop stand-in for pkg_resources: only `packaging`, used by clip."
    shim.packaging = packaging  # type: ignore[attr-defined]
    previous = sys.modules.get("pkg_resources", _MISSING)
    sys.modules["pkg_resources"] = shim
    try:
        return importlib.import_module("clip.clip")
    finally:
        if sys.modules.get("pkg_resources") is shim:
            if previous is _MISSING:
                del sys.modules["pkg_resources"]
            else:
                sys.modules["pkg_resources"] = previous  # type: ignore[assignment]


def _model_urls() -> Dict[str, str]:
    return import_clip()._MODELS


def __getattr__(name: str) -> Any:
    # MODEL_URLS is the package's own `_MODELS` dict (the same object), looked up lazily so
    # that importing this module does not import clip.
    if name == "MODEL_URLS":
        return _model_urls()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def available_models() -> List[str]:
    """Names accepted as MODEL.BACKBONE.NAME besides a checkpoint path (``RN50``, ``ViT-B/16``, ...)."""
    return list(_model_urls().keys())


# --------------------------------------------------------------------------------------------
# Resolving a backbone to a checkpoint file


def default_cache_dir(cfg_value: str = "") -> str:
    """The folder for downloaded weights: ``cfg_value``, else $COOP_CLIP_CACHE, else ~/.cache/clip."""
    folder = cfg_value or os.environ.get(CACHE_ENV_VAR, "") or DEFAULT_CACHE_DIR
    return os.path.abspath(os.path.expanduser(folder))


def download_weights(url: str, root: str) -> str:
    """Download ``url`` into folder ``root`` with CLIP's own downloader (SHA256-checked).

    Module-level so tests can replace it; ``resolve_weights`` also accepts ``download=``.
    """
    return import_clip()._download(url, root)


# Errors that mean "the weights could not be fetched" (no network, DNS, timeout, refused
# connection, HTTP error, truncated transfer, unwritable folder) or that the download failed
# its checksum (CLIP raises RuntimeError).
_FETCH_ERRORS = (OSError, http.client.HTTPException, RuntimeError, ValueError, TypeError)


def _fetch(url: str, cache: str, target: str, download: Optional[Callable[[str, str], str]]) -> str:
    """Download into a private temporary folder inside ``cache``, then rename onto ``target``.

    A killed or failed download never leaves a partial file at ``target``, and concurrent
    runs downloading the same file cannot corrupt each other.
    """
    fn = download if download is not None else download_weights
    os.makedirs(cache, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=".download-", dir=cache)
    try:
        got = fn(url, tmp_dir)
        expected = url.split("/")[-2]
        actual = sha256_file(got)
        if actual != expected:
            raise RuntimeError(
                f"the downloaded file's SHA256 checksum {actual} does not match {expected}"
            )
        os.replace(got, target)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return target


def resolve_weights(
    backbone: str,
    cache_dir: str = "",
    download: Optional[Callable[[str, str], str]] = None,
) -> str:
    """Return the path of the checkpoint for ``backbone`` (a CLIP model name or a file path).

    A model name is looked up in the cache folder (``default_cache_dir(cache_dir)``); a file
    there with the SHA256 from the URL is used without any network access. Otherwise it is
    downloaded with CLIP's downloader (or ``download(url, folder) -> path``). Failure raises
    ``CLIPWeightsError`` naming the cache folder and the URL.
    """
    if not backbone:
        raise CLIPWeightsError(
            "MODEL.BACKBONE.NAME is empty: give a CLIP model name "
            f"({', '.join(available_models())}) or the path to a local checkpoint file."
        )
    urls = _model_urls()
    if backbone in urls:
        return _resolve_named(backbone, urls[backbone], default_cache_dir(cache_dir), download)

    path = os.path.expanduser(backbone)
    if os.path.isfile(path):
        return path
    what = "a folder, not a file" if os.path.isdir(path) else "not an existing file"
    raise CLIPWeightsError(
        f"CLIP backbone {backbone!r} is neither a CLIP model name nor an existing file "
        f"({path!r} is {what}). Available models: {', '.join(urls)}. Set MODEL.BACKBONE.NAME "
        "to one of these names or to the path of a local checkpoint file."
    )


def _resolve_named(
    backbone: str, url: str, cache: str, download: Optional[Callable[[str, str], str]]
) -> str:
    expected = url.split("/")[-2]
    target = os.path.join(cache, os.path.basename(url))
    mismatch = ""
    if os.path.isfile(target):
        actual = sha256_file(target)
        if actual == expected:
            return target
        mismatch = (
            f"The existing file {target} fails its SHA256 checksum (expected {expected}, got "
            f"{actual}): it is incomplete or corrupt, and it could not be downloaded again. "
        )
        logger.warning("%s exists, but its SHA256 checksum does not match; re-downloading", target)
    elif os.path.exists(target):
        raise CLIPWeightsError(
            f"CLIP weights for backbone {backbone!r}: {target} exists but is not a regular file. "
            f"Remove it, or pass a local checkpoint path as MODEL.BACKBONE.NAME."
        )

    logger.info("Downloading CLIP weights for %s from %s into %s", backbone, url, cache)
    try:
        return _fetch(url, cache, target, download)
    except _FETCH_ERRORS as e:
        raise CLIPWeightsError(
            f"CLIP weights for backbone {backbone!r} are not available and could not be "
            f"downloaded ({type(e).__name__}: {e}). {mismatch}\n"
            f"  cache folder: {cache}\n"
            f"  URL: {url}\n"
            f"Download the file by hand into that folder (as {target}; its SHA256 must be "
            f"{expected}), or pass a local checkpoint path as MODEL.BACKBONE.NAME. "
            f"The cache folder can be changed with ${CACHE_ENV_VAR}."
        ) from e


# --------------------------------------------------------------------------------------------
# Building the model


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "(no message)"


def _read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """Read a plain tensor state dict (optionally wrapped as {"state_dict": ...}) safely."""
    not_clip = (
        f"{path} is neither a TorchScript CLIP archive nor a plain tensor state dict "
        "(only those are loaded; arbitrary pickles are never executed)"
    )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError, EOFError, ...
        raise CLIPWeightsError(f"{not_clip}: {type(e).__name__}: {_first_line(e)}") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if (
        not isinstance(obj, dict)
        or not obj
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    ):
        raise CLIPWeightsError(f"{not_clip}: it holds a {type(obj).__name__} of other objects.")
    return obj


# Builds the model from the ``clip.clip`` module and a checkpoint's state dict.
BuildModel = Callable[[types.ModuleType, Dict[str, torch.Tensor]], nn.Module]


def load_clip(
    backbone: str,
    cache_dir: str = "",
    download: Optional[Callable[[str, str], str]] = None,
    build: Optional[BuildModel] = None,
) -> nn.Module:
    """Load CLIP on the CPU exactly as CoOp's ``load_clip_to_cpu``.

    ``backbone`` is a model name or a checkpoint path (TorchScript archive as released by
    OpenAI, or a plain tensor state dict). The model is built by ``clip.model.build_model``,
    which first constructs ``CLIP`` with torch's default initialisers (consuming the global
    torch RNG like the original) and then loads the weights strictly. Returned in eval mode
    with the fp16 weights as built; callers decide precision (``.float()`` for fp32/amp).

    ``build(clip_module, state_dict)`` replaces ``build_model`` where it must return the same
    model and leave the torch RNG in the same state (the speed path that skips the
    initialisers: :func:`coop.fast.clip_init.memoised_builder`).
    """
    clip_mod = import_clip()
    path = resolve_weights(backbone, cache_dir, download)

    state_dict: Optional[Dict[str, torch.Tensor]] = None
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
            jit_model = torch.jit.load(path, map_location="cpu").eval()
    except RuntimeError:
        state_dict = _read_state_dict(path)
    else:
        state_dict = jit_model.state_dict()
        del jit_model

    try:
        model = build(clip_mod, state_dict) if build else clip_mod.build_model(state_dict)
    except KeyError as e:
        raise CLIPWeightsError(
            f"{path} does not hold CLIP weights: missing key {e}. Expected an OpenAI CLIP "
            "checkpoint (TorchScript archive or its state dict)."
        ) from e
    except (RuntimeError, ValueError, AssertionError, IndexError, TypeError) as e:
        raise CLIPWeightsError(
            f"The weights in {path} do not fit the CLIP architecture inferred from them "
            f"({type(e).__name__}: {_first_line(e)} ...)."
        ) from e
    return model.eval()


# --------------------------------------------------------------------------------------------
# Tokenization

_TOKENIZER: Any = None


def get_tokenizer() -> Any:
    """CLIP's ``SimpleTokenizer``, created on first use (the one ``clip.tokenize`` uses)."""
    global _TOKENIZER
    if _TOKENIZER is None:
        clip_mod = import_clip()
        from clip.simple_tokenizer import SimpleTokenizer

        tok = getattr(clip_mod, "_tokenizer", None)
        _TOKENIZER = tok if isinstance(tok, SimpleTokenizer) else SimpleTokenizer()
    return _TOKENIZER


def tokenize(
    texts: Union[str, Sequence[str]], context_length: int = 77, truncate: bool = False
) -> torch.Tensor:
    """Token ids ``[SOT] + BPE + [EOT]`` zero-padded: (N, context_length) int64."""
    if isinstance(texts, str):
        texts = [texts]
    ids = import_clip().tokenize(list(texts), context_length=context_length, truncate=truncate)
    return ids.long()


def token_length(text: str) -> int:
    """Number of BPE tokens of ``text`` without SOT/EOT (CoOp's ``name_lens``)."""
    return len(get_tokenizer().encode(text))


# --------------------------------------------------------------------------------------------
# Model facts, read from the model (so another CLIP family can sit behind this adapter)


def clip_dtype(clip_model: nn.Module) -> torch.dtype:
    """CLIP's compute dtype (``visual.conv1.weight.dtype``): fp16 as built, fp32 after .float()."""
    return clip_model.dtype


def input_resolution(clip_model: nn.Module) -> int:
    """Image side length the vision tower expects."""
    return int(clip_model.visual.input_resolution)


def embed_dim(clip_model: nn.Module) -> int:
    """Dimension of the joint image/text feature space."""
    return int(clip_model.text_projection.shape[1])


def text_width(clip_model: nn.Module) -> int:
    """Width of the text transformer (size of one prompt token embedding, CoOp's ctx_dim)."""
    return int(clip_model.ln_final.weight.shape[0])


def text_heads(clip_model: nn.Module) -> int:
    """Attention heads of the text transformer's blocks."""
    return int(clip_model.transformer.resblocks[0].attn.num_heads)


def context_length(clip_model: nn.Module) -> int:
    """Token positions of the text tower (77 for every OpenAI CLIP)."""
    return int(clip_model.positional_embedding.shape[0])


def image_dtype(visual: nn.Module) -> torch.dtype:
    """The dtype an image encoder computes in (its first convolution's, as CLIP's ``dtype``)."""
    return visual.conv1.weight.dtype


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
    n, length, d = x.shape
    for block in transformer.resblocks:
        heads = block.attn.num_heads
        h = block.ln_1(x)
        qkv = F.linear(h, block.attn.in_proj_weight, block.attn.in_proj_bias)
        q, k, v = qkv.view(n, length, 3, heads, d // heads).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (n, heads, L, d / heads)
        a = a.transpose(1, 2).reshape(n, length, d)
        x = x + F.linear(a, block.attn.out_proj.weight, block.attn.out_proj.bias)
        x = x + block.mlp(block.ln_2(x))
    return x


class TextEncoder(nn.Module):
    """CLIP's text tower applied to prompt embeddings (CoOp's TextEncoder).

    ``forward(prompts (n, 77, D), tokenized_prompts (n, 77)) -> (n, embed_dim)``; the feature
    is taken at the EOT token (the largest id). With ``eot_truncate`` the transformer runs only
    on the first ``max(EOT index) + 1`` positions: the causal mask makes later positions
    irrelevant to the EOT feature, so the result equals the plain path up to float rounding.
    """

    def __init__(self, clip_model: nn.Module, eot_truncate: bool = False) -> None:
        super().__init__()
        self.transformer = clip_model.transformer
        self.positional_embedding = clip_model.positional_embedding
        self.ln_final = clip_model.ln_final
        self.text_projection = clip_model.text_projection
        self.dtype = clip_model.dtype
        self.eot_truncate = eot_truncate

    def forward(self, prompts: torch.Tensor, tokenized_prompts: torch.Tensor) -> torch.Tensor:
        if self.eot_truncate:
            return self.forward_truncated(prompts, tokenized_prompts)
        x = prompts + self.positional_embedding.type(self.dtype)
        x = x.permute(1, 0, 2)  # NLD -> LND
        x = self.transformer(x)
        x = x.permute(1, 0, 2)  # LND -> NLD
        x = self.ln_final(x).type(self.dtype)
        # (n, D) rows at the EOT token, projected to (n, embed_dim)
        x = x[torch.arange(x.shape[0]), tokenized_prompts.argmax(dim=-1)] @ self.text_projection
        return x

    def forward_truncated(
        self,
        prompts: torch.Tensor,
        tokenized_prompts: torch.Tensor,
        length: Optional[int] = None,
    ) -> torch.Tensor:
        """The EOT features computed over the first ``length`` positions only (default: up to
        the last EOT token). With ``length`` given and ``tokenized_prompts`` on the prompts'
        device, nothing waits for the device: no value is read back to the host, and nothing is
        copied from host memory (the attention is causal without CLIP's mask; see
        :func:`encode_causal`)."""
        eot = tokenized_prompts.argmax(dim=-1)  # (n,)
        if length is None:
            length = int(eot.max()) + 1
        x = prompts[:, :length] + self.positional_embedding[:length].type(self.dtype)
        x = encode_causal(self.transformer, x)  # (n, L, D), L = length
        x = self.ln_final(x).type(self.dtype)
        rows = torch.arange(x.shape[0], device=x.device)
        x = x[rows, eot.to(x.device)] @ self.text_projection
        return x


def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(n, S, D) -> (n, heads, S, D / heads)."""
    n, s, d = t.shape
    return t.reshape(n, s, heads, d // heads).transpose(1, 2)


def _merge_heads(t: torch.Tensor) -> torch.Tensor:
    """(n, heads, S, hd) -> (n, S, heads * hd)."""
    n, h, s, hd = t.shape
    return t.transpose(1, 2).reshape(n, s, h * hd)


# Query rows per attention problem of the class suffixes: consecutive classes are packed into
# blocks of this many token rows (a class longer than that gets a block of its own length),
# attended to at once under a block-diagonal causal mask; far fewer and larger problems than
# one per class.
_SUFFIX_BLOCK_ROWS = 24


class _SuffixBlocks(NamedTuple):
    """Where the packed class suffixes sit in the attention blocks (see
    :func:`_suffix_blocks`)."""

    nb: int  # blocks
    rows: torch.Tensor  # (nb * R,) row of cat(prefix, suffixes) in each block slot
    slots: torch.Tensor  # (T,) the block slot of each packed suffix row
    mask: torch.Tensor  # (nb, 1, R, P + R) bool: what each slot's query may attend to
    last_rows: torch.Tensor  # (n,) row of each class's last token
    last_query_rows: torch.Tensor  # (nb * C,) the same, laid out per block (C classes max)
    last_slots: torch.Tensor  # (n,) each class's position in that layout
    last_mask: torch.Tensor  # (nb, 1, C, P + R) bool


@functools.lru_cache(maxsize=64)
def _suffix_blocks(lengths: Tuple[int, ...], p: int, block_rows: int, device: str) -> _SuffixBlocks:
    """Pack classes (suffix ``lengths``, after a prefix of ``p`` rows) greedily, in order,
    into blocks of ``R = max(block_rows, longest)`` slots. A query slot may attend to every
    prefix key and, causally, to the keys of its own class; empty slots read row 0, are never
    attended to, and their outputs are dropped. Built outside inference mode (the tensors are
    reused by later passes that record gradients)."""
    with torch.inference_mode(False):
        r = max(block_rows, max(lengths))
        block, offset, first_of_block = [], [], []
        b, used = 0, 0
        for k, length in enumerate(lengths):
            if k == 0 or used + length > r:
                if k:
                    b, used = b + 1, 0
                first_of_block.append(k)
            block.append(b)
            offset.append(used)
            used += length
        nb = b + 1
        dev = torch.device(device)
        ln = torch.tensor(lengths)
        n, t = len(lengths), int(ln.sum())
        cls = torch.repeat_interleave(torch.arange(n), ln)  # class of each packed row
        start = torch.cumsum(ln, 0) - ln
        pos = torch.arange(t) - start[cls]  # position of each packed row within its class
        slots = torch.tensor(block)[cls] * r + torch.tensor(offset)[cls] + pos
        rows = torch.zeros(nb * r, dtype=torch.long)
        rows[slots] = p + torch.arange(t)
        slot_cls = torch.full((nb * r,), -1, dtype=torch.long)
        slot_cls[slots] = cls
        slot_pos = torch.zeros(nb * r, dtype=torch.long)
        slot_pos[slots] = pos
        sc, sp = slot_cls.view(nb, r), slot_pos.view(nb, r)
        filled = (sc >= 0)[:, None, :]
        own = (sc[:, :, None] == sc[:, None, :]) & (sp[:, :, None] >= sp[:, None, :]) & filled
        mask = torch.cat([torch.ones(nb, r, p, dtype=torch.bool), own], dim=-1).unsqueeze(1)
        # the last layer: one query per class, at its last token, C per block
        index_in_block = torch.arange(n) - torch.tensor(first_of_block)[torch.tensor(block)]
        c = int(index_in_block.max()) + 1
        last_rows = p + start + ln - 1
        last_slots = torch.tensor(block) * c + index_in_block
        last_query_rows = torch.zeros(nb * c, dtype=torch.long)
        last_query_rows[last_slots] = last_rows
        query_cls = torch.full((nb * c,), -2, dtype=torch.long)  # -2: an empty query slot
        query_cls[last_slots] = torch.arange(n)
        own_last = (query_cls.view(nb, c)[:, :, None] == sc[:, None, :]) & filled
        last_mask = torch.cat([torch.ones(nb, c, p, dtype=torch.bool), own_last], dim=-1)
        return _SuffixBlocks(
            nb=nb,
            rows=rows.to(dev),
            slots=slots.to(dev),
            mask=mask.to(dev),
            last_rows=last_rows.to(dev),
            last_query_rows=last_query_rows.to(dev),
            last_slots=last_slots.to(dev),
            last_mask=last_mask.unsqueeze(1).to(dev),
        )


@functools.lru_cache(maxsize=64)
def _pack_index(lengths: Tuple[int, ...], device: str) -> torch.Tensor:
    """Rows of the (n * max(lengths)) padded suffix rows that belong to a class, in order:
    the packing of the suffixes as a gather with a fixed index (a boolean mask would read
    its count back to the host). Built outside inference mode, like :func:`_suffix_blocks`."""
    with torch.inference_mode(False):
        lm = max(lengths)
        idx = [i * lm + j for i, length in enumerate(lengths) for j in range(length)]
        return torch.tensor(idx, dtype=torch.long).to(torch.device(device))


def suffix_lengths(tokenized_prompts: torch.Tensor, prefix_len: int) -> Tuple[int, ...]:
    """Each prompt's token count after a shared prefix of ``prefix_len`` tokens, up to and
    including its end-of-text token (read on the host once, not every step)."""
    eot = tokenized_prompts.argmax(dim=-1)
    if int(eot.min()) < prefix_len:
        raise ValueError("an end-of-text token lies inside the shared prefix")
    return tuple(int(v) for v in (eot - prefix_len + 1).tolist())


def encode_shared_prefix(
    transformer: nn.Module, x_p: torch.Tensor, x_s: torch.Tensor, lengths: Sequence[int]
) -> torch.Tensor:
    """The last layer's outputs at each class's last position, (n, D), of prompts made of a
    shared prefix followed by per-class suffixes, under CLIP's causal mask.

    ``x_p`` (P, D) is the prefix's input (embeddings plus positions), ``x_s`` (T, D) the
    suffixes' inputs packed one class after another, ``lengths`` the n suffix lengths (summing
    to T). Prefix and suffix rows go through every per-token operation (layer norms,
    projections, MLP) together, once per layer. The attention runs twice per layer: once for
    the prefix (causal), and once for all the classes, packed in blocks of rows; a token
    attends to the prefix's keys and values and, causally, to its own class's. In the last
    layer only each class's last position is computed beyond its key and value.
    """
    p, d = x_p.shape
    blk = _suffix_blocks(tuple(int(v) for v in lengths), p, _SUFFIX_BLOCK_ROWS, str(x_s.device))
    nb = blk.nb

    x = torch.cat([x_p, x_s])
    blocks = list(transformer.resblocks)
    for i, block in enumerate(blocks):
        final = i + 1 == len(blocks)
        heads = block.attn.num_heads
        w, b = block.attn.in_proj_weight, block.attn.in_proj_bias
        h = block.ln_1(x)
        if final:  # only the last positions' outputs are used
            k, v = F.linear(h, w[d:], b[d:]).chunk(2, dim=-1)
        else:
            q, k, v = F.linear(h, w, b).chunk(3, dim=-1)
        # (index_select, whose backward is a plain index_add, rather than indexing)
        k_s = torch.cat([k[:p].expand(nb, p, d), k.index_select(0, blk.rows).view(nb, -1, d)], 1)
        v_s = torch.cat([v[:p].expand(nb, p, d), v.index_select(0, blk.rows).view(nb, -1, d)], 1)
        k_s, v_s = _split_heads(k_s, heads), _split_heads(v_s, heads)
        if final:
            q_l = F.linear(h.index_select(0, blk.last_query_rows), w[:d], b[:d])
            q_l = _split_heads(q_l.view(nb, -1, d), heads)
            a_l = F.scaled_dot_product_attention(q_l, k_s, v_s, attn_mask=blk.last_mask)
            att = _merge_heads(a_l).reshape(-1, d).index_select(0, blk.last_slots)
            x = x.index_select(0, blk.last_rows)
        else:
            a_p = F.scaled_dot_product_attention(
                _split_heads(q[None, :p], heads),
                _split_heads(k[None, :p], heads),
                _split_heads(v[None, :p], heads),
                is_causal=True,
            )
            a_s = F.scaled_dot_product_attention(
                _split_heads(q.index_select(0, blk.rows).view(nb, -1, d), heads),
                k_s,
                v_s,
                attn_mask=blk.mask,
            )
            a_s = _merge_heads(a_s).reshape(-1, d).index_select(0, blk.slots)
            att = torch.cat([_merge_heads(a_p)[0], a_s])
        x = x + F.linear(att, block.attn.out_proj.weight, block.attn.out_proj.bias)
        x = x + block.mlp(block.ln_2(x))
    return x


class SharedPrefixTextEncoder(TextEncoder):
    """CLIP's text tower for prompts that share their first ``P`` token embeddings.

    With a unified context and the class token at the end, the start token and the context
    tokens are the same for every class, and under the causal mask so are their hidden
    states. They are computed once; each class then runs only over its own tokens up to its
    end-of-text token, attending to the prefix's keys and values. Gradients flow to the
    prefix (the learnable context). ``class_chunk`` > 0 processes the classes in chunks with
    activation checkpointing, bounding memory for many classes. Equal to
    :class:`TextEncoder` up to float rounding.
    """

    def __init__(self, clip_model: nn.Module, class_chunk: int = 0) -> None:
        super().__init__(clip_model)
        self.class_chunk = class_chunk

    def forward(  # type: ignore[override]
        self,
        prefix: torch.Tensor,
        suffix: torch.Tensor,
        tokenized_prompts: torch.Tensor,
        lengths: Optional[Tuple[int, ...]] = None,
    ) -> torch.Tensor:
        """``prefix`` (P, D) shared embeddings, ``suffix`` (n, 77 - P, D) per-class
        embeddings, ``tokenized_prompts`` (n, 77) -> text features (n, embed_dim).
        ``lengths``: :func:`suffix_lengths` of the prompts, computed once by the caller; with
        them nothing in the pass reads a value back from the device."""
        p, d = prefix.shape
        pos = self.positional_embedding.type(self.dtype)
        if lengths is None:
            lengths = suffix_lengths(tokenized_prompts, p)
        x_p = prefix + pos[:p]
        # each class runs only up to its own end-of-text token
        n = len(lengths)
        chunked = bool(self.class_chunk) and torch.is_grad_enabled() and n > self.class_chunk
        step = self.class_chunk if chunked else n

        def run(x_prefix: torch.Tensor, a: int, b: int) -> torch.Tensor:
            # classes a..b-1 -> their features at the end-of-text tokens, (b - a, embed_dim)
            lens = tuple(lengths[a:b])
            lm = max(lens)
            padded = suffix[a:b, :lm] + pos[p : p + lm]
            # packed, one class after another
            x_s = padded.reshape(-1, d).index_select(0, _pack_index(lens, str(suffix.device)))
            h = encode_shared_prefix(self.transformer, x_prefix, x_s, lens)
            return self.ln_final(h).type(self.dtype) @ self.text_projection

        if not chunked:
            return run(x_p, 0, n)
        from torch.utils.checkpoint import checkpoint

        outs = [
            checkpoint(run, x_p, a, min(a + step, n), use_reentrant=False)
            for a in range(0, n, step)
        ]
        return torch.cat(outs)
