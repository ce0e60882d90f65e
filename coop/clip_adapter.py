"""The CLIP adapter: what ``coop``'s methods need of OpenAI CLIP, in one place.

Importing the package (with a ``pkg_resources`` shim for setuptools>=82), resolving a
backbone name or a local file to a checkpoint (downloaded with its SHA256 check), building
the model exactly as CoOp's ``load_clip_to_cpu`` does (so the torch RNG is consumed
identically), tokenization, the plain text encoder of the prompt learners, and the model
facts (widths, heads, context length, input size) read from the model, so that another CLIP
family can sit behind the same functions. Deep prompts (prompt tokens inserted into or
replacing tokens at the inputs of chosen transformer layers of both towers, as MaPLe and
PromptSRC use them) run through :class:`DeepTextEncoder` and :func:`encode_image_deep`,
which call CLIP's own residual blocks one by one and change the tokens between them; CLIP is
neither vendored nor edited. The speed paths, which rewrite parts of the encoders, are in
:mod:`coop.fast`.

Nothing is imported or loaded at module import time beyond the standard library and torch.
"""

from __future__ import annotations

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
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from coop.io import sha256_file

logger = logging.getLogger(__name__)

__all__ = [
    "CLIPWeightsError",
    "DeepTextEncoder",
    "TextEncoder",
    "add_layer_prompts",
    "available_models",
    "clip_dtype",
    "context_length",
    "default_cache_dir",
    "download_weights",
    "embed_dim",
    "encode_image_deep",
    "get_tokenizer",
    "image_dtype",
    "import_clip",
    "input_resolution",
    "load_clip",
    "resolve_weights",
    "text_heads",
    "text_layer_prompts",
    "text_layers",
    "text_width",
    "token_length",
    "tokenize",
    "vision_heads",
    "vision_layer_prompts",
    "vision_layers",
    "vision_tokens",
    "vision_width",
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


def text_layers(clip_model: nn.Module) -> int:
    """Residual blocks of the text transformer."""
    return len(clip_model.transformer.resblocks)


def is_vit(visual: nn.Module) -> bool:
    """Whether an image encoder is a vision transformer (not a ModifiedResNet)."""
    return hasattr(visual, "transformer") and hasattr(visual, "class_embedding")


def _vit(clip_model: nn.Module) -> nn.Module:
    visual = getattr(clip_model, "visual", clip_model)
    if not is_vit(visual):
        raise ValueError(
            f"Deep vision prompts need a ViT image encoder; this CLIP has a "
            f"{type(visual).__name__}. Set MODEL.BACKBONE.NAME to a ViT backbone (ViT-B/16, "
            "ViT-B/32, ViT-L/14)."
        )
    return visual


def vision_width(clip_model: nn.Module) -> int:
    """Width of the ViT image transformer (size of one image token; 768 for ViT-B)."""
    return int(_vit(clip_model).conv1.weight.shape[0])


def vision_layers(clip_model: nn.Module) -> int:
    """Residual blocks of the ViT image transformer."""
    return len(_vit(clip_model).transformer.resblocks)


def vision_heads(clip_model: nn.Module) -> int:
    """Attention heads of the ViT image transformer's blocks."""
    return int(_vit(clip_model).transformer.resblocks[0].attn.num_heads)


def vision_tokens(clip_model: nn.Module) -> int:
    """Tokens the ViT image transformer sees without prompts: the patches and the class
    token (197 for ViT-B/16 at 224 px)."""
    return int(_vit(clip_model).positional_embedding.shape[0])


# --------------------------------------------------------------------------------------------
# The text tower


class TextEncoder(nn.Module):
    """CLIP's text tower applied to prompt embeddings (CoOp's TextEncoder, the original
    computation).

    ``forward(prompts (n, 77, D), tokenized_prompts (n, 77)) -> (n, embed_dim)``; the feature
    is taken at the EOT token (the largest id). The faster text paths (:mod:`coop.fast.text`)
    build on it.
    """

    def __init__(self, clip_model: nn.Module) -> None:
        super().__init__()
        self.transformer = clip_model.transformer
        self.positional_embedding = clip_model.positional_embedding
        self.ln_final = clip_model.ln_final
        self.text_projection = clip_model.text_projection
        self.dtype = clip_model.dtype

    def forward(self, prompts: torch.Tensor, tokenized_prompts: torch.Tensor) -> torch.Tensor:
        x = prompts + self.positional_embedding.type(self.dtype)
        x = x.permute(1, 0, 2)  # NLD -> LND
        x = self.transformer(x)
        x = x.permute(1, 0, 2)  # LND -> NLD
        x = self.ln_final(x).type(self.dtype)
        # (n, D) rows at the EOT token, projected to (n, embed_dim)
        x = x[torch.arange(x.shape[0]), tokenized_prompts.argmax(dim=-1)] @ self.text_projection
        return x


# --------------------------------------------------------------------------------------------
# Deep prompts
#
# A method supplies, per tower, a list ``deep`` indexed by layer: ``deep[i]`` (n, width) is
# the prompt of the input of residual block i; an entry that is None, or past the end of the
# list, leaves the tokens as the previous block left them. Layer 0 is where the prompt tokens
# enter the sequence: on the image side ``deep[0]`` is appended after the class and patch
# tokens (with their positional embeddings, before ``ln_pre``); on the text side the
# method's prompt embeddings already hold them (CoOp's layout [SOS, ctx, class name ...]) and
# ``deep[0]`` must be None. At a layer i >= 1 the prompt replaces the tokens at the prompt's
# positions: the last n tokens of the image sequence, the tokens 1..n (after SOS) of the text
# sequence. Prompts are cast to the activations' dtype; the same prompt serves every image
# and every class. With no prompts both towers compute exactly what CLIP computes.


def layer_prompt(deep: Sequence[Optional[torch.Tensor]], i: int) -> Optional[torch.Tensor]:
    """The prompt of block ``i`` in a ``deep`` list (None: none)."""
    return deep[i] if i < len(deep) else None


def check_text_deep(deep: Sequence[Optional[torch.Tensor]]) -> None:
    """Refuse a text-side ``deep`` list with a layer-0 prompt (it belongs in the prompt
    embeddings)."""
    if deep and deep[0] is not None:
        raise ValueError("the text side's layer-0 prompt is part of the prompt embeddings")


def replace_text_prompt(x: torch.Tensor, prompt: torch.Tensor, seq_dim: int) -> torch.Tensor:
    """The text tokens ``x`` with tokens 1..n (after SOS) replaced by ``prompt`` (n, D) for
    every sequence; ``seq_dim``: the token axis of ``x`` (0 in CLIP's LND layout, 1 batch
    first)."""
    n = prompt.shape[0]
    if seq_dim == 0:  # (L, N, D)
        p = prompt.to(x.dtype).unsqueeze(1).expand(-1, x.shape[1], -1)
        return torch.cat([x[:1], p, x[1 + n :]], dim=0)
    p = prompt.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)  # (N, L, D)
    return torch.cat([x[:, :1], p, x[:, 1 + n :]], dim=1)


