"""Flowers102 (``oxford_flowers/jpg``, split ``split_zhou_OxfordFlowers.json``).

Without the split file: the labels of ``imagelabels.mat`` (image ``i`` is
``jpg/image_{i+1:05d}.jpg``) are grouped by class and each class is split 50/20/30 into
train/val/test; class names come from ``cat_to_name.json``. Reading the ``.mat`` file needs
scipy (only then). The official ``setid.mat`` split is not used.
"""

from __future__ import annotations

import json
import logging
import os
import random
from typing import Dict, List

from coop.data import Datum
from coop.registry import DATASET_REGISTRY
from coop.splits import SplitDataset

__all__ = ["OxfordFlowers"]

logger = logging.getLogger(__name__)


@DATASET_REGISTRY.register()
class OxfordFlowers(SplitDataset):
    dataset_dir = "oxford_flowers"
    image_dir = "jpg"
    split_file = "split_zhou_OxfordFlowers.json"

    def build_split(self, p_trn: float = 0.5, p_val: float = 0.2):
        label_file = os.path.join(self.dataset_dir, "imagelabels.mat")
        cname_file = os.path.join(self.dataset_dir, "cat_to_name.json")
        labels = [int(v) for v in self.load_mat(label_file)["labels"][0]]
        with open(self.require_annotation(cname_file), encoding="utf-8") as f:
            lab2cname: Dict[str, str] = json.load(f)

        # group the image paths by mat value, in order of first appearance
        groups: Dict[int, List[str]] = {}
        for i, value in enumerate(labels):
            impath = os.path.join(self.image_dir, f"image_{i + 1:05d}.jpg")
            groups.setdefault(value, []).append(impath)

        p_tst = 1 - p_trn - p_val
        logger.info(
            "Splitting data into %.0f%% train, %.0f%% val, and %.0f%% test",
            p_trn * 100,
            p_val * 100,
            p_tst * 100,
        )
        # check every class before any random number is drawn
        for value, impaths in groups.items():
            n = len(impaths)
            n_train, n_val = round(n * p_trn), round(n * p_val)
            if not (n_train > 0 and n_val > 0 and n - n_train - n_val > 0):
                raise ValueError(
                    f"OxfordFlowers: class {value} has {n} image(s), too few for a "
                    f"{p_trn:.0%}/{p_val:.0%}/{p_tst:.0%} split (each part must be > 0)"
                )
            if str(value) not in lab2cname:
                raise ValueError(f"OxfordFlowers: {cname_file} has no name for class {value}")

        train: List[Datum] = []
        val: List[Datum] = []
        test: List[Datum] = []
        for value, impaths in groups.items():
            random.shuffle(impaths)
            n = len(impaths)
            n_train, n_val = round(n * p_trn), round(n * p_val)
            label, classname = value - 1, lab2cname[str(value)]
            for part, chunk in (
                (train, impaths[:n_train]),
                (val, impaths[n_train : n_train + n_val]),
                (test, impaths[n_train + n_val :]),
            ):
                part.extend(Datum(impath=p, label=label, classname=classname) for p in chunk)
        return train, val, test
