"""Deep prompts through the CLIP adapter (coop.clip_adapter) and its truncated text path
(coop.fast.deep): CLIP's outputs without prompts, exactly the tokens the prompts replace,
gradients reaching the prompts, the truncated path equal to the plain one."""

from __future__ import annotations

import pytest
import torch

from coop import clip_adapter as ca
from coop.fast.deep import OncePerEvaluation, TruncatedDeepTextEncoder
from coop.testing.tiny_clip import tiny_clip_model

LAYERS = 3


@pytest.fixture(scope="module")
def clip3():
    return tiny_clip_model("vit", vision_layers=LAYERS, text_layers=LAYERS)


@pytest.fixture
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def text(clip3):
    tokens = ca.tokenize(["a photo of a dog.", "a photo of a big red car.", "X X X X cat."])
    with torch.no_grad():
        return clip3.token_embedding(tokens), tokens


def _capture_block_inputs(blocks):
    """Inputs of every residual block during the next forward, by block index."""
    seen, handles = {}, []
    for i, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0])))
    return seen, handles


def _prompt(n, width, seed):
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def test_model_facts_are_read_from_the_model(clip3):
    assert ca.vision_width(clip3) == 64 and ca.vision_layers(clip3) == LAYERS
    assert ca.vision_heads(clip3) == 1 and ca.vision_tokens(clip3) == 5  # (32/16)^2 + 1
    assert ca.text_layers(clip3) == LAYERS
    rn = tiny_clip_model("resnet")
    with pytest.raises(
        ValueError, match="need a ViT image encoder; this CLIP has a ModifiedResNet"
    ):
        ca.encode_image_deep(rn.visual, torch.zeros(1, 3, 32, 32))


def test_without_prompts_the_towers_are_clips_bit_for_bit(clip3, images, text):
    emb, tokens = text
    with torch.no_grad():
        assert torch.equal(ca.encode_image_deep(clip3.visual, images), clip3.visual(images))
        assert torch.equal(
            ca.encode_image_deep(clip3.visual, images, [None] * LAYERS), clip3.visual(images)
        )
        assert torch.equal(ca.DeepTextEncoder(clip3)(emb, tokens), clip3.encode_text(tokens))


@pytest.mark.parametrize("layer", [1, 2])
def test_a_text_prompt_replaces_tokens_1_to_n_at_its_layer(clip3, text, layer):
    emb, tokens = text
    n, width = 2, 64
    prompt = _prompt(n, width, layer)
    enc = ca.DeepTextEncoder(clip3)
    blocks = clip3.transformer.resblocks
    runs = {}
    for name, deep in (("plain", []), ("prompted", [None] * layer + [prompt])):
        seen, handles = _capture_block_inputs(blocks)
        with torch.no_grad():
            enc(emb, tokens, deep)
        for h in handles:
            h.remove()
        runs[name] = {i: x.clone() for i, x in seen.items()}  # (L, N, D)
    a, b = runs["plain"], runs["prompted"]
    for i in range(layer):  # before the prompt's layer nothing changes
        assert torch.equal(a[i], b[i])
    x = b[layer]
    assert torch.equal(x[1 : 1 + n], prompt.unsqueeze(1).expand(-1, 3, -1))  # every class
    assert torch.equal(x[0], a[layer][0]) and torch.equal(x[1 + n :], a[layer][1 + n :])


def test_an_image_prompt_is_appended_at_layer_0_and_replaces_the_last_tokens_later(clip3, images):
    n, width = 2, 64
    first, second = _prompt(n, width, 10), _prompt(n, width, 11)
    blocks = clip3.visual.transformer.resblocks
    runs = {}
    for name, deep in (("plain", []), ("first", [first]), ("both", [first, None, second])):
        seen, handles = _capture_block_inputs(blocks)
        with torch.no_grad():
            ca.encode_image_deep(clip3.visual, images, deep)
        for h in handles:
            h.remove()
        runs[name] = {i: x.clone() for i, x in seen.items()}  # (tokens, B, W)
    plain, one, both = runs["plain"], runs["first"], runs["both"]
    assert plain[0].shape[0] == 5 and one[0].shape[0] == 5 + n  # appended, not replacing
    assert torch.equal(one[0][:5], plain[0])  # ln_pre works per token
    expected = clip3.visual.ln_pre(first).detach()
    assert torch.allclose(one[0][5:], expected.unsqueeze(1).expand(-1, 2, -1))
    assert torch.equal(both[1], one[1])  # layer 1 has no prompt: the tokens flow on
    assert torch.equal(both[2][-n:], second.unsqueeze(1).expand(-1, 2, -1))  # every image
    assert torch.equal(both[2][:-n], one[2][:-n])


