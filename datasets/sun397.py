"""SUN397 (``sun397/SUN397``, split ``split_zhou_SUN397.json``).

Without the JSON the split is built from the official partition files in the dataset
folder: ``ClassName.txt`` (label = line index), ``Training_01.txt`` (train + val, split
80/20 per class) and ``Testing_01.txt`` (test).
"""

from __future__ import annotations

import os
from typing import Dict, List

from coop.data import Datum
from coop.registry import DATASET_REGISTRY
from coop.splits import SplitDataset, split_trainval


def sun397_classname(category: str) -> str:
    """``a/apartment_building/outdoor`` -> ``outdoor apartment_building``: drop the letter,
    put the remaining components in reverse order (so indoor/outdoor comes first)."""
    return " ".join(reversed(category.split("/")[1:]))


@DATASET_REGISTRY.register()
class SUN397(SplitDataset):
    dataset_dir = "sun397"
    image_dir = "SUN397"
    split_file = "split_zhou_SUN397.json"

    def _lines(self, name: str) -> List[str]:
        return self.annotation_lines(os.path.join(self.dataset_dir, name))

    def build_split(self):
        categories = [
            line[1:] if line.startswith("/") else line for line in self._lines("ClassName.txt")
        ]
        cname2lab = {c: i for i, c in enumerate(categories)}
        trainval = self._read_data(cname2lab, "Training_01.txt")
        test = self._read_data(cname2lab, "Testing_01.txt")
        train, val = split_trainval(trainval, p_val=0.2)
        return train, val, test

    def _read_data(self, cname2lab: Dict[str, int], list_file: str) -> List[Datum]:
        items: List[Datum] = []
        for line in self._lines(list_file):
            rel = line[1:] if line.startswith("/") else line
            category = os.path.dirname(rel)
            if category not in cname2lab:
                raise ValueError(
                    f"SUN397: {list_file} lists {line!r}, whose category {category!r} is not "
                    f"in ClassName.txt"
                )
            items.append(
                Datum(
                    impath=os.path.join(self.image_dir, rel),
                    label=cname2lab[category],
                    classname=sun397_classname(category),
                )
            )
        return items
