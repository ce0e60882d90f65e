"""The test-only ImageNet variants: ImageNetV2, ImageNet-Sketch, ImageNet-A, ImageNet-R.

Each folder holds a copy of ImageNet's ``classnames.txt``. The data is both ``train_x`` and
``test`` (val is None); there is no few-shot step, SUBSAMPLE_CLASSES is ignored and no
``split_fewshot`` folder is created. Labels:

- ImageNetV2: the folder name 0..n-1; the class name is line ``label`` of classnames.txt
  (sorted-wnid order, so the labels equal ImageNet's);
- ImageNet-Sketch, -A, -R: the index of the wnid folder in the sorted list of the variant's
  own folders (so A and R, with 200 folders, have labels 0..199); names by wnid.

Images inside a class folder are sorted (see :func:`coop.datasets.imagenet.sorted_images`).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, List

from coop.data import DatasetBase, Datum
from coop.datasets.imagenet import read_classnames, sorted_images, sorted_subdirs
from coop.registry import DATASET_REGISTRY
from coop.splits import DatasetNotFoundError

logger = logging.getLogger(__name__)


def _class_images(folder: str, what: str) -> List[str]:
    images = sorted_images(folder)
    if not images:
        raise ValueError(f"{what}: the class folder {folder} holds no images")
    return [os.path.join(folder, name) for name in images]


def read_wnid_folders(image_dir: str, classnames: Dict[str, str], what: str) -> List[Datum]:
    """Items of a ``<image_dir>/<wnid>/*`` layout: label = index of the wnid in the sorted
    list of the sub-directories (files such as README.txt are not classes); classname by
    wnid."""
    folders = sorted_subdirs(image_dir)
    if not folders:
        raise ValueError(f"{what}: no class folders in {image_dir}")
    unknown = [w for w in folders if w not in classnames]
    if unknown:
        raise ValueError(f"{what}: the folder(s) {unknown[:5]} are not listed in classnames.txt")
    items: List[Datum] = []
    for label, wnid in enumerate(folders):
        for impath in _class_images(os.path.join(image_dir, wnid), what):
            items.append(Datum(impath=impath, label=label, classname=classnames[wnid]))
    return items


class _ImageNetVariant(DatasetBase):
    """Shared constructor: find the folders, read classnames.txt, ``train_x = test = data``."""

    dataset_dir = ""
    image_dir = ""

    def __init__(self, cfg: Any) -> None:
        cls = type(self)
        root = os.path.abspath(os.path.expanduser(cfg.DATASET.ROOT))
        self.root = root
        self.dataset_dir = os.path.join(root, cls.dataset_dir)
        self.image_dir = os.path.join(self.dataset_dir, cls.image_dir)
        if not os.path.isdir(self.image_dir):
            raise DatasetNotFoundError(
                f"{cls.__name__} not found: the folder {self.image_dir} does not exist. "
                f"DATASET.ROOT ({root}) must contain '{cls.dataset_dir}/{cls.image_dir}' "
                f"(see DATASETS.md for how to download and arrange it)"
            )
        subsample = cfg.DATASET.get("SUBSAMPLE_CLASSES", "all")
        if subsample != "all":
            logger.warning(
                "%s is a test-only dataset: DATASET.SUBSAMPLE_CLASSES=%s is ignored",
                cls.__name__,
                subsample,
            )
        classnames = read_classnames(os.path.join(self.dataset_dir, "classnames.txt"))
        data = self.read_data(classnames)
        super().__init__(train_x=data, test=data)

    def read_data(self, classnames: Dict[str, str]) -> List[Datum]:
        return read_wnid_folders(self.image_dir, classnames, type(self).__name__)


@DATASET_REGISTRY.register()
class ImageNetV2(_ImageNetVariant):
    dataset_dir = "imagenetv2"
    image_dir = "imagenetv2-matched-frequency-format-val"

    def read_data(self, classnames: Dict[str, str]) -> List[Datum]:
        names = list(classnames.values())  # line order = sorted-wnid order = ImageNet labels
        expected = [str(label) for label in range(len(names))]
        found = sorted_subdirs(self.image_dir)
        if sorted(found) != sorted(expected):
            extra = sorted(set(found) - set(expected))[:5]
            missing = sorted(set(expected) - set(found), key=int)[:5]
            raise ValueError(
                f"ImageNetV2: {self.image_dir} must hold the folders 0..{len(names) - 1}, one "
                f"per line of classnames.txt; missing: {missing}, unexpected: {extra}"
            )
        items: List[Datum] = []
        for label in range(len(names)):
            folder = os.path.join(self.image_dir, str(label))
            for impath in _class_images(folder, "ImageNetV2"):
                items.append(Datum(impath=impath, label=label, classname=names[label]))
        return items


@DATASET_REGISTRY.register()
class ImageNetSketch(_ImageNetVariant):
    dataset_dir = "imagenet-sketch"
    image_dir = "images"


@DATASET_REGISTRY.register()
class ImageNetA(_ImageNetVariant):
    dataset_dir = "imagenet-adversarial"
    image_dir = "imagenet-a"


@DATASET_REGISTRY.register()
class ImageNetR(_ImageNetVariant):
    dataset_dir = "imagenet-rendition"
    image_dir = "imagenet-r"
