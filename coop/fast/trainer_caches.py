"""The feature caches as a trainer uses them (see :mod:`coop.fast.feature_cache` for the
stores): the evaluation pass through cached image features, the frozen features of any
list of images under the test transform (per image, so every subset of a split shares
them), and the opt-in training feature cache's views and loader.

A trainer here is a :class:`~coop.clip_trainer.CLIPTrainer`: these read its ``cfg``,
``device``, ``dm``, ``tfm_train``, ``evaluator``, ``autocast()``, ``parse_batch_test``, ``image_features``,
``logits_from_features`` and the cache-key facts ``feature_kind``, ``clip_dtype()``,
``image_channels_last()`` and ``image_bn_folded()``.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from tqdm import tqdm

from coop.fast.feature_cache import (
    TRAIN_VIEWS_FORMAT,
    FeatureCache,
    SeededViews,
    TrainViewCache,
    cache_key,
    default_cache_dir,
    draw_loader_seed,
    file_sha256,
    split_fingerprint,
)

logger = logging.getLogger(__name__)

# what ``image_features`` computes by default (a trainer's ``feature_kind``); part of the
# cache key (bump when it changes)
FEATURE_KIND = "clip-visual-l2norm-v1"


def weights_hash(trainer: Any, cache_root: str) -> str:
    from coop.clip_adapter import resolve_weights

    path = resolve_weights(trainer.cfg.MODEL.BACKBONE.NAME, trainer.cfg.MODEL.BACKBONE.CACHE_DIR)
    return file_sha256(path, cache_root)


def encoder_key_parts(trainer: Any, cache_root: str) -> Dict[str, Any]:
    """What any cached image feature depends on besides its images and transform: the
    feature kind, the weights' content, the precision, the memory format, whether the
    batch norms are folded, the device and the torch version."""
    return {
        "kind": getattr(trainer, "feature_kind", FEATURE_KIND),
        "weights": weights_hash(trainer, cache_root),
        "dtype": str(trainer.clip_dtype()),
        "channels_last": trainer.image_channels_last(),
        "bn_folded": trainer.image_bn_folded(),
        "device": trainer.device.type,
        "torch": torch.__version__,
    }


def eval_key(trainer: Any, data_loader: Any, cache_root: str) -> Tuple[str, Dict[str, Any]]:
    cfg = trainer.cfg
    source = data_loader.dataset.data_source
    parts = {
        **encoder_key_parts(trainer, cache_root),
        "split": split_fingerprint([d.impath for d in source], [d.label for d in source]),
        "size": list(cfg.INPUT.SIZE),
        "interpolation": cfg.INPUT.INTERPOLATION,
        "mean": list(cfg.INPUT.PIXEL_MEAN),
        "std": list(cfg.INPUT.PIXEL_STD),
        "normalize": "normalize" in cfg.INPUT.TRANSFORMS,
        "no_transform": cfg.INPUT.NO_TRANSFORM,
        "batch_size": data_loader.batch_size,
    }
    return cache_key(parts), parts


def split_features(
    trainer: Any, split: str, data_loader: Any
) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """The image features and labels of every batch of ``data_loader`` (a pass over a test
    split): read from the disk cache where ``trainer.eval_cache_enabled()`` (computed once
    with the same batches and operations as the plain path, so bit-identical, then reused
    by later runs), else computed."""
    if not trainer.eval_cache_enabled():
        return _loader_features(trainer, split, data_loader)
    cache_root = default_cache_dir(trainer.cfg.FAST.CACHE_DIR)
    cache = FeatureCache(cache_root)
    key, parts = eval_key(trainer, data_loader, cache_root)
    hit = cache.load(key)
    if hit is not None:
        logger.info(f"Using cached image features of the *{split}* set ({cache.path(key)})")
        draw_loader_seed()  # the original draws this when it iterates the loader
        return hit
    features, labels = _loader_features(trainer, split, data_loader)
    cache.store(key, features, labels, parts)
    logger.info(f"Cached image features of the *{split}* set in {cache.path(key)}")
    return features, labels


def _loader_features(
    trainer: Any, split: str, data_loader: Any
) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    features, labels = [], []
    with torch.no_grad():
        for batch in tqdm(data_loader, desc=f"features {split}", leave=False):
            input, label = trainer.parse_batch_test(batch)
            with trainer.autocast():
                features.append(trainer.image_features(input))
            labels.append(label)
    return features, labels


def evaluate_cached(trainer: Any, split: str, data_loader: Any) -> None:
    """An evaluation pass through the disk cache of image features
    (``FAST.EVAL_FEATURE_CACHE``, :func:`split_features`)."""
    features, labels = split_features(trainer, split, data_loader)
    for feats, label in zip(features, labels):
        with trainer.autocast():
            output = trainer.logits_from_features(feats.to(trainer.device))
        trainer.evaluator.process(output, label.to(trainer.device))


def image_features_key(trainer: Any, transform: Any, cache_root: str) -> Tuple[str, Dict]:
    """The key of the per-image entry of features under a deterministic ``transform``:
    everything the features depend on except which images."""
    import torchvision

    cfg = trainer.cfg
    parts = {
        **encoder_key_parts(trainer, cache_root),
        "cache": "image-features",
        "format": TRAIN_VIEWS_FORMAT,
        "byteorder": sys.byteorder,
        "input": {k: cfg.INPUT[k] for k in sorted(cfg.INPUT)},
        "transform": repr(transform),
        "batch_size": cfg.DATALOADER.TEST.BATCH_SIZE,
        "torchvision": torchvision.__version__,
    }
    return cache_key(parts), parts


def _stored_features(
    cache: TrainViewCache, source: List[Any]
) -> Tuple[List[str], Dict[str, int], Dict[str, torch.Tensor]]:
    """The cache file of each item of ``source``, each file's first position there (repeated
    images share a file) and the features the cache holds, by file."""
    files = [cache.image_file(d.impath) for d in source]
    first: Dict[str, int] = {}
    for i, path in enumerate(files):
        first.setdefault(path, i)
    meta = cache.read_meta()
    stored: Dict[str, torch.Tensor] = {}
    if meta is not None:
        for path, i in first.items():
            feats = cache.load(path, meta, impath=source[i].impath)
            if feats is not None:
                stored[path] = feats
    return files, first, stored


def image_features_of(trainer: Any, data_source: List[Any], transform: Any) -> torch.Tensor:
    """Frozen image features ``(N, E)`` (on the CPU) of the images of ``data_source`` (a
    list of Datum, e.g. a few-shot subset) under the deterministic ``transform`` (the test
    transform).

    Where ``trainer.eval_cache_enabled()``, they go through a per-image disk store (one
    file per image, as the training views are stored), so any subset of a split (every
    seed, shot count and run) computes only the images no earlier run has; missing ones
    are computed in batches of the test batch size, the last padded to it, so an image's
    features do not depend on which others share its batch. Otherwise they are computed
    by one sequential pass in test batches."""
    from coop.data import DatasetWrapper, build_data_loader

    if not data_source:
        raise ValueError("image_features_of: no images given")
    cfg = trainer.cfg
    bs = cfg.DATALOADER.TEST.BATCH_SIZE
    if not trainer.eval_cache_enabled():
        loader = build_data_loader(
            cfg, data_source=data_source, batch_size=bs, tfm=transform, is_train=False
        )
        features, _ = _loader_features(trainer, "images", loader)
        return torch.cat(features).cpu()

    cache_root = default_cache_dir(cfg.FAST.CACHE_DIR)
    key, parts = image_features_key(trainer, transform, cache_root)
    cache = TrainViewCache(cache_root, key, parts, subdir="image_features")
    files, first, stored = _stored_features(cache, data_source)
    pairs = [(i, 0) for path, i in first.items() if path not in stored]
    if pairs:
        wrapper = DatasetWrapper(cfg, data_source, transform=transform, is_train=False)
        computed = compute_train_views(trainer, wrapper, pairs, bs, desc="image features")
        stored.update(
            cache.store({files[i]: feat.unsqueeze(0) for (i, _), feat in zip(pairs, computed)})
        )
    logger.info(
        f"Image features of {len(data_source)} images: computed {len(pairs)}, read "
        f"{len(first) - len(pairs)} from {cache.folder}"
    )
    return torch.stack([stored[path][0] for path in files])


def train_views_key(trainer: Any, cache_root: str) -> Tuple[str, Dict[str, Any]]:
    """The key of the training-view entry: everything the features depend on except
    which images (the weights, the training transform, precision, batch shape, device)."""
    import torchvision

    cfg = trainer.cfg
    parts = {
        **encoder_key_parts(trainer, cache_root),
        "cache": "train-views",
        "format": TRAIN_VIEWS_FORMAT,
        "byteorder": sys.byteorder,  # the view files hold raw bytes
        "input": {k: cfg.INPUT[k] for k in sorted(cfg.INPUT)},
        "transform": repr(trainer.tfm_train),
        "batch_size": cfg.DATALOADER.TRAIN_X.BATCH_SIZE,
        "torchvision": torchvision.__version__,
    }
    return cache_key(parts), parts


def compute_train_views(
    trainer: Any,
    wrapper: Any,
    pairs: List[Tuple[int, int]],
    batch_size: int = 0,
    desc: str = "training feature cache",
) -> List[torch.Tensor]:
    """Features (on the CPU) of view ``v`` of image ``i`` for each ``(i, v)`` of ``pairs``.

    The views go through the image encoder in batches of the training batch size (the
    batch shape the encoder sees in training without the cache), the last one padded to
    it, so an image's features do not depend on how many others share its batch (kernels
    are chosen by shape) and at most a training batch less one of padding is computed
    (``batch_size``: another batch size)."""
    from coop.data import resolve_num_workers

    bs = batch_size or trainer.cfg.DATALOADER.TRAIN_X.BATCH_SIZE
    loader = torch.utils.data.DataLoader(
        SeededViews(wrapper, pairs),
        batch_size=bs,
        shuffle=False,
        num_workers=resolve_num_workers(trainer.cfg.DATALOADER.NUM_WORKERS),
        pin_memory=trainer.device.type == "cuda",
    )
    out: List[torch.Tensor] = []
    # the loader draws its base seed from torch's generator: keep the run's stream intact
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        for batch in tqdm(loader, desc=desc, leave=False):
            images = batch["img"]
            n = images.shape[0]
            if n < bs:
                pad = images.new_zeros((bs - n, *images.shape[1:]))
                images = torch.cat([images, pad])
            with trainer.autocast():
                feats = trainer.image_features(images.to(trainer.device))[:n]
            out.extend(feats.cpu().unbind(0))
    return out


def build_train_cache(trainer: Any) -> Tuple[torch.Tensor, torch.Tensor]:
    """Features of ``TRAIN_CACHE_VIEWS`` augmented views of every training image,
    ``(V, N, E)``, and the labels ``(N,)``, through the shared per-image cache of seeded
    views: only the views no earlier run has stored are computed. The run's own random
    streams are untouched."""
    from coop.data import DatasetWrapper

    views = trainer.cfg.FAST.TRAIN_CACHE_VIEWS
    if views < 1:
        raise ValueError(f"FAST.TRAIN_CACHE_VIEWS must be at least 1, got {views}")
    source = trainer.dm.dataset.train_x
    cfg = trainer.cfg.clone()
    cfg.defrost()
    cfg.DATALOADER.K_TRANSFORMS = 1  # a view is one augmentation
    cfg.DATALOADER.RETURN_IMG0 = False
    cache_root = default_cache_dir(trainer.cfg.FAST.CACHE_DIR)
    key, parts = train_views_key(trainer, cache_root)
    cache = TrainViewCache(cache_root, key, parts)

    files, first, stored = _stored_features(cache, source)
    have = {path: (stored[path].shape[0] if path in stored else 0) for path in first}
    pairs = [(i, v) for path, i in first.items() for v in range(have[path], views)]
    reused = sum(min(n, views) for n in have.values())

    if pairs:
        wrapper = DatasetWrapper(cfg, source, transform=trainer.tfm_train, is_train=True)
        computed = compute_train_views(trainer, wrapper, pairs)
        rows: Dict[str, List[torch.Tensor]] = {}
        for (i, _), feat in zip(pairs, computed):
            rows.setdefault(files[i], []).append(feat)
        updates = {
            path: torch.cat([stored[path], torch.stack(new)])
            if path in stored
            else torch.stack(new)
            for path, new in rows.items()
        }
        stored.update(cache.store(updates))
    logger.info(
        f"Training feature cache (opt-in deviation): {views} augmented views of "
        f"{len(source)} images; computed {len(pairs)} new views, reused {reused} from "
        f"{cache.folder}"
    )
    feats = torch.stack([stored[path][:views] for path in files], dim=1)
    labels = torch.tensor([d.label for d in source])
    return feats.to(trainer.device), labels.to(trainer.device)


class CachedViewsLoader:
    """The training loader under ``FAST.TRAIN_FEATURE_CACHE``: batches ``{"feat", "label"}``
    of cached image features, one random view per image, fed to the host's own epoch loop.

    Each pass makes the draws a loader pass makes (the base seed, then the sampler's seed)
    and drops the last incomplete batch as the training loader does. The cache is built at
    the first pass (after a resume has restored the random states)."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.batch_size = trainer.cfg.DATALOADER.TRAIN_X.BATCH_SIZE
        self.n = len(trainer.dm.dataset.train_x)
        self._feats: Optional[torch.Tensor] = None  # (V, N, E)
        self._labels: Optional[torch.Tensor] = None  # (N,)

    def __len__(self) -> int:
        return self.n // self.batch_size if self.n >= self.batch_size else 1

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        if self._feats is None:
            self._feats, self._labels = build_train_cache(self.trainer)
        n, bs = self.n, self.batch_size
        draw_loader_seed()
        seed = int(torch.empty((), dtype=torch.int64).random_().item())
        gen = torch.Generator()
        gen.manual_seed(seed)
        perm = torch.randperm(n, generator=gen)
        view_idx = torch.randint(self._feats.shape[0], (n,), generator=gen)
        batches = [perm[i : i + bs] for i in range(0, n - bs + 1, bs)] if n >= bs else [perm]
        for idx in batches:
            on_device = idx.to(self._feats.device)
            yield {
                "feat": self._feats[view_idx[idx].to(self._feats.device), on_device],
                "label": self._labels[on_device],
            }
