"""Miniature datasets in the real on-disk layouts, with learnable synthetic images.

Every image of a class shares a base colour and a stripe pattern (plus small noise), so even
a tiny random CLIP's image features cluster per class. Everything is deterministic given
``seed`` and uses numpy's own ``Generator``: the global ``random``/numpy/torch generators are
never touched.
"""

from __future__ import annotations

import colorsys
import os
from typing import List

import numpy as np

__all__ = ["CALTECH101_FOLDERS", "make_caltech101", "class_image"]

# The 100 class folders of Caltech101 (BACKGROUND_Google and Faces_easy are extra, ignored).
# The four renamed folders come first so that even small miniatures exercise the renames.
CALTECH101_FOLDERS: List[str] = [
    "Faces", "Leopards", "Motorbikes", "airplanes", "accordion", "anchor", "ant", "barrel",
    "bass", "beaver", "binocular", "bonsai", "brain", "brontosaurus", "buddha", "butterfly",
    "camera", "cannon", "car_side", "ceiling_fan", "cellphone", "chair", "chandelier",
    "cougar_body", "cougar_face", "crab", "crayfish", "crocodile", "crocodile_head", "cup",
    "dalmatian", "dollar_bill", "dolphin", "dragonfly", "electric_guitar", "elephant", "emu",
    "euphonium", "ewer", "ferry", "flamingo", "flamingo_head", "garfield", "gerenuk",
    "gramophone", "grand_piano", "hawksbill", "headphone", "hedgehog", "helicopter", "ibis",
    "inline_skate", "joshua_tree", "kangaroo", "ketch", "lamp", "laptop", "llama", "lobster",
    "lotus", "mandolin", "mayfly", "menorah", "metronome", "minaret", "nautilus", "octopus",
    "okapi", "pagoda", "panda", "pigeon", "pizza", "platypus", "pyramid", "revolver", "rhino",
    "rooster", "saxophone", "schooner", "scissors", "scorpion", "sea_horse", "snoopy",
    "soccer_ball", "stapler", "starfish", "stegosaurus", "stop_sign", "strawberry",
    "sunflower", "tick", "trilobite", "umbrella", "watch", "water_lilly", "wheelchair",
    "wild_cat", "windsor_chair", "wrench", "yin_yang",
]  # fmt: skip

_CALTECH_IGNORED = ("BACKGROUND_Google", "Faces_easy")
_CALTECH_RENAMES = {
    "airplanes": "airplane",
    "Faces": "face",
    "Leopards": "leopard",
    "Motorbikes": "motorbike",
}


def class_image(
    class_index: int,
    n_classes: int,
    rng: np.random.Generator,
    height: int,
    width: int,
    noise: float = 12.0,
) -> np.ndarray:
    """An (H, W, 3) uint8 image for class ``class_index``: its own hue, brightness and
    stripe direction/period, plus Gaussian noise of std ``noise`` (drawn from ``rng``)."""
    hue = (class_index / max(n_classes, 1)) % 1.0
    value = 0.95 if class_index % 2 == 0 else 0.7
    base = np.array(colorsys.hsv_to_rgb(hue, 0.85, value)) * 255.0
    period = 4 + 2 * (class_index % 4)
    yy, xx = np.mgrid[0:height, 0:width]
    coord = yy if (class_index // 4) % 2 == 0 else xx
    stripes = ((coord // (period // 2)) % 2).astype(np.float64)  # 0/1 bands
    img = base[None, None, :] * (0.65 + 0.35 * stripes[..., None])
    img = img + rng.normal(0.0, noise, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _save_jpeg(path: str, array: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(array).save(path, format="JPEG", quality=90)


def make_caltech101(
    root: str,
    n_classes: int = 10,
    n_per_class: int = 20,
    image_size: int = 40,
    with_split: bool = True,
    seed: int = 0,
) -> str:
    """Write a miniature Caltech101 under ``<root>/caltech-101`` and return ``root``.

    Class folders are real Caltech101 folder names (always starting with ``Faces``,
    ``Leopards``, ``Motorbikes``, ``airplanes``), plus the ignored ``BACKGROUND_Google`` and
    ``Faces_easy`` folders and hidden files. Image widths vary a little so that shorter-edge
    resizing is exercised. With ``with_split`` a ``split_zhou_Caltech101.json`` is written
    with a deterministic 50/20/30 split of each class (numpy ``Generator``, not ``random``).
    """
    from coop.data import Datum
    from coop.splits import save_split

    if not 1 <= n_classes <= len(CALTECH101_FOLDERS):
        raise ValueError(f"n_classes must be in 1..{len(CALTECH101_FOLDERS)}, got {n_classes}")
    rng = np.random.default_rng(seed)
    dataset_dir = os.path.join(root, "caltech-101")
    image_dir = os.path.join(dataset_dir, "101_ObjectCategories")
    os.makedirs(image_dir, exist_ok=True)

    folders = CALTECH101_FOLDERS[:n_classes]
    # labels follow the case-sensitive sorted folder order, like the loader
    sorted_folders = sorted(folders)
    files = {}
    for folder in folders:
        cls = sorted_folders.index(folder)
        folder_dir = os.path.join(image_dir, folder)
        os.makedirs(folder_dir, exist_ok=True)
        paths = []
        for i in range(n_per_class):
            width = image_size + 4 * (i % 3)
            path = os.path.join(folder_dir, f"image_{i + 1:04d}.jpg")
            _save_jpeg(path, class_image(cls, n_classes, rng, image_size, width))
            paths.append(path)
        files[folder] = paths

    for folder in _CALTECH_IGNORED:
        folder_dir = os.path.join(image_dir, folder)
        os.makedirs(folder_dir, exist_ok=True)
        for i in range(3):
            noise = rng.integers(0, 256, size=(image_size, image_size, 3), dtype=np.uint8)
            _save_jpeg(os.path.join(folder_dir, f"image_{i + 1:04d}.jpg"), noise)
    with open(os.path.join(image_dir, ".DS_Store"), "wb") as f:
        f.write(b"\0")
    with open(os.path.join(image_dir, folders[0], ".hidden_note"), "wb") as f:
        f.write(b"not an image")

    if with_split:
        train, val, test = [], [], []
        for label, folder in enumerate(sorted_folders):
            paths = files[folder]
            order = rng.permutation(len(paths))
            shuffled = [paths[j] for j in order]
            n = len(shuffled)
            n_train, n_val = round(n * 0.5), round(n * 0.2)
            cname = _CALTECH_RENAMES.get(folder, folder)
            for part, chunk in (
                (train, shuffled[:n_train]),
                (val, shuffled[n_train : n_train + n_val]),
                (test, shuffled[n_train + n_val :]),
            ):
                part.extend(Datum(p, label=label, classname=cname) for p in chunk)
        save_split(
            train, val, test, os.path.join(dataset_dir, "split_zhou_Caltech101.json"), image_dir
        )
    return root
