"""Make a tiny random CLIP partly "pretrained" on a miniature dataset.

A tiny CLIP with random weights has no image-text alignment, so zero-shot is at chance and a
learned context alone cannot discover one. Real CLIP is pretrained; this helper imitates that
cheaply: it trains the text tower for a few steps so that the prompt ``template`` with each
class name points at that class's image features. Zero-shot then works partly, and CoOp's
learned context can improve on it, as on real data. Deterministic, CPU only, a few seconds.
"""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F

from coop.io import atomic_torch_save

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _load_images(paths: Sequence[str], size: int) -> torch.Tensor:
    from PIL import Image
    from torchvision.transforms import functional as TF

    out = []
    for p in paths:
        img = Image.open(p).convert("RGB")
        img = TF.resize(img, size, interpolation=TF.InterpolationMode.BICUBIC)
        img = TF.center_crop(img, [size, size])
        out.append(TF.normalize(TF.to_tensor(img), CLIP_MEAN, CLIP_STD))
    return torch.stack(out)


def align_tiny_clip(
    state_dict: dict,
    items: Sequence[Tuple[str, int]],
    classnames: List[str],
    template: str = "a photo of a {}.",
    steps: int = 20,
    lr: float = 1e-3,
    seed: int = 0,
) -> dict:
    """Return a copy of ``state_dict`` whose text tower was trained for ``steps`` Adam steps
    to classify ``items`` (image path, label) with ``template`` prompts. The image tower is
    untouched. The caller's random generators are not disturbed."""
    from coop.clip_adapter import import_clip, tokenize

    clip = import_clip()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = clip.build_model({k: v.clone() for k, v in state_dict.items()}).float()
        size = model.visual.input_resolution
        images = _load_images([p for p, _ in items], size)
        labels = torch.tensor([label for _, label in items])
        with torch.no_grad():
            img = model.encode_image(images)
            img = img / img.norm(dim=-1, keepdim=True)
        tokens = tokenize([template.format(c.replace("_", " ")) for c in classnames])
        params = [p for n, p in model.named_parameters() if not n.startswith("visual")]
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=lr)
        scale = math.exp(float(model.logit_scale.detach()))
        for _ in range(steps):
            txt = model.encode_text(tokens)
            txt = txt / txt.norm(dim=-1, keepdim=True)
            loss = F.cross_entropy(scale * img @ txt.t(), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def read_split_items(split_file: str, image_dir: str) -> Tuple[List[Tuple[str, int]], List[str]]:
    """The train items (absolute path, label) and the class names of a split JSON file."""
    import json
    import os

    with open(split_file, encoding="utf-8") as f:
        split = json.load(f)
    items = [(os.path.join(image_dir, rel), int(label)) for rel, label, _ in split["train"]]
    names = {int(label): cname for _, label, cname in split["train"]}
    return items, [names[i] for i in range(len(names))]


def save_learnable_tiny_clip(
    path: str, split_file: str, image_dir: str, arch: str = "vit", seed: int = 0
) -> str:
    """A tiny CLIP for a miniature dataset on which CoOp measurably beats zero-shot.

    The token and positional embeddings are scaled up (x5) so that the paper's learning
    rate suits the tiny text tower, and the text tower is aligned for 300 steps with the
    template "a {} in a video game." (not the zero-shot template), so zero-shot CLIP is
    partly right and a learned context can do better. Saved as a plain state dict.
    """
    from coop.testing.tiny_clip import tiny_clip_state_dict

    items, classnames = read_split_items(split_file, image_dir)
    sd = tiny_clip_state_dict(arch=arch, seed=seed)
    sd["token_embedding.weight"] = sd["token_embedding.weight"] * 5.0
    sd["positional_embedding"] = sd["positional_embedding"] * 5.0
    sd = align_tiny_clip(
        sd, items, classnames, template="a {} in a video game.", steps=300, lr=1e-3, seed=seed
    )
    atomic_torch_save(sd, path)
    return path
