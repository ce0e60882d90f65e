"""Linear-probe CLIP (Radford et al., 2021, appendix A3), the CoOp paper's baseline.

CLIP's frozen image encoder gives features (the test transform for every split, not
normalised); an L2-regularised logistic regression (scikit-learn, L-BFGS) is fitted on the
few-shot training features. Its inverse regularisation strength C is chosen on the few-shot
validation split: a coarse search over 1e6 ... 1e-6, then ``NUM_STEP`` bisection steps in
log space around the best value; the last step's classifier is the final one (the original
``lpclip/linear_probe.py``).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from coop.clip_trainer import CLIPTrainer
from coop.config import CN, ConfigError
from coop.fast import image_encoder, load_clip_for
from coop.fast.trainer_caches import image_features_of, split_features
from coop.io import CheckpointError
from coop.registry import TRAINER_REGISTRY

logger = logging.getLogger(__name__)

SEARCH_LIST = (1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6)  # the coarse search, in this order
SAMPLINGS = ("dassl", "lpclip")
LPCLIP_VAL_SHOTS = {1: 1, 2: 2, 4: 4, 8: 4, 16: 4}  # lpclip's validation shots per K


class NotFittedError(RuntimeError):
    """The linear probe was asked to predict before its classifier was fitted or loaded."""


def fit_logistic(x: np.ndarray, y: np.ndarray, c: float, max_iter: int = 1000) -> Any:
    """lpclip's classifier: ``LogisticRegression(solver="lbfgs", max_iter, penalty="l2", C)``."""
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(solver="lbfgs", max_iter=max_iter, penalty="l2", C=c)
    with warnings.catch_warnings():
        # newer scikit-learn deprecates naming the (default) L2 penalty: the same fit
        warnings.filterwarnings(
            "ignore", message=".*'penalty' was deprecated", category=FutureWarning
        )
        return clf.fit(x, y)


def accuracy(clf: Any, x: np.ndarray, y: np.ndarray) -> float:
    """The fraction of ``x`` that ``clf`` classifies as ``y``."""
    return float(np.sum(clf.predict(x) == y) / len(y))


def search_c(
    train: Tuple[np.ndarray, np.ndarray],
    val: Tuple[np.ndarray, np.ndarray],
    num_step: int = 8,
    max_iter: int = 1000,
    search_list: Sequence[float] = SEARCH_LIST,
    on_step: Optional[Callable[..., None]] = None,
) -> Tuple[Any, float]:
    """The classifier of the C search on ``val`` = (features, labels) and its C.

    Coarse: fit at every C of ``search_list``; the first best on val is the peak. Then
    ``num_step`` times: fit at the ends of [peak / 10, peak * 10] (bisected in log space
    at each step), keep the end with the higher val accuracy (ties go left) and halve the
    range towards it. ``on_step(step, c_left, c_right, acc_left, acc_right, clf, c)`` sees
    each step (``step`` -1: the coarse search, with the list of accuracies as
    ``acc_left``)."""
    if num_step < 1:
        raise ValueError(f"the C search needs at least one bisection step, got {num_step}")

    def val_acc(c: float) -> Tuple[Any, float]:
        clf = fit_logistic(train[0], train[1], c, max_iter)
        return clf, accuracy(clf, *val)

    coarse = [val_acc(c)[1] for c in search_list]
    if on_step:
        on_step(-1, None, None, coarse, None, None, None)
    c_peak = search_list[int(np.argmax(coarse))]
    c_left, c_right = 1e-1 * c_peak, 1e1 * c_peak
    for step in range(num_step):
        clf_left, acc_left = val_acc(c_left)
        clf_right, acc_right = val_acc(c_right)
        if acc_left < acc_right:
            clf, c = clf_right, c_right
            lo, hi = 0.5 * (np.log10(c_right) + np.log10(c_left)), np.log10(c_right)
        else:
            clf, c = clf_left, c_left
            lo, hi = np.log10(c_left), 0.5 * (np.log10(c_right) + np.log10(c_left))
        if on_step:
            on_step(step, c_left, c_right, acc_left, acc_right, clf, c)
        c_left, c_right = np.power(10, lo), np.power(10, hi)
    return clf, float(c)


