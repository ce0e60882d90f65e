"""Building CLIP without its random initialisers (coop.fast.clip_init) gives the same model and
random stream."""

from __future__ import annotations

import copy
import logging
import os

import pytest
import torch
from helpers_train import coop_argv, read_results

from coop.clip_adapter import import_clip, load_clip
from coop.fast import clip_init
from coop.fast.clip_init import clip_args_from_state_dict, memoised_builder
from coop.testing.tiny_clip import tiny_clip_args, tiny_clip_state_dict
from coop.train import main


def _build(path, seed, memo=""):
    """(model, generator state after the build, the next random draw)."""
    torch.manual_seed(seed)
    model = load_clip(path, build=memoised_builder(memo) if memo else None)
    state = torch.get_rng_state()
    return model, state, torch.randn(8)


def _assert_same_model(a, b):
    assert type(a) is type(b) and type(a).__name__ == "CLIP"
    assert [type(m) for m in a.modules()] == [type(m) for m in b.modules()]
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k
    for ba, bb in zip(a.transformer.resblocks, b.transformer.resblocks):
        assert torch.equal(ba.attn_mask, bb.attn_mask)
    tokens = torch.randint(1, 400, (3, 77))
    tokens[:, 5] = 49407
    img = torch.randn(2, 3, a.visual.input_resolution, a.visual.input_resolution)
    with torch.no_grad():
        assert torch.equal(a.encode_text(tokens), b.encode_text(tokens))
        fa, fb = copy.deepcopy(a).float(), copy.deepcopy(b).float()
        assert torch.equal(fa.encode_image(img), fb.encode_image(img))


@pytest.mark.parametrize("arch", ["vit", "resnet"])
def test_args_inferred_from_the_state_dict(arch):
    kw = {"vision_layers": (1, 2, 1, 1)} if arch == "resnet" else {"vision_layers": 2}
    sd = tiny_clip_state_dict(arch=arch, **kw)
    assert clip_args_from_state_dict(sd) == tiny_clip_args(arch=arch, **kw)


@pytest.mark.parametrize("ckpt", ["tiny_vit", "tiny_rn", "tiny_vit_jit"])
def test_memoised_build_is_bit_identical(ckpt, request, tmp_path, monkeypatch):
    path = request.getfixturevalue(ckpt)
    memo = str(tmp_path / "memo")
    plain, state_plain, draw_plain = _build(path, 5)
    first, state_first, draw_first = _build(path, 5, memo)  # runs the initialisers
    assert len(os.listdir(memo)) == 1

    # the second build must not run build_model's initialisers at all
    clip_mod = import_clip()

    def no_build(_):
        raise AssertionError("build_model called although the random state is known")

    monkeypatch.setattr(clip_mod, "build_model", no_build)
    second, state_second, draw_second = _build(path, 5, memo)
    for model, state, draw in (
        (first, state_first, draw_first),
        (second, state_second, draw_second),
    ):
        assert torch.equal(state, state_plain)
        assert torch.equal(draw, draw_plain)
        _assert_same_model(plain, model)
    # the initialisers really draw: without them the stream would be elsewhere
    torch.manual_seed(5)
    assert not torch.equal(torch.randn(8), draw_plain)


def test_another_seed_is_a_new_memo_entry(tiny_vit, tmp_path):
    memo = str(tmp_path / "memo")
    _build(tiny_vit, 1, memo)
    _, state, _ = _build(tiny_vit, 2, memo)
    assert len(os.listdir(memo)) == 2
    _, state_plain, _ = _build(tiny_vit, 2)
    assert torch.equal(state, state_plain)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_memo_is_ignored(tiny_vit, tmp_path, caplog, damage):
    memo = str(tmp_path / "memo")
    _build(tiny_vit, 3, memo)
    (entry,) = [os.path.join(memo, f) for f in os.listdir(memo)]
    data = bytearray(open(entry, "rb").read())
    if damage == "truncate":
        data = data[:100]
    else:
        data[500] ^= 0xFF
    open(entry, "wb").write(bytes(data))
    with caplog.at_level(logging.WARNING):
        model, state, draw = _build(tiny_vit, 3, memo)
    assert "damaged random-state memo" in caplog.text
    plain, state_plain, draw_plain = _build(tiny_vit, 3)
    assert torch.equal(state, state_plain) and torch.equal(draw, draw_plain)
    _assert_same_model(plain, model)
    # rewritten whole
    _, state2, _ = _build(tiny_vit, 3, memo)
    assert torch.equal(state2, state_plain)


