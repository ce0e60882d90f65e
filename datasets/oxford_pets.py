"""OxfordPets (``oxford_pets/images``, split ``split_zhou_OxfordPets.json``).

Without the split file: ``annotations/trainval.txt`` is split 80/20 into train/val per class
(``split_trainval``) and ``annotations/test.txt`` is the test split.
"""

from __future__ import annotations

import os
from typing import List

from coop.data import Datum
from coop.registry import DATASET_REGISTRY
from coop.splits import SplitDataset, split_trainval

__all__ = ["OxfordPets", "breed_name", "read_annotations"]


def breed_name(image_name: str) -> str:
    """The class name of an image name: its last ``_<n>`` dropped, lowercased.

    ``Egyptian_Mau_1`` -> ``egyptian_mau``; ``american_bulldog_10`` -> ``american_bulldog``.
    """
    parts = image_name.split("_")
    if len(parts) < 2:
        raise ValueError(f"Image name {image_name!r} is not of the form <Breed>_<n>")
    return "_".join(parts[:-1]).lower()


def read_annotations(filepath: str, image_dir: str) -> List[Datum]:
    """Read ``trainval.txt``/``test.txt``: lines ``<image name> <CLASS-ID> <SPECIES> <BREED-ID>``.

    impath = ``<image_dir>/<image name>.jpg``; label = CLASS-ID - 1; classname =
    :func:`breed_name`. Blank lines and ``#`` comment lines (as in ``list.txt``) are skipped.
    """
    if not os.path.isfile(filepath):
        raise FileNotFoundError(
            f"OxfordPets: {filepath} is missing. Without split_zhou_OxfordPets.json the split "
            f"is generated from annotations/trainval.txt and annotations/test.txt; download "
            f"the annotations or the split file (see DATASETS.md)"
        )
    items: List[Datum] = []
    with open(filepath, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            fields = line.split()
            try:
                if len(fields) != 4:
                    raise ValueError("expected 4 fields")
                imname = fields[0]
                label = int(fields[1]) - 1
                classname = breed_name(imname)
            except ValueError as e:
                raise ValueError(
                    f"{filepath}, line {lineno}: expected '<image name> <CLASS-ID> <SPECIES> "
                    f"<BREED-ID>', got {line!r} ({e})"
                ) from None
            impath = os.path.join(image_dir, imname + ".jpg")
            items.append(Datum(impath=impath, label=label, classname=classname))
    return items


@DATASET_REGISTRY.register()
class OxfordPets(SplitDataset):
    dataset_dir = "oxford_pets"
    image_dir = "images"
    split_file = "split_zhou_OxfordPets.json"

    def build_split(self):
        anno_dir = os.path.join(self.dataset_dir, "annotations")
        trainval = read_annotations(os.path.join(anno_dir, "trainval.txt"), self.image_dir)
        test = read_annotations(os.path.join(anno_dir, "test.txt"), self.image_dir)
        train, val = split_trainval(trainval, p_val=0.2)
        return train, val, test
