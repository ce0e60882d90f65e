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

- ``add_config(cfg)``: its config node ``TRAINER.<NAME>`` with the original defaults (a
  method whose original reads another method's node adds its keys there, adding only what
  is missing, and names that node in ``config_node_name``);
- ``build_custom_clip(clip_model)``: the model (an ``nn.Module`` whose ``forward(image)``
  gives logits, or in training a tuple whose first item is the logits and the rest what
  ``compute_loss`` reads), its learnable part named by ``learnable`` (default
  ``"prompt_learner"``), or ``model_name`` set to register the whole model under that name
  (its parameters chosen by ``is_learnable`` are trained, the rest frozen);
- ``image_features(images)`` / ``logits_from_features(features)`` such that
  ``logits_from_features(image_features(x))`` is what ``model_inference(x)`` computes (the
  feature caches use them; default: the model's ``encode_image`` and ``logits``);
  ``image_encoder_frozen = False`` where the image encoder learns (no cached image features
  are then ever used);
- optionally ``train_output(image, features)`` (default: the logits) and
  ``compute_loss(output, label)`` on it (default: cross-entropy), ``train_step`` (a step
  other than one backward pass of one loss), ``check_cfg(cfg)``,
  ``check_checkpoint(state_dict, path)`` (before the model is built),
  ``derived_state_keys`` (what the original saved but the model rebuilds, dropped on load),
  ``prepare_loaded_state_dict(name, state_dict, path)``, ``model_description()`` (for the
  errors) and ``log_train_accuracy`` (whether the training log shows the batch accuracy).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from coop.config import ConfigError
from coop.fast.trainer_caches import FEATURE_KIND, CachedViewsLoader, evaluate_cached

logger = logging.getLogger(__name__)

PRECISIONS = ("fp16", "fp32", "amp", "bf16")

EXTEND_HINT = (
    "call coop.dassl_bridge.extend_dassl_cfg(cfg) after get_cfg_default() in your setup_cfg "
    "(or import coop.dassl_plugin before the config is created)"
)


class CLIPTrainer:
    """Host-independent base of the CLIP trainers (see the module docstring)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> CLIPTrainer:
        # a method class built directly (Dassl's ``TRAINER_REGISTRY.get(name)(cfg)`` idiom
        # on this package's registry) runs on the bundled engine
        from coop.hosts import HostAdapter, on_host

        if not issubclass(cls, HostAdapter):
            cls = on_host(cls)
        return object.__new__(cls)

    trains = True  # False: nothing is learned (no checkpoint; --eval-only needs no model)
    image_encoder_frozen = True  # only then are cached image features used
    # what ``image_features`` computes (part of the feature caches' keys): a method whose
    # features differ (e.g. not normalised) names its own kind
    feature_kind = FEATURE_KIND
    learnable = "prompt_learner"  # the attribute of the model that is trained and saved
    # set: the whole model is registered (saved, optimised, put in train/eval mode) under
    # this name, as methods whose learnable prompts sit inside CLIP's towers do; the
    # optimizer then holds every parameter, and only the learnable ones get gradients
    model_name: Optional[str] = None
    # the folder of this method's shipped YAML files, ``configs/trainers/<config_dir>/``
    # (None: the class name)
    config_dir: Optional[str] = None
    # the YAML (a file stem in ``config_dir``) each protocol preset of ``coop-sweep`` runs
    # this method with, as the original scripts do: "fewshot" (the K-shot grid),
    # "base2new" (train on base classes) and "xd" (train on ImageNet for cross-dataset
    # transfer and domain generalisation; "dg" where that differs); "<protocol>.<dataset>",
    # "<protocol>.<K>shots" and "<protocol>.<dataset>.<K>shots" refine a protocol's file
    # (the most specific key wins). A protocol the original ships no script for is left
    # out: its preset then stops with an error naming the declared ones
    protocol_configs: Dict[str, str] = {}
    # output folder patterns of the protocols where the method's original scripts differ
    # from CoOp's main.sh and CoCoOp's scripts (coop.sweep_presets.DEFAULT_DIRS): keys
    # "fewshot", "base2new_train", "base2new_test", "xd_train", "xd_test", "dg_train",
    # "dg_test", "zeroshot"; fields {dataset} {trainer} {cfg} {shots} {seed} and the keys of
    # the method's config node (e.g. {N_CTX}; an evaluation's folder takes them from the run
    # it loads, as the scripts' COMMON_DIR); a pattern that starts with {output} is not put
    # under the sweep's --output folder but beside it (a script writing to output_xd/)
    protocol_dirs: Dict[str, str] = {}
    # the opts the original scripts pass, in their order, per run kind (the protocol_dirs
    # keys), as a flat sequence KEY, VALUE, KEY, VALUE, ...: e.g. KgCoOp's base2new_train
    # ("TRAINER.COOP.N_CTX", "4", ..., "TRAINER.COOP.W", "8.0", ...). The protocol's own
    # opts (DATASET.NUM_SHOTS, DATASET.SUBSAMPLE_CLASSES) follow them. "<kind>.<K>shots",
    # "<kind>.<dataset>" and "<kind>.<dataset>.<K>shots" change or add pairs on top of the
    # kind's (ProGrad's LOSS.LAMBDA 0.8 for some datasets at 8 and 16 shots); "dg_*" falls
    # back to "xd_*". A flag (--nctx, --csc, --ctp) replaces its key's value in place, a
    # trailing opt of the sweep replaces the pair. Without a declaration for a run kind, the
    # config keys its folder names are passed as opts
    protocol_opts: Dict[str, Sequence[str]] = {}
    # the shot counts a protocol runs by default where the original's differ from the
    # papers' (few-shot 1, 2, 4, 8, 16; the others 16): e.g. ProGrad's {"base2new": (4,)}
    protocol_shots: Dict[str, Tuple[int, ...]] = {}
    # keys of a loaded state dict that the model rebuilds from the class names (the original
    # code saved them; its load_model drops them)
    derived_state_keys: Tuple[str, ...] = ()
    # prefixes of state keys that the original's checkpoints lack (the model keeps its values)
    optional_state_prefixes: Tuple[str, ...] = ()
    # whether the training log reports the batch accuracy beside the loss
    log_train_accuracy = True
    # the precision switches build_model sets (a method that builds its own model keeps these)
    use_amp = False
    use_bf16 = False
    scaler = None

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)  # type: ignore[call-arg] - the host's: data, model, evaluator
        from coop.fast.malloc import tune_for_run

        # after the build: the checkpoint's transient copies went back to the kernel
        tune_for_run(cfg, self.device.type)

    # ------------------------------------------------------------------ config
    @classmethod
    def config_folder(cls) -> str:
        """``configs/trainers/<config_dir>`` under the package's shipped configs."""
        return cls.config_dir or cls.__name__

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
        # the training transform (Dassl's data manager does not keep it as an attribute)
        self.tfm_train = (
            getattr(self.dm, "tfm_train", None) or self.train_loader_x.dataset.transform
        )
        if self.train_cache_enabled():
            self.train_loader_x = CachedViewsLoader(self)  # cached views, one per image

    def check_checkpoint(self, state_dict: Dict[str, Any], path: str) -> None:
        """Hook: stop with :class:`~coop.io.CheckpointError` when the weights ``state_dict``
        of ``path`` cannot fit this model (called before the model is built)."""

    def prepare_loaded_state_dict(
        self, name: str, state_dict: Dict[str, Any], path: str
    ) -> Dict[str, Any]:
        """The weights ``state_dict`` of ``path`` made ready for the registered model
        ``name``: ``derived_state_keys`` dropped (the model keeps its own), one clear error
        for a weight whose shape differs from the model's or one the model needs but the
        file lacks (absent keys under ``optional_state_prefixes`` keep the model's values),
        each cast to the model's dtype (e.g. an fp16 checkpoint evaluated in fp32)."""
        from coop.io import CheckpointError

        derived = set(self.derived_state_keys)
        state_dict = {k: v for k, v in state_dict.items() if k not in derived}
        own = self._models[name].state_dict()  # type: ignore[attr-defined]
        for key, value in state_dict.items():
            if key in own and own[key].shape != value.shape:
                raise CheckpointError(
                    f"The checkpoint {path} does not fit this model: '{key}' has shape "
                    f"{tuple(value.shape)} there but {tuple(own[key].shape)} here "
                    f"({self.model_description()})"
                )
        optional = tuple(self.optional_state_prefixes)
        missing = [k for k in own if k not in state_dict and k not in derived]
        missing = [k for k in missing if not (optional and k.startswith(optional))]
        if missing:
            shown = missing if len(missing) <= 5 else missing[:5] + ["..."]
            raise CheckpointError(f"The checkpoint {path} lacks the weights {shown}")
        # the entries the file may lack keep the model's values, so a strict load works
        out = {k: v for k, v in own.items() if k not in state_dict}
        out.update({k: v.to(own[k].dtype) if k in own else v for k, v in state_dict.items()})
        return out

    def model_description(self) -> str:
        """What a checkpoint must fit, for the errors (a method adds its own settings)."""
        return f"{self.num_classes} classes, backbone {self.cfg.MODEL.BACKBONE.NAME}"

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
            if not self.is_learnable(name):
                param.requires_grad_(False)
        enabled = sorted(n for n, p in self.model.named_parameters() if p.requires_grad)
        logger.info(f"Parameters to be updated: {enabled}")
        if cfg.MODEL.INIT_WEIGHTS:
            self.load_pretrained_weights(cfg.MODEL.INIT_WEIGHTS)
        self.model.to(self.device)
        self.after_model_built()

        module = self.trained_module()
        self.optim = self.build_optimizer(module, cfg.OPTIM)
        self.sched = self.build_lr_scheduler(self.optim, cfg.OPTIM)
        self.register_model(self.model_name or self.learnable, module, self.optim, self.sched)

        self.use_amp = prec == "amp" and self.device.type == "cuda"
        if prec == "amp" and not self.use_amp:
            logger.warning("PREC amp needs CUDA; on this device it trains exactly like fp32")
        self.scaler = torch.amp.GradScaler("cuda") if self.use_amp else None
        # bf16 (our option): fp32 weights, bf16 autocast in training and evaluation
        self.use_bf16 = prec == "bf16"

    def build_custom_clip(self, clip_model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def is_learnable(self, name: str) -> bool:
        """Whether the model's parameter ``name`` is trained (default: it lies in the
        ``learnable`` part); the others are frozen."""
        return self.learnable in name

    def trained_module(self) -> nn.Module:
        """The module registered, saved and given to the optimizer: the whole model where
        ``model_name`` is set, else its ``learnable`` part."""
        return self.model if self.model_name else getattr(self.model, self.learnable)

    def after_model_built(self) -> None:
        """Hook: the model is on its device, before the optimizer is built."""

    def load_pretrained_weights(self, path: str) -> None:
        """MODEL.INIT_WEIGHTS: copy into the learnable part the keys whose name and shape
        match."""
        from coop.io import CheckpointError, load_checkpoint

        module = self.trained_module()
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

    parse_batch_test = parse_batch_train

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, non_blocking=self.non_blocking_copies())

    def non_blocking_copies(self) -> bool:
        """On the fast path batch copies do not block the host: the loaders pin their
        batches on CUDA, and a pinned copy is ordered before the kernels that read it, so the
        host can queue the step meanwhile (same values)."""
        return bool(self.cfg.FAST.ENABLED)

    def autocast(self) -> Any:
        if self.use_bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward_backward(self, batch: Dict[str, Any]) -> Dict[str, float]:
        if "feat" in batch:  # FAST.TRAIN_FEATURE_CACHE: frozen image features of a view
            feats, label = self._to_device(batch["feat"]), self._to_device(batch["label"])
            return self.train_step(lambda: self.train_output(features=feats), label)
        image, label = self.parse_batch_train(batch)
        return self.train_step(lambda: self.train_output(image=image), label)

    def train_output(
        self, image: Optional[torch.Tensor] = None, features: Optional[torch.Tensor] = None
    ) -> Any:
        """What a training step computes its loss on, from the images ``image`` or (the
        training feature cache) their frozen image features ``features``: the logits (B,
        n_cls), or a tuple whose first element is the logits where the method's loss needs
        more (e.g. its text features, a teacher's logits)."""
        if features is not None:
            return self.logits_from_features(features)
        return self.model(image)

    def compute_loss(self, output: Any, label: torch.Tensor) -> torch.Tensor:
        """The method's training loss on ``output`` (:meth:`train_output`; default: the
        cross-entropy of the logits)."""
        return F.cross_entropy(output, label)

    def train_step(self, logits_fn: Callable[[], Any], label: torch.Tensor) -> Dict:
        """One optimisation step on ``logits_fn()`` (:meth:`train_output`) in the method's
        precision."""
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

        logits = output[0] if isinstance(output, tuple) else output
        loss_summary = {"loss": loss.item()}
        if self.log_train_accuracy:
            loss_summary["acc"] = compute_accuracy(logits, label)
        if (self.batch_idx + 1) == self.num_batches:
            self.update_lr()
        return loss_summary

    # ------------------------------------------------------------------ evaluation
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """The image features the logits are computed from (default: the model's
        ``encode_image``)."""
        return self.model.encode_image(images)

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """The logits (B, n_cls) of image features (default: the model's ``logits``)."""
        return self.model.logits(features)

    def model_inference(self, input: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.model(input)

    def clip_dtype(self) -> torch.dtype:
        """The precision image features are computed in (part of the cache key)."""
        return torch.bfloat16 if self.use_bf16 else self.model.dtype

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

    def run_evaluation(self, split: str, data_loader: Any) -> None:
        """The bundled engine's per-pass hook: through the evaluation feature cache where
        it is on."""
        if not self.eval_cache_enabled():
            return super().run_evaluation(split, data_loader)  # type: ignore[misc]
        evaluate_cached(self, split, data_loader)

    # ------------------------------------------------------------------ training cache
    def train_cache_enabled(self) -> bool:
        return bool(self.cfg.FAST.TRAIN_FEATURE_CACHE)


def check_input_size(cfg: Any, clip_model: nn.Module) -> None:
    """Stop with a ValueError when ``INPUT.SIZE`` is not the loaded CLIP's input resolution
    (a prompt learner's first check, as the originals make it)."""
    clip_imsize = clip_model.visual.input_resolution
    if cfg.INPUT.SIZE[0] != clip_imsize:
        raise ValueError(
            f"INPUT.SIZE {tuple(cfg.INPUT.SIZE)} does not match the input resolution "
            f"{clip_imsize} of the CLIP backbone '{cfg.MODEL.BACKBONE.NAME}'; "
            f"set INPUT.SIZE ({clip_imsize}, {clip_imsize})"
        )


def compute_accuracy(output: torch.Tensor, target: torch.Tensor) -> float:
    """Top-1 batch accuracy in percent, computed as Dassl does."""
    batch_size = target.size(0)
    _, pred = output.topk(1, 1, True, True)
    pred = pred.t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    correct_k = correct[:1].view(-1).float().sum(0, keepdim=True)
    return correct_k.mul_(100.0 / batch_size).item()
