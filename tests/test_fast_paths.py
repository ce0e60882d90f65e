"""Every fast path gives the plain path's numbers (up to float rounding)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers_train import coop_argv, loss_lines, read_results, zeroshot_argv
from torch.utils._python_dispatch import TorchDispatchMode

from coop.clip_adapter import TextEncoder, embed_dim, load_clip, tokenize
from coop.config import get_cfg_default
from coop.fast import prompt_text_encoder
from coop.fast.shared_prefix import SharedPrefixTextEncoder
from coop.fast.text import PromptTextEncoder, TruncatedTextEncoder, text_mode
from coop.testing.tiny_clip import save_tiny_clip, tiny_clip_model
from coop.train import main
from coop.trainers.coop import CustomCLIP, PromptLearner

NAMES = ["face", "accordion", "hello kitty", "motorbike", "a very long class name of words"]


def _cfg(**fast):
    cfg = get_cfg_default()
    cfg.INPUT.SIZE = (32, 32)
    for k, v in fast.items():
        cfg.FAST[k] = v
    return cfg


@pytest.fixture(scope="module")
def clip32(tiny_vit):
    return load_clip(tiny_vit).float()


@pytest.fixture(scope="module")
def clip_deep(tmp_path_factory):
    """Three text layers: the shared-prefix encoder's inner layers (attention over the prefix
    and the class blocks) run, not only its last one."""
    path = tmp_path_factory.mktemp("clip") / "deep.pt"
    return load_clip(save_tiny_clip(str(path), arch="vit", text_layers=3)).float()


@pytest.mark.parametrize(
    "position,csc,expected",
    [("end", False, "shared_prefix"), ("end", True, "truncate"), ("middle", False, "truncate")],
)
def test_text_mode_selection(clip32, position, csc, expected):
    cfg = _cfg()
    cfg.TRAINER.COOP.CLASS_TOKEN_POSITION = position
    cfg.TRAINER.COOP.CSC = csc
    pl = PromptLearner(cfg, NAMES, clip32)
    assert text_mode(cfg, pl) == expected
    assert text_mode(_cfg(ENABLED=False), pl) == "plain"
    # on a GPU, auto truncates below GPU_SHARED_PREFIX_MIN_CLASSES classes (5 < 500 here)
    assert text_mode(cfg, pl, "cuda") == "truncate"
    cfg.FAST.GPU_SHARED_PREFIX_MIN_CLASSES = len(NAMES)
    assert text_mode(cfg, pl, "cuda") == expected
    cfg.FAST.GPU_SHARED_PREFIX_MIN_CLASSES = 500
    # replayed from CUDA graphs, the per-operation cost is gone: the fewest FLOPs win
    cfg.FAST.CUDA_GRAPHS = True
    assert text_mode(cfg, pl, "cuda", graphs=True) == expected
    assert prompt_text_encoder(cfg, clip32, pl, "fp16").text_modes["cuda"] == expected
    # not graphed under autocast
    assert prompt_text_encoder(cfg, clip32, pl, "amp").text_modes["cuda"] == "truncate"
    cfg.FAST.CUDA_GRAPHS = False
    cfg.FAST.TEXT = "shared_prefix"  # asked for: on every device, where the prompts allow it
    assert text_mode(cfg, pl, "cuda") == text_mode(cfg, pl, "cpu") == expected
    cfg.FAST.TEXT = "truncate"
    assert text_mode(cfg, pl) == text_mode(cfg, pl, "cuda") == "truncate"
    cfg.FAST.TEXT = "plain"
    assert text_mode(cfg, pl) == text_mode(cfg, pl, "cuda") == "plain"


class _CountOps(TorchDispatchMode):
    """Counts the ATen operations run inside it."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def test_the_gpu_choice_for_few_classes_runs_fewer_operations_than_the_original(clip_deep):
    """What the GPU default rests on: truncation runs fewer operations than the original
    (its blocks attend causally without nn.MultiheadAttention's layout copies and mask; about
    a third fewer), the shared prefix far more of them (though far fewer FLOPs)."""
    counts = {}
    for mode in ("plain", "truncate", "shared_prefix"):
        torch.manual_seed(0)
        model = CustomCLIP(_cfg(TEXT=mode), NAMES, clip_deep)
        assert model.text_mode == mode
        with _CountOps() as ops:
            model.text_features().sum().backward()
        counts[mode] = ops.n
    assert counts["truncate"] < counts["plain"] * 0.85  # three layers; 0.64 at twelve
    assert counts["shared_prefix"] > counts["plain"] * 1.2
    auto = CustomCLIP(_cfg(), NAMES, clip_deep)
    assert auto.text_encoder.text_modes == {"cpu": "shared_prefix", "cuda": "truncate"}


