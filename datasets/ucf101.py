"""UCF101 (``ucf101/UCF-101-midframes``, split ``split_zhou_UCF101.json``).

The images are the middle frames of the videos (the zip the CoOp authors provide). Without
the JSON the split is built from ``ucfTrainTestlist``: ``classInd.txt`` (label = id - 1),
``trainlist01.txt`` (train + val, split 80/20 per class) and ``testlist01.txt`` (test).
"""

from __future__ import annotations

import os
import re
from typing import Dict, List

from coop.data import Datum
from coop.registry import DATASET_REGISTRY
from coop.splits import SplitDataset, split_trainval

_CAMEL_PIECE = re.compile(r"[A-Z][^A-Z]*")


def rename_action(action: str) -> str:
    """``ApplyEyeMakeup`` -> ``Apply_Eye_Makeup``, ``YoYo`` -> ``Yo_Yo``."""
    return "_".join(_CAMEL_PIECE.findall(action))


@DATASET_REGISTRY.register()
class UCF101(SplitDataset):
    dataset_dir = "ucf101"
    image_dir = "UCF-101-midframes"
    split_file = "split_zhou_UCF101.json"

    def _lines(self, name: str) -> List[str]:
        return self.annotation_lines(os.path.join(self.dataset_dir, "ucfTrainTestlist", name))

    def build_split(self):
        cname2lab: Dict[str, int] = {}
        for line in self._lines("classInd.txt"):
            fields = line.split()
            if len(fields) < 2 or not fields[0].isdigit():
                raise ValueError(
                    f"UCF101: classInd.txt has the line {line!r}; expected '<id> <Action>'"
                )
            cname2lab[fields[1]] = int(fields[0]) - 1
        trainval = self._read_data(cname2lab, "trainlist01.txt")
        test = self._read_data(cname2lab, "testlist01.txt")
        train, val = split_trainval(trainval, p_val=0.2)
        return train, val, test

    def _read_data(self, cname2lab: Dict[str, int], list_file: str) -> List[Datum]:
        items: List[Datum] = []
        for line in self._lines(list_file):
            video = line.split()[0]  # "Action/v_Action_gXX_cYY.avi" (a label may follow)
            parts = video.split("/")
            if len(parts) != 2:
                raise ValueError(
                    f"UCF101: {list_file} has the line {line!r}; expected '<Action>/<video>.avi'"
                )
            action, filename = parts
            if action not in cname2lab:
                raise ValueError(
                    f"UCF101: {list_file} lists {video!r}, whose action {action!r} is not in "
                    f"classInd.txt"
                )
            renamed = rename_action(action)
            stem, ext = os.path.splitext(filename)
            frame = stem + ".jpg" if ext == ".avi" else filename
            items.append(
                Datum(
                    impath=os.path.join(self.image_dir, renamed, frame),
                    label=cname2lab[action],
                    classname=renamed,
                )
            )
        return items
