"""coop.clip_adapter and coop.testing.tiny_clip: loading, RNG order, offline errors, model
facts, the plain text tower."""

from __future__ import annotations

import hashlib
import os
import pickle
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
import warnings

import pytest
import torch

from coop import clip_adapter as ca
from coop.testing.tiny_clip import save_tiny_clip, tiny_clip_args, tiny_clip_model

CASES = [(arch, fmt) for arch in ("vit", "resnet") for fmt in ("state_dict", "torchscript")]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_clip")
    return {
        (arch, fmt): save_tiny_clip(str(folder / f"{arch}_{fmt}.pt"), arch, fmt)
        for arch, fmt in CASES
    }


@pytest.fixture(scope="module")
def sources():
    return {arch: tiny_clip_model(arch) for arch in ("vit", "resnet")}


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to open a URL fails as on a machine without network."""
    calls = []

    def no_network(*args, **kwargs):
        calls.append(args)
        raise urllib.error.URLError("network is unreachable (test)")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    return calls


def _fake_model(monkeypatch, content: bytes, name: str = "Fake-T/1") -> tuple:
    sha = hashlib.sha256(content).hexdigest()
    url = f"https://example.invalid/clip/models/{sha}/Fake-T-1.pt"
    monkeypatch.setitem(ca.MODEL_URLS, name, url)
    return name, url, sha


# ------------------------------------------------------------------------------------------
# import


def test_import_is_lazy_and_shim_used_only_for_import():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["pkg_resources"] = None  # as if setuptools>=82: no pkg_resources
        import coop.clip_adapter as ca
        assert "clip" not in sys.modules and "clip.clip" not in sys.modules
        clip = ca.import_clip()
        assert clip.__name__ == "clip.clip" and callable(clip.tokenize)
        assert sys.modules["pkg_resources"] is None  # the shim did not stay behind
        assert ca.import_clip() is clip
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_import_clip_in_this_env():
    clip = ca.import_clip()
    assert clip.__name__ == "clip.clip"
    assert ca.MODEL_URLS is clip._MODELS
    names = ca.available_models()
    assert {"RN50", "RN101", "ViT-B/32", "ViT-B/16"} <= set(names)
    with pytest.raises(AttributeError):
        ca.NOT_A_THING  # noqa: B018


# ------------------------------------------------------------------------------------------
# loading local files


@pytest.mark.parametrize("arch,fmt", CASES)
def test_load_local_file_matches_source(ckpts, sources, arch, fmt):
    path = ckpts[(arch, fmt)]
    assert ca.resolve_weights(path) == path
    model = ca.load_clip(path)
    assert ca.clip_dtype(model) == torch.float16  # fp16 as built, no .float()
    assert model.token_embedding.weight.dtype == torch.float32
    assert not model.training
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert ca.input_resolution(model) == 32
    assert ca.embed_dim(model) == 64 and ca.text_width(model) == 64
    assert ca.text_heads(model) == 1 and ca.context_length(model) == 77
    assert ca.image_dtype(model.visual) == torch.float16

    src = sources[arch]
    model = model.float()
    g = torch.Generator().manual_seed(1)
    image = torch.randn(3, 3, 32, 32, generator=g)
    ids = ca.tokenize(["a photo of a dog.", "x x x motorbike.", ""])
    with torch.no_grad():
        assert torch.equal(model.encode_image(image), src.encode_image(image))
        assert torch.equal(model.encode_text(ids), src.encode_text(ids))
    assert torch.equal(model.logit_scale, src.logit_scale)
    assert abs(model.logit_scale.exp().item() - 100.0) < 1e-3


def test_torchscript_archive_like_released(ckpts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sd = torch.jit.load(ckpts[("vit", "torchscript")], map_location="cpu").state_dict()
    for key in ("input_resolution", "context_length", "vocab_size"):
        assert key in sd
    assert int(sd["input_resolution"]) == 32 and int(sd["context_length"]) == 77
    assert "visual.proj" in sd and sd["token_embedding.weight"].shape == (49408, 64)
    plain = torch.load(ckpts[("vit", "state_dict")], map_location="cpu", weights_only=True)
    assert set(sd) - set(plain) == {"input_resolution", "context_length", "vocab_size"}


@pytest.mark.parametrize("arch,fmt", CASES)
def test_construction_consumes_rng_like_clip(ckpts, arch, fmt):
    from clip.model import CLIP

    torch.manual_seed(123)
    start = torch.get_rng_state()
    ca.load_clip(ckpts[(arch, fmt)])
    after_load = torch.get_rng_state()
    torch.manual_seed(123)
    CLIP(*tiny_clip_args(arch))
    after_direct = torch.get_rng_state()
    assert not torch.equal(start, after_load)  # construction draws ...
    assert torch.equal(after_load, after_direct)  # ... exactly like building CLIP directly


def test_tiny_clip_does_not_touch_global_rng():
    torch.manual_seed(7)
    state = torch.get_rng_state()
    tiny_clip_model("vit", seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    a, b = tiny_clip_model("vit", seed=3), tiny_clip_model("vit", seed=4)
    assert torch.equal(a.text_projection, tiny_clip_model("vit", seed=3).text_projection)
    assert not torch.equal(a.text_projection, b.text_projection)


def test_wrapped_state_dict_loads(ckpts, tmp_path, sources):
    plain = torch.load(ckpts[("vit", "state_dict")], map_location="cpu", weights_only=True)
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": plain, "epoch": 3}, path)
    model = ca.load_clip(str(path)).float()
    assert torch.equal(model.text_projection, sources["vit"].text_projection)


def test_mismatched_state_dict_names_file(ckpts, tmp_path):
    plain = torch.load(ckpts[("vit", "state_dict")], map_location="cpu", weights_only=True)
    del plain["ln_final.bias"]
    path = tmp_path / "broken.pt"
    torch.save(plain, path)
    with pytest.raises(ca.CLIPWeightsError, match="broken.pt"):
        ca.load_clip(str(path))

    other = tmp_path / "not_clip.pt"
    torch.save({"weight": torch.zeros(3)}, other)
    with pytest.raises(ca.CLIPWeightsError, match="not_clip.pt.*missing key"):
        ca.load_clip(str(other))


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (_touch, (self.marker,))


def _touch(path):  # would run if the pickle were executed
    open(path, "w").close()
    return path


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch_save", "pickle", "empty"])
def test_arbitrary_pickle_is_refused(tmp_path, writer):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pt"
    if writer == "torch_save":
        torch.save({"model": _Payload(str(marker))}, path)
    elif writer == "pickle":
        with open(path, "wb") as f:
            pickle.dump(_Payload(str(marker)), f)
    else:
        path.write_bytes(b"")
    with pytest.raises(ca.CLIPWeightsError, match="neither a TorchScript CLIP archive nor a plain"):
        ca.load_clip(str(path))
    assert not marker.exists()


# ------------------------------------------------------------------------------------------
# names, cache and the offline errors


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("COOP_CLIP_CACHE", raising=False)
    assert ca.default_cache_dir() == os.path.expanduser("~/.cache/clip")
    monkeypatch.setenv("COOP_CLIP_CACHE", str(tmp_path / "env"))
    assert ca.default_cache_dir() == str(tmp_path / "env")
    assert ca.default_cache_dir(str(tmp_path / "cfg")) == str(tmp_path / "cfg")


def test_cached_file_with_right_sha_needs_no_network(monkeypatch, tmp_path, offline):
    content = b"fake clip weights"
    name, url, _ = _fake_model(monkeypatch, content)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "Fake-T-1.pt").write_bytes(content)
    assert ca.resolve_weights(name, str(cache)) == str(cache / "Fake-T-1.pt")
    assert offline == []


def test_offline_missing_weights_error(tmp_path, offline):
    cache = tmp_path / "cache"
    url = ca.MODEL_URLS["RN50"]
    with pytest.raises(ca.CLIPWeightsError) as info:
        ca.load_clip("RN50", str(cache))
    msg = str(info.value)
    assert "'RN50'" in msg and str(cache) in msg and url in msg
    assert "by hand" in msg and "MODEL.BACKBONE.NAME" in msg
    assert len(offline) == 1
    assert os.listdir(cache) == []  # no partial file, no temp folder left behind


def test_offline_wrong_sha_mentions_checksum(tmp_path, offline):
    cache = tmp_path / "cache"
    cache.mkdir()
    stale = cache / "ViT-B-16.pt"
    stale.write_bytes(b"truncated download")
    with pytest.raises(ca.CLIPWeightsError, match="checksum") as info:
        ca.resolve_weights("ViT-B/16", str(cache))
    assert ca.MODEL_URLS["ViT-B/16"] in str(info.value) and str(cache) in str(info.value)
    assert stale.read_bytes() == b"truncated download"  # left untouched
    assert sorted(os.listdir(cache)) == ["ViT-B-16.pt"]


@pytest.mark.filterwarnings("ignore::ResourceWarning")  # clip._download leaves files unclosed
def test_download_through_clip_downloader(monkeypatch, tmp_path):
    """The real clip._download runs (fed by a fake URL opener) and the file lands atomically."""
    content = b"0123456789" * 2000
    name, url, _ = _fake_model(monkeypatch, content)

    class FakeResponse:
        def __init__(self):
            self._data = [content[i : i + 8192] for i in range(0, len(content), 8192)] + [b""]

        def info(self):
            return {"Content-Length": str(len(content))}

        def read(self, n):
            return self._data.pop(0)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    opened = []
    monkeypatch.setattr(urllib.request, "urlopen", lambda u: opened.append(u) or FakeResponse())
    cache = tmp_path / "cache"
    path = ca.resolve_weights(name, str(cache))
    assert path == str(cache / "Fake-T-1.pt") and opened == [url]
    assert open(path, "rb").read() == content
    assert os.listdir(cache) == ["Fake-T-1.pt"]


def test_injected_download_and_bad_checksum(monkeypatch, tmp_path):
    name, url, _ = _fake_model(monkeypatch, b"right")

    def bad_download(u, root):
        out = os.path.join(root, os.path.basename(u))
        with open(out, "wb") as f:
            f.write(b"wrong")
        return out

    cache = tmp_path / "cache"
    with pytest.raises(ca.CLIPWeightsError, match="checksum"):
        ca.resolve_weights(name, str(cache), download=bad_download)
    assert os.listdir(cache) == []

    monkeypatch.setattr(ca, "download_weights", lambda u, root: bad_download(u, root))
    with pytest.raises(ca.CLIPWeightsError, match=str(cache).replace("\\", "\\\\")):
        ca.resolve_weights(name, str(cache))


def test_unknown_name_lists_models(tmp_path):
    with pytest.raises(ca.CLIPWeightsError) as info:
        ca.resolve_weights("ViT-X/99", str(tmp_path))
    msg = str(info.value)
    assert "neither" in msg and "RN50" in msg and "ViT-B/16" in msg
    with pytest.raises(ca.CLIPWeightsError, match="folder"):
        ca.resolve_weights(str(tmp_path))


# ------------------------------------------------------------------------------------------
# tokenization


def test_tokenize():
    ids = ca.tokenize("a photo of a")
    assert ids.dtype == torch.int64 and ids.shape == (1, 77)
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 49407, 0]
    assert ids[0, 6:].abs().sum() == 0
    assert ca.tokenize(["a", "b c"]).shape == (2, 77)


def test_token_length_and_coop_prompt_row():
    assert ca.token_length("motorbike") == 1
    assert ca.token_length("a photo of a") == 4
    row = ca.tokenize(" ".join(["X"] * 16) + " motorbike.")[0]
    assert row[:20].tolist() == [49406] + [343] * 16 + [33341, 269, 49407]
    assert int(row.argmax()) == 19


# ------------------------------------------------------------------------------------------
# TextEncoder


PROMPTS = ["a photo of a dog.", "x x x x motorbike.", "a", "an extremely long prompt " * 8]


@pytest.mark.parametrize("arch", ["vit", "resnet"])
def test_text_encoder_equals_encode_text(sources, arch):
    model = sources[arch]
    ids = ca.tokenize(PROMPTS)
    with torch.no_grad():
        prompts = model.token_embedding(ids).type(model.dtype)
        out = ca.TextEncoder(model)(prompts, ids)
        assert out.shape == (len(PROMPTS), 64)
        assert torch.equal(out, model.encode_text(ids))


def test_text_encoder_fp16_as_built(ckpts):
    model = ca.load_clip(ckpts[("vit", "state_dict")])
    ids = ca.tokenize(PROMPTS[:2])
    with torch.no_grad():
        prompts = model.token_embedding(ids).type(model.dtype)
        out = ca.TextEncoder(model)(prompts, ids)
        assert out.dtype == torch.float16
        assert torch.equal(out, model.encode_text(ids))