class _HostToDevice(TorchDispatchMode):
    """Records every copy of a CPU tensor to another device (on a GPU, a copy from host
    memory, which blocks the host and cannot be recorded in a CUDA graph)."""

    def __init__(self):
        super().__init__()
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in ("_to_copy", "copy_", "index", "index_put_"):
            ins = [a for a in args if isinstance(a, torch.Tensor)]
            ins += [t for a in args if isinstance(a, (list, tuple)) for t in a
                    if isinstance(t, torch.Tensor)]  # fmt: skip
            res = out if isinstance(out, torch.Tensor) else None
            if res is not None and res.device.type != "cpu":
                if any(t.device.type == "cpu" and t.dim() > 0 for t in ins):
                    self.copies.append(name)
        return out


@pytest.mark.parametrize("text", ["auto", "shared_prefix", "truncate", "graphs_plain"])
@pytest.mark.parametrize("chunk", [0, 2])
def test_fast_text_step_waits_for_nothing_on_the_device(tiny_vit, text, chunk):
    """On a GPU every value read back to the host (``.item()``, ``int()``, ``.tolist()``,
    boolean-mask indexing) makes the host wait for the device, and so does every copy from
    host memory. On the meta device, which holds no values, each such read raises, and the
    copies are recorded: the text side's forward and backward must run there without
    either, as they run in a training step (after a first pass that builds the layouts)."""
    if text == "graphs_plain":  # the original text computation, replayable from CUDA graphs
        cfg = _cfg(TEXT="plain", CLASS_CHUNK=chunk, CUDA_GRAPHS=True)
    else:
        cfg = _cfg(TEXT=text, CLASS_CHUNK=chunk)
    torch.manual_seed(0)
    model = CustomCLIP(cfg, NAMES, load_clip(tiny_vit).float()).to("meta")
    model.text_features().sum().backward()
    with _HostToDevice() as h2d:
        model.text_features().sum().backward()
    assert h2d.copies == []
    assert model.prompt_learner.ctx.grad.shape == model.prompt_learner.ctx.shape
    # the detectors see what the original's path does: it reads the longest prompt back,
    # and copies CLIP's causal mask from host memory in every block
    before = TruncatedTextEncoder(load_clip(tiny_vit).float()).to("meta")
    pl = model.prompt_learner
    with pytest.raises(RuntimeError, match="meta"):
        before(pl(), model.text_encoder.tokenized_on_device)
    original = TextEncoder(load_clip(tiny_vit).float()).to("meta")
    with _HostToDevice() as h2d:
        original(pl(), pl.tokenized_prompts)
    assert len(h2d.copies) > len(original.transformer.resblocks)


def test_image_pass_waits_for_nothing_on_the_device(tiny_rn, tiny_vit):
    """The frozen image encoders (ResNet with folded norms in channels-last, ViT) copy nothing
    from host memory and read nothing back: a CUDA graph can record them."""
    for ckpt in (tiny_rn, tiny_vit):
        clip = load_clip(ckpt).float()
        model = CustomCLIP(_cfg(), NAMES, clip).to("meta")
        with _HostToDevice() as h2d, torch.no_grad():
            out = model.encode_image(torch.empty(2, 3, 32, 32, device="meta"))
        assert h2d.copies == []
        assert out.shape == (2, embed_dim(clip))


def test_the_text_path_follows_the_device_of_the_context(tiny_vit):
    model = CustomCLIP(_cfg(), NAMES, load_clip(tiny_vit).float())  # its own copy: moved below
    assert model.text_mode == "shared_prefix"
    model.to("meta")  # any device other than the CPU takes the GPU's choice
    assert model.text_mode == "truncate"


@pytest.mark.parametrize("chunk", [0, 2])
def test_shared_prefix_matches_plain_forward_and_gradient(clip_deep, chunk):
    torch.manual_seed(0)
    pl = PromptLearner(_cfg(), NAMES, clip_deep)
    plain = TextEncoder(clip_deep)
    shared = SharedPrefixTextEncoder(clip_deep, class_chunk=chunk)
    tok = pl.tokenized_prompts

    out_plain = plain(pl(), tok)
    (out_plain**2).sum().backward()
    grad_plain = pl.ctx.grad.clone()
    pl.ctx.grad = None

    out_fast = shared(torch.cat([pl.token_prefix[0], pl.ctx]), pl.token_suffix, tok)
    (out_fast**2).sum().backward()
    assert torch.allclose(out_fast, out_plain, rtol=1e-5, atol=1e-5)
    assert torch.allclose(pl.ctx.grad, grad_plain, rtol=1e-4, atol=1e-4 * grad_plain.abs().max())
    assert not torch.equal(grad_plain, torch.zeros_like(grad_plain))