def test_unwritable_memo_folder_only_warns(tiny_vit, tmp_path, caplog):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with caplog.at_level(logging.WARNING):
        _, state, _ = _build(tiny_vit, 4, str(blocker / "memo"))
    assert "Could not remember" in caplog.text
    _, state_plain, _ = _build(tiny_vit, 4)
    assert torch.equal(state, state_plain)


def test_unknown_clip_version_falls_back_to_the_full_build(tiny_vit, tmp_path, monkeypatch):
    memo = str(tmp_path / "memo")
    _build(tiny_vit, 6, memo)
    monkeypatch.setattr(clip_init, "_build_without_init", lambda *a: None)
    model, state, draw = _build(tiny_vit, 6, memo)
    plain, state_plain, draw_plain = _build(tiny_vit, 6)
    assert torch.equal(state, state_plain) and torch.equal(draw, draw_plain)
    _assert_same_model(plain, model)


def test_training_runs_with_and_without_the_memo_are_identical(data_root, tiny_vit, tmp_path):
    cache = str(tmp_path / "cache")
    ctx = {}
    for name, memo in (("off", "False"), ("first", "True"), ("second", "True")):
        out = str(tmp_path / name)
        argv = coop_argv(
            data_root, out, tiny_vit, 1, 2, "OPTIM.MAX_EPOCH", "2",
            "FAST.CACHE_DIR", cache, "FAST.CLIP_INIT_MEMO", memo,
        )  # fmt: skip
        assert main(argv) == 0
        ckpt = torch.load(os.path.join(out, "prompt_learner", "model.pth.tar-2"), weights_only=True)
        ctx[name] = (ckpt["state_dict"]["ctx"], read_results(out)["metrics"])
    assert len(os.listdir(os.path.join(cache, "clip_init"))) == 1
    for name in ("first", "second"):
        assert torch.equal(ctx[name][0], ctx["off"][0])
        assert ctx[name][1] == ctx["off"][1]


@pytest.mark.parametrize("arch", ["vit", "resnet"])
def test_build_without_init_takes_over_the_checkpoint_tensors_safely(arch):
    """The checkpoint's tensors become the parameters without a second copy, yet every
    parameter ends up as build_model makes it: its dtype, contiguous, in its own memory."""
    clip_mod = import_clip()
    kw = {"vision_layers": (1, 1, 1, 1)} if arch == "resnet" else {}
    sd = tiny_clip_state_dict(arch=arch, **kw)
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}
    # one tensor stored transposed, two sharing one block of memory
    w = half["text_projection"]
    half["text_projection"] = w.t().contiguous().t()
    assert not half["text_projection"].is_contiguous()
    # both fp16 in the built model, so neither is cast (and copied) on the way in
    a, b = "transformer.resblocks.0.attn.out_proj.bias", "transformer.resblocks.0.mlp.c_proj.bias"
    half[b] = half[a]
    for source in (sd, half):
        torch.manual_seed(0)
        plain = clip_mod.build_model(copy.deepcopy(source))
        args = clip_args_from_state_dict(source)
        fast = clip_init._build_without_init(clip_mod, dict(source), args)
        _assert_same_model(plain, fast)
        # linear weights are fp16 as build_model's convert_weights leaves them
        assert fast.transformer.resblocks[0].mlp.c_fc.weight.dtype == torch.float16
        ptrs = [p.untyped_storage().data_ptr() for p in fast.parameters()]
        assert len(set(ptrs)) == len(ptrs)
        assert all(p.is_contiguous() for p in fast.parameters())
        assert all(p.requires_grad for p in fast.parameters())
    block = fast.transformer.resblocks[0]
    with torch.no_grad():
        block.attn.out_proj.bias.add_(1)
    assert not torch.equal(block.attn.out_proj.bias, block.mlp.c_proj.bias)
