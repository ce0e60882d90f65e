"""CoOp's PromptLearner / CustomCLIP (protocol §(g)) and the zero-shot templates (§(i)).

Expected token ids and layouts are built by hand from the spec, using CLIP's own token
embedding table as the reference for embeddings.
"""

from __future__ import annotations

import pytest
import torch

from coop.clip_adapter import load_clip
from coop.config import get_cfg_default
from coop.trainers.coop import CustomCLIP, PromptLearner
from coop.trainers.templates import CUSTOM_TEMPLATES, IMAGENET_TEMPLATES_SELECT

SOT, EOT, X, PERIOD = 49406, 49407, 343, 269
# BPE ids (CLIP tokenizer); "motorbike" is given by the spec
NAME_IDS = {
    "motorbike": [33341],
    "face": [1710],
    "accordion": [48760],
    "hello kitty": [3306, 8417],
}
A_PHOTO_OF_A = [320, 1125, 539, 320]
CLASSNAMES = ["face", "hello_kitty", "accordion"]  # "_" becomes a space


@pytest.fixture(scope="module")
def clip_model(tiny_vit):
    return load_clip(tiny_vit).float()


@pytest.fixture(scope="module")
def dim(clip_model):
    return clip_model.ln_final.weight.shape[0]


def _cfg(**coop):
    cfg = get_cfg_default()
    cfg.INPUT.SIZE = (32, 32)
    cfg.MODEL.BACKBONE.NAME = "tiny-vit"
    for k, v in coop.items():
        setattr(cfg.TRAINER.COOP, k, v)
    return cfg


def _ids(name, prefix_ids):
    """[SOT, prefix..., name..., '.', EOT, 0 ...] (77)."""
    row = [SOT, *prefix_ids, *NAME_IDS[name.replace("_", " ")], PERIOD, EOT]
    return row + [0] * (77 - len(row))


def _emb(clip_model, ids):
    with torch.no_grad():
        return clip_model.token_embedding(torch.tensor(ids))


def _learner(clip_model, classnames=CLASSNAMES, seed=0, **coop):
    torch.manual_seed(seed)
    return PromptLearner(_cfg(**coop), list(classnames), clip_model)


def _set_distinct_ctx(pl):
    """Give every context row a recognisable value."""
    with torch.no_grad():
        pl.ctx.copy_(torch.randn(pl.ctx.shape, generator=torch.Generator().manual_seed(7)))


# --------------------------------------------------------------------------------------------
# Tokenization and buffers


def test_tokenized_prompt_row_for_motorbike(clip_model):
    pl = _learner(clip_model, ["motorbike"])
    row = pl.tokenized_prompts[0].tolist()
    assert row == [SOT] + [X] * 16 + [33341, PERIOD, EOT] + [0] * 57
    assert pl.tokenized_prompts.shape == (1, 77)
    assert pl.tokenized_prompts.dtype == torch.int64
    assert int(pl.tokenized_prompts[0].argmax()) == 19


def test_tokenized_prompts_for_several_classes(clip_model):
    pl = _learner(clip_model, CLASSNAMES, N_CTX=4)
    expected = torch.tensor([_ids(n, [X] * 4) for n in CLASSNAMES])
    assert torch.equal(pl.tokenized_prompts, expected)
    # EOT index = n_ctx + name_len + 2
    assert pl.tokenized_prompts.argmax(-1).tolist() == [4 + 1 + 2, 4 + 2 + 2, 4 + 1 + 2]
    assert list(pl.name_lens) == [1, 2, 1]


def test_buffers_shapes_values_and_not_in_state_dict(clip_model, dim):
    pl = _learner(clip_model)
    n_cls = len(CLASSNAMES)
    assert pl.token_prefix.shape == (n_cls, 1, dim)
    assert pl.token_suffix.shape == (n_cls, 60, dim)
    for i, name in enumerate(CLASSNAMES):
        full = _emb(clip_model, _ids(name, [X] * 16))
        assert torch.equal(pl.token_prefix[i], full[:1])
        assert torch.equal(pl.token_suffix[i], full[17:])
    assert set(pl.state_dict()) == {"ctx"}
    assert [n for n, _ in pl.named_parameters()] == ["ctx"]
    assert pl.ctx.requires_grad


# --------------------------------------------------------------------------------------------
# Layouts


