"""Dassl's data API: ``Datum``, ``DatasetBase``, transforms, loaders and ``DataManager``.

Same names and semantics as ``dassl.data`` (written fresh). Randomness follows Dassl exactly:
few-shot sampling uses the standard library's global ``random``; augmentation and the
``RandomSampler`` use torch's global generator through torchvision's and torch's own classes.
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections import defaultdict
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset as TorchDataset

logger = logging.getLogger(__name__)

__all__ = [
    "Datum",
    "DatasetBase",
    "MissingImageError",
    "UnreadableImageError",
    "EmptyLoaderError",
    "DatasetError",
    "INTERPOLATION_NAMES",
    "SUPPORTED_TRANSFORMS",
    "build_transform",
    "read_image",
    "DatasetWrapper",
    "skip_unreadable_collate",
    "build_data_loader",
    "DataManager",
]


class MissingImageError(FileNotFoundError):
    """An image listed in a dataset does not exist on disk."""


class UnreadableImageError(OSError):
    """An image file exists but cannot be decoded."""


class EmptyLoaderError(ValueError):
    """A data loader would yield no batch."""


class DatasetError(ValueError):
    """The files of a dataset do not have the expected layout or content."""


# --------------------------------------------------------------------------------------
# Datum / DatasetBase
# --------------------------------------------------------------------------------------


class Datum:
    """One labelled image: ``impath`` (an existing file), ``label``, ``domain``, ``classname``."""

    def __init__(self, impath: str = "", label: int = 0, domain: int = 0, classname: str = ""):
        impath = os.fspath(impath)
        if not isinstance(impath, str):
            raise TypeError(f"Datum.impath must be a str path, got {type(impath).__name__}")
        if not os.path.isfile(impath):
            raise MissingImageError(f"Image file not found: {impath}")
        self._impath = impath
        self._label = label
        self._domain = domain
        self._classname = classname

    @property
    def impath(self) -> str:
        return self._impath

    @property
    def label(self) -> int:
        return self._label

    @property
    def domain(self) -> int:
        return self._domain

    @property
    def classname(self) -> str:
        return self._classname

    def __repr__(self) -> str:
        return (
            f"Datum(impath={self._impath!r}, label={self._label!r}, "
            f"domain={self._domain!r}, classname={self._classname!r})"
        )


class DatasetBase:
    """A dataset as lists of :class:`Datum` (Dassl's ``DatasetBase``).

    ``num_classes`` = max label of ``train_x`` + 1; ``lab2cname`` and ``classnames`` (in
    ascending label order) are taken from ``train_x``.
    """

    dataset_dir = ""  # the folder of the dataset under DATASET.ROOT
    domains: List[str] = []  # domain names, for domain-generalization datasets

    def __init__(
        self,
        train_x: Optional[List[Datum]] = None,
        train_u: Optional[List[Datum]] = None,
        val: Optional[List[Datum]] = None,
        test: Optional[List[Datum]] = None,
    ) -> None:
        self._train_x = train_x
        self._train_u = train_u
        self._val = val
        self._test = test
        self._num_classes = self.get_num_classes(train_x or [])
        self._lab2cname, self._classnames = self.get_lab2cname(train_x or [])

    @property
    def train_x(self) -> Optional[List[Datum]]:
        return self._train_x

    @property
    def train_u(self) -> Optional[List[Datum]]:
        return self._train_u

    @property
    def val(self) -> Optional[List[Datum]]:
        return self._val

    @property
    def test(self) -> Optional[List[Datum]]:
        return self._test

    @property
    def lab2cname(self) -> Dict[int, str]:
        return self._lab2cname

    @property
    def classnames(self) -> List[str]:
        return self._classnames

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @staticmethod
    def get_num_classes(data_source: Sequence[Datum]) -> int:
        """Max label + 1 (0 for an empty list)."""
        labels = {item.label for item in data_source}
        return max(labels) + 1 if labels else 0

    @staticmethod
    def get_lab2cname(data_source: Sequence[Datum]) -> Tuple[Dict[int, str], List[str]]:
        """``({label: classname}, classnames in ascending label order)``."""
        mapping: Dict[int, str] = {}
        for item in data_source:
            mapping.setdefault(item.label, item.classname)
        labels = sorted(mapping)
        lab2cname = {label: mapping[label] for label in labels}
        return lab2cname, [mapping[label] for label in labels]

    @staticmethod
    def split_dataset_by_label(data_source: Sequence[Datum]) -> Dict[int, List[Datum]]:
        """Group items by label; labels in order of first appearance, items in list order."""
        output: Dict[int, List[Datum]] = defaultdict(list)
        for item in data_source:
            output[item.label].append(item)
        return output

    @staticmethod
    def split_dataset_by_domain(data_source: Sequence[Datum]) -> Dict[int, List[Datum]]:
        """Group items by domain; domains in order of first appearance."""
        output: Dict[int, List[Datum]] = defaultdict(list)
        for item in data_source:
            output[item.domain].append(item)
        return output

    def generate_fewshot_dataset(
        self, *data_sources: List[Datum], num_shots: int = -1, repeat: bool = False
    ) -> Any:
        """K items per label from each source (Dassl's algorithm and random-number order).

        Per label (in order of first appearance): ``random.sample(items, K)`` when there are
        at least K items (also when exactly K), else ``random.choices(items, k=K)`` if
        ``repeat``, else all items in list order. Returns one list for one source, else a
        list of lists; with ``num_shots < 1`` the input is returned unchanged.
        """
        if num_shots < 1:
            if len(data_sources) == 1:
                return data_sources[0]
            return data_sources
        logger.info("Creating a %d-shot dataset", num_shots)
        output: List[List[Datum]] = []
        for data_source in data_sources:
            chosen_all: List[Datum] = []
            for _label, items in self.split_dataset_by_label(data_source).items():
                if len(items) >= num_shots:
                    chosen = random.sample(items, num_shots)
                elif repeat:
                    chosen = random.choices(items, k=num_shots)
                else:
                    chosen = items
                chosen_all.extend(chosen)
            output.append(chosen_all)
        if len(output) == 1:
            return output[0]
        return output

    @staticmethod
    def subsample_classes(*args: Optional[List[Datum]], subsample: str = "all") -> List[Any]:
        """Keep the base (first ceil(n/2) sorted labels of ``args[0]``) or new classes.

        Every list is filtered (order kept) and relabelled to 0..m-1; items are rebuilt as
        ``Datum(impath, new_label, classname)``. Returns a list with one entry per argument
        (``None`` stays ``None``); with ``"all"`` the inputs are returned unchanged.
        """
        allowed = ("all", "base", "new")
        if subsample not in allowed:
            raise ValueError(
                f"DATASET.SUBSAMPLE_CLASSES must be one of {', '.join(allowed)}; got {subsample!r}"
            )
        if subsample == "all":
            return list(args)
        labels = sorted({item.label for item in (args[0] or [])})
        m = math.ceil(len(labels) / 2)
        logger.info("SUBSAMPLE %s CLASSES!", subsample.upper())
        selected = labels[:m] if subsample == "base" else labels[m:]
        relabeler = {old: new for new, old in enumerate(selected)}
        output: List[Any] = []
        for data_source in args:
            if data_source is None:
                output.append(None)
                continue
            output.append(
                [
                    Datum(
                        impath=item.impath,
                        label=relabeler[item.label],
                        classname=item.classname,
                    )
                    for item in data_source
                    if item.label in relabeler
                ]
            )
        return output


# --------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------

INTERPOLATION_NAMES = ("bilinear", "bicubic", "nearest")
SUPPORTED_TRANSFORMS = ("random_resized_crop", "random_flip", "center_crop", "normalize")


def _interpolation(name: str) -> Any:
    from torchvision.transforms import InterpolationMode

    modes = {
        "bilinear": InterpolationMode.BILINEAR,
        "bicubic": InterpolationMode.BICUBIC,
        "nearest": InterpolationMode.NEAREST,
    }
    if name not in modes:
        raise ValueError(
            f"Unknown INPUT.INTERPOLATION {name!r}; choose one of {', '.join(INTERPOLATION_NAMES)}"
        )
    return modes[name]


def build_transform(cfg: Any, is_train: bool = True, choices: Optional[Sequence[str]] = None):
    """Dassl's ``build_transform`` for the choices CoOp uses (torchvision classes).

    Train: [Resize(SIZE) unless a random crop is chosen], RandomResizedCrop, CenterCrop,
    RandomHorizontalFlip, ToTensor, Normalize (each only when chosen). Test:
    Resize(max(SIZE)) (shorter edge), CenterCrop(SIZE), ToTensor, Normalize if chosen.
    Returns ``None`` when ``INPUT.NO_TRANSFORM`` is set.
    """
    import torchvision.transforms as T

    if cfg.INPUT.NO_TRANSFORM:
        logger.info("Note: no transform is applied!")
        return None
    if choices is None:
        choices = cfg.INPUT.TRANSFORMS
    choices = list(choices)
    for choice in choices:
        if choice not in SUPPORTED_TRANSFORMS:
            raise ValueError(
                f"Unknown transform {choice!r} in INPUT.TRANSFORMS; "
                f"supported: {', '.join(SUPPORTED_TRANSFORMS)}"
            )
    interp = _interpolation(cfg.INPUT.INTERPOLATION)
    size = tuple(cfg.INPUT.SIZE)
    target = f"{size[0]}x{size[1]}"
    normalize = T.Normalize(mean=cfg.INPUT.PIXEL_MEAN, std=cfg.INPUT.PIXEL_STD)
    tfms: List[Callable] = []

    if is_train:
        logger.info("Building transform_train")
        if "random_crop" not in choices and "random_resized_crop" not in choices:
            logger.info("+ resize to %s", target)
            tfms.append(T.Resize(size, interpolation=interp))
        if "random_resized_crop" in choices:
            scale = tuple(cfg.INPUT.RRCROP_SCALE)
            logger.info("+ random resized crop (size=%s, scale=%s)", size, scale)
            tfms.append(T.RandomResizedCrop(size, scale=scale, interpolation=interp))
        if "center_crop" in choices:
            logger.info("+ %s center crop", target)
            tfms.append(T.CenterCrop(size))
        if "random_flip" in choices:
            logger.info("+ random flip")
            tfms.append(T.RandomHorizontalFlip())
    else:
        logger.info("Building transform_test")
        logger.info("+ resize the smaller edge to %d", max(size))
        tfms.append(T.Resize(max(size), interpolation=interp))
        logger.info("+ %s center crop", target)
        tfms.append(T.CenterCrop(size))

    logger.info("+ to torch tensor of range [0, 1]")
    tfms.append(T.ToTensor())
    if "normalize" in choices:
        logger.info("+ normalization (mean=%s, std=%s)", cfg.INPUT.PIXEL_MEAN, cfg.INPUT.PIXEL_STD)
        tfms.append(normalize)
    return T.Compose(tfms)


# --------------------------------------------------------------------------------------
# Reading images, dataset wrapper, loaders
# --------------------------------------------------------------------------------------


def read_image(path: str):
    """Open ``path`` with PIL and convert it to RGB; a failure names the file."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, ...
        raise UnreadableImageError(f"Cannot read image {path}: {e}") from e


class DatasetWrapper(TorchDataset):
    """Reads the image of each Datum at every access and applies the transform.

    An item is a dict with ``img``, ``label``, ``domain``, ``impath``, ``index`` (and ``img0``,
    the un-augmented image as a tensor, when ``DATALOADER.RETURN_IMG0``). With
    ``DATALOADER.K_TRANSFORMS > 1`` (training only) ``img`` is a list of K augmented views; a
    list of transforms gives ``img``, ``img2``, ``img3``, ...

    An image that cannot be decoded raises :class:`UnreadableImageError` naming the file;
    with ``DATALOADER.SKIP_UNREADABLE`` the item is instead ``{"_unreadable": impath,
    "index": idx}``, which :func:`skip_unreadable_collate` drops from its batch.
    """

    def __init__(
        self,
        cfg: Any,
        data_source: List[Datum],
        transform: Any = None,
        is_train: bool = False,
    ) -> None:
        import torchvision.transforms as T

        self.cfg = cfg
        self.data_source = data_source
        self.transform = transform
        self.is_train = is_train
        self.k_tfm = cfg.DATALOADER.K_TRANSFORMS if is_train else 1
        self.return_img0 = cfg.DATALOADER.RETURN_IMG0
        self.skip_unreadable = bool(cfg.DATALOADER.get("SKIP_UNREADABLE", False))
        if self.k_tfm > 1 and transform is None:
            raise ValueError("DATALOADER.K_TRANSFORMS > 1 needs a transform, but none was given")
        # the un-augmented view (img0, or img when there is no transform)
        plain: List[Callable] = [
            T.Resize(tuple(cfg.INPUT.SIZE), interpolation=_interpolation(cfg.INPUT.INTERPOLATION)),
            T.ToTensor(),
        ]
        if "normalize" in cfg.INPUT.TRANSFORMS:
            plain.append(T.Normalize(mean=cfg.INPUT.PIXEL_MEAN, std=cfg.INPUT.PIXEL_STD))
        self.to_tensor = T.Compose(plain)

    def __len__(self) -> int:
        return len(self.data_source)

    def _apply(self, tfm: Callable, img0: Any) -> Any:
        views = [tfm(img0) for _ in range(self.k_tfm)]
        return views[0] if len(views) == 1 else views

    def __getitem__(self, idx: int) -> Dict[str, Any]:
        item = self.data_source[idx]
        output: Dict[str, Any] = {
            "label": item.label,
            "domain": item.domain,
            "impath": item.impath,
            "index": idx,
        }
        try:
            img0 = read_image(item.impath)
        except UnreadableImageError:
            if not self.skip_unreadable:
                raise
            return {"_unreadable": item.impath, "index": idx}
        if self.transform is None:
            output["img"] = self.to_tensor(img0)
        elif isinstance(self.transform, (list, tuple)):
            for i, tfm in enumerate(self.transform):
                key = "img" if i == 0 else f"img{i + 1}"
                output[key] = self._apply(tfm, img0)
        else:
            output["img"] = self._apply(self.transform, img0)
        if self.return_img0:
            output["img0"] = self.to_tensor(img0)
        return output


def skip_unreadable_collate(batch: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Collate the readable items of ``batch`` (the default collate) and list the paths of
    the unreadable ones under ``"_skipped"``; ``"_empty"`` is True when none was readable."""
    from torch.utils.data import default_collate

    good = [item for item in batch if "_unreadable" not in item]
    skipped = [item["_unreadable"] for item in batch if "_unreadable" in item]
    if not good:
        return {"_skipped": skipped, "_empty": True}
    out = default_collate(good)
    if skipped:
        out["_skipped"] = skipped
    return out


SAMPLERS = ("RandomSampler", "SequentialSampler")


def _build_sampler(sampler_type: str, data_source: Any) -> Any:
    from torch.utils.data import RandomSampler, SequentialSampler

    if sampler_type == "RandomSampler":
        # no generator: the sampler draws its seed from torch's global generator at iter()
        return RandomSampler(data_source)
    if sampler_type == "SequentialSampler":
        return SequentialSampler(data_source)
    raise ValueError(f"Unknown sampler {sampler_type!r}; supported: {', '.join(SAMPLERS)}")


def seed_like_a_fresh_worker(base_seed: int, worker_id: int) -> None:
    """Seed this worker's ``random``, torch and numpy generators exactly as torch's
    ``_worker_loop`` seeds a newly started worker."""
    seed = base_seed + worker_id
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
        from torch.utils.data._utils.worker import _generate_state
    except ImportError:
        return
    np.random.seed(_generate_state(base_seed, worker_id))


class EpochSeededSampler:
    """Wraps a sampler for persistent workers: at the start of every pass it draws, from
    torch's global generator, the base seed that a freshly created multi-worker iterator
    draws (before the sampler's own draw), and pairs it with every index."""

    def __init__(self, sampler: Any) -> None:
        self.sampler = sampler

    def __iter__(self):
        base_seed = int(torch.empty((), dtype=torch.int64).random_().item())
        for idx in self.sampler:
            yield (idx, base_seed)

    def __len__(self) -> int:
        return len(self.sampler)


class ReseedingDataset(TorchDataset):
    """A dataset for persistent workers: when a worker sees a new pass's base seed it
    re-seeds itself as a new worker would be seeded, so every pass draws the augmentations
    that the original's re-created workers draw. Other attributes are the wrapped ones."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        self._base_seed: Optional[int] = None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":  # not yet set (unpickling)
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, key: Tuple[int, int]) -> Any:
        idx, base_seed = key
        info = torch.utils.data.get_worker_info()
        if info is not None and base_seed != self._base_seed:
            self._base_seed = base_seed
            seed_like_a_fresh_worker(base_seed, info.id)
        return self.dataset[idx]


def build_data_loader(
    cfg: Any,
    sampler_type: str = "SequentialSampler",
    data_source: Optional[List[Datum]] = None,
    batch_size: int = 64,
    n_domain: int = 0,
    n_ins: int = 2,
    tfm: Any = None,
    is_train: bool = True,
    dataset_wrapper: Optional[type] = None,
) -> torch.utils.data.DataLoader:
    """Dassl's ``build_data_loader``: drop_last only when training and N >= batch size."""
    if data_source is None:
        raise ValueError("build_data_loader needs a data_source (a list of Datum)")
    if len(data_source) == 0:
        raise EmptyLoaderError(
            "Cannot build a data loader over an empty list of images; check DATASET.ROOT, "
            "DATASET.NUM_SHOTS and DATASET.SUBSAMPLE_CLASSES"
        )
    wrapper_cls = dataset_wrapper or DatasetWrapper
    wrapper = wrapper_cls(cfg, data_source, transform=tfm, is_train=is_train)
    extra: Dict[str, Any] = {}
    if cfg.DATALOADER.get("SKIP_UNREADABLE", False):
        extra["collate_fn"] = skip_unreadable_collate
    sampler = _build_sampler(sampler_type, wrapper)
    num_workers = resolve_num_workers(cfg.DATALOADER.NUM_WORKERS)
    dataset: Any = wrapper
    if num_workers > 0 and cfg.FAST.ENABLED and cfg.FAST.PERSISTENT_WORKERS:
        # workers live across epochs but are re-seeded per epoch like fresh ones; the
        # loader's own base-seed draw goes to a private generator, the real one is drawn
        # from the global generator by the sampler, where the original draws it
        dataset = ReseedingDataset(wrapper)
        sampler = EpochSeededSampler(sampler)
        extra["persistent_workers"] = True
        extra["generator"] = torch.Generator()
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=is_train and len(data_source) >= batch_size,
        pin_memory=torch.cuda.is_available() and cfg.USE_CUDA,
        **extra,
    )
    if len(loader) == 0:
        raise EmptyLoaderError(
            f"The data loader has no batch ({len(data_source)} images, batch size {batch_size})"
        )
    return loader


def resolve_num_workers(value: int) -> int:
    """``DATALOADER.NUM_WORKERS``; -1 (our option) means one per CPU core, at most 8."""
    if value >= 0:
        return value
    return max(
        1,
        min(
            8,
            len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else (os.cpu_count() or 1),
        ),
    )


def _format_table(rows: List[Tuple[str, str]]) -> str:
    """A two-column plain table (the layout of ``tabulate``'s default format)."""
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    rule = f"{'-' * w0}  {'-' * w1}"
    lines = [rule] + [f"{a.ljust(w0)}  {b.ljust(w1)}".rstrip() for a, b in rows] + [rule]
    return "\n".join(lines)


class DataManager:
    """Builds the dataset, the transforms and the loaders (Dassl's ``DataManager``)."""

    def __init__(
        self,
        cfg: Any,
        custom_tfm_train: Any = None,
        custom_tfm_test: Any = None,
        dataset_wrapper: Optional[type] = None,
    ) -> None:
        from coop.registry import build_dataset

        try:
            dataset = build_dataset(cfg)
        except ValueError as e:
            if type(e) is not ValueError:
                raise
            # the datasets report bad files and layouts as plain ValueErrors
            raise DatasetError(str(e)) from e

        if custom_tfm_train is None:
            tfm_train = build_transform(cfg, is_train=True)
        else:
            logger.info("* Using custom transform for training")
            tfm_train = custom_tfm_train
        if custom_tfm_test is None:
            tfm_test = build_transform(cfg, is_train=False)
        else:
            logger.info("* Using custom transform for testing")
            tfm_test = custom_tfm_test

        dl = cfg.DATALOADER
        self.train_loader_x = build_data_loader(
            cfg,
            sampler_type=dl.TRAIN_X.SAMPLER,
            data_source=dataset.train_x,
            batch_size=dl.TRAIN_X.BATCH_SIZE,
            n_domain=dl.TRAIN_X.N_DOMAIN,
            n_ins=dl.TRAIN_X.N_INS,
            tfm=tfm_train,
            is_train=True,
            dataset_wrapper=dataset_wrapper,
        )
        self.train_loader_u = None
        if dataset.train_u:
            node = dl.TRAIN_X if dl.TRAIN_U.SAME_AS_X else dl.TRAIN_U
            self.train_loader_u = build_data_loader(
                cfg,
                sampler_type=node.SAMPLER,
                data_source=dataset.train_u,
                batch_size=node.BATCH_SIZE,
                n_domain=node.N_DOMAIN,
                n_ins=node.N_INS,
                tfm=tfm_train,
                is_train=True,
                dataset_wrapper=dataset_wrapper,
            )
        self.val_loader = None
        if dataset.val:
            self.val_loader = build_data_loader(
                cfg,
                sampler_type=dl.TEST.SAMPLER,
                data_source=dataset.val,
                batch_size=dl.TEST.BATCH_SIZE,
                tfm=tfm_test,
                is_train=False,
                dataset_wrapper=dataset_wrapper,
            )
        self.test_loader = build_data_loader(
            cfg,
            sampler_type=dl.TEST.SAMPLER,
            data_source=dataset.test,
            batch_size=dl.TEST.BATCH_SIZE,
            tfm=tfm_test,
            is_train=False,
            dataset_wrapper=dataset_wrapper,
        )

        self.dataset = dataset
        self.tfm_train = tfm_train
        self.tfm_test = tfm_test
        self._num_classes = dataset.num_classes
        self._num_source_domains = len(cfg.DATASET.SOURCE_DOMAINS)
        self._lab2cname = dataset.lab2cname

        if cfg.VERBOSE:
            self.show_dataset_summary(cfg)

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def num_source_domains(self) -> int:
        return self._num_source_domains

    @property
    def lab2cname(self) -> Dict[int, str]:
        return self._lab2cname

    def summary_rows(self, cfg: Any) -> List[Tuple[str, str]]:
        """The rows of the dataset summary table."""
        rows = [("Dataset", str(cfg.DATASET.NAME))]
        if cfg.DATASET.SOURCE_DOMAINS:
            rows.append(("Source", str(list(cfg.DATASET.SOURCE_DOMAINS))))
        if cfg.DATASET.TARGET_DOMAINS:
            rows.append(("Target", str(list(cfg.DATASET.TARGET_DOMAINS))))
        rows.append(("# classes", f"{self.num_classes:,}"))
        rows.append(("# train_x", f"{len(self.dataset.train_x):,}"))
        if self.dataset.train_u:
            rows.append(("# train_u", f"{len(self.dataset.train_u):,}"))
        if self.dataset.val:
            rows.append(("# val", f"{len(self.dataset.val):,}"))
        rows.append(("# test", f"{len(self.dataset.test):,}"))
        return rows

    def show_dataset_summary(self, cfg: Any) -> None:
        """Log the summary table (Dataset, # classes, # train_x, # val, # test)."""
        logger.info("%s", _format_table(self.summary_rows(cfg)))
