"""Food101 (``food-101/images``, split ``split_zhou_Food101.json``).

Without the split file every class folder is split 50/20/30 (``read_and_split_data``); the
official ``meta/train.txt``/``meta/test.txt`` are not used.
"""

from __future__ import annotations

from coop.registry import DATASET_REGISTRY
from coop.splits import SplitDataset, read_and_split_data


@DATASET_REGISTRY.register()
class Food101(SplitDataset):
    dataset_dir = "food-101"
    image_dir = "images"
    split_file = "split_zhou_Food101.json"

    def build_split(self):
        return read_and_split_data(self.image_dir)
