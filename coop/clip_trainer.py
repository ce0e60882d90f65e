"""A base for trainers over a frozen CLIP image encoder (CoOp, the zero-shot baselines, ...).

It adds three things to :class:`~coop.engine.TrainerX`, driven by the ``FAST`` config node:

- evaluation under ``torch.inference_mode`` (``FAST.ENABLED``; the original's ``no_grad``
  otherwise): the same numbers without autograd's bookkeeping of versions and views;
- evaluation through the disk cache of image features (``FAST.EVAL_FEATURE_CACHE``): the
  features of an evaluation split are computed once, with the same batches and operations as
  the plain path (so the logits are bit-identical), and reused by later runs;
- the opt-in training feature cache (``FAST.TRAIN_FEATURE_CACHE``, a documented deviation
  from the protocol): features of a fixed number of augmented views per training image,
  seeded by the image and the view index, are kept per image on disk and shared by every
  run (seed, shot count, method) that uses the image; each epoch trains the text side only
  on one view per image.

A subclass provides ``image_features(images) -> (B, E)`` (normalised) and
``logits_from_features(features) -> (B, n_cls)`` such that
``logits_from_features(image_features(x))`` is exactly what ``model_inference(x)`` computes.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Dict, List, Tuple

import torch
from tqdm import tqdm

from coop.engine import TrainerX
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

# what ``image_features`` computes; part of the cache key (bump when it changes)
FEATURE_KIND = "clip-visual-l2norm-v1"


class CLIPTrainer(TrainerX):
    """TrainerX for models with a frozen CLIP image encoder."""

    # ------------------------------------------------------------------ hooks
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def clip_dtype(self) -> torch.dtype:
        raise NotImplementedError

    def image_channels_last(self) -> bool:
        """Whether ``image_features`` runs a channels-last image encoder (``FAST.CHANNELS_LAST``;
        part of the cache key, as it changes float rounding)."""
        return False

    def image_bn_folded(self) -> bool:
        """Whether ``image_features`` runs an image encoder with its batch norms folded into
        its convolutions (``FAST.FOLD_BN``; part of the cache key, as it changes float
        rounding)."""
        return False

    def evaluation_context(self):
        """Evaluation under inference mode on the fast path: the frozen encoders record no
        autograd state at all (the original's ``no_grad`` still tracks versions and views)."""
        if not self.cfg.FAST.ENABLED:
            return super().evaluation_context()
        return torch.inference_mode()

    def non_blocking_copies(self) -> bool:
        """On the fast path batch copies do not block the host: the loaders pin their
        batches on CUDA, and a pinned copy is ordered before the kernels that read it, so the
        host can queue the step meanwhile (same values)."""
        return bool(self.cfg.FAST.ENABLED)

    # ------------------------------------------------------------------ evaluation cache
    def eval_cache_enabled(self) -> bool:
        fast = self.cfg.FAST
        # skipped unreadable images are counted per pass, so such runs read the images
        skipping = self.cfg.DATALOADER.SKIP_UNREADABLE
        return bool(fast.ENABLED and fast.EVAL_FEATURE_CACHE and not skipping)

    def _weights_hash(self, cache_root: str) -> str:
        from coop.clip_adapter import resolve_weights

        path = resolve_weights(self.cfg.MODEL.BACKBONE.NAME, self.cfg.MODEL.BACKBONE.CACHE_DIR)
        return file_sha256(path, cache_root)

    def _encoder_key_parts(self, cache_root: str) -> Dict[str, Any]:
        """What any cached image feature depends on besides its images and transform: the
        feature kind, the weights' content, the precision, the memory format, whether the
        batch norms are folded, the device and the torch version."""
        return {
            "kind": FEATURE_KIND,
            "weights": self._weights_hash(cache_root),
            "dtype": str(self.clip_dtype()),
            "channels_last": self.image_channels_last(),
            "bn_folded": self.image_bn_folded(),
            "device": self.device.type,
            "torch": torch.__version__,
        }

    def _eval_key(self, data_loader: Any, cache_root: str) -> Tuple[str, Dict[str, Any]]:
        cfg = self.cfg
        source = data_loader.dataset.data_source
        parts = {
            **self._encoder_key_parts(cache_root),
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

    def run_evaluation(self, split: str, data_loader: Any) -> None:
        if not self.eval_cache_enabled():
            return super().run_evaluation(split, data_loader)
        cache_root = default_cache_dir(self.cfg.FAST.CACHE_DIR)
        cache = FeatureCache(cache_root)
        key, parts = self._eval_key(data_loader, cache_root)
        hit = cache.load(key)
        if hit is not None:
            logger.info(f"Using cached image features of the *{split}* set ({cache.path(key)})")
            draw_loader_seed()  # the original draws this when it iterates the loader
            features, labels = hit
        else:
            features, labels = [], []
            for batch in tqdm(data_loader, desc=f"features {split}", leave=False):
                input, label = self.parse_batch_test(batch)
                features.append(self.image_features(input))
                labels.append(label)
            cache.store(key, features, labels, parts)
            logger.info(f"Cached image features of the *{split}* set in {cache.path(key)}")
        for feats, label in zip(features, labels):
            output = self.logits_from_features(feats.to(self.device))
            self.evaluator.process(output, label.to(self.device))

    # ------------------------------------------------------------------ training cache
    def train_cache_enabled(self) -> bool:
        return bool(self.cfg.FAST.TRAIN_FEATURE_CACHE)

    def _train_views_key(self, cache_root: str) -> Tuple[str, Dict[str, Any]]:
        """The key of the training-view entry: everything the features depend on except
        which images (the weights, the training transform, precision, batch shape, device)."""
        import torchvision

        cfg = self.cfg
        parts = {
            **self._encoder_key_parts(cache_root),
            "cache": "train-views",
            "format": TRAIN_VIEWS_FORMAT,
            "byteorder": sys.byteorder,  # the view files hold raw bytes
            "input": {k: cfg.INPUT[k] for k in sorted(cfg.INPUT)},
            "transform": repr(self.dm.tfm_train),
            "batch_size": cfg.DATALOADER.TRAIN_X.BATCH_SIZE,
            "torchvision": torchvision.__version__,
        }
        return cache_key(parts), parts

    def _compute_train_views(
        self, wrapper: Any, pairs: List[Tuple[int, int]]
    ) -> List[torch.Tensor]:
        """Features (on the CPU) of view ``v`` of image ``i`` for each ``(i, v)`` of ``pairs``.

        The views go through the image encoder in batches of the training batch size (the
        batch shape the encoder sees in training without the cache), the last one padded to
        it, so an image's features do not depend on how many others share its batch (kernels
        are chosen by shape) and at most a training batch less one of padding is computed."""
        from coop.data import resolve_num_workers

        bs = self.cfg.DATALOADER.TRAIN_X.BATCH_SIZE
        loader = torch.utils.data.DataLoader(
            SeededViews(wrapper, pairs),
            batch_size=bs,
            shuffle=False,
            num_workers=resolve_num_workers(self.cfg.DATALOADER.NUM_WORKERS),
            pin_memory=self.device.type == "cuda",
        )
        out: List[torch.Tensor] = []
        # the loader draws its base seed from torch's generator: keep the run's stream intact
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            for batch in tqdm(loader, desc="training feature cache", leave=False):
                images = batch["img"]
                n = images.shape[0]
                if n < bs:
                    pad = images.new_zeros((bs - n, *images.shape[1:]))
                    images = torch.cat([images, pad])
                feats = self.image_features(images.to(self.device))[:n]
                out.extend(feats.cpu().unbind(0))
        return out

    def _build_train_cache(self) -> None:
        """Features of ``TRAIN_CACHE_VIEWS`` augmented views of every training image,
        (V, N, E), through the shared per-image cache of seeded views: only the views no
        earlier run has stored are computed. The run's own random streams are untouched."""
        from coop.data import DatasetWrapper

        views = self.cfg.FAST.TRAIN_CACHE_VIEWS
        if views < 1:
            raise ValueError(f"FAST.TRAIN_CACHE_VIEWS must be at least 1, got {views}")
        source = self.dm.dataset.train_x
        cfg = self.cfg.clone()
        cfg.defrost()
        cfg.DATALOADER.K_TRANSFORMS = 1  # a view is one augmentation
        cfg.DATALOADER.RETURN_IMG0 = False
        cache_root = default_cache_dir(self.cfg.FAST.CACHE_DIR)
        key, parts = self._train_views_key(cache_root)
        cache = TrainViewCache(cache_root, key, parts)

        files = [cache.image_file(d.impath) for d in source]
        first: Dict[str, int] = {}  # file -> its first position in train_x (repeats share it)
        for i, path in enumerate(files):
            first.setdefault(path, i)
        meta = cache.read_meta()
        stored: Dict[str, torch.Tensor] = {}
        if meta is not None:
            for path, i in first.items():
                feats = cache.load(path, meta, impath=source[i].impath)
                if feats is not None:
                    stored[path] = feats
        have = {path: (stored[path].shape[0] if path in stored else 0) for path in first}
        pairs = [(i, v) for path, i in first.items() for v in range(have[path], views)]
        reused = sum(min(n, views) for n in have.values())

        if pairs:
            wrapper = DatasetWrapper(cfg, source, transform=self.dm.tfm_train, is_train=True)
            computed = self._compute_train_views(wrapper, pairs)
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
        self._train_feats = feats.to(self.device)  # (V, N, E)
        self._train_labels = torch.tensor([d.label for d in source], device=self.device)

    def run_epoch(self) -> None:
        if not self.train_cache_enabled():
            return super().run_epoch()
        if getattr(self, "_train_feats", None) is None:
            self._build_train_cache()
        self.set_model_mode("train")
        n = self._train_labels.shape[0]
        bs = self.cfg.DATALOADER.TRAIN_X.BATCH_SIZE
        # the same draws as a loader pass (base seed, sampler seed), then a view per image
        draw_loader_seed()
        seed = int(torch.empty((), dtype=torch.int64).random_().item())
        gen = torch.Generator()
        gen.manual_seed(seed)
        perm = torch.randperm(n, generator=gen)
        view_idx = torch.randint(self._train_feats.shape[0], (n,), generator=gen)
        batches: List[torch.Tensor] = (
            [perm[i : i + bs] for i in range(0, n - bs + 1, bs)] if n >= bs else [perm]
        )
        self.num_batches = len(batches)
        summaries: List[Dict[str, float]] = []
        for batch_idx, idx in enumerate(batches):
            self.batch_idx = batch_idx
            feats = self._train_feats[view_idx[idx], idx.to(self._train_feats.device)]
            label = self._train_labels[idx.to(self._train_labels.device)]
            summaries.append(self.train_step(lambda f=feats: self.logits_from_features(f), label))
        if summaries:
            mean = {k: sum(s[k] for s in summaries) / len(summaries) for k in summaries[0]}
            info = " ".join(f"{k} {v:.4f}" for k, v in mean.items())
            logger.info(
                f"epoch [{self.epoch + 1}/{self.max_epoch}] {info} lr {self.get_current_lr():.4e}"
            )

    def train_step(self, logits_fn: Any, label: torch.Tensor) -> Dict[str, float]:
        """One optimisation step on the logits ``logits_fn()``; the subclass's update rule."""
        raise NotImplementedError
