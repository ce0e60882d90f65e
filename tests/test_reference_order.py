"""A seeded ``coop-train`` CoOp run reproduces the original's random-number order bit for bit.

The original (CoOp ff61507 on Dassl c61a1b5) cannot run here, so this file carries a
separate, deliberately plain re-implementation of what a seeded original run does with
``DATALOADER.NUM_WORKERS 0`` and ``PREC fp32`` (protocol.md §a, §e, §f, §g). It imports
nothing of our trainer, engine, data manager, dataset classes, sampler or loader code: only
``coop.clip_adapter`` (``import_clip`` to reach the installed ``clip`` package, whose
``clip.model.build_model`` *is* the original's construction; ``tokenize``; ``token_length``)
and the ``coop.testing`` fixture builders. It does not use our ``load_clip`` either, so an
extra draw hidden in our loading path would show. Our side runs through the real command
line in-process (``coop.train.main``) with a thin wrapper around ``CoOp.forward_backward``
and ``CoOp.model_inference`` that only records what passes through.

Matched and compared, in the original's order:

1. ``random.seed / np.random.seed / torch.manual_seed`` once, first, never again.
2. Python ``random``: few-shot train sampling with K (labels in order of first appearance,
   ``random.sample`` when a class has >= K items, even == K; else all items in order), then
   val with min(K, 4). Compared with our few-shot cache file entry by entry.
3. torch generator: CLIP construction inside ``build_model`` (draws thrown away), then the
   context ``normal_(0, 0.02)`` of shape (n_ctx, D), or (n_cls, n_ctx, D) with CSC, or no
   draw with CTX_INIT. Compared: the initial context (``torch.equal``).
4. Each epoch: one int64 (DataLoader base seed), one int64 (``RandomSampler`` seed) ->
   ``randperm(N)`` on a private generator; consecutive batches, the last N mod bs indices
   dropped and never loaded when N >= bs (one batch of all N when N < bs); per sample in
   batch order: ``RandomResizedCrop`` draws, then the ``RandomHorizontalFlip`` draw.
   Compared: the image paths of every batch and every batch's image tensor (bitwise).
5. Constant warm-up (epoch 1 at 1e-5) then cosine (0.002 * ½(1 + cos(π(e-2)/E))), one rate
   per epoch. Compared: the rate in force at every step.
6. Forward numerics: image features / norm, text features from the prompt layout
   (end/middle/front) / norm, ``logit_scale.exp() * img @ txt.T`` (scale *before* the
   matmul), cross entropy, zero_grad, backward, SGD (momentum 0.9, wd 5e-4). Compared: every
   step's loss (``==`` on the Python floats) and the saved final context (``torch.equal``).
7. Final test: one int64 draw (test iterator), deterministic test transform. Compared: the
   test logits (bitwise) and the accuracy in ``results.json``.

``test_reference_detects_deviations`` shows the comparison has teeth: an extra draw, a
reseed per epoch, transforming the dropped samples, a sequential sampler or scaling the
logits after the matmul each change the reference's own trajectory.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image
from torch import nn
from torchvision.transforms import InterpolationMode

from coop.clip_adapter import import_clip, token_length, tokenize
from coop.testing.fixtures import make_caltech101
from coop.testing.tiny_clip import save_tiny_clip

REPO = Path(__file__).resolve().parents[1]
DATASET_CFG = REPO / "configs" / "datasets" / "caltech101.yaml"
TRAINER_CFG = REPO / "configs" / "trainers" / "CoOp" / "rn50.yaml"

# rn50.yaml / Dassl defaults used by the reference
SIZE = 32  # the tiny CLIPs' input resolution (INPUT.SIZE (32, 32))
PIXEL_MEAN = [0.48145466, 0.4578275, 0.40821073]
PIXEL_STD = [0.26862954, 0.26130258, 0.27577711]
BASE_LR = 0.002
WARMUP_CONS_LR = 1e-5
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
TEST_BATCH_SIZE = 100

Item = Tuple[str, int, str]  # (absolute image path, label, classname)


@dataclass(frozen=True)
class Case:
    seed: int = 1
    shots: int = 4
    epochs: int = 3
    batch_size: int = 32
    arch: str = "vit"
    csc: bool = False
    position: str = "end"
    ctx_init: str = ""
    n_ctx: int = 16

    def opts(self) -> List[str]:
        out = [
            "DATALOADER.TRAIN_X.BATCH_SIZE",
            str(self.batch_size),
            "TRAINER.COOP.N_CTX",
            str(self.n_ctx),
        ]
        if self.csc:
            out += ["TRAINER.COOP.CSC", "True"]
        if self.position != "end":
            out += ["TRAINER.COOP.CLASS_TOKEN_POSITION", self.position]
        if self.ctx_init:
            out += ["TRAINER.COOP.CTX_INIT", self.ctx_init]
        return out


CASES = {
    # 10 classes x 4 shots = 40 images: one step of 32 per epoch, 8 images never loaded
    "vit-seed1-k4": Case(seed=1, shots=4),
    # five steps of 8 per epoch, nothing dropped
    "vit-seed2-k4-bs8": Case(seed=2, shots=4, batch_size=8),
    # K=16 > 10 train items per class: all kept, no draw; 100 images -> 3 steps, 4 dropped
    "vit-seed1-k16": Case(seed=1, shots=16),
    "vit-seed2-k16-bs16": Case(seed=2, shots=16, batch_size=16),
    # N=10 < 32: one partial batch holding the whole permutation
    "vit-seed2-k1": Case(seed=2, shots=1),
    "vit-csc": Case(seed=2, shots=4, batch_size=8, csc=True),
    "vit-middle": Case(seed=1, shots=4, batch_size=8, position="middle"),
    "vit-front": Case(seed=2, shots=4, batch_size=16, position="front", n_ctx=4),
    "vit-ctx-init": Case(seed=1, shots=4, batch_size=8, ctx_init="a photo of a"),
    "resnet-seed1-k4-bs8": Case(seed=1, shots=4, batch_size=8, arch="resnet"),
}


# ------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def ref_data_root(tmp_path_factory) -> str:
    # 10 classes, 20 images each -> the split JSON holds 10 train / 4 val / 6 test per class
    return make_caltech101(str(tmp_path_factory.mktemp("ref_data")), n_per_class=20, seed=0)


@pytest.fixture(scope="module")
def ref_ckpts(tmp_path_factory) -> Dict[str, str]:
    folder = tmp_path_factory.mktemp("ref_clip")
    return {
        arch: save_tiny_clip(str(folder / f"{arch}.pt"), arch=arch) for arch in ("vit", "resnet")
    }


# ------------------------------------------------------------------------------------------
# the reference: the original's procedure written out step by step


def _read_split(root: str) -> Tuple[List[Item], List[Item], List[Item]]:
    """Dassl's ``read_split``: paths in the JSON are relative to the image folder."""
    dataset_dir = os.path.join(root, "caltech-101")
    image_dir = os.path.join(dataset_dir, "101_ObjectCategories")
    with open(os.path.join(dataset_dir, "split_zhou_Caltech101.json"), encoding="utf-8") as f:
        split = json.load(f)

    def items(key: str) -> List[Item]:
        return [
            (os.path.join(image_dir, rel), int(label), cname) for rel, label, cname in split[key]
        ]

    return items("train"), items("val"), items("test")


