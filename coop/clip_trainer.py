"""The trainer base of every CLIP method, written once for two hosts.

:class:`CLIPTrainer` holds what prompt-learning methods share (CLIP loading and precision,
the optimisation step with its loss hook, evaluation with the class text features computed
once, the feature caches, the checkpoint-fit check, the config-node contract). It touches
only Dassl's public trainer API (``self.cfg``, ``self.dm``, ``self.device``,
``register_model``, ``model_backward_and_update``, ``update_lr``, ``parse_batch_train``,
``model_inference``, ``load_model``, ...), and has no engine of its own: a method class is
put on a host by :func:`coop.hosts.on_host`, either the bundled engine
(:class:`coop.engine.TrainerX`, the default) or a real Dassl's ``dassl.engine.TrainerX``
(:mod:`coop.dassl_bridge`).

A method subclass provides:

- ``add_config(cfg)``: its config node ``TRAINER.<NAME>`` with the original defaults;
- ``build_custom_clip(clip_model)``: the model (an ``nn.Module`` whose ``forward(image)``
  gives logits), its learnable part named by ``learnable`` (default ``"prompt_learner"``);
- ``image_features(images)`` / ``logits_from_features(features)`` such that
  ``logits_from_features(image_features(x))`` is what ``model_inference(x)`` computes (the
  feature caches use them); ``image_encoder_frozen = False`` where the image encoder learns
  (no cached image features are then ever used);
- optionally ``compute_loss(output, label)`` (default: cross-entropy), ``check_cfg(cfg)``,
  ``check_checkpoint(state_dict, path)`` (before the model is built) and
  ``prepare_loaded_state_dict(name, state_dict, path)``.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from coop.config import ConfigError
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

PRECISIONS = ("fp16", "fp32", "amp", "bf16")

EXTEND_HINT = (
    "call coop.dassl_bridge.extend_dassl_cfg(cfg) after get_cfg_default() in your setup_cfg "
    "(or import coop.dassl_plugin before the config is created)"
)


class CLIPTrainer:
    """Host-independent base of the CLIP trainers (see the module docstring)."""

    image_encoder_frozen = True  # only then are cached image features used
    learnable = "prompt_learner"  # the attribute of the model that is trained and saved

    # ------------------------------------------------------------------ config
    @classmethod
    def add_config(cls, cfg: Any) -> None:
        """Add this method's config node (``TRAINER.<NAME>``) with its defaults."""

    @classmethod
    def config_node_name(cls) -> Optional[str]:
        """``<NAME>`` of the node ``TRAINER.<NAME>`` that this method's ``add_config`` adds:
        the upper-cased name of the class that defines ``add_config`` (None: no node)."""
        for klass in cls.__mro__:
            if "add_config" in vars(klass):
                return None if klass is CLIPTrainer else klass.__name__.upper()
        return None

    def method_cfg(self) -> Any:
        """This method's config node ``TRAINER.<NAME>`` (None for a method without one)."""
        name = self.config_node_name()
        return self.cfg.TRAINER.get(name) if name else None

    @classmethod
    def check_cfg(cls, cfg: Any) -> None:
        """Dassl's hook, run first in the trainer's constructor (and by ``coop-train``
        before anything is written): the keys this package adds must be there (a Dassl
        config that ``extend_dassl_cfg`` was not run for lacks them), and a method checks
        its own keys' values (a classmethod, so it needs no trainer)."""
        node = cls.config_node_name()
        needed = [("FAST", cfg.get("FAST"))]
        if node:
            needed.append((f"TRAINER.{node}", cfg.TRAINER.get(node)))
        for key, value in needed:
            if value is None:
                raise ConfigError(
                    f"The config has no {key} node, which trainer {cls.__name__} reads: "
                    f"{EXTEND_HINT}"
                )
        prec = cls._prec_of(cfg)
        if prec is not None and prec not in PRECISIONS:
            raise ConfigError(f"TRAINER.{node}.PREC must be one of {PRECISIONS}, got '{prec}'")
        if cfg.FAST.TRAIN_FEATURE_CACHE and not cls.image_encoder_frozen:
            raise ConfigError(
                f"FAST.TRAIN_FEATURE_CACHE needs a frozen image encoder; trainer "
                f"{cls.__name__} trains its image encoder: turn it off"
            )

    @classmethod
    def _prec_of(cls, cfg: Any) -> Optional[str]:
        name = cls.config_node_name()
        node = cfg.TRAINER.get(name) if name else None
        if node is not None and hasattr(node, "get") and "PREC" in node:
            return str(node.PREC)
        return None

    @property
    def precision(self) -> str:
        """``TRAINER.<NAME>.PREC`` (fp16 for a method without that key, as CLIP is built)."""
        return self._prec_of(self.cfg) or "fp16"

    # ------------------------------------------------------------------ construction
    @classmethod
    def for_checkpoints(cls, cfg: Any, paths: Sequence[str]) -> CLIPTrainer:
        """Build the trainer, checking that the checkpoints ``paths`` fit it after the data
        is built (the class count is known) and before CLIP is loaded."""
        trainer = cls.__new__(cls)
        trainer._pending_checkpoints = list(paths)
        trainer.__init__(cfg)
        return trainer

    def build_data_loader(self) -> None:
        super().build_data_loader()  # type: ignore[misc]
        from coop.io import load_checkpoint

        for path in self.__dict__.pop("_pending_checkpoints", ()):
            self.check_checkpoint(load_checkpoint(path)["state_dict"], path)
        if self.train_cache_enabled():
            self.train_loader_x = CachedViewsLoader(self)

    def check_checkpoint(self, state_dict: Dict[str, Any], path: str) -> None:
        """Hook: stop with :class:`~coop.io.CheckpointError` when the weights ``state_dict``
        of ``path`` cannot fit this model (called before the model is built)."""

    def build_model(self) -> None:
        """Load CLIP in the method's precision, build the method's model, train only its
        ``learnable`` part (the official CoOp trainer's ``build_model``)."""
        from coop.fast import load_clip_for

        cfg = self.cfg
        prec = self.precision
        clip_model = load_clip_for(cfg)
        if prec in ("fp32", "amp", "bf16"):
            clip_model.float()
        elif self.device.type == "cpu":
            logger.warning(
                f"PREC fp16 on a CPU is slow and numerically fragile; pass "
                f"TRAINER.{self.config_node_name()}.PREC fp32 for CPU runs"
            )
        logger.info("Building custom CLIP")
        self.model = self.build_custom_clip(clip_model)

        logger.info("Turning off gradients in both the image and the text encoder")
        for name, param in self.model.named_parameters():
            if self.learnable not in name:
                param.requires_grad_(False)
        if cfg.MODEL.INIT_WEIGHTS:
            self.load_pretrained_weights(cfg.MODEL.INIT_WEIGHTS)
        self.model.to(self.device)
        self.after_model_built()

        module = getattr(self.model, self.learnable)
        self.optim = self.build_optimizer(module, cfg.OPTIM)
        self.sched = self.build_lr_scheduler(self.optim, cfg.OPTIM)
        self.register_model(self.learnable, module, self.optim, self.sched)

        self.use_amp = prec == "amp" and self.device.type == "cuda"
        if prec == "amp" and not self.use_amp:
            logger.warning("PREC amp needs CUDA; on this device it trains exactly like fp32")
        self.scaler = torch.amp.GradScaler("cuda") if self.use_amp else None
        # bf16 (our option): fp32 weights, bf16 autocast in training and evaluation
        self.use_bf16 = prec == "bf16"

    def build_custom_clip(self, clip_model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def after_model_built(self) -> None:
        """Hook: the model is on its device, before the optimizer is built."""

    def load_pretrained_weights(self, path: str) -> None:
        """MODEL.INIT_WEIGHTS: copy into the learnable part the keys whose name and shape
        match."""
        from coop.io import CheckpointError, load_checkpoint

        module = getattr(self.model, self.learnable)
        ckpt = load_checkpoint(path)
        own = module.state_dict()
        matched = {
            k: v for k, v in ckpt["state_dict"].items() if k in own and own[k].shape == v.shape
        }
        if not matched:
            raise CheckpointError(f"No weights in {path} match the {self.learnable}")
        module.load_state_dict(matched, strict=False)
        logger.info(f"Initialized the {self.learnable} from {path}: {sorted(matched)}")

    # ------------------------------------------------------------------ the step
    def parse_batch_train(self, batch: Dict[str, Any]) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(images, labels)`` on the device (the official CoOp trainer's override)."""
        return self._to_device(batch["img"]), self._to_device(batch["label"])

    def parse_batch_test(self, batch: Dict[str, Any]) -> Tuple[torch.Tensor, torch.Tensor]:
        return self._to_device(batch["img"]), self._to_device(batch["label"])

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, non_blocking=self.non_blocking_copies())

    def non_blocking_copies(self) -> bool:
        """On the fast path batch copies do not block the host: the loaders pin their
        batches on CUDA, and a pinned copy is ordered before the kernels that read it, so the
        host can queue the step meanwhile (same values)."""
        return bool(self.cfg.FAST.ENABLED)

    def autocast(self) -> Any:
        if self.__dict__.get("use_bf16"):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward_backward(self, batch: Dict[str, Any]) -> Dict[str, float]:
        if "feat" in batch:  # FAST.TRAIN_FEATURE_CACHE: frozen image features of a view
            feats, label = self._to_device(batch["feat"]), self._to_device(batch["label"])
            return self.train_step(lambda: self.logits_from_features(feats), label)
        image, label = self.parse_batch_train(batch)
        return self.train_step(lambda: self.model(image), label)

    def compute_loss(self, output: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """The method's training loss on the logits ``output`` (B, n_cls)."""
        return F.cross_entropy(output, label)

    def train_step(self, logits_fn: Callable[[], torch.Tensor], label: torch.Tensor) -> Dict:
        """One optimisation step on the logits ``logits_fn()`` in the method's precision."""
        if self.use_amp:
            with torch.autocast("cuda"):
                output = logits_fn()
                loss = self.compute_loss(output, label)
            self.optim.zero_grad()
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optim)
            self.scaler.update()
        else:
            with self.autocast():
                output = logits_fn()
                loss = self.compute_loss(output, label)
            self.model_backward_and_update(loss)

        loss_summary = {"loss": loss.item(), "acc": compute_accuracy(output, label)}
        if (self.batch_idx + 1) == self.num_batches:
            self.update_lr()
        return loss_summary

    # ------------------------------------------------------------------ evaluation
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def model_inference(self, input: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.model(input)

    def clip_dtype(self) -> torch.dtype:
        """The precision image features are computed in (part of the cache key)."""
        return torch.bfloat16 if self.__dict__.get("use_bf16") else self.model.dtype

    def image_channels_last(self) -> bool:
        """Whether ``image_features`` runs a channels-last image encoder (cache key)."""
        return bool(getattr(self.model, "channels_last", False))

    def image_bn_folded(self) -> bool:
        """Whether ``image_features`` runs an image encoder with folded batch norms (cache
        key)."""
        return bool(getattr(self.model, "bn_folded", False))

    def evaluation_scope(self) -> Any:
        """Hook: a context active during an evaluation pass beyond inference mode (e.g. the
        class text features computed once for every batch)."""
        return contextlib.nullcontext()

    def evaluation_context(self) -> Any:
        """Evaluation under inference mode on the fast path (the frozen encoders record no
        autograd state; the original's ``no_grad`` still tracks versions and views), with
        the method's :meth:`evaluation_scope`."""
        if not self.cfg.FAST.ENABLED:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        stack.enter_context(self.evaluation_scope())
        return stack

    # ------------------------------------------------------------------ evaluation cache
    def eval_cache_enabled(self) -> bool:
        fast = self.cfg.FAST
        # skipped unreadable images are counted per pass, so such runs read the images
        skipping = self.cfg.DATALOADER.get("SKIP_UNREADABLE", False)
        return bool(
            self.image_encoder_frozen and fast.ENABLED and fast.EVAL_FEATURE_CACHE and not skipping
        )

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
        """The bundled engine's per-pass hook: through the disk cache of image features
        (``FAST.EVAL_FEATURE_CACHE``), computed once with the same batches and operations as
        the plain path (bit-identical logits) and reused by later runs."""
        if not self.eval_cache_enabled():
            return super().run_evaluation(split, data_loader)  # type: ignore[misc]
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
                with self.autocast():
                    features.append(self.image_features(input))
                labels.append(label)
            cache.store(key, features, labels, parts)
            logger.info(f"Cached image features of the *{split}* set in {cache.path(key)}")
        for feats, label in zip(features, labels):
            with self.autocast():
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
                with self.autocast():
                    feats = self.image_features(images.to(self.device))[:n]
                out.extend(feats.cpu().unbind(0))
        return out

    def build_train_cache(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Features of ``TRAIN_CACHE_VIEWS`` augmented views of every training image,
        ``(V, N, E)``, and the labels ``(N,)``, through the shared per-image cache of seeded
        views: only the views no earlier run has stored are computed. The run's own random
        streams are untouched."""
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
        labels = torch.tensor([d.label for d in source])
        return feats.to(self.device), labels.to(self.device)


class CachedViewsLoader:
    """The training loader under ``FAST.TRAIN_FEATURE_CACHE``: batches ``{"feat", "label"}``
    of cached image features, one random view per image, fed to the host's own epoch loop.

    Each pass makes the draws a loader pass makes (the base seed, then the sampler's seed)
    and drops the last incomplete batch as the training loader does. The cache is built at
    the first pass (after a resume has restored the random states)."""

    def __init__(self, trainer: CLIPTrainer) -> None:
        self.trainer = trainer
        self.batch_size = trainer.cfg.DATALOADER.TRAIN_X.BATCH_SIZE
        self.n = len(trainer.dm.dataset.train_x)
        self._feats: Optional[torch.Tensor] = None  # (V, N, E)
        self._labels: Optional[torch.Tensor] = None  # (N,)

    def __len__(self) -> int:
        return self.n // self.batch_size if self.n >= self.batch_size else 1

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        if self._feats is None:
            self._feats, self._labels = self.trainer.build_train_cache()
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


def compute_accuracy(output: torch.Tensor, target: torch.Tensor) -> float:
    """Top-1 batch accuracy in percent, computed as Dassl does."""
    batch_size = target.size(0)
    _, pred = output.topk(1, 1, True, True)
    pred = pred.t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    correct_k = correct[:1].view(-1).float().sum(0, keepdim=True)
    return correct_k.mul_(100.0 / batch_size).item()
