"""The zero-shot baselines' class text features (trainers/zsclip.py): one template, an
ensemble (each normalised, the mean re-normalised) and the plain mean of unnormalised
features, each equal bit for bit to the computation written out by hand; the prompts'
text; the baselines' template lists."""

from __future__ import annotations

import torch

from coop.clip_adapter import load_clip, tokenize
from coop.testing.tiny_clip import tiny_clip_model
from coop.trainers.zsclip import class_text_features, ensemble_templates

NAMES = ["cat", "sea_lion", "red car"]
TEMPLATES = ["a photo of a {}.", "itap of a {}.", "art of the {}."]


def _by_hand(clip_model, template):
    with torch.no_grad():
        return clip_model.encode_text(
            tokenize([template.format(n) for n in ("cat", "sea lion", "red car")])
        )


def test_one_template_is_clips_normalised_features():
    clip_model = tiny_clip_model("vit")
    f = _by_hand(clip_model, TEMPLATES[0])
    got = class_text_features(clip_model, NAMES, TEMPLATES[:1])
    assert torch.equal(got, f / f.norm(dim=-1, keepdim=True))


def test_an_ensemble_is_the_renormalised_mean_of_normalised_features(tiny_vit):
    clip_model = load_clip(tiny_vit)  # fp16 as built, as the baselines keep it
    feats = []
    for template in TEMPLATES:
        f = _by_hand(clip_model, template)
        feats.append(f / f.norm(dim=-1, keepdim=True))
    mean = torch.stack(feats).mean(dim=0)  # the original ZeroshotCLIP2's
    got = class_text_features(clip_model, NAMES, TEMPLATES)
    assert got.dtype == torch.float16
    assert torch.equal(got, mean / mean.norm(dim=-1, keepdim=True))


def test_unnormalised_features_average_plainly_through_the_given_encoder():
    clip_model = tiny_clip_model("vit")
    seen = []

    def encode(tokens):
        seen.append(tokens)
        with torch.no_grad():
            return clip_model.encode_text(tokens)

    got = class_text_features(clip_model, NAMES, TEMPLATES, normalize=False, encode=encode)
    feats = [_by_hand(clip_model, t).unsqueeze(1) for t in TEMPLATES]
    assert torch.equal(got, torch.cat(feats, dim=1).mean(dim=1))  # the original PromptSRC's
    assert torch.equal(seen[1][1], tokenize("itap of a sea lion.")[0])  # "_" read as a space
    assert not got.requires_grad


def test_the_ensemble_adds_the_datasets_own_template_except_on_imagenet():
    assert len(ensemble_templates("ImageNet")) == 7
    assert ensemble_templates("OxfordPets")[-1] == "a photo of a {}, a type of pet."
