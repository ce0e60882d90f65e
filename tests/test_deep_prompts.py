"""The deep-prompt bases (coop.deep_prompts): the layer-0 text context and class prompts as
the deep-prompt originals build them, the model's features and logits against CLIP's own,
the class text features once per evaluation, the trainer base's settings."""

from __future__ import annotations

import pytest
import torch

from coop import clip_adapter as ca
from coop.config import get_cfg_default
from coop.deep_prompts import DeepPromptCLIP, DeepPromptTrainer, TextContextLearner
from coop.testing.tiny_clip import tiny_clip_model


@pytest.fixture(scope="module")
def clip3():
    return tiny_clip_model("vit", vision_layers=3, text_layers=3)


def _cfg(size=32):
    cfg = get_cfg_default()
    cfg.INPUT.SIZE = (size, size)
    return cfg


def test_words_start_the_context_and_the_prompt_keeps_them_all(clip3):
    learner = TextContextLearner(_cfg(), ["cat", "sea_lion"], clip3, 2, "a_photo of a")
    ids = ca.tokenize("a photo of a sea lion.")[0]
    assert torch.equal(learner.tokenized_prompts[1], ids)
    emb = clip3.token_embedding(ids).detach()
    assert torch.equal(learner.ctx.detach(), emb[1:3])  # "a photo"
    assert torch.equal(learner.token_prefix[1, 0], emb[0])  # SOS
    assert torch.equal(learner.token_suffix[1], emb[3:])  # "of a sea lion." EOS ...
    assert torch.equal(learner()[1], emb)  # [SOS, ctx, suffix] is the prompt's embedding
    assert learner.prompt_prefix == "a photo of a" and (learner.n_cls, learner.n_ctx) == (2, 2)
    # the class-token buffers are saved, as the originals save them
    assert {"ctx", "token_prefix", "token_suffix"} <= set(learner.state_dict())


def test_more_than_4_tokens_or_no_words_draw_the_context(clip3):
    for n_ctx, words in ((5, "a photo of a"), (3, "")):
        torch.manual_seed(4)
        learner = TextContextLearner(_cfg(), ["cat"], clip3, n_ctx, words)
        torch.manual_seed(4)
        assert torch.equal(learner.ctx.detach(), torch.empty(n_ctx, 64).normal_(std=0.02))
        x = " ".join(["X"] * n_ctx)
        assert torch.equal(learner.tokenized_prompts[0], ca.tokenize(f"{x} cat.")[0])


def test_an_input_size_other_than_clips_is_one_clear_error(clip3):
    with pytest.raises(ValueError, match=r"INPUT.SIZE \(224, 224\) does not match .* 32"):
        TextContextLearner(_cfg(224), ["cat"], clip3, 2, "a photo")


class _Unprompted(DeepPromptCLIP):
    """The layer-0 context only: the text tower sees CLIP's own prompt embeddings."""

    def text_prompts(self):
        return self.prompt_learner(), []

    def vision_prompts(self):
        return []


def test_features_and_logits_are_clips_own_without_deep_prompts(clip3):
    cfg = _cfg()
    cfg.FAST.ENABLED = False
    learner = TextContextLearner(cfg, ["cat", "sea_lion"], clip3, 4, "a photo of a")
    model = _Unprompted(cfg, clip3, learner)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        text = clip3.encode_text(ca.tokenize(["a photo of a cat.", "a photo of a sea lion."]))
        text = text / text.norm(dim=-1, keepdim=True)
        image = clip3.encode_image(images)
        image = image / image.norm(dim=-1, keepdim=True)
        assert torch.equal(model.encode_text(), text)
        assert torch.equal(model.encode_image(images), image)
        assert torch.equal(model(images), clip3.logit_scale.exp() * image @ text.t())


def test_text_features_are_computed_once_inside_an_evaluation(clip3):
    learner = TextContextLearner(_cfg(), ["cat", "dog"], clip3, 2, "a photo")
    model = _Unprompted(_cfg(), clip3, learner)
    calls = []
    model.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = [model(images), model(images)]
        assert len(calls) == 2
        with model.text_features.frozen():
            once = [model(images), model(images)]
    assert len(calls) == 3
    assert all(torch.equal(a, b) for a, b in zip(plain, once))


def test_the_trainer_base_trains_the_image_side_and_rebuilds_the_class_tokens():
    assert DeepPromptTrainer.image_encoder_frozen is False
    assert DeepPromptTrainer.log_train_accuracy is False
    assert DeepPromptTrainer.derived_state_keys == (
        "prompt_learner.token_prefix",
        "prompt_learner.token_suffix",
    )
