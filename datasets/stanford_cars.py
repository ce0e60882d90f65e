"""StanfordCars (``stanford_cars``, split ``split_zhou_StanfordCars.json``).

The split file's paths are relative to the dataset folder itself (``cars_train/00001.jpg``).
Without the split file the official ``.mat`` annotations are read (this alone needs scipy):
``devkit/cars_train_annos.mat`` (images in ``cars_train/``) is split 80/20 into train/val per
class and ``cars_test_annos_withlabels.mat`` (images in ``cars_test/``) is the test split.
"""

from __future__ import annotations

import os
from typing import Any, List

from coop.data import Datum
from coop.registry import DATASET_REGISTRY
from coop.splits import SplitDataset, split_trainval

__all__ = ["StanfordCars", "year_first"]


def year_first(classname: str) -> str:
    """Move the last word (the year) to the front: ``AM General Hummer SUV 2000`` ->
    ``2000 AM General Hummer SUV``."""
    words = classname.split(" ")
    return " ".join([words[-1], *words[:-1]])


@DATASET_REGISTRY.register()
class StanfordCars(SplitDataset):
    dataset_dir = "stanford_cars"
    image_dir = ""  # the split file's paths are relative to the dataset folder
    split_file = "split_zhou_StanfordCars.json"

    def build_split(self):
        devkit = os.path.join(self.dataset_dir, "devkit")
        train_annos = os.path.join(devkit, "cars_train_annos.mat")
        test_annos = os.path.join(self.dataset_dir, "cars_test_annos_withlabels.mat")
        meta_file = os.path.join(devkit, "cars_meta.mat")
        for path in (train_annos, test_annos, meta_file):
            self.require_annotation(path)
        class_names = self.load_mat(meta_file)["class_names"][0]
        trainval = self._read_annos("cars_train", train_annos, class_names)
        test = self._read_annos("cars_test", test_annos, class_names)
        train, val = split_trainval(trainval, p_val=0.2)
        return train, val, test

    def _read_annos(self, folder: str, anno_file: str, class_names: Any) -> List[Datum]:
        """One Datum per record of ``anno_file`` (``fname[0]``, ``class[0, 0]`` 1-based)."""
        image_dir = os.path.join(self.dataset_dir, folder)
        items: List[Datum] = []
        for record in self.load_mat(anno_file)["annotations"][0]:
            imname = str(record["fname"][0])
            label = int(record["class"][0, 0]) - 1
            if not 0 <= label < len(class_names):
                raise ValueError(
                    f"StanfordCars: {anno_file} gives {imname} the class {label + 1}, but "
                    f"cars_meta.mat has {len(class_names)} class names"
                )
            classname = year_first(str(class_names[label][0]))
            items.append(
                Datum(impath=os.path.join(image_dir, imname), label=label, classname=classname)
            )
        return items
