"""Facts about the 15 benchmark datasets, in one table (:data:`DATASETS`, keyed by registry name).

The dataset files (``coop/datasets/*.py``) know only their on-disk layout; everything else a
user needs to obtain and verify a dataset lives here: the config stem, the published class
count and split sizes (CoOp/CoCoOp papers' statistics table), the folders and files that
must exist, where the files come from and which of them can be downloaded automatically.

The folder, the image folder and the split file name are read from the registered dataset
class (``dataset_dir``, ``image_dir``, ``split_file``) so they are never written twice.
Download URLs and md5 sums that torchvision keeps as class attributes are read from
torchvision when needed (nothing is imported at import time).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

__all__ = [
    "Download",
    "ManualStep",
    "DatasetInfo",
    "DATASETS",
    "COOP_DATASETS_MD",
    "get_info",
    "resolve_name",
]

# Where the official split files (and a few other files) are linked from.
COOP_DATASETS_MD = "CoOp's DATASETS.md (github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md)"


@dataclass(frozen=True)
class Download:
    """One file that can be fetched from a public URL.

    ``url``/``md5`` are given here, or ``from_torchvision`` reads ``(url, md5)`` from the
    ``torchvision.datasets`` module (its dataset classes keep them as class attributes).
    An archive (``extract=True``) is saved under the download folder, extracted into a
    staging folder, archives named in ``then_extract`` (paths inside the staging folder) are
    extracted beside themselves, and each ``(src, dst)`` of ``place`` is moved from the
    staging folder to ``<dataset folder>/<dst>`` (``src`` ending in ``/*`` moves each entry
    of that folder into ``dst``). A plain file (``extract=False``) is saved straight to
    ``<dataset folder>/<filename>``. ``provides`` are the paths (under the dataset folder)
    whose presence means this download is already installed.
    """

    filename: str
    provides: Tuple[str, ...]
    url: str = ""
    md5: Optional[str] = None
    from_torchvision: Optional[Callable[[Any], Tuple[str, Optional[str]]]] = None
    extract: bool = True
    then_extract: Tuple[str, ...] = ()
    place: Tuple[Tuple[str, str], ...] = ()

    def resolve(self) -> Tuple[str, Optional[str]]:
        """``(url, md5)``; md5 is None when no checksum is known."""
        if self.from_torchvision is not None:
            import torchvision.datasets as tvd

            return self.from_torchvision(tvd)
        return self.url, self.md5


@dataclass(frozen=True)
class ManualStep:
    """A file or folder the user must obtain by hand.

    ``dest`` is relative to the dataset folder (may contain placeholders such as
    ``<wnid>``); ``check`` is the path whose existence means the step is done (default:
    ``dest``). With ``copy_from`` (a path relative to DATASET.ROOT) ``prepare`` copies that
    file when it exists instead of asking the user. ``optional`` steps are needed only to
    generate a split when the official split file is absent.
    """

    what: str
    source: str
    dest: str
    check: str = ""
    copy_from: str = ""
    optional: bool = False

    @property
    def check_path(self) -> str:
        return self.check or self.dest


@dataclass(frozen=True)
class DatasetInfo:
    """What is known about one registered dataset (see the module docstring)."""

    name: str  # registry name = DATASET.NAME
    title: str  # the usual name of the dataset
    config: str  # stem of configs/datasets/<config>.yaml
    num_classes: int
    # published full split sizes (train, val, test); val None = no val split (test-only)
    sizes: Tuple[int, Optional[int], int]
    val_is_test: bool = False  # ImageNet: its val set is both val and test
    test_only: bool = False  # the ImageNet variants: train_x = test = the data
    image_dirs: Tuple[str, ...] = ()  # folders that must exist; () = the class's image_dir
    required_files: Tuple[Tuple[str, str], ...] = ()  # (path, where it comes from)
    split_note: str = ""  # shown when the dataset has no split JSON
    homepage: str = ""
    downloads: Tuple[Download, ...] = ()
    manual: Tuple[ManualStep, ...] = ()

    # ---- facts read from the registered dataset class

    @property
    def dataset_class(self) -> Any:
        from coop.registry import DATASET_REGISTRY

        return DATASET_REGISTRY.get(self.name)

    @property
    def folder(self) -> str:
        """The dataset's folder under DATASET.ROOT."""
        return self.dataset_class.dataset_dir

    @property
    def image_dir(self) -> str:
        """The image folder (path prefix of the split JSON paths), relative to the folder."""
        return getattr(self.dataset_class, "image_dir", "")

    @property
    def split_file(self) -> str:
        """The split JSON file name, or "" when the dataset has none."""
        return getattr(self.dataset_class, "split_file", "") or ""

    @property
    def required_dirs(self) -> Tuple[str, ...]:
        """Folders (relative to the dataset folder) that must exist."""
        return self.image_dirs or ((self.image_dir,) if self.image_dir else ())

    @property
    def split_description(self) -> str:
        return self.split_file or self.split_note

    def manual_steps(self) -> List[ManualStep]:
        """The manual steps, with the official split file first when there is one."""
        steps: List[ManualStep] = []
        if self.split_file:
            steps.append(
                ManualStep(
                    what=f"the official split file {self.split_file}",
                    source=(
                        f"{COOP_DATASETS_MD}, section {self.title}, links it (Google Drive). "
                        f"Without it training generates a different split and the published "
                        f"numbers are not reproduced"
                    ),
                    dest=self.split_file,
                )
            )
        steps.extend(self.manual)
        return steps


_SPLIT_ONLY_TO_GENERATE = "only needed to generate a split when the official split file is absent"

_IMAGENET_CLASSNAMES = ManualStep(
    what="classnames.txt (1000 lines '<wnid> <class name>': CLIP's curated ImageNet names)",
    source=f"{COOP_DATASETS_MD}, section ImageNet, links it (Google Drive)",
    dest="classnames.txt",
)


def _variant_classnames() -> ManualStep:
    return ManualStep(
        what="classnames.txt, a copy of ImageNet's classnames.txt",
        source=(
            f"copied from <ROOT>/imagenet/classnames.txt when that exists; otherwise "
            f"{COOP_DATASETS_MD}, section ImageNet, links it (Google Drive)"
        ),
        dest="classnames.txt",
        copy_from="imagenet/classnames.txt",
    )


# The table. Order = the spec's summary table (ImageNet first, then the ten others, then
# the four variants).
_TABLE: Tuple[DatasetInfo, ...] = (
    DatasetInfo(
        name="ImageNet",
        title="ImageNet",
        config="imagenet",
        num_classes=1000,
        sizes=(1281167, 50000, 50000),
        val_is_test=True,
        image_dirs=("images/train", "images/val"),
        required_files=(("classnames.txt", "CoOp's DATASETS.md links it"),),
        split_note="none (folder listing)",
        homepage="https://image-net.org (ILSVRC2012, account required)",
        manual=(
            ManualStep(
                what=(
                    "the ILSVRC2012 training images (ILSVRC2012_img_train.tar): extract it, "
                    "then extract each of the 1000 <wnid>.tar inside into its own <wnid> folder"
                ),
                source="image-net.org, ILSVRC2012 download page (free account; no public URL)",
                dest="images/train/<wnid>/*.JPEG",
                check="images/train",
            ),
            ManualStep(
                what=(
                    "the ILSVRC2012 validation images (ILSVRC2012_img_val.tar), sorted into the "
                    "same 1000 <wnid> folders (the labels are in ILSVRC2012_devkit_t12.tar.gz; "
                    "torchvision.datasets.ImageNet(root, split='val') builds <root>/val/<wnid>/ "
                    "from those two archives, then move that folder here)"
                ),
                source="image-net.org, ILSVRC2012 download page (free account; no public URL)",
                dest="images/val/<wnid>/*.JPEG",
                check="images/val",
            ),
            _IMAGENET_CLASSNAMES,
        ),
    ),
    DatasetInfo(
        name="Caltech101",
        title="Caltech101",
        config="caltech101",
        num_classes=100,
        sizes=(4128, 1649, 2465),
        homepage="https://data.caltech.edu/records/mzrjq-6wc02",
        downloads=(
            Download(
                filename="caltech-101.zip",
                # the URL and md5 torchvision's Caltech101.download() uses
                url="https://data.caltech.edu/records/mzrjq-6wc02/files/caltech-101.zip",
                md5="3138e1922a9193bfa496528edbbc45d0",
                then_extract=("caltech-101/101_ObjectCategories.tar.gz",),
                place=(("caltech-101/101_ObjectCategories", "101_ObjectCategories"),),
                provides=("101_ObjectCategories",),
            ),
        ),
    ),
    DatasetInfo(
        name="OxfordPets",
        title="OxfordPets",
        config="oxford_pets",
        num_classes=37,
        sizes=(2944, 736, 3669),
        homepage="https://www.robots.ox.ac.uk/~vgg/data/pets/",
        downloads=(
            Download(
                filename="images.tar.gz",
                from_torchvision=lambda tv: tv.OxfordIIITPet._RESOURCES[0],
                place=(("images", "images"),),
                provides=("images",),
            ),
            Download(
                filename="annotations.tar.gz",
                from_torchvision=lambda tv: tv.OxfordIIITPet._RESOURCES[1],
                place=(("annotations", "annotations"),),
                provides=("annotations",),
            ),
        ),
    ),
    DatasetInfo(
        name="StanfordCars",
        title="StanfordCars",
        config="stanford_cars",
        num_classes=196,
        sizes=(6509, 1635, 8041),
        image_dirs=("cars_train", "cars_test"),
        homepage="https://ai.stanford.edu/~jkrause/cars/car_dataset.html (no longer served)",
        manual=(
            ManualStep(
                what="the training images cars_train/ (00001.jpg ...)",
                source=(
                    "the original Stanford URLs are gone (torchvision's StanfordCars cannot "
                    "download either); use a mirror of the Stanford Cars dataset, e.g. on Kaggle, "
                    f"as described in {COOP_DATASETS_MD}"
                ),
                dest="cars_train/",
            ),
            ManualStep(
                what="the test images cars_test/ (00001.jpg ...)",
                source="the same mirror as cars_train/",
                dest="cars_test/",
            ),
            ManualStep(
                what="devkit/ (cars_meta.mat, cars_train_annos.mat)",
                source=f"the same mirror (car_devkit.tgz); {_SPLIT_ONLY_TO_GENERATE}",
                dest="devkit/",
                optional=True,
            ),
            ManualStep(
                what="cars_test_annos_withlabels.mat",
                source=f"the same mirror; {_SPLIT_ONLY_TO_GENERATE}",
                dest="cars_test_annos_withlabels.mat",
                optional=True,
            ),
        ),
    ),
    DatasetInfo(
        name="OxfordFlowers",
        title="Flowers102",
        config="oxford_flowers",
        num_classes=102,
        sizes=(4093, 1633, 2463),
        homepage="https://www.robots.ox.ac.uk/~vgg/data/flowers/102/",
        downloads=(
            Download(
                filename="102flowers.tgz",
                from_torchvision=lambda tv: (
                    tv.Flowers102._download_url_prefix + tv.Flowers102._file_dict["image"][0],
                    tv.Flowers102._file_dict["image"][1],
                ),
                place=(("jpg", "jpg"),),
                provides=("jpg",),
            ),
            Download(
                filename="imagelabels.mat",
                from_torchvision=lambda tv: (
                    tv.Flowers102._download_url_prefix + tv.Flowers102._file_dict["label"][0],
                    tv.Flowers102._file_dict["label"][1],
                ),
                extract=False,
                provides=("imagelabels.mat",),
            ),
        ),
        manual=(
            ManualStep(
                what="cat_to_name.json (class names of the 102 flower classes)",
                source=f"{COOP_DATASETS_MD}, section Flowers102; {_SPLIT_ONLY_TO_GENERATE}",
                dest="cat_to_name.json",
                optional=True,
            ),
        ),
    ),
    DatasetInfo(
        name="Food101",
        title="Food101",
        config="food101",
        num_classes=101,
        sizes=(50500, 20200, 30300),
        homepage="https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/",
        downloads=(
            Download(
                filename="food-101.tar.gz",
                from_torchvision=lambda tv: (tv.Food101._URL, tv.Food101._MD5),
                place=(("food-101/*", ""),),
                provides=("images", "meta"),
            ),
        ),
    ),
    DatasetInfo(
        name="FGVCAircraft",
        title="FGVCAircraft",
        config="fgvc_aircraft",
        num_classes=100,
        sizes=(3334, 3333, 3333),
        required_files=tuple(
            (f, "it is in the data/ folder of fgvc-aircraft-2013b.tar.gz")
            for f in (
                "variants.txt",
                "images_variant_train.txt",
                "images_variant_val.txt",
                "images_variant_test.txt",
            )
        ),
        split_note="official lists (images_variant_*.txt)",
        homepage="https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/",
        downloads=(
            Download(
                filename="fgvc-aircraft-2013b.tar.gz",
                from_torchvision=lambda tv: (tv.FGVCAircraft._URL, None),
                place=(("fgvc-aircraft-2013b/data/*", ""),),
                provides=(
                    "images",
                    "variants.txt",
                    "images_variant_train.txt",
                    "images_variant_val.txt",
                    "images_variant_test.txt",
                ),
            ),
        ),
    ),
    DatasetInfo(
        name="SUN397",
        title="SUN397",
        config="sun397",
        num_classes=397,
        sizes=(15880, 3970, 19850),
        homepage="https://vision.princeton.edu/projects/2010/SUN/",
        downloads=(
            Download(
                filename="SUN397.tar.gz",
                from_torchvision=lambda tv: (tv.SUN397._DATASET_URL, tv.SUN397._DATASET_MD5),
                place=(("SUN397", "SUN397"),),
                provides=("SUN397",),
            ),
        ),
        manual=(
            ManualStep(
                what="ClassName.txt, Training_01.txt, Testing_01.txt (from Partitions.zip)",
                source=f"the SUN397 homepage (vision.princeton.edu); {_SPLIT_ONLY_TO_GENERATE}",
                dest="ClassName.txt",
                optional=True,
            ),
        ),
    ),
    DatasetInfo(
        name="DescribableTextures",
        title="DTD",
        config="dtd",
        num_classes=47,
        sizes=(2820, 1128, 1692),
        homepage="https://www.robots.ox.ac.uk/~vgg/data/dtd/",
        downloads=(
            Download(
                filename="dtd-r1.0.1.tar.gz",
                from_torchvision=lambda tv: (tv.DTD._URL, tv.DTD._MD5),
                place=(("dtd/*", ""),),
                provides=("images",),
            ),
        ),
    ),
    DatasetInfo(
        name="EuroSAT",
        title="EuroSAT",
        config="eurosat",
        num_classes=10,
        sizes=(13500, 5400, 8100),
        homepage="https://github.com/phelber/eurosat",
        downloads=(
            Download(
                filename="EuroSAT.zip",
                # the URL and md5 torchvision's EuroSAT.download() uses (RGB version)
                url=(
                    "https://huggingface.co/datasets/torchgeo/eurosat/resolve/"
                    "c877bcd43f099cd0196738f714544e355477f3fd/EuroSAT.zip"
                ),
                md5="c8fa014336c82ac7804f0398fcb19387",
                place=(("2750", "2750"),),
                provides=("2750",),
            ),
        ),
    ),
    DatasetInfo(
        name="UCF101",
        title="UCF101",
        config="ucf101",
        num_classes=101,
        sizes=(7639, 1898, 3783),
        homepage="https://www.crcv.ucf.edu/data/UCF101.php",
        manual=(
            ManualStep(
                what=(
                    "UCF-101-midframes.zip (one middle frame per video, provided by the CoOp "
                    "authors); extract it here"
                ),
                source=f"{COOP_DATASETS_MD}, section UCF101, links it (Google Drive)",
                dest="UCF-101-midframes/<Action>/*.jpg",
                check="UCF-101-midframes",
            ),
            ManualStep(
                what="ucfTrainTestlist/ (classInd.txt, trainlist01.txt, testlist01.txt)",
                source=(
                    f"UCF101TrainTestSplits-RecognitionTask.zip on the UCF101 homepage "
                    f"(crcv.ucf.edu); {_SPLIT_ONLY_TO_GENERATE}"
                ),
                dest="ucfTrainTestlist/",
                optional=True,
            ),
        ),
    ),
    DatasetInfo(
        name="ImageNetV2",
        title="ImageNetV2",
        config="imagenetv2",
        num_classes=1000,
        sizes=(10000, None, 10000),
        test_only=True,
        required_files=(("classnames.txt", "copy ImageNet's classnames.txt here"),),
        split_note="none (test only)",
        homepage="https://github.com/modestyles/ImageNetV2",
        manual=(
            ManualStep(
                what=(
                    "the matched-frequency set (imagenetv2-matched-frequency.tar.gz); extract it "
                    "here so that its folders 0..999 are in imagenetv2-matched-frequency-format-val/"
                ),
                source="the ImageNetV2 project (github.com/modestyles/ImageNetV2, Hugging Face)",
                dest="imagenetv2-matched-frequency-format-val/<0..999>/*.jpeg",
                check="imagenetv2-matched-frequency-format-val",
            ),
            _variant_classnames(),
        ),
    ),
    DatasetInfo(
        name="ImageNetSketch",
        title="ImageNet-Sketch",
        config="imagenet_sketch",
        num_classes=1000,
        sizes=(50889, None, 50889),
        test_only=True,
        required_files=(("classnames.txt", "copy ImageNet's classnames.txt here"),),
        split_note="none (test only)",
        homepage="https://github.com/HaohanWang/ImageNet-Sketch",
        manual=(
            ManualStep(
                what="ImageNet-Sketch.zip; extract it and rename its sketch/ folder to images/",
                source=(
                    "the ImageNet-Sketch project (github.com/HaohanWang/ImageNet-Sketch: Google "
                    "Drive, Kaggle or Hugging Face)"
                ),
                dest="images/<wnid>/*.JPEG",
                check="images",
            ),
            _variant_classnames(),
        ),
    ),
    DatasetInfo(
        name="ImageNetA",
        title="ImageNet-A",
        config="imagenet_a",
        num_classes=200,
        sizes=(7500, None, 7500),
        test_only=True,
        required_files=(("classnames.txt", "copy ImageNet's classnames.txt here"),),
        split_note="none (test only)",
        homepage="https://github.com/hendrycks/natural-adv-examples",
        downloads=(
            Download(
                filename="imagenet-a.tar",
                url="https://people.eecs.berkeley.edu/~hendrycks/imagenet-a.tar",
                place=(("imagenet-a", "imagenet-a"),),
                provides=("imagenet-a",),
            ),
        ),
        manual=(_variant_classnames(),),
    ),
    DatasetInfo(
        name="ImageNetR",
        title="ImageNet-R",
        config="imagenet_r",
        num_classes=200,
        sizes=(30000, None, 30000),
        test_only=True,
        required_files=(("classnames.txt", "copy ImageNet's classnames.txt here"),),
        split_note="none (test only)",
        homepage="https://github.com/hendrycks/imagenet-r",
        downloads=(
            Download(
                filename="imagenet-r.tar",
                url="https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar",
                place=(("imagenet-r", "imagenet-r"),),
                provides=("imagenet-r",),
            ),
        ),
        manual=(_variant_classnames(),),
    ),
)

DATASETS: Dict[str, DatasetInfo] = {info.name: info for info in _TABLE}


def get_info(name: str) -> DatasetInfo:
    """The table entry of a registry name (exact)."""
    return DATASETS[name]


def resolve_name(name: str) -> Optional[str]:
    """The registry name for a registry name or config stem, case-insensitively; else None."""
    key = name.strip().lower()
    if key.endswith(".yaml"):
        key = key[: -len(".yaml")]
    for info in DATASETS.values():
        if key in (info.name.lower(), info.config.lower()):
            return info.name
    return None