def _fewshot(items: List[Item], k: int) -> List[Item]:
    """Dassl's ``generate_fewshot_dataset`` for one source (repeat=False)."""
    if k < 1:
        return list(items)
    by_label: Dict[int, List[Item]] = {}
    for it in items:
        by_label.setdefault(it[1], []).append(it)
    out: List[Item] = []
    for group in by_label.values():
        out.extend(random.sample(group, k) if len(group) >= k else group)
    return out


def _epoch_lr(epoch: int, max_epoch: int) -> float:
    """The rate used during (1-based) epoch ``epoch``: constant warm-up W=1, then cosine."""
    if epoch == 1:
        return WARMUP_CONS_LR
    return BASE_LR * 0.5 * (1 + math.cos(math.pi * (epoch - 2) / max_epoch))


class _RefPrompts:
    """CoOp's PromptLearner state and layout, as plain tensors."""

    def __init__(self, case: Case, classnames: List[str], clip_model: nn.Module) -> None:
        dtype = clip_model.dtype
        n_cls = len(classnames)
        ctx_dim = clip_model.ln_final.weight.shape[0]
        if case.ctx_init:
            init = case.ctx_init.replace("_", " ")
            n_ctx = len(init.split(" "))
            with torch.no_grad():
                emb = clip_model.token_embedding(tokenize(init)).type(dtype)
            ctx = emb[0, 1 : 1 + n_ctx, :]  # always generic in the original, even with CSC
            prefix_words = init
        else:
            n_ctx = case.n_ctx
            shape = (n_cls, n_ctx, ctx_dim) if case.csc else (n_ctx, ctx_dim)
            ctx = torch.empty(*shape, dtype=dtype)
            nn.init.normal_(ctx, std=0.02)
            prefix_words = " ".join(["X"] * n_ctx)
        self.ctx = nn.Parameter(ctx)
        self.init_ctx = ctx.detach().clone()
        names = [name.replace("_", " ") for name in classnames]
        self.name_lens = [token_length(name) for name in names]
        prompts = [prefix_words + " " + name + "." for name in names]
        self.tokenized = torch.cat([tokenize(p) for p in prompts])
        with torch.no_grad():
            emb = clip_model.token_embedding(self.tokenized).type(dtype)
        self.prefix = emb[:, :1, :]
        self.suffix = emb[:, 1 + n_ctx :, :]
        self.n_cls, self.n_ctx, self.position = n_cls, n_ctx, case.position

    def __call__(self) -> torch.Tensor:
        ctx = self.ctx
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(self.n_cls, -1, -1)
        if self.position == "end":
            return torch.cat([self.prefix, ctx, self.suffix], dim=1)
        half = self.n_ctx // 2
        rows = []
        for i in range(self.n_cls):
            pre, c, suf, n = (
                self.prefix[i : i + 1],
                ctx[i : i + 1],
                self.suffix[i : i + 1],
                self.name_lens[i],
            )
            if self.position == "middle":
                parts = [pre, c[:, :half], suf[:, :n], c[:, half:], suf[:, n:]]
            else:  # front
                parts = [pre, suf[:, :n], c, suf[:, n:]]
            rows.append(torch.cat(parts, dim=1))
        return torch.cat(rows, dim=0)