def lpclip_sample(
    train_labels: np.ndarray, val_labels: np.ndarray, num_shots: int, seed: int
) -> Tuple[List[int], List[int]]:
    """The few-shot indices lpclip draws: ``np.random.seed(seed)``, then for each training
    label in sorted order ``np.random.choice`` of K of its training indices without
    replacement, then the same on val with the validation shots of K."""
    rng = np.random.RandomState(seed)  # the state np.random.seed(seed) gives the global one
    val_shots = LPCLIP_VAL_SHOTS.get(num_shots, min(num_shots, 4))
    picked: List[List[int]] = [[], []]
    for which, (labels, k) in enumerate(((train_labels, num_shots), (val_labels, val_shots))):
        for label in np.unique(train_labels):
            pool = np.where(labels == label)[0]
            if len(pool) < k:
                split = ("train", "val")[which]
                raise ValueError(
                    f"TRAINER.LINEARPROBECLIP.SAMPLING lpclip draws {k} images of each class "
                    f"from the {split} split, but class {int(label)} has {len(pool)} there"
                )
            picked[which].extend(int(i) for i in rng.choice(pool, size=k, replace=False))
    return picked[0], picked[1]


class LinearClassifier(nn.Module):
    """``logits = features @ weight.T + bias`` in float64 (scikit-learn's decision function);
    ``c`` is the chosen C (NaN until fitted)."""

    def __init__(self, dim: int, classnames: Sequence[str]) -> None:
        super().__init__()
        n_cls = len(classnames)
        self.register_buffer("weight", torch.zeros(n_cls, dim, dtype=torch.float64))
        self.register_buffer("bias", torch.zeros(n_cls, dtype=torch.float64))
        self.register_buffer("c", torch.tensor(float("nan"), dtype=torch.float64))
        # the class names, saved with the weights (as UTF-8 bytes: a checkpoint holds
        # tensors only), so that a classifier of ImageNet's 1000 classes can evaluate
        # ImageNet-A/-R, which hold 200 of them: rows are picked by name
        self.register_buffer("classnames", encode_names(classnames))

    @property
    def fitted(self) -> bool:
        return not bool(torch.isnan(self.c))

    def set_from(self, clf: Any, c: float) -> None:
        """Take the weights of a fitted scikit-learn classifier; classes it never saw get
        a bias of -inf (never predicted)."""
        n_cls, dim = self.weight.shape
        coef = np.asarray(clf.coef_, dtype=np.float64)
        intercept = np.asarray(clf.intercept_, dtype=np.float64)
        if len(clf.classes_) == 2:  # one decision function: class 1 where it is > 0
            coef = np.concatenate([np.zeros((1, dim)), coef])
            intercept = np.concatenate([[0.0], intercept])
        weight = np.zeros((n_cls, dim))
        bias = np.full(n_cls, -np.inf)
        weight[clf.classes_] = coef
        bias[clf.classes_] = intercept
        self.weight.copy_(torch.from_numpy(weight))
        self.bias.copy_(torch.from_numpy(bias))
        self.c.fill_(c)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features.double() @ self.weight.t() + self.bias  # (B, n_cls)


def encode_names(names: Sequence[str]) -> torch.Tensor:
    """Class names as a uint8 tensor (newline-separated UTF-8)."""
    return torch.tensor(list("\n".join(names).encode("utf-8")), dtype=torch.uint8)


def decode_names(data: torch.Tensor) -> List[str]:
    return bytes(data.tolist()).decode("utf-8").split("\n")


