"""FGVCAircraft (``fgvc_aircraft``: the ``data/`` folder of fgvc-aircraft-2013b).

There is no split JSON and none is ever written: train/val/test are the official
variant-level lists ``images_variant_{train,val,test}.txt``; no random numbers are used.
Class names are the lines of ``variants.txt`` and the label is the line index.
"""

from __future__ import annotations

import os
from typing import Dict, List

from coop.data import Datum
from coop.registry import DATASET_REGISTRY
from coop.splits import Split, SplitDataset


def _read_lines(path: str, what: str) -> List[str]:
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"FGVCAircraft: {what} {path} is missing; the dataset folder must be the data/ "
            f"folder of fgvc-aircraft-2013b (see DATASETS.md)"
        )
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


@DATASET_REGISTRY.register()
class FGVCAircraft(SplitDataset):
    dataset_dir = "fgvc_aircraft"
    image_dir = "images"
    split_file = ""  # none: the official lists are read every time

    def _load_split(self, cfg) -> Split:
        # replaces SplitDataset's "read the JSON or build and save it": nothing is written
        return self.build_split()

    def build_split(self) -> Split:
        classnames = [
            line.strip()
            for line in _read_lines(os.path.join(self.dataset_dir, "variants.txt"), "variants.txt")
        ]
        # label = line index in variants.txt (blank lines keep their index but name no class)
        cname2lab: Dict[str, int] = {c: i for i, c in enumerate(classnames) if c}
        train = self._read_data(cname2lab, "images_variant_train.txt")
        val = self._read_data(cname2lab, "images_variant_val.txt")
        test = self._read_data(cname2lab, "images_variant_test.txt")
        return train, val, test

    def _read_data(self, cname2lab: Dict[str, int], split_file: str) -> List[Datum]:
        path = os.path.join(self.dataset_dir, split_file)
        items: List[Datum] = []
        for lineno, line in enumerate(_read_lines(path, "the list"), start=1):
            words = line.strip().split()
            if not words:
                continue
            if len(words) < 2:
                raise ValueError(
                    f"{path}:{lineno}: expected '<image id> <variant name>', got {line!r}"
                )
            image_id, classname = words[0], " ".join(words[1:])
            if classname not in cname2lab:
                raise ValueError(
                    f"{path}:{lineno}: the variant {classname!r} is not listed in variants.txt"
                )
            impath = os.path.join(self.image_dir, f"{image_id}.jpg")
            items.append(Datum(impath=impath, label=cname2lab[classname], classname=classname))
        return items