def _text_features(
    clip_model: nn.Module, prompts: torch.Tensor, tokenized: torch.Tensor
) -> torch.Tensor:
    dtype = clip_model.dtype
    x = prompts + clip_model.positional_embedding.type(dtype)
    x = x.permute(1, 0, 2)
    x = clip_model.transformer(x)
    x = x.permute(1, 0, 2)
    x = clip_model.ln_final(x).type(dtype)
    return x[torch.arange(x.shape[0]), tokenized.argmax(dim=-1)] @ clip_model.text_projection


def _logits(
    clip_model: nn.Module, learner: _RefPrompts, images: torch.Tensor, scale_after: bool
) -> torch.Tensor:
    img = clip_model.visual(images.type(clip_model.dtype))
    txt = _text_features(clip_model, learner(), learner.tokenized)
    img = img / img.norm(dim=-1, keepdim=True)
    txt = txt / txt.norm(dim=-1, keepdim=True)
    scale = clip_model.logit_scale.exp()
    if scale_after:  # a deviation, for test_reference_detects_deviations only
        return scale * (img @ txt.t())
    return scale * img @ txt.t()


def _load(path: str, tfm: Any) -> torch.Tensor:
    return tfm(Image.open(path).convert("RGB"))


def _int64_draw() -> int:
    return int(torch.empty((), dtype=torch.int64).random_().item())