def test_end_layout(clip_model, dim):
    pl = _learner(clip_model, CLASSNAMES, CLASS_TOKEN_POSITION="end")
    _set_distinct_ctx(pl)
    out = pl()
    assert out.shape == (3, 77, dim)
    ctx = pl.ctx.detach()
    expected = torch.cat(
        [pl.token_prefix, ctx.unsqueeze(0).expand(3, -1, -1), pl.token_suffix], dim=1
    )
    assert torch.equal(out, expected)
    for i, name in enumerate(CLASSNAMES):
        full = _emb(clip_model, _ids(name, [X] * 16))
        assert torch.equal(out[i, 0], full[0])
        assert torch.equal(out[i, 1:17], ctx)
        assert torch.equal(out[i, 17:], full[17:])


@pytest.mark.parametrize("csc", [False, True])
def test_middle_layout(clip_model, csc):
    pl = _learner(clip_model, CLASSNAMES, CLASS_TOKEN_POSITION="middle", CSC=csc)
    _set_distinct_ctx(pl)
    out = pl().detach()
    assert out.shape[1] == 77
    for i, name in enumerate(CLASSNAMES):
        ctx = pl.ctx.detach()[i] if csc else pl.ctx.detach()
        n = len(NAME_IDS[name.replace("_", " ")])
        full = _emb(clip_model, _ids(name, [X] * 16))
        assert torch.equal(out[i, 0], full[0])  # SOS
        assert torch.equal(out[i, 1:9], ctx[:8])  # first half of the context
        assert torch.equal(out[i, 9 : 9 + n], full[17 : 17 + n])  # class tokens
        assert torch.equal(out[i, 9 + n : 17 + n], ctx[8:])  # second half
        assert torch.equal(out[i, 17 + n :], full[17 + n :])  # ".", EOT, padding
        eot = int(pl.tokenized_prompts[i].argmax())
        assert eot == 16 + n + 2
        assert torch.equal(out[i, eot], _emb(clip_model, [EOT])[0])
        assert torch.equal(out[i, eot - 1], _emb(clip_model, [PERIOD])[0])


@pytest.mark.parametrize("csc", [False, True])
def test_front_layout(clip_model, csc):
    pl = _learner(clip_model, CLASSNAMES, CLASS_TOKEN_POSITION="front", CSC=csc)
    _set_distinct_ctx(pl)
    out = pl().detach()
    assert out.shape[1] == 77
    for i, name in enumerate(CLASSNAMES):
        ctx = pl.ctx.detach()[i] if csc else pl.ctx.detach()
        n = len(NAME_IDS[name.replace("_", " ")])
        full = _emb(clip_model, _ids(name, [X] * 16))
        assert torch.equal(out[i, 0], full[0])
        assert torch.equal(out[i, 1 : 1 + n], full[17 : 17 + n])  # class right after SOS
        assert torch.equal(out[i, 1 + n : 17 + n], ctx)
        assert torch.equal(out[i, 17 + n :], full[17 + n :])
        eot = int(pl.tokenized_prompts[i].argmax())
        assert torch.equal(out[i, eot], _emb(clip_model, [EOT])[0])


def test_odd_n_ctx_middle_split(clip_model):
    pl = _learner(clip_model, ["hello_kitty"], CLASS_TOKEN_POSITION="middle", N_CTX=5)
    _set_distinct_ctx(pl)
    out = pl().detach()[0]
    ctx = pl.ctx.detach()
    full = _emb(clip_model, _ids("hello kitty", [X] * 5))
    assert torch.equal(out[1:3], ctx[:2])  # half = 5 // 2
    assert torch.equal(out[3:5], full[6:8])
    assert torch.equal(out[5:8], ctx[2:])
    assert torch.equal(out[8:], full[8:])


def test_unknown_position_raises(clip_model):
    pl = _learner(clip_model, CLASSNAMES, CLASS_TOKEN_POSITION="left")
    with pytest.raises(ValueError, match="left"):
        pl()


def test_tokenized_prompts_same_for_every_position(clip_model):
    rows = [
        _learner(clip_model, CLASSNAMES, CLASS_TOKEN_POSITION=pos).tokenized_prompts
        for pos in ("end", "middle", "front")
    ]
    assert torch.equal(rows[0], rows[1]) and torch.equal(rows[0], rows[2])


