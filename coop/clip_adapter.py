"""The CLIP adapter: what ``coop``'s methods need of OpenAI CLIP, in one place.

Importing the package (with a ``pkg_resources`` shim for setuptools>=82), resolving a
backbone name or a local file to a checkpoint (downloaded with its SHA256 check), building
the model exactly as CoOp's ``load_clip_to_cpu`` does (so the torch RNG is consumed
identically), tokenization, the plain text encoder of the prompt learners, and the model
facts (widths, heads, context length, input size) read from the model, so that another CLIP
family can sit behind the same functions. The speed paths, which rewrite parts of the
encoders, are in :mod:`coop.fast`.

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