@TRAINER_REGISTRY.register()
class LinearProbeCLIP(CLIPTrainer):
    """Logistic regression on frozen CLIP image features, C chosen on the few-shot val."""

    learnable = "classifier"
    feature_kind = "clip-visual-raw-v1"
    # lpclip's feature extraction runs rn50_val.yaml: the test transform, batches of 200
    protocol_configs = {"fewshot": "rn50", "xd": "rn50"}
    optional_state_prefixes = ("classnames",)  # checkpoints written before they were saved

    @classmethod
    def add_config(cls, cfg) -> None:
        cfg.TRAINER.LINEARPROBECLIP = CN()
        cfg.TRAINER.LINEARPROBECLIP.PREC = "fp16"  # CLIP as built (lpclip ran fp16 on a GPU)
        cfg.TRAINER.LINEARPROBECLIP.NUM_STEP = 8  # bisection steps after the coarse search
        cfg.TRAINER.LINEARPROBECLIP.MAX_ITER = 1000  # L-BFGS iterations
        # "dassl": the data manager's few-shot train/val (CoOp's subsets for the seed);
        # "lpclip": lpclip's own numpy draw from the full splits (our option)
        cfg.TRAINER.LINEARPROBECLIP.SAMPLING = "dassl"

    @classmethod
    def check_cfg(cls, cfg) -> None:
        super().check_cfg(cfg)
        opts = cfg.TRAINER.LINEARPROBECLIP
        if opts.SAMPLING not in SAMPLINGS:
            raise ConfigError(
                f"TRAINER.LINEARPROBECLIP.SAMPLING must be one of {SAMPLINGS}, "
                f"got '{opts.SAMPLING}'"
            )
        if opts.NUM_STEP < 1 or opts.MAX_ITER < 1:
            raise ConfigError(
                "TRAINER.LINEARPROBECLIP.NUM_STEP and MAX_ITER must be at least 1, got "
                f"{opts.NUM_STEP} and {opts.MAX_ITER}"
            )
        if opts.SAMPLING == "lpclip" and cfg.SEED < 0:
            raise ConfigError(
                "TRAINER.LINEARPROBECLIP.SAMPLING lpclip draws with np.random.seed(SEED): "
                "pass --seed"
            )

    def build_model(self) -> None:
        prec = self.precision
        clip_model = load_clip_for(self.cfg)
        if prec in ("fp32", "amp", "bf16"):
            clip_model.float()
        clip_model.to(self.device)
        for param in clip_model.parameters():
            param.requires_grad_(False)
        self.use_bf16 = prec == "bf16"
        self.clip_model = clip_model
        self.image_encoder = image_encoder(self.cfg, clip_model.visual, normalize=False)
        dim = int(clip_model.visual.output_dim)
        self.model = LinearClassifier(dim, self.dm.dataset.classnames).to(self.device)
        self.register_model(self.learnable, self.model)  # nothing to optimise by SGD

    # ------------------------------------------------------------------ fitting
    def run_epoch(self) -> None:
        if not self.model.fitted:  # fitted in the first epoch; later ones have nothing to do
            self.fit()

    def fewshot_sources(self) -> Tuple[list, list]:
        """The few-shot training and validation images (lists of Datum)."""
        cfg = self.cfg
        if cfg.TRAINER.LINEARPROBECLIP.SAMPLING == "dassl":
            train, val = self.dm.dataset.train_x, self.dm.dataset.val
        else:
            from coop.registry import build_dataset

            full_cfg = cfg.clone()
            full_cfg.defrost()
            full_cfg.DATASET.NUM_SHOTS = -1
            full = build_dataset(full_cfg)
            train, val = full.train_x, full.val or []
            if cfg.DATASET.NUM_SHOTS >= 1 and val:
                labels = [np.array([d.label for d in s]) for s in (train, val)]
                ti, vi = lpclip_sample(*labels, cfg.DATASET.NUM_SHOTS, cfg.SEED)
                train, val = [train[i] for i in ti], [val[i] for i in vi]
        if not val:
            raise ConfigError(
                f"The linear probe chooses C on a validation split, but {cfg.DATASET.NAME} "
                "has none here"
            )
        return train, val

    def fit(self) -> None:
        cfg = self.cfg
        opts = cfg.TRAINER.LINEARPROBECLIP
        shots, seed, name = cfg.DATASET.NUM_SHOTS, cfg.SEED, cfg.DATASET.NAME
        tfm_test = self.test_loader.dataset.transform  # every split: the test transform
        train, val = self.fewshot_sources()

        def features(source: list) -> Tuple[np.ndarray, np.ndarray]:
            feats = image_features_of(self, source, tfm_test).double().numpy()
            return feats, np.array([d.label for d in source])

        with torch.inference_mode():
            train_xy, val_xy = features(train), features(val)
            test_feats, test_labels = split_features(self, "test", self.test_loader)
        test_x = torch.cat(test_feats).double().cpu().numpy()
        test_y = torch.cat(test_labels).cpu().numpy()
        logger.info(
            f"Linear probe: {len(train)} training and {len(val)} validation images "
            f"({opts.SAMPLING} sampling), {len(test_y)} test images"
        )

        def on_step(step, c_left, c_right, acc_left, acc_right, clf, c) -> None:
            if step < 0:  # the coarse search's val accuracies, as lpclip prints them
                logger.info(f"{[float(a) for a in acc_left]}")
                return
            logger.info(f"{name}, {shots} Shot, Round {step}: {c_left}/{c_right}")
            logger.info(f"Val accuracy (Left): {100 * acc_left:.2f}")
            logger.info(f"Val accuracy (Right): {100 * acc_right:.2f}")
            test_acc = 100 * accuracy(clf, test_x, test_y)
            logger.info(f"Test Accuracy: {test_acc:.2f}")
            logger.info(f"{name}, seed {seed}, {shots} shot, weight {c}, test_acc {test_acc:.2f}")

        clf, c = search_c(train_xy, val_xy, opts.NUM_STEP, opts.MAX_ITER, on_step=on_step)
        self.model.set_from(clf, c)
        logger.info(f"Chosen C: {c}")

    # ------------------------------------------------------------------ inference
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(images)

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        if not self.model.fitted:
            raise NotFittedError(
                "LinearProbeCLIP has no fitted classifier: train it first, or evaluate a "
                "trained one with --eval-only --model-dir <run> --load-epoch <N>"
            )
        return self.model(features)

    def model_inference(self, image: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.logits_from_features(self.image_features(image))

    def clip_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.use_bf16 else self.clip_model.dtype

    def image_channels_last(self) -> bool:
        return self.image_encoder.channels_last

    def image_bn_folded(self) -> bool:
        return self.image_encoder.bn_folded

    def check_checkpoint(self, state_dict, path: str) -> None:
        weight = state_dict.get("weight")
        if not isinstance(weight, torch.Tensor) or "bias" not in state_dict:
            raise CheckpointError(
                f"{path} is not a linear-probe checkpoint: it has no 'weight' and 'bias' "
                f"(keys: {sorted(state_dict)})"
            )
        if weight.dim() == 2 and weight.shape[0] == self.num_classes:
            return
        rows = self.class_rows(state_dict)
        if weight.dim() != 2 or rows is None:
            raise CheckpointError(
                f"The checkpoint {path} does not fit this dataset: its classifier has shape "
                f"{tuple(weight.shape)}, for {self.num_classes} classes here"
                + ("" if "classnames" not in state_dict else " (not all of them among its classes)")
            )

    def class_rows(self, state_dict) -> Optional[List[int]]:
        """The rows of a saved classifier for this dataset's classes, by name (None: it
        lacks names or one of the classes)."""
        if not isinstance(state_dict.get("classnames"), torch.Tensor):
            return None
        index = {name: i for i, name in enumerate(decode_names(state_dict["classnames"]))}
        names = self.dm.dataset.classnames
        return [index[n] for n in names] if all(n in index for n in names) else None

    def prepare_loaded_state_dict(self, name, state_dict, path):
        state_dict = dict(state_dict)
        if state_dict["weight"].shape[0] != self.num_classes:
            # a classifier of more classes (ImageNet's for ImageNet-A/-R): this dataset's rows
            rows = self.class_rows(state_dict)
            logger.info(
                f"Using {len(rows)} of the {state_dict['weight'].shape[0]} classes of {path}"
            )
            state_dict["weight"] = state_dict["weight"][rows]
            state_dict["bias"] = state_dict["bias"][rows]
            state_dict["classnames"] = self.model.classnames
        return super().prepare_loaded_state_dict(name, state_dict, path)