class DeepTextEncoder(TextEncoder):
    """CLIP's text tower with deep prompts: ``forward(prompts (n, 77, D), tokenized (n, 77),
    deep) -> (n, embed_dim)``, ``deep[i]`` (n_ctx, D) replacing the tokens 1..n_ctx at the
    input of block i >= 1 (see the section comment). CLIP's blocks run one by one over all
    77 positions, as ``transformer(x)`` runs them; without prompts the result is
    :class:`TextEncoder`'s bit for bit. The state dict has :class:`TextEncoder`'s keys."""

    def forward(  # type: ignore[override]
        self,
        prompts: torch.Tensor,
        tokenized_prompts: torch.Tensor,
        deep: Sequence[Optional[torch.Tensor]] = (),
    ) -> torch.Tensor:
        check_text_deep(deep)
        x = prompts + self.positional_embedding.type(self.dtype)
        x = x.permute(1, 0, 2)  # NLD -> LND
        for i, block in enumerate(self.transformer.resblocks):
            prompt = layer_prompt(deep, i)
            if prompt is not None:
                x = replace_text_prompt(x, prompt, seq_dim=0)
            x = block(x)
        x = x.permute(1, 0, 2)  # LND -> NLD
        x = self.ln_final(x).type(self.dtype)
        rows = torch.arange(x.shape[0])
        return x[rows, tokenized_prompts.argmax(dim=-1)] @ self.text_projection