def reference_run(
    root: str, ckpt: str, case: Case, deviation: Optional[str] = None
) -> Dict[str, Any]:
    """The original's seeded CoOp run (0 workers, fp32) on the Caltech101 miniature.

    ``deviation`` (tests of the test only) introduces one departure from the original.
    """
    rec: Dict[str, Any] = {"impaths": [], "images": [], "lrs": [], "losses": [], "test_logits": []}

    # 1. seeding (train.py -> set_random_seed), before anything else
    random.seed(case.seed)
    np.random.seed(case.seed)
    torch.manual_seed(case.seed)

    # 2. dataset: split JSON, few-shot train with K then val with min(K, 4) (Python random)
    train, val, test = _read_split(root)
    train = _fewshot(train, case.shots)
    val = _fewshot(val, min(case.shots, 4))
    rec["train"], rec["val"] = train, val
    labels = sorted({it[1] for it in train})
    lab2cname = {it[1]: it[2] for it in train}
    classnames = [lab2cname[label] for label in labels]

    # transforms: no draws when built
    train_tfm = T.Compose(
        [
            T.RandomResizedCrop(
                (SIZE, SIZE), scale=(0.08, 1.0), interpolation=InterpolationMode.BICUBIC
            ),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(PIXEL_MEAN, PIXEL_STD),
        ]
    )
    test_tfm = T.Compose(
        [
            T.Resize(SIZE, interpolation=InterpolationMode.BICUBIC),
            T.CenterCrop((SIZE, SIZE)),
            T.ToTensor(),
            T.Normalize(PIXEL_MEAN, PIXEL_STD),
        ]
    )

    # 3. CLIP: load_clip_to_cpu (torch.jit.load fails on a plain state dict, then torch.load;
    # neither draws) -> build_model (construction draws) -> .float() for fp32; frozen and
    # left in eval mode. Then the context.
    import_clip()  # installs the pkg_resources shim `import clip` needs
    from clip.model import build_model

    clip_model = build_model(torch.load(ckpt, map_location="cpu", weights_only=True)).float()
    clip_model.requires_grad_(False)
    clip_model.eval()
    learner = _RefPrompts(case, classnames, clip_model)
    rec["init_ctx"] = learner.init_ctx
    if deviation == "extra_draw":  # e.g. an unneeded iterator or a val pass before training
        _int64_draw()

    optim = torch.optim.SGD(
        [learner.ctx],
        lr=BASE_LR,
        momentum=MOMENTUM,
        weight_decay=WEIGHT_DECAY,
        dampening=0,
        nesterov=False,
    )

    # 4. training
    n, bs = len(train), case.batch_size
    for epoch in range(1, case.epochs + 1):
        if deviation == "reseed_each_epoch":
            torch.manual_seed(case.seed + epoch)
        lr = _epoch_lr(epoch, case.epochs)
        for group in optim.param_groups:
            group["lr"] = lr
        _int64_draw()  # DataLoader iterator: worker base seed (unused with 0 workers)
        if deviation == "sequential_sampler":
            perm = list(range(n))
        else:
            gen = torch.Generator()
            gen.manual_seed(_int64_draw())  # RandomSampler seed, at the first batch request
            perm = torch.randperm(n, generator=gen).tolist()
        batches = [perm[i : i + bs] for i in range(0, n - bs + 1, bs)] if n >= bs else [perm]
        for idxs in batches:
            images = torch.stack([_load(train[i][0], train_tfm) for i in idxs])
            labels_t = torch.tensor([train[i][1] for i in idxs], dtype=torch.int64)
            logits = _logits(clip_model, learner, images, deviation == "scale_after_matmul")
            loss = F.cross_entropy(logits, labels_t)
            optim.zero_grad()
            loss.backward()
            optim.step()
            rec["impaths"].append([train[i][0] for i in idxs])
            rec["images"].append(images)
            rec["lrs"].append(lr)
            rec["losses"].append(loss.item())
        if deviation == "load_dropped":  # loading (and augmenting) the dropped tail
            for i in perm[len(batches) * bs :]:
                _load(train[i][0], train_tfm)
    rec["final_ctx"] = learner.ctx.detach().clone()

    # 5. final test with the last-epoch model
    with torch.no_grad():
        _int64_draw()  # test loader iterator
        correct = 0
        for start in range(0, len(test), TEST_BATCH_SIZE):
            chunk = test[start : start + TEST_BATCH_SIZE]
            images = torch.stack([_load(it[0], test_tfm) for it in chunk])
            logits = _logits(clip_model, learner, images, deviation == "scale_after_matmul")
            rec["test_logits"].append(logits)
            pred = logits.max(dim=1)[1]
            correct += int(pred.eq(torch.tensor([it[1] for it in chunk])).sum().item())
    rec["accuracy"] = 100.0 * correct / len(test)
    return rec


