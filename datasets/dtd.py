"""DTD (``dtd/images``, split ``split_zhou_DescribableTextures.json``).

Without the split file every texture folder is split 50/20/30 (``read_and_split_data``);
DTD's official ``labels/train1.txt`` ... splits are not used.
"""

from __future__ import annotations

from coop.registry import DATASET_REGISTRY
from coop.splits import SplitDataset, read_and_split_data


@DATASET_REGISTRY.register()
class DescribableTextures(SplitDataset):
    dataset_dir = "dtd"
    image_dir = "images"
    split_file = "split_zhou_DescribableTextures.json"

    def build_split(self):
        return read_and_split_data(self.image_dir)