def encode_image_deep(
    visual: nn.Module, image: torch.Tensor, deep: Sequence[Optional[torch.Tensor]] = ()
) -> torch.Tensor:
    """CLIP's ViT image tower ``visual`` on ``image`` (B, 3, H, W), already in the tower's
    dtype, with deep prompts: ``deep[0]`` (n, W) appended to the tokens before ``ln_pre``,
    ``deep[i]`` replacing the last n tokens at the input of block i >= 1 (see the section
    comment). Returns the unnormalised features (B, embed_dim); without prompts exactly
    ``visual(image)``."""
    visual = _vit(visual)
    x = visual.conv1(image)  # (B, W, grid, grid)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # (B, grid², W)
    cls = visual.class_embedding.to(x.dtype) + torch.zeros(
        x.shape[0], 1, x.shape[-1], dtype=x.dtype, device=x.device
    )
    x = torch.cat([cls, x], dim=1)  # (B, grid² + 1, W)
    x = x + visual.positional_embedding.to(x.dtype)
    first = layer_prompt(deep, 0)
    if first is not None:
        x = torch.cat([x, first.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)], dim=1)
    x = visual.ln_pre(x)
    x = x.permute(1, 0, 2)  # NLD -> LND
    for i, block in enumerate(visual.transformer.resblocks):
        prompt = layer_prompt(deep, i) if i else None
        if prompt is not None:
            p = prompt.to(x.dtype).unsqueeze(1).expand(-1, x.shape[1], -1)
            x = torch.cat([x[: x.shape[0] - prompt.shape[0]], p], dim=0)
        x = block(x)
    x = x.permute(1, 0, 2)  # LND -> NLD
    x = visual.ln_post(x[:, 0, :])
    if visual.proj is not None:
        x = x @ visual.proj
    return x


def add_layer_prompts(
    clip_model: nn.Module,
    vision_depth: int,
    vision_ctx: int,
    text_depth: int,
    text_ctx: int,
    std: float = 0.02,
) -> None:
    """Give the towers of ``clip_model`` their own learnable prompts (fp32, normal with
    ``std``), under the names the deep-prompting papers' modified CLIP uses, so that their
    checkpoints' keys match: ``visual.VPT`` (vision_ctx, W) for image layer 0 when
    ``vision_depth`` > 0, and ``VPT_shallow`` (n_ctx, width) on blocks 1..depth-1 of the
    image (``visual.transformer.resblocks.<i>``) and text (``transformer.resblocks.<i>``)
    transformers (blocks past the tower's last have none). Drawn in that order, after CLIP
    is built. :func:`vision_layer_prompts` and :func:`text_layer_prompts` return them as the
    ``deep`` lists of the two towers."""
    if min(vision_depth, text_depth) < 0:
        raise ValueError(f"Prompt depths must be >= 0, got {vision_depth} and {text_depth}")
    visual = clip_model.visual
    if vision_depth > 0:
        visual.VPT = nn.Parameter(torch.empty(vision_ctx, vision_width(clip_model)))
        nn.init.normal_(visual.VPT, std=std)
    for blocks, depth, n_ctx in (
        (visual.transformer.resblocks if vision_depth else [], vision_depth, vision_ctx),
        (clip_model.transformer.resblocks, text_depth, text_ctx),
    ):
        for i in range(1, min(depth, len(blocks))):
            width = blocks[i].ln_1.weight.shape[0]
            blocks[i].VPT_shallow = nn.Parameter(torch.empty(n_ctx, width))
            nn.init.normal_(blocks[i].VPT_shallow, std=std)


def vision_layer_prompts(visual: nn.Module) -> List[Optional[torch.Tensor]]:
    """The image tower's prompts that :func:`add_layer_prompts` gave it, as the ``deep`` list
    of :func:`encode_image_deep` (``visual``: CLIP's ``visual``)."""
    blocks = list(visual.transformer.resblocks)[1:] if is_vit(visual) else []
    return [getattr(visual, "VPT", None), *[getattr(b, "VPT_shallow", None) for b in blocks]]


def text_layer_prompts(transformer: nn.Module) -> List[Optional[torch.Tensor]]:
    """The text tower's prompts that :func:`add_layer_prompts` gave it, as the ``deep`` list
    of :class:`DeepTextEncoder` (``transformer``: CLIP's text ``transformer``)."""
    blocks = list(transformer.resblocks)[1:]
    return [None, *[getattr(b, "VPT_shallow", None) for b in blocks]]