# ------------------------------------------------------------------------------------------
# our run, through the real command line


def our_run(
    root: str, ckpt: str, case: Case, out_dir: str, monkeypatch, fast: bool = False
) -> Dict[str, Any]:
    from coop.hosts import on_host
    from coop.train import main
    from coop.trainers.coop import CoOp as CoOpMethod

    CoOp = on_host(CoOpMethod)  # the class that runs on the bundled engine
    from coop.utils import close_logger

    rec: Dict[str, Any] = {"impaths": [], "images": [], "lrs": [], "losses": [], "test_logits": []}
    forward_backward = CoOp.forward_backward
    model_inference = CoOp.model_inference

    def recording_forward_backward(self, batch):
        if "init_ctx" not in rec:
            rec["init_ctx"] = self.model.prompt_learner.ctx.detach().clone()
        rec["impaths"].append(list(batch["impath"]))
        rec["images"].append(batch["img"].detach().clone())
        rec["lrs"].append(self.optim.param_groups[0]["lr"])
        summary = forward_backward(self, batch)
        rec["losses"].append(summary["loss"])
        return summary

    def recording_model_inference(self, input):
        output = model_inference(self, input)
        rec["test_logits"].append(output.detach().clone())
        return output

    monkeypatch.setattr(CoOp, "forward_backward", recording_forward_backward)
    monkeypatch.setattr(CoOp, "model_inference", recording_model_inference)
    cache_dir = os.path.join(out_dir, "cache")
    out = os.path.join(out_dir, "output")
    argv = [
        "--root", root,
        "--seed", str(case.seed),
        "--trainer", "CoOp",
        "--dataset-config-file", str(DATASET_CFG),
        "--config-file", str(TRAINER_CFG),
        "--output-dir", out,
        "DATASET.NUM_SHOTS", str(case.shots),
        "DATASET.CACHE_DIR", cache_dir,  # a fresh few-shot cache: our run draws the lists
        "MODEL.BACKBONE.NAME", ckpt,
        "INPUT.SIZE", f"({SIZE}, {SIZE})",
        "TRAINER.COOP.PREC", "fp32",
        "DATALOADER.NUM_WORKERS", "0",
        "OPTIM.MAX_EPOCH", str(case.epochs),
        "TRAIN.PRINT_FREQ", "1",
        # the plain path computes exactly what the original computes; the fast paths
        # (on by default) agree up to float rounding (test_fast_paths_match_reference)
        "FAST.ENABLED", str(fast),
        "FAST.EVAL_FEATURE_CACHE", "False",
        *case.opts(),
    ]  # fmt: skip
    try:
        rc = main(argv)
    finally:
        close_logger()
    assert rc == 0, f"coop-train failed with exit status {rc}"

    with open(
        os.path.join(
            cache_dir, "caltech-101", "split_fewshot", f"shot_{case.shots}-seed_{case.seed}.json"
        ),
        encoding="utf-8",
    ) as f:
        fewshot = json.load(f)
    dataset_dir = os.path.join(root, "caltech-101")
    for key in ("train", "val"):
        rec[key] = [
            (os.path.join(dataset_dir, rel), label, cname) for rel, label, cname in fewshot[key]
        ]
    ckpt_path = os.path.join(out, "prompt_learner", f"model.pth.tar-{case.epochs}")
    rec["final_ctx"] = torch.load(ckpt_path, map_location="cpu", weights_only=True)["state_dict"][
        "ctx"
    ]
    with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
        rec["accuracy"] = json.load(f)["metrics"]["accuracy"]
    return rec


# ------------------------------------------------------------------------------------------
# tests