def test_gradients_reach_every_layers_prompt(clip3, images, text):
    emb, tokens = text
    vision = [_prompt(2, 64, i).requires_grad_() for i in range(LAYERS)]
    texts = [None] + [_prompt(2, 64, 20 + i).requires_grad_() for i in range(1, LAYERS)]
    f = ca.encode_image_deep(clip3.visual, images, vision)
    t = ca.DeepTextEncoder(clip3)(emb, tokens, texts)
    (f @ t.t()).square().sum().backward()
    for p in vision + texts[1:]:
        assert p.grad is not None and p.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="layer-0 prompt is part of the prompt embeddings"):
        ca.DeepTextEncoder(clip3)(emb, tokens, [texts[1]])


def test_the_truncated_text_path_equals_the_plain_one(clip3, text):
    emb, tokens = text
    deep = [None] + [_prompt(4, 64, 30 + i) for i in range(1, LAYERS)]
    grads = []
    outs = []
    for enc in (ca.DeepTextEncoder(clip3), TruncatedDeepTextEncoder(clip3)):
        ds = [None] + [p.clone().requires_grad_() for p in deep[1:]]
        e = emb.clone().requires_grad_()
        out = enc(e, tokens, ds)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append([e.grad] + [p.grad for p in ds[1:]])
    assert torch.allclose(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-5 * float(g0.abs().max()))
    # the same parameters, saved under the same names
    assert ca.DeepTextEncoder(clip3).state_dict().keys() == (
        TruncatedDeepTextEncoder(clip3).state_dict().keys()
    )


def test_layer_prompts_take_the_deep_prompting_papers_names(clip3):
    model = tiny_clip_model("vit", vision_layers=LAYERS, text_layers=LAYERS)
    ca.add_layer_prompts(model, vision_depth=2, vision_ctx=3, text_depth=9, text_ctx=4)
    names = {k: tuple(v.shape) for k, v in model.named_parameters() if "VPT" in k}
    assert names == {
        "visual.VPT": (3, 64),
        "visual.transformer.resblocks.1.VPT_shallow": (3, 64),
        "transformer.resblocks.1.VPT_shallow": (4, 64),  # depth 9 > 3 layers: blocks 1, 2
        "transformer.resblocks.2.VPT_shallow": (4, 64),
    }
    vision = ca.vision_layer_prompts(model.visual)
    text = ca.text_layer_prompts(model.transformer)
    assert vision[0] is model.visual.VPT and vision[2] is None and text[0] is None
    assert text[2] is model.transformer.resblocks[2].VPT_shallow
    prompts = [model.visual.VPT, *[b.VPT_shallow for b in model.transformer.resblocks[1:]]]
    assert all(p.dtype == torch.float32 and 0.015 < float(p.std()) < 0.025 for p in prompts)


def test_once_per_evaluation_computes_once_inside_and_afresh_outside():
    calls = []

    def features():
        calls.append(1)
        return torch.ones(1) * len(calls)

    memo = OncePerEvaluation(features)
    with memo.frozen():
        assert [float(memo()) for _ in range(3)] == [1.0, 1.0, 1.0]
    assert float(memo()) == 2.0 and len(calls) == 2


@pytest.mark.parametrize("enabled", [True, False])
def test_fast_encode_text_equals_clips(clip3, enabled):
    from coop.config import get_cfg_default
    from coop.fast import encode_text

    cfg = get_cfg_default()
    cfg.FAST.ENABLED = enabled
    tokens = ca.tokenize(["a photo of a dog.", "itap of the big red car.", "a cat."])
    with torch.no_grad():
        got, expected = encode_text(cfg, clip3, tokens), clip3.encode_text(tokens)
    if enabled:
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    else:
        assert torch.equal(got, expected)
