"""EuroSAT (``eurosat/2750``, split ``split_zhou_EuroSAT.json``).

Without the split file every class folder is split 50/20/30 (``read_and_split_data``) and
the folder names are replaced by the readable names of ``NEW_CNAMES``.
"""

from __future__ import annotations

from coop.registry import DATASET_REGISTRY
from coop.splits import SplitDataset, read_and_split_data

NEW_CNAMES = {
    "AnnualCrop": "Annual Crop Land",
    "Forest": "Forest",
    "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road",
    "Industrial": "Industrial Buildings",
    "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land",
    "Residential": "Residential Buildings",
    "River": "River",
    "SeaLake": "Sea or Lake",
}


@DATASET_REGISTRY.register()
class EuroSAT(SplitDataset):
    dataset_dir = "eurosat"
    image_dir = "2750"
    split_file = "split_zhou_EuroSAT.json"

    def build_split(self):
        return read_and_split_data(self.image_dir, new_cnames=NEW_CNAMES)