# --------------------------------------------------------------------------------------------
# Initialisation


def test_csc_context_is_per_class(clip_model, dim):
    pl = _learner(clip_model, CLASSNAMES, CSC=True)
    assert pl.ctx.shape == (3, 16, dim)
    assert not torch.equal(pl.ctx[0], pl.ctx[1])
    assert not torch.equal(pl.ctx[1], pl.ctx[2])
    out = pl().detach()
    for i in range(3):
        assert torch.equal(out[i, 1:17], pl.ctx.detach()[i])


@pytest.mark.parametrize("seed", [0, 1234])
def test_random_init_draws_one_normal_from_the_global_generator(clip_model, dim, seed):
    torch.manual_seed(seed)
    pl = PromptLearner(_cfg(), CLASSNAMES, clip_model)
    after = torch.get_rng_state()
    torch.manual_seed(seed)
    expected = torch.empty(16, dim).normal_(0, 0.02)
    assert torch.equal(pl.ctx.detach(), expected)
    assert torch.equal(after, torch.get_rng_state())  # exactly one draw of that size


def test_random_init_csc_draw(clip_model, dim):
    torch.manual_seed(5)
    pl = PromptLearner(_cfg(CSC=True), CLASSNAMES, clip_model)
    torch.manual_seed(5)
    assert torch.equal(pl.ctx.detach(), torch.empty(3, 16, dim).normal_(0, 0.02))


def test_random_init_statistics(clip_model):
    pl = _learner(clip_model, CLASSNAMES, N_CTX=16)
    ctx = pl.ctx.detach()
    assert abs(float(ctx.mean())) < 0.01
    assert 0.015 < float(ctx.std()) < 0.025


@pytest.mark.parametrize("init", ["a photo of a", "a_photo_of_a"])
def test_ctx_init_uses_word_embeddings_without_random_draw(clip_model, dim, init):
    state = torch.get_rng_state()
    pl = PromptLearner(_cfg(CTX_INIT=init, N_CTX=16), CLASSNAMES, clip_model)
    assert torch.equal(torch.get_rng_state(), state)
    assert pl.n_ctx == 4
    assert pl.ctx.shape == (4, dim)
    assert torch.equal(pl.ctx.detach(), _emb(clip_model, A_PHOTO_OF_A))
    for i, name in enumerate(CLASSNAMES):
        assert pl.tokenized_prompts[i].tolist() == _ids(name, A_PHOTO_OF_A)
    assert pl.token_suffix.shape == (3, 72, dim)
    # the forward pass reproduces the plain "a photo of a <name>." embedding
    out = pl().detach()
    for i, name in enumerate(CLASSNAMES):
        assert torch.equal(out[i], _emb(clip_model, _ids(name, A_PHOTO_OF_A)))


def test_ctx_init_with_csc(clip_model, dim):
    state = torch.get_rng_state()
    pl = PromptLearner(_cfg(CTX_INIT="a photo of a", CSC=True), CLASSNAMES, clip_model)
    assert torch.equal(torch.get_rng_state(), state)
    assert pl.ctx.shape == (3, 4, dim)
    words = _emb(clip_model, A_PHOTO_OF_A)
    for i in range(3):
        assert torch.equal(pl.ctx.detach()[i], words)
    # independent rows (a real parameter per class, not a view of one row)
    with torch.no_grad():
        pl.ctx[0] += 1
    assert torch.equal(pl.ctx.detach()[1], words)


def test_input_size_mismatch_names_both_sizes(clip_model):
    cfg = _cfg()
    cfg.INPUT.SIZE = (224, 224)
    with pytest.raises(ValueError) as ei:
        PromptLearner(cfg, CLASSNAMES, clip_model)
    msg = str(ei.value)
    assert "224" in msg and "32" in msg


def test_ctx_dtype_follows_clip(tiny_vit):
    half = load_clip(tiny_vit)  # fp16 weights, as built
    torch.manual_seed(0)
    pl = PromptLearner(_cfg(), CLASSNAMES, half)
    assert pl.ctx.dtype == torch.float16
    assert pl.token_suffix.dtype == torch.float16


# --------------------------------------------------------------------------------------------
# CustomCLIP


@pytest.fixture
def custom(clip_model):
    torch.manual_seed(0)
    model = CustomCLIP(_cfg(), CLASSNAMES, clip_model)
    model.eval()
    return model