@pytest.mark.parametrize("csc,position", [(True, "end"), (False, "middle")])
def test_truncated_path_runs_class_chunks_like_the_whole(clip_deep, monkeypatch, csc, position):
    """FAST.CLASS_CHUNK bounds the truncated path's memory too (class-specific contexts,
    middle/front class positions): chunks of classes under activation checkpointing give the
    features and the context gradient of one pass over all classes."""
    import torch.utils.checkpoint as ckpt

    calls = []
    real = ckpt.checkpoint
    monkeypatch.setattr(ckpt, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    runs = {}
    for chunk in (0, 2):
        cfg = _cfg(TEXT="auto", CLASS_CHUNK=chunk)
        cfg.TRAINER.COOP.CSC, cfg.TRAINER.COOP.CLASS_TOKEN_POSITION = csc, position
        torch.manual_seed(0)
        model = CustomCLIP(cfg, NAMES, clip_deep)
        assert model.text_mode == "truncate"
        feats = model.text_features()  # unit rows: weigh them, as the logits do
        w = torch.randn(feats.shape, generator=torch.Generator().manual_seed(2))
        (feats * w).sum().backward()
        runs[chunk] = (feats.detach(), model.prompt_learner.ctx.grad.clone())
        if chunk == 0:
            assert calls == []
        else:
            assert len(calls) == 3  # 5 classes in chunks of 2
            with torch.no_grad():  # evaluation needs no chunks: nothing is kept for a backward
                model.text_features()
            assert len(calls) == 3
    (f0, g0), (f2, g2) = runs[0], runs[2]
    assert torch.allclose(f2, f0, rtol=1e-5, atol=1e-6)
    assert torch.allclose(g2, g0, rtol=1e-4, atol=1e-5 * g0.abs().max())
    assert g0.abs().max() > 0


_WORDS = "red fox big cat tiny bird of the north old oak tree sea lion kite".split()


@pytest.mark.parametrize(
    "names",
    [
        # many classes of mixed lengths: several attention blocks, dummy classes in the last
        [" ".join(_WORDS[(i * 7) % 13 : (i * 7) % 13 + 1 + i % 5]) for i in range(37)],
        ["solitary"],  # one class
        ["ant", "bee", "cow", "dog"],  # all of one length
        # a suffix longer than an attention block: one class per block
        ["cat", " ".join(_WORDS * 2), "dog"],
    ],
    ids=["37_mixed", "one", "same_length", "long_name"],
)
def test_shared_prefix_blocks_match_plain(clip_deep, names):
    torch.manual_seed(1)
    pl = PromptLearner(_cfg(), names, clip_deep)
    tok = pl.tokenized_prompts
    g = torch.randn(len(names), clip_deep.text_projection.shape[1])

    out_plain = TextEncoder(clip_deep)(pl(), tok)
    (out_plain * g).sum().backward()
    grad_plain = pl.ctx.grad.clone()
    pl.ctx.grad = None
    shared = SharedPrefixTextEncoder(clip_deep)
    out_fast = shared(torch.cat([pl.token_prefix[0], pl.ctx]), pl.token_suffix, tok)
    (out_fast * g).sum().backward()
    assert torch.allclose(out_fast, out_plain, rtol=1e-5, atol=1e-5)
    assert torch.allclose(pl.ctx.grad, grad_plain, rtol=1e-4, atol=1e-4 * grad_plain.abs().max())
    with torch.no_grad():
        again = shared(torch.cat([pl.token_prefix[0], pl.ctx]), pl.token_suffix, tok)
    assert torch.allclose(again, out_fast, rtol=1e-6, atol=1e-6)


def test_shared_prefix_trains_after_an_evaluation_under_inference_mode(clip_deep):
    # the block layout is built once per set of lengths and reused: one first built inside
    # inference mode (an evaluation) must still serve a pass that records gradients
    names = ["inference first", "then", "a training step"]
    pl = PromptLearner(_cfg(), names, clip_deep)
    shared = SharedPrefixTextEncoder(clip_deep)
    args = (torch.cat([pl.token_prefix[0], pl.ctx]), pl.token_suffix, pl.tokenized_prompts)
    with torch.inference_mode():
        evaluated = shared(*args)
    trained = shared(torch.cat([pl.token_prefix[0], pl.ctx]), *args[1:])
    trained.sum().backward()
    assert pl.ctx.grad is not None and pl.ctx.grad.abs().sum() > 0
    assert torch.allclose(evaluated, trained.detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch", ["vit", "resnet"])
def test_eot_truncate_equals_plain(arch):
    model = tiny_clip_model(arch)
    masks = [blk.attn_mask for blk in model.transformer.resblocks]
    ids = tokenize(["a photo of a dog.", "x x x x motorbike.", "a"])  # EOT at most at index 9
    with torch.no_grad():
        prompts = model.token_embedding(ids).type(model.dtype)
        # garbage after EOT cannot matter with the causal mask
        prompts[:, 12:] = torch.randn(prompts[:, 12:].shape, generator=torch.Generator())
        plain = TextEncoder(model)(prompts, ids)
        fast = TruncatedTextEncoder(model)(prompts, ids)
    assert fast.shape == plain.shape
    assert torch.allclose(fast, plain, rtol=1e-5, atol=1e-6)
    for blk, mask in zip(model.transformer.resblocks, masks):
        assert blk.attn_mask is mask and mask.shape == (77, 77)


def test_truncated_matches_plain_for_middle_and_csc(clip32):
    cfg = _cfg()
    cfg.TRAINER.COOP.CLASS_TOKEN_POSITION = "middle"
    cfg.TRAINER.COOP.CSC = True
    torch.manual_seed(0)
    pl = PromptLearner(cfg, NAMES, clip32)
    a = TextEncoder(clip32)(pl(), pl.tokenized_prompts)
    b = TruncatedTextEncoder(clip32)(pl(), pl.tokenized_prompts)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def test_frozen_text_features_equal_per_batch_logits(clip32):
    torch.manual_seed(0)
    model = CustomCLIP(_cfg(), NAMES, clip32)
    img = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        per_batch = model(img)
        with model.frozen_text_features():
            frozen = model(img)
    assert torch.equal(per_batch, frozen)


def _conv_weights(visual):
    return [m.weight for m in visual.modules() if isinstance(m, torch.nn.Conv2d)]


def test_channels_last_resnet_encoder_matches_plain(tiny_rn, clip32):
    cl = torch.channels_last
    torch.manual_seed(0)
    plain = CustomCLIP(_cfg(ENABLED=False), NAMES, load_clip(tiny_rn).float())
    torch.manual_seed(0)
    fast = CustomCLIP(_cfg(), NAMES, load_clip(tiny_rn).float())
    assert fast.channels_last and not plain.channels_last
    assert all(w.is_contiguous(memory_format=cl) for w in _conv_weights(fast.image_encoder))
    assert not all(w.is_contiguous(memory_format=cl) for w in _conv_weights(plain.image_encoder))
    img = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        a, b = plain(img), fast(img)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-4)
    # off when asked, and a vision transformer is left as it is
    assert not CustomCLIP(_cfg(CHANNELS_LAST=False), NAMES, load_clip(tiny_rn)).channels_last
    assert not CustomCLIP(_cfg(), NAMES, clip32).channels_last


def _with_random_norm_stats(clip_model, seed: int = 0):
    """The model with random batch-norm statistics and affine parameters (the tiny
    checkpoints keep the defaults, which folding would barely change)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in clip_model.visual.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                c = bn.num_features
                bn.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                bn.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.1)
                bn.weight.copy_(torch.randn(c, generator=g))
                bn.bias.copy_(torch.randn(c, generator=g) * 0.5)
    return clip_model


def _norms(module):
    return [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]


def test_folded_batch_norms_give_the_plain_features(tiny_rn, clip32):
    torch.manual_seed(0)
    plain = CustomCLIP(
        _cfg(ENABLED=False), NAMES, _with_random_norm_stats(load_clip(tiny_rn).float())
    )
    torch.manual_seed(0)
    fast = CustomCLIP(_cfg(), NAMES, _with_random_norm_stats(load_clip(tiny_rn).float()))
    assert fast.bn_folded and not plain.bn_folded
    assert not _norms(fast.image_encoder) and len(_norms(plain.image_encoder)) == 19
    img = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        a, b = plain.encode_image(img), fast.encode_image(img)
        unnormalised = plain.image_encoder.visual(img)
    assert unnormalised.std() > 0.1  # the norms' statistics reach the features
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    # off when asked; a norm in training mode, or a vision transformer, is left alone
    off = CustomCLIP(_cfg(FOLD_BN=False), NAMES, load_clip(tiny_rn).float())
    assert not off.bn_folded and len(_norms(off.image_encoder)) == 19
    training = load_clip(tiny_rn).float()
    training.visual.layer1[0].bn2.train()
    assert not CustomCLIP(_cfg(), NAMES, training).bn_folded
    assert len(_norms(training.visual)) == 19
    assert not CustomCLIP(_cfg(), NAMES, clip32).bn_folded


def test_resnet_training_fast_matches_plain(data_root, tiny_rn, tmp_path):
    """Channels-last encoder, shared-prefix text side, persistent workers: same losses,
    context and accuracy as the plain path, up to float rounding."""
    runs = {}
    for fast in ("False", "True"):
        out = str(tmp_path / fast)
        argv = coop_argv(
            data_root, out, tiny_rn, 1, 4, "OPTIM.MAX_EPOCH", "2",
            "DATALOADER.TRAIN_X.BATCH_SIZE", "8", "TRAIN.PRINT_FREQ", "1", "FAST.ENABLED", fast,
        )  # fmt: skip
        argv[argv.index("DATALOADER.NUM_WORKERS") + 1] = "1"
        assert main(argv) == 0
        ckpt = torch.load(os.path.join(out, "prompt_learner", "model.pth.tar-2"), weights_only=True)
        lines = loss_lines(os.path.join(out, "log.txt"))
        runs[fast] = ([float(x.split()[5]) for x in lines], ckpt["state_dict"]["ctx"], out)
    (lp, cp, op), (lf, cf, of) = runs["False"], runs["True"]
    assert len(lp) == len(lf) == 10
    assert lf == pytest.approx(lp, abs=2e-4)
    assert torch.allclose(cf, cp, atol=1e-4) and not torch.equal(cp, torch.zeros_like(cp))
    assert read_results(of)["metrics"] == pytest.approx(read_results(op)["metrics"], abs=1e-6)


def test_zeroshot_resnet_fast_matches_plain(data_root, tiny_rn, tmp_path):
    metrics = {}
    for fast in ("False", "True"):
        out = str(tmp_path / fast)
        assert main(zeroshot_argv(data_root, out, tiny_rn, "FAST.ENABLED", fast)) == 0
        metrics[fast] = read_results(out)["metrics"]
    assert metrics["True"] == pytest.approx(metrics["False"], abs=1e-6)


def test_training_with_fast_paths_matches_plain(data_root, learnable_clip, tmp_path):
    runs = {}
    for name, fast in (("plain", "False"), ("fast", "True")):
        out = str(tmp_path / name)
        argv = coop_argv(
            data_root, out, learnable_clip, 1, 4,
            "OPTIM.MAX_EPOCH", "3", "DATALOADER.TRAIN_X.BATCH_SIZE", "8",
            "TRAIN.PRINT_FREQ", "1", "FAST.ENABLED", fast,
        )  # fmt: skip
        assert main(argv) == 0
        runs[name] = out
    plain = loss_lines(os.path.join(runs["plain"], "log.txt"))
    fast = loss_lines(os.path.join(runs["fast"], "log.txt"))
    assert len(plain) == len(fast) == 15

    def losses(lines):
        return [float(line.split()[5]) for line in lines]

    assert losses(fast) == pytest.approx(losses(plain), abs=2e-4)
    a = torch.load(
        os.path.join(runs["plain"], "prompt_learner", "model.pth.tar-3"), weights_only=True
    )
    b = torch.load(
        os.path.join(runs["fast"], "prompt_learner", "model.pth.tar-3"), weights_only=True
    )
    assert torch.allclose(a["state_dict"]["ctx"], b["state_dict"]["ctx"], atol=1e-4)
    assert read_results(runs["plain"])["metrics"] == pytest.approx(
        read_results(runs["fast"])["metrics"], abs=1e-6
    )


def _features_dir():
    return os.path.join(os.environ["COOP_CACHE_DIR"], "features")


def test_eval_feature_cache_cold_and_warm_give_identical_results(data_root, tiny_vit, tmp_path):
    cache = str(tmp_path / "cache")
    outs = []
    for i in range(2):
        out = str(tmp_path / f"zs{i}")
        assert main(zeroshot_argv(data_root, out, tiny_vit, "FAST.CACHE_DIR", cache)) == 0
        outs.append(out)
    entries = [f for f in os.listdir(os.path.join(cache, "features")) if f.endswith(".pt")]
    assert len(entries) == 1
    entry = torch.load(os.path.join(cache, "features", entries[0]), weights_only=True)
    assert entry["features"][0].shape == (60, 64)
    log_warm = open(os.path.join(outs[1], "log.txt"), encoding="utf-8").read()
    assert "Using cached image features of the *test* set" in log_warm
    plain = str(tmp_path / "plain")
    assert main(zeroshot_argv(data_root, plain, tiny_vit, "FAST.ENABLED", "False")) == 0
    assert read_results(outs[0])["metrics"] == read_results(plain)["metrics"]
    assert read_results(outs[1])["metrics"] == read_results(plain)["metrics"]

    # a changed test image gives a new key: the features are recomputed, not reused
    ddir = os.path.join(data_root, "caltech-101")
    with open(os.path.join(ddir, "split_zhou_Caltech101.json"), encoding="utf-8") as f:
        rel = json.load(f)["test"][0][0]
    victim = os.path.join(ddir, "101_ObjectCategories", rel)
    st = os.stat(victim)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    out3 = str(tmp_path / "zs3")
    assert main(zeroshot_argv(data_root, out3, tiny_vit, "FAST.CACHE_DIR", cache)) == 0
    entries = [f for f in os.listdir(os.path.join(cache, "features")) if f.endswith(".pt")]
    assert len(entries) == 2


def test_eval_cache_shared_across_seeds_and_keeps_the_random_stream(data_root, tiny_vit, tmp_path):
    """CoOp runs with cold and warm caches: same metrics, and the warm run still consumes the
    loader's seed draw (checked through identical final test results and RNG states)."""
    from coop.hosts import on_host
    from coop.trainers.coop import CoOp as CoOpMethod

    CoOp = on_host(CoOpMethod)  # the class that runs on the bundled engine

    states = []
    original_test = CoOp.test

    def recording_test(self, split=None):
        r = original_test(self, split)
        states.append(torch.get_rng_state().clone())
        return r

    cache = str(tmp_path / "cache")
    results = []
    try:
        CoOp.test = recording_test
        for i in range(2):
            out = str(tmp_path / f"r{i}")
            argv = coop_argv(
                data_root, out, tiny_vit, 1, 2, "OPTIM.MAX_EPOCH", "1", "FAST.CACHE_DIR", cache
            )
            assert main(argv) == 0
            results.append(read_results(out)["metrics"])
    finally:
        CoOp.test = original_test
    assert results[0] == results[1]
    assert torch.equal(states[0], states[1])


def test_damaged_cache_entry_is_recomputed(data_root, tiny_vit, tmp_path):
    cache = str(tmp_path / "cache")
    out = str(tmp_path / "a")
    assert main(zeroshot_argv(data_root, out, tiny_vit, "FAST.CACHE_DIR", cache)) == 0
    (entry,) = [f for f in os.listdir(os.path.join(cache, "features")) if f.endswith(".pt")]
    with open(os.path.join(cache, "features", entry), "wb") as f:
        f.write(b"not a tensor file")
    out2 = str(tmp_path / "b")
    assert main(zeroshot_argv(data_root, out2, tiny_vit, "FAST.CACHE_DIR", cache)) == 0
    assert read_results(out2)["metrics"] == read_results(out)["metrics"]


def test_training_feature_cache_is_opt_in_and_deterministic(data_root, learnable_clip, tmp_path):
    outs = []
    for i in range(2):
        out = str(tmp_path / f"t{i}")
        argv = coop_argv(
            data_root, out, learnable_clip, 1, 16, "OPTIM.MAX_EPOCH", "20",
            "FAST.TRAIN_FEATURE_CACHE", "True", "FAST.TRAIN_CACHE_VIEWS", "4",
        )  # fmt: skip
        assert main(argv) == 0
        outs.append(out)
    log = open(os.path.join(outs[0], "log.txt"), encoding="utf-8").read()
    assert "Training feature cache (opt-in deviation): 4 augmented views of 100 images" in log
    assert read_results(outs[0])["metrics"] == read_results(outs[1])["metrics"]
    zs = str(tmp_path / "zs")
    assert main(zeroshot_argv(data_root, zs, learnable_clip)) == 0
    assert read_results(outs[0])["metrics"]["accuracy"] > read_results(zs)["metrics"]["accuracy"]


def test_bf16_precision_trains_close_to_fp32(data_root, learnable_clip, tmp_path):
    res = {}
    for prec in ("fp32", "bf16"):
        out = str(tmp_path / prec)
        argv = coop_argv(data_root, out, learnable_clip, 1, 4, "OPTIM.MAX_EPOCH", "2")
        argv[argv.index("TRAINER.COOP.PREC") + 1] = prec
        assert main(argv) == 0
        res[prec] = read_results(out)
        ckpt = torch.load(os.path.join(out, "prompt_learner", "model.pth.tar-2"), weights_only=True)
        assert ckpt["state_dict"]["ctx"].dtype == torch.float32  # fp32 master weights
    assert res["bf16"]["config"]["TRAINER"]["COOP"]["PREC"] == "bf16"
    assert abs(res["bf16"]["metrics"]["accuracy"] - res["fp32"]["metrics"]["accuracy"]) <= 15.0


def test_worker_count_from_the_machine_and_persistent_workers(data_root, tiny_vit, tmp_path):
    from coop.data import DataManager, resolve_num_workers

    assert resolve_num_workers(3) == 3 and resolve_num_workers(0) == 0
    auto = resolve_num_workers(-1)
    assert 1 <= auto <= min(8, os.cpu_count() or 1)

    cfg = get_cfg_default()
    cfg.DATASET.NAME, cfg.DATASET.ROOT, cfg.DATASET.NUM_SHOTS = "Caltech101", data_root, 2
    cfg.INPUT.SIZE = (32, 32)
    cfg.DATALOADER.NUM_WORKERS = -1
    dm = DataManager(cfg)
    assert dm.train_loader_x.num_workers == auto
    assert dm.train_loader_x.persistent_workers is True
    cfg.FAST.PERSISTENT_WORKERS = False
    assert DataManager(cfg).train_loader_x.persistent_workers is False
    cfg.FAST.PERSISTENT_WORKERS = True
    cfg.FAST.ENABLED = False  # the original re-creates its workers every epoch
    assert DataManager(cfg).train_loader_x.persistent_workers is False


def test_persistent_workers_draw_the_original_augmentations(data_root, tiny_vit, tmp_path):
    """Workers kept alive across epochs but re-seeded like new ones: the same batches,
    augmentations and random stream as workers re-created every epoch, bit for bit."""
    runs = {}
    for persistent in ("False", "True"):
        out = str(tmp_path / persistent)
        argv = coop_argv(
            data_root, out, tiny_vit, 1, 4, "OPTIM.MAX_EPOCH", "3",
            "DATALOADER.TRAIN_X.BATCH_SIZE", "8", "TRAIN.PRINT_FREQ", "1",
            "FAST.PERSISTENT_WORKERS", persistent,
        )  # fmt: skip
        argv[argv.index("DATALOADER.NUM_WORKERS") + 1] = "2"
        assert main(argv) == 0
        ckpt = torch.load(os.path.join(out, "prompt_learner", "model.pth.tar-3"), weights_only=True)
        runs[persistent] = (loss_lines(os.path.join(out, "log.txt")), ckpt, read_results(out))
    (lines_a, ckpt_a, res_a), (lines_b, ckpt_b, res_b) = runs["False"], runs["True"]
    assert len(lines_a) == 15
    assert lines_a == lines_b
    assert torch.equal(ckpt_a["state_dict"]["ctx"], ckpt_b["state_dict"]["ctx"])
    assert res_a["metrics"] == res_b["metrics"]


def test_cuda_graphs_are_opt_in_and_leave_other_devices_and_precisions_eager(
    data_root, tiny_rn, tmp_path
):
    from coop.fast.cuda_graphs import GraphedImageEncoder, GraphedTextSide

    assert get_cfg_default().FAST.CUDA_GRAPHS is False
    on = _cfg(CUDA_GRAPHS=True)

    def graphed(cfg):
        model = CustomCLIP(cfg, NAMES, load_clip(tiny_rn).float())
        assert model.text_encoder.cuda_graphs == model.image_encoder.cuda_graphs
        return model.text_encoder.cuda_graphs

    assert graphed(on)
    on.TRAINER.COOP.PREC = "amp"
    assert not graphed(on)
    assert not graphed(_cfg())
    with pytest.raises(ValueError, match="CUDA device"):
        GraphedTextSide(lambda c: c * 2, torch.zeros(3, requires_grad=True))
    calls = []
    enc = GraphedImageEncoder(lambda x: calls.append(1) or x + 1)
    assert torch.equal(enc(torch.ones(2)), torch.full((2,), 2.0)) and calls == [1]
    # a CPU run with the option trains exactly as without it, and says why
    runs = {}
    for graphs in ("False", "True"):
        out = str(tmp_path / graphs)
        argv = coop_argv(
            data_root, out, tiny_rn, 1, 2, "OPTIM.MAX_EPOCH", "1", "TRAIN.PRINT_FREQ", "1",
            "FAST.CUDA_GRAPHS", graphs, "USE_CUDA", "False",
        )  # fmt: skip
        assert main(argv) == 0
        runs[graphs] = out
    log = open(os.path.join(runs["True"], "log.txt"), encoding="utf-8").read()
    assert "FAST.CUDA_GRAPHS needs a CUDA device; on cpu the run is computed without" in log
    assert loss_lines(os.path.join(runs["True"], "log.txt")) == loss_lines(
        os.path.join(runs["False"], "log.txt")
    )


class _StaticGradient(torch.autograd.Function):
    """Stands in for a graphed callable: ``2 * x``, whose backward writes the gradient into
    one static buffer and returns a detached view of it, as a replayed backward graph does."""

    buffer = torch.zeros(3)

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        _StaticGradient.buffer.copy_(grad * 2)
        return _StaticGradient.buffer.detach()


@pytest.mark.parametrize("own", [False, True])
def test_a_graphed_gradient_does_not_alias_the_context_gradient(own):
    from coop.fast.cuda_graphs import own_gradient

    ctx = torch.zeros(3, requires_grad=True)
    opt = torch.optim.SGD([ctx], lr=0.0)
    grads = []
    for _ in range(3):
        opt.zero_grad(set_to_none=False)  # zeroes .grad in place after the first step
        x = own_gradient(ctx) if own else ctx
        (_StaticGradient.apply(x) * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
        grads.append(ctx.grad.clone())
    expected = torch.tensor([2.0, 4.0, 6.0])
    if own:
        assert all(torch.equal(g, expected) for g in grads)
        assert ctx.grad.data_ptr() != _StaticGradient.buffer.data_ptr()
    else:  # the hazard own_gradient removes: .grad became the buffer and adds to itself
        assert ctx.grad.data_ptr() == _StaticGradient.buffer.data_ptr()
        assert torch.equal(grads[1], 2 * expected)


def test_a_text_side_that_cannot_be_graphed_runs_eagerly_after_one_warning(
    clip_deep, monkeypatch, caplog
):
    """Where a platform cannot record CUDA graphs, FAST.CUDA_GRAPHS costs one warning, not
    the run: the text side is computed eagerly (the same features), on the path the GPU
    takes without graphs, and recording is not tried again. (On a CPU, with the GPU-only
    conditions lifted and the recorder made to fail as a capture does.)"""
    import coop.fast.text as text_mod

    attempts = []

    def failing_recorder(fn, ctx):
        attempts.append(1)
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore")

    monkeypatch.setattr(text_mod, "GraphedTextSide", failing_recorder)
    monkeypatch.setattr(
        PromptTextEncoder, "_graph_text_side", lambda self, ctx: self.cuda_graphs and self._record
    )
    torch.manual_seed(0)
    eager = CustomCLIP(_cfg(), NAMES, clip_deep)
    torch.manual_seed(0)
    model = CustomCLIP(_cfg(CUDA_GRAPHS=True), NAMES, clip_deep)
    assert model.text_encoder.text_modes["cuda"] == "shared_prefix"  # the choice with graphs
    with caplog.at_level("WARNING"):
        first, second = model.text_features(), model.text_features()
    assert attempts == [1]
    warnings = [r.getMessage() for r in caplog.records if "FAST.CUDA_GRAPHS" in r.getMessage()]
    assert warnings == [
        "FAST.CUDA_GRAPHS: recording the text side as a CUDA graph failed (CUDA error: "
        "operation not permitted when stream is capturing); it runs eagerly from now on "
        "(the same numbers, without the speed-up)"
    ]
    assert (
        model.text_encoder.text_modes["cuda"] == "truncate" == eager.text_encoder.text_modes["cuda"]
    )
    assert torch.equal(first, second) and torch.equal(first, eager.text_features())


def test_an_image_encoder_that_cannot_be_graphed_runs_eagerly_after_one_warning(
    monkeypatch, caplog
):
    from contextlib import nullcontext

    import coop.fast.cuda_graphs as cuda_graphs
    from coop.fast.cuda_graphs import GraphedImageEncoder

    attempts = []

    def failing_record(self, x):
        attempts.append(1)
        raise RuntimeError("CUDA error: operation not supported")

    monkeypatch.setattr(GraphedImageEncoder, "_recordable", staticmethod(lambda x: True))
    monkeypatch.setattr(GraphedImageEncoder, "_record", failing_record)
    monkeypatch.setattr(cuda_graphs, "_stream_kept_on_failure", lambda device: nullcontext())
    enc = GraphedImageEncoder(lambda x: x * 3)
    with caplog.at_level("WARNING"):
        outs = [enc(torch.ones(2, 3)), enc(torch.ones(2, 3)), enc(torch.ones(4, 3))]
    assert attempts == [1] and enc._graphs == {}
    assert all(torch.equal(o, torch.full_like(o, 3.0)) for o in outs)
    assert sum("recording the image encoder as a CUDA graph failed" in r.getMessage()
               for r in caplog.records) == 1  # fmt: skip


def test_a_failed_recording_leaves_the_current_stream_as_it_was(monkeypatch):
    # torch.cuda.graph switches to its side stream before beginning a capture and switches
    # back only after a successful end; a refused capture must not leave the run there
    import coop.fast.cuda_graphs as cuda_graphs

    current = ["default"]
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[0])
    monkeypatch.setattr(torch.cuda, "set_stream", lambda stream: current.__setitem__(0, stream))
    with pytest.raises(RuntimeError, match="capture refused"):
        with cuda_graphs._stream_kept_on_failure(torch.device("cuda")):
            current[0] = "side"  # what entering torch.cuda.graph does
            raise RuntimeError("capture refused")
    assert current == ["default"]
    with cuda_graphs._stream_kept_on_failure(torch.device("cuda")):
        current[0] = "other"  # a successful recording manages its streams itself
    assert current == ["other"]


def test_evaluation_runs_under_inference_mode_and_training_goes_on_after_it(
    data_root, learnable_clip, tmp_path, monkeypatch
):
    """Fast path: evaluations (here one on the val split after each epoch) run under
    inference mode, and the epochs after them still train, with the plain path's losses."""
    seen = {}
    original = CustomCLIP.logits

    def logits(self, image_features):
        if not torch.is_grad_enabled():
            seen.setdefault(self.text_mode, set()).add(torch.is_inference_mode_enabled())
        return original(self, image_features)

    monkeypatch.setattr(CustomCLIP, "logits", logits)
    runs = {}
    for fast in ("False", "True"):
        out = str(tmp_path / fast)
        argv = coop_argv(
            data_root, out, learnable_clip, 1, 4, "OPTIM.MAX_EPOCH", "3",
            "DATALOADER.TRAIN_X.BATCH_SIZE", "8", "TRAIN.PRINT_FREQ", "1",
            "TEST.FINAL_MODEL", "best_val", "FAST.ENABLED", fast,
        )  # fmt: skip
        assert main(argv) == 0
        runs[fast] = out
    assert seen == {"plain": {False}, "shared_prefix": {True}}
    log = open(os.path.join(runs["True"], "log.txt"), encoding="utf-8").read()
    assert log.count("Evaluate on the *val* set") == 3
    fast_losses = [float(x.split()[5]) for x in loss_lines(os.path.join(runs["True"], "log.txt"))]
    plain = [float(x.split()[5]) for x in loss_lines(os.path.join(runs["False"], "log.txt"))]
    assert len(fast_losses) == len(plain) == 15
    assert fast_losses == pytest.approx(plain, abs=2e-4)
    assert read_results(runs["True"])["metrics"] == pytest.approx(
        read_results(runs["False"])["metrics"], abs=1e-6
    )


@pytest.mark.parametrize("fast", [True, False])
def test_batches_are_copied_to_the_device_without_blocking_on_the_fast_path(fast):
    from types import SimpleNamespace

    from coop.clip_trainer import CLIPTrainer

    calls = []

    class Recording(torch.Tensor):
        def to(self, *args, **kwargs):
            calls.append(kwargs.get("non_blocking"))
            return torch.Tensor.to(torch.Tensor(self), *args, **kwargs)

    img, label = torch.randn(2, 3, 4, 4), torch.tensor([1, 0])
    cfg = _cfg(ENABLED=fast)
    trainer = SimpleNamespace(cfg=cfg, device=torch.device("cpu"))
    trainer.non_blocking_copies = lambda: CLIPTrainer.non_blocking_copies(trainer)
    trainer._to_device = lambda t: CLIPTrainer._to_device(trainer, t)
    batch = {"img": img.as_subclass(Recording), "label": label.as_subclass(Recording)}
    for parse in (CLIPTrainer.parse_batch_train, CLIPTrainer.parse_batch_test):
        x, y = parse(trainer, batch)
        assert torch.equal(x, img) and torch.equal(y, label)
    assert calls == [fast] * 4