def _norm(items: List[Item]) -> List[Tuple[str, int, str]]:
    return [(os.path.normpath(p), int(label), cname) for p, label, cname in items]


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_order(name, ref_data_root, ref_ckpts, tmp_path, monkeypatch):
    case = CASES[name]
    ckpt = ref_ckpts[case.arch]
    ref = reference_run(ref_data_root, ckpt, case)
    ours = our_run(ref_data_root, ckpt, case, str(tmp_path), monkeypatch)

    # Python random: few-shot train then val
    assert _norm(ours["train"]) == _norm(ref["train"]), "few-shot train list differs"
    assert _norm(ours["val"]) == _norm(ref["val"]), "few-shot val list differs"
    n_train = len(ref["train"])
    expected_steps = (n_train // case.batch_size if n_train >= case.batch_size else 1) * case.epochs
    assert len(ref["losses"]) == expected_steps

    # torch generator: CLIP construction, then the context draw
    assert ours["init_ctx"].shape == ref["init_ctx"].shape
    assert torch.equal(ours["init_ctx"], ref["init_ctx"]), "initial context differs"

    # per epoch: sampler permutation, drop_last, augmentation draws
    assert len(ours["impaths"]) == expected_steps, "number of training steps differs"
    for step, (a, b) in enumerate(zip(ours["impaths"], ref["impaths"])):
        assert [os.path.normpath(p) for p in a] == [os.path.normpath(p) for p in b], (
            f"step {step}: the batch holds other images (sampler order / drop_last)"
        )
    for step, (a, b) in enumerate(zip(ours["images"], ref["images"])):
        assert torch.equal(a, b), f"step {step}: augmented images differ (crop/flip draws)"

    # LR schedule: ours steps PyTorch's recursive cosine, the reference uses the closed
    # form; they agree to ~1e-15 relative (protocol.md §e), far below float32 resolution.
    assert ours["lrs"] == pytest.approx(ref["lrs"], rel=1e-12, abs=0)

    # numerics: every loss and the final context, bitwise
    assert ours["losses"] == ref["losses"], "loss trajectory differs"
    assert torch.equal(ours["final_ctx"], ref["final_ctx"]), "final context differs"

    # final test
    ours_logits = torch.cat(ours["test_logits"])
    ref_logits = torch.cat(ref["test_logits"])
    assert torch.equal(ours_logits, ref_logits), "test logits differ"
    assert ours["accuracy"] == ref["accuracy"]


@pytest.mark.parametrize(
    "name", ["vit-seed2-k4-bs8", "vit-csc", "vit-middle", "resnet-seed1-k4-bs8"]
)
def test_fast_paths_match_reference(name, ref_data_root, ref_ckpts, tmp_path, monkeypatch):
    """With the default fast paths the run draws the same random numbers (same shots, same
    augmented batches) and its numbers agree with the original's up to float rounding."""
    case = CASES[name]
    ckpt = ref_ckpts[case.arch]
    ref = reference_run(ref_data_root, ckpt, case)
    ours = our_run(ref_data_root, ckpt, case, str(tmp_path), monkeypatch, fast=True)
    assert _norm(ours["train"]) == _norm(ref["train"])
    assert torch.equal(ours["init_ctx"], ref["init_ctx"])
    assert len(ours["images"]) == len(ref["images"])
    for a, b in zip(ours["images"], ref["images"]):
        assert torch.equal(a, b)
    assert ours["losses"] == pytest.approx(ref["losses"], rel=1e-4, abs=1e-5)
    assert torch.allclose(ours["final_ctx"], ref["final_ctx"], rtol=1e-4, atol=1e-5)
    ours_logits = torch.cat(ours["test_logits"])
    ref_logits = torch.cat(ref["test_logits"])
    assert torch.allclose(ours_logits, ref_logits, rtol=1e-4, atol=1e-3)


DEVIATIONS = [
    "extra_draw",
    "reseed_each_epoch",
    "load_dropped",
    "sequential_sampler",
    "scale_after_matmul",
]


def test_reference_detects_deviations(ref_data_root, ref_ckpts):
    """Each listed departure from the original changes the trajectory the tests compare."""
    case = Case(seed=1, shots=4)  # 40 images, bs 32: 8 dropped per epoch
    faithful = reference_run(ref_data_root, ref_ckpts["vit"], case)
    again = reference_run(ref_data_root, ref_ckpts["vit"], case)
    assert again["losses"] == faithful["losses"]  # deterministic
    assert torch.equal(again["final_ctx"], faithful["final_ctx"])
    for deviation in DEVIATIONS:
        other = reference_run(ref_data_root, ref_ckpts["vit"], case, deviation=deviation)
        assert other["losses"] != faithful["losses"], f"{deviation} went unnoticed"
        assert not torch.equal(other["final_ctx"], faithful["final_ctx"]), deviation