def _image():
    return torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(11))


def test_custom_clip_logits_formula(custom, clip_model):
    image = _image()
    with torch.no_grad():
        logits = custom(image)
        img = clip_model.encode_image(image)
        img = img / img.norm(dim=-1, keepdim=True)
        txt = custom.text_features()
        expected = (clip_model.logit_scale.exp() * img) @ txt.t()
    assert logits.shape == (5, 3)
    assert torch.equal(logits, expected)


def test_custom_clip_with_x_context_equals_plain_clip_text(custom, clip_model):
    """With every ctx row set to the embedding of "X", the prompts are exactly the embedded
    "X ... X <name>." prompts, so the text features equal CLIP's own encode_text."""
    with torch.no_grad():
        custom.prompt_learner.ctx.copy_(_emb(clip_model, [X] * 16))
        tokens = torch.tensor([_ids(n, [X] * 16) for n in CLASSNAMES])
        ref = clip_model.encode_text(tokens)
        ref = ref / ref.norm(dim=-1, keepdim=True)
        txt = custom.text_features()
        torch.testing.assert_close(txt, ref, rtol=1e-5, atol=1e-6)

        image = _image()
        img = clip_model.encode_image(image)
        img = img / img.norm(dim=-1, keepdim=True)
        expected = (clip_model.logit_scale.exp() * img) @ ref.t()
        torch.testing.assert_close(custom(image), expected, rtol=1e-5, atol=1e-4)


def test_frozen_text_features_gives_identical_logits(custom):
    image = _image()
    with torch.no_grad():
        plain = custom(image)
        plain_a, plain_b = custom(image[:2]), custom(image[2:])
        with custom.frozen_text_features():
            frozen = custom(image)
            a, b = custom(image[:2]), custom(image[2:])
        assert torch.equal(frozen, plain)
        assert torch.equal(a, plain_a) and torch.equal(b, plain_b)
        # leaving the context drops the cache: a new ctx changes the logits again
        custom.prompt_learner.ctx.add_(0.5)
        assert not torch.equal(custom(image), plain)


def test_custom_clip_gradient_reaches_only_ctx(clip_model):
    torch.manual_seed(0)
    model = CustomCLIP(_cfg(), CLASSNAMES, clip_model)
    for name, p in model.named_parameters():
        if "prompt_learner" not in name:
            p.requires_grad_(False)
    loss = model(_image()).logsumexp(-1).mean()
    loss.backward()
    assert model.prompt_learner.ctx.grad is not None
    assert float(model.prompt_learner.ctx.grad.abs().sum()) > 0
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["prompt_learner.ctx"]


# --------------------------------------------------------------------------------------------
# Zero-shot templates (§(i))


SPEC_CUSTOM_TEMPLATES = {
    "OxfordPets": "a photo of a {}, a type of pet.",
    "OxfordFlowers": "a photo of a {}, a type of flower.",
    "FGVCAircraft": "a photo of a {}, a type of aircraft.",
    "DescribableTextures": "{} texture.",
    "EuroSAT": "a centered satellite photo of {}.",
    "StanfordCars": "a photo of a {}.",
    "Food101": "a photo of {}, a type of food.",
    "SUN397": "a photo of a {}.",
    "Caltech101": "a photo of a {}.",
    "UCF101": "a photo of a person doing {}.",
    "ImageNet": "a photo of a {}.",
    "ImageNetSketch": "a photo of a {}.",
    "ImageNetV2": "a photo of a {}.",
    "ImageNetA": "a photo of a {}.",
    "ImageNetR": "a photo of a {}.",
}


@pytest.mark.parametrize("name", sorted(SPEC_CUSTOM_TEMPLATES))
def test_custom_template(name):
    assert CUSTOM_TEMPLATES[name] == SPEC_CUSTOM_TEMPLATES[name]


def test_custom_templates_cover_exactly_the_15_datasets():
    assert set(CUSTOM_TEMPLATES) == set(SPEC_CUSTOM_TEMPLATES)


def test_imagenet_templates_select():
    assert list(IMAGENET_TEMPLATES_SELECT) == [
        "itap of a {}.",
        "a bad photo of the {}.",
        "a origami {}.",
        "a photo of the large {}.",
        "a {} in a video game.",
        "art of the {}.",
        "a photo of the small {}.",
    ]
