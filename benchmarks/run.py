#!/usr/bin/env python
"""Speed and memory benchmarks: the plain path (what the original CoOp computes) against the
fast path (the ``FAST`` defaults), side by side in one process.

    python benchmarks/run.py [--quick] [--device cpu|cuda] [--cases a,b,...] [--json OUT]

Every case times both paths with interleaved repetitions after a warm-up and reports medians,
the ratio, its target and PASS/FAIL; the last line is ``SUMMARY: k/n targets met``. The full
run builds random-weight CLIP models of the real RN50 and ViT-B/16 shapes (nothing is
downloaded); ``--quick`` uses narrow models whose image/text cost balance is the real one.
See benchmarks/README.md for what each case measures.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import io
import json
import math
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = (
    "train_step_100",
    "train_step_1000",
    "text_fraction",
    "eval_1000",
    "cocoop",
    "eval_warm",
    "linear_probe",
    "sweep",
    "eval_process",
    "memory_1000",
    "deep_prompts",
)

# --------------------------------------------------------------------------------------------
# Model shapes


@dataclass(frozen=True)
class Shape:
    """A CLIP architecture (positional arguments of ``clip.model.CLIP``) and its batch sizes."""

    name: str
    # embed dim, resolution, vision layers, vision width, patch (None = ResNet), context
    # length, vocab size, text width, text heads, text layers
    clip_args: Tuple[Any, ...]
    batch: int  # training batch
    test_batch: int  # CoOp's test batch (its configs), 4x smaller in the miniatures

    @property
    def resolution(self) -> int:
        return int(self.clip_args[1])


# The real shapes (clip.md section 2): context 77, vocab 49408, text 512 wide, 8 heads, 12 layers.
FULL_SHAPES = {
    "RN50": Shape("RN50", (1024, 224, (3, 4, 6, 3), 64, None, 77, 49408, 512, 8, 12), 32, 100),
    "ViT-B/16": Shape("ViT-B/16", (512, 224, 12, 768, 16, 77, 49408, 512, 8, 12), 32, 100),
}
# Narrow stand-ins for a CPU. Per image / per 77-token prompt (forward FLOPs) the real RN50
# costs 11.6 / 5.8 GFLOP (ratio 2.0) and ViT-B/16 33.7 / 5.8 (5.8). The quick models use a
# 4x smaller batch, so their image/prompt ratio is 4x the real one (7.9 and 24): a training
# batch then weighs against the class prompts exactly as in the real models.
QUICK_SHAPES = {
    "RN50": Shape("RN50-mini", (256, 128, (3, 4, 6, 3), 32, None, 77, 49408, 128, 2, 4), 8, 25),
    "ViT-B/16": Shape("ViT-B/16-mini", (256, 160, 8, 384, 16, 77, 49408, 128, 2, 4), 8, 25),
}
# The checkpoint that coop.train.main runs with in --quick (eval_warm, sweep): a 64 px
# RN-like model whose prompt costs ~5x an image (0.73 vs 0.15 GFLOP), so that on the
# 10-class miniature with batch 32 a step balances images against prompts as the real RN50
# does on Caltech101's 100 classes.
QUICK_RUN_CLIP = dict(
    arch="resnet",
    embed_dim=256,
    image_resolution=64,
    vision_width=32,
    vision_layers=(1, 2, 2, 1),
    text_width=256,
    text_layers=6,
)
FULL_RUN_CLIP = dict(
    arch="resnet",
    embed_dim=1024,
    image_resolution=224,
    vision_width=64,
    vision_layers=(3, 4, 6, 3),
    text_width=512,
    text_layers=12,
)

# Epochs of the official CoOp schedules (1 shot: 50, 2/4 shots: 100, 8/16 shots: 200) and
# the default number of cached training views; the sweep divides both by SWEEP_DIV, so that
# each cached view is reused over as many epochs as in the official schedule (5 to 20).
# CoCoOp's fast path against the original's per-image loop: it must gain at least this much
COCOOP_TARGET = 2.0

SHOTS = (1, 2, 4, 8, 16)
SEEDS = (1, 2, 3)
OFFICIAL_EPOCHS = {1: 50, 2: 100, 4: 100, 8: 200, 16: 200}
OFFICIAL_VIEWS = 10
SWEEP_DIV = 10


@dataclass
class Plan:
    quick: bool
    device: torch.device
    shapes: Dict[str, Shape]
    n_small: int  # "100 classes"
    n_large: int  # "1000 classes" (smaller in --quick)
    n_eval: int  # classes of the cold evaluation
    eval_batches: int  # test batches of the cold evaluation
    reps: int
    warmup: int
    run_clip: Dict[str, Any]
    sweep_classes: int
    sweep_per_class: int
    warm_per_class: int
    warm_classes: int
    workers: int
    threads: int = 0
    sweep_seeds: Tuple[int, ...] = SEEDS
    fast_opts: Tuple[str, ...] = ()  # extra config opts of every fast path (--fast-opt)
    tmp: str = ""
    _clips: Dict[Tuple[str, str], Any] = field(default_factory=dict)
    _memory: Dict[Tuple[str, bool], Any] = field(default_factory=dict)
    _plain_small: Dict[str, Tuple[float, float]] = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def prec(self) -> str:
        return "fp16" if self.cuda else "fp32"


def make_plan(quick: bool, device: str) -> Plan:
    dev = torch.device(device)
    if quick:
        return Plan(
            quick=True,
            device=dev,
            shapes=QUICK_SHAPES,
            n_small=100,
            n_large=300,
            n_eval=300,
            eval_batches=3,
            reps=3,
            warmup=1,
            run_clip=QUICK_RUN_CLIP,
            sweep_classes=10,
            sweep_per_class=34,  # 17 train (>= 16 shots), 7 val, 10 test per class
            warm_classes=10,
            warm_per_class=170,  # 510 test images
            workers=0,
        )
    return Plan(
        quick=False,
        device=dev,
        shapes=FULL_SHAPES,
        n_small=100,
        n_large=1000,
        n_eval=1000,
        eval_batches=10,
        reps=7,
        warmup=2,
        run_clip=FULL_RUN_CLIP,
        sweep_classes=100,
        sweep_per_class=34,  # 1000 test images
        warm_classes=100,
        warm_per_class=34,
        workers=8 if dev.type == "cuda" else 0,
    )


# --------------------------------------------------------------------------------------------
# Class names: 1-4 words in the style of ImageNet / Caltech101 class names

_NOUNS = """tench goldfinch shark hen ostrich brambling junco bulbul jay magpie chickadee kite
eagle vulture owl salamander newt frog turtle gecko iguana chameleon lizard alligator
triceratops snake boa python cobra viper rattlesnake trilobite scorpion tarantula tick
centipede grouse peacock quail partridge parrot macaw cockatoo lorikeet hornbill hummingbird
toucan drake goose swan tusker echidna platypus wallaby koala wombat jellyfish anemone coral
flatworm nematode conch snail slug chiton nautilus crab lobster crayfish isopod stork
spoonbill flamingo heron egret bittern crane limpkin gallinule coot bustard turnstone
sandpiper redshank dowitcher oystercatcher pelican penguin albatross whale dugong terrier
retriever spaniel setter pointer sheepdog collie poodle mastiff schnauzer beagle bloodhound
dalmatian husky pug chihuahua vizsla schipperke keeshond affenpinscher accordion anchor
barrel binocular bonsai camera cannon chair chandelier cup ewer ferry gramophone headphone
helicopter ketch lamp laptop mandolin menorah metronome minaret pagoda pizza pyramid revolver
saxophone schooner scissors stapler umbrella watch wheelchair wrench airliner ambulance
backpack bakery balloon banjo barometer bathtub beacon bicycle birdhouse bobsled bookcase
bottlecap breakwater broom bucket buckle canoe cardigan carousel cassette castle catamaran
cauldron cello chainsaw chime cinema cloak cocktail convertible corkscrew cornet cradle
crutch cuirass dam desk dishwasher dome drum dumbbell envelope espresso fireboat flagpole
flute forklift fountain gondola guillotine hamper hammer handkerchief harmonica harp hatchet
hourglass jeep jigsaw kimono lawnmower lifeboat limousine lipstick loupe maraca marimba
maypole microwave minivan mitten monastery mortarboard mosque muzzle obelisk oboe odometer
organ padlock palace parachute pedestal pinwheel planetarium plunger poncho projector puck
quilt racket radiator rifle sandal sarong scabbard seatbelt shovel snorkel sombrero syringe
teapot thimble toaster tractor trombone tripod turnstile typewriter viaduct violin waffle
wardrobe whistle yawl yurt""".split()
_MODIFIERS = """great white black red blue green golden silver grey brown spotted striped common
American European African Indian Japanese Chinese Mexican German English Irish Scottish
French Italian Siberian Egyptian Persian giant little lesser king sea water wild electric
grand ceiling soccer stop joshua inline windsor cowboy rocking sports police steel wooden
paper space tree rock snow fire garden mountain desert long-horned three-toed ring-tailed
bull hammerhead""".split()


# Caltech101's 100 classes as CoOp names them (label order of its split file, underscores
# become spaces in the prompt learner): the paper's 100-class dataset.
CALTECH101_CLASSNAMES = [
    n.replace("_", " ")
    for n in """face leopard motorbike accordion airplane anchor ant barrel bass beaver binocular
bonsai brain brontosaurus buddha butterfly camera cannon car_side ceiling_fan cellphone chair
chandelier cougar_body cougar_face crab crayfish crocodile crocodile_head cup dalmatian
dollar_bill dolphin dragonfly electric_guitar elephant emu euphonium ewer ferry flamingo
flamingo_head garfield gerenuk gramophone grand_piano hawksbill headphone hedgehog helicopter
ibis inline_skate joshua_tree kangaroo ketch lamp laptop llama lobster lotus mandolin mayfly
menorah metronome minaret nautilus octopus okapi pagoda panda pigeon pizza platypus pyramid
revolver rhino rooster saxophone schooner scissors scorpion sea_horse snoopy soccer_ball
stapler starfish stegosaurus stop_sign strawberry sunflower tick trilobite umbrella watch
water_lilly wheelchair wild_cat windsor_chair wrench yin_yang""".split()
]


def benchmark_classnames(n: int) -> List[str]:
    """The class names of an ``n``-class case: Caltech101's own at 100 classes, otherwise
    ImageNet-style synthetic names (``make_classnames``)."""
    if n == len(CALTECH101_CLASSNAMES):
        return list(CALTECH101_CLASSNAMES)
    return make_classnames(n)


def make_classnames(n: int, seed: int = 0) -> List[str]:
    """``n`` distinct class names of 1-4 words (40% / 35% / 18% / 7%), deterministic."""
    rng = random.Random(seed)
    names: List[str] = []
    seen = set()
    while len(names) < n:
        k = rng.choices((1, 2, 3, 4), weights=(40, 35, 18, 7))[0]
        words = rng.sample(_MODIFIERS, k - 1) + [rng.choice(_NOUNS)]
        name = " ".join(words)
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def name_token_stats(names: Sequence[str]) -> Tuple[float, int]:
    from coop.clip_adapter import token_length

    lens = [token_length(n) for n in names]
    return sum(lens) / len(lens), max(lens)


# --------------------------------------------------------------------------------------------
# Building the real model classes


def build_clip(plan: Plan, shape: Shape, copy: str = ""):
    """A random-weight ``clip.model.CLIP`` built like ``build_model`` (fp16 weights via
    ``convert_weights``) on cuda, fp32 on the CPU; eval mode, on the plan's device. Each
    ``copy`` name gets its own instance with the same weights (the fast path converts a
    ResNet image encoder to channels-last in place, which must not reach the plain one)."""
    key = (shape.name, copy)
    if key in plan._clips:
        return plan._clips[key]
    from coop.clip_adapter import import_clip

    import_clip()
    from clip.model import CLIP, convert_weights

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIP(*shape.clip_args)
    if plan.cuda:
        convert_weights(model)  # PREC fp16, as the paper
    model = model.eval().to(plan.device)
    plan._clips[key] = model
    return model


def build_coop(plan: Plan, clip_model, shape: Shape, classnames: Sequence[str], fast: bool):
    """``CustomCLIP`` through the real class, frozen like the CoOp trainer; returns
    (model, optimizer). Only the prompt learner is trainable; the encoders stay in eval."""
    from coop.trainers.coop import CustomCLIP

    opts = {"N_CTX": 16, "CSC": False, "CTX_INIT": "", "CLASS_TOKEN_POSITION": "end"}
    return _build_method(plan, clip_model, shape, classnames, fast, CustomCLIP, "COOP", opts)


def build_cocoop(
    plan: Plan,
    clip_model,
    shape: Shape,
    classnames: Sequence[str],
    fast: bool,
    extra: Sequence[str] = (),
):
    """CoCoOp's ``CustomCLIP`` as its protocol's YAML sets it (4 context tokens from "a photo
    of a"), frozen like the trainer, with the config opts ``extra`` on the fast path;
    returns (model, optimizer)."""
    from coop.trainers.cocoop import CustomCLIP

    opts = {"N_CTX": 4, "CTX_INIT": "a photo of a"}
    return _build_method(
        plan, clip_model, shape, classnames, fast, CustomCLIP, "COCOOP", opts, extra
    )


def _build_method(plan, clip_model, shape, classnames, fast, custom_clip, node, opts, extra=()):
    from coop.optim import build_optimizer

    cfg = _method_cfg(plan, shape, fast, node, opts, extra)

    def learnable(name: str) -> bool:
        return "prompt_learner" in name

    model = _build_model(plan, clip_model, custom_clip, cfg, classnames, learnable)
    model.eval()
    model.prompt_learner.train()
    optim = build_optimizer(model.prompt_learner, cfg.OPTIM)
    return model, optim


def _method_cfg(plan, shape, fast, node, opts=None, extra=()):
    """The frozen config of a method's model at ``shape``: its node ``TRAINER.<node>`` in
    the plan's precision with ``opts``; on the fast path the plan's ``--fast-opt`` and the
    case's ``extra`` options."""
    from coop.config import get_cfg_default, merge_from_list

    cfg = get_cfg_default()
    cfg.INPUT.SIZE = (shape.resolution, shape.resolution)
    cfg.FAST.ENABLED = fast
    cfg.TRAINER[node].PREC = plan.prec
    for key, value in (opts or {}).items():
        cfg.TRAINER[node][key] = value
    if fast and (plan.fast_opts or extra):
        merge_from_list(cfg, list(plan.fast_opts), where="--fast-opt")
        merge_from_list(cfg, list(extra), where="the benchmark case")
    cfg.freeze()
    return cfg


def _build_model(plan, clip_model, custom_clip, cfg, classnames, learnable):
    """``custom_clip(cfg, classnames, clip_model)`` built as its trainer builds it (the
    prompt learner embeds its tokens on the CPU, before ``.to(device)``; the random stream
    left as it was), the parameters whose name ``learnable`` refuses frozen, on the device."""
    emb = clip_model.token_embedding
    emb.to("cpu")
    try:
        with torch.random.fork_rng(devices=[]):
            model = custom_clip(cfg, list(classnames), clip_model)
    finally:
        emb.to(plan.device)
    for name, param in model.named_parameters():
        if not learnable(name):
            param.requires_grad_(False)
    return model.to(plan.device)


def batch_for(plan: Plan, shape: Shape, n: int, n_cls: int):
    g = torch.Generator().manual_seed(0)
    r = shape.resolution
    images = torch.randn(n, 3, r, r, generator=g).to(plan.device)
    labels = torch.randint(0, n_cls, (n,), generator=g).to(plan.device)
    return images, labels


def train_step_fn(model, optim, images, labels) -> Callable[[], None]:
    """One CoOp step as ``CoOp.forward_backward`` (PREC fp16/fp32): forward, CE, zero_grad,
    backward, SGD step, loss.item()."""

    def step() -> None:
        output = model(images)
        loss = F.cross_entropy(output, labels)
        optim.zero_grad()
        loss.backward()
        optim.step()
        loss.item()

    return step


def image_forward_fn(model, images) -> Callable[[], None]:
    """The image side of ``model`` alone: its frozen encoder's forward (as that path runs it,
    e.g. channels-last) and the normalisation, without gradient tracking."""

    def fwd() -> None:
        with torch.no_grad():
            model.encode_image(images)

    return fwd


def text_forward_backward_fn(model, weight: torch.Tensor) -> Callable[[], None]:
    """Forward and backward of the class text features alone (into the context)."""

    def fn() -> None:
        model.prompt_learner.ctx.grad = None
        tf = model.text_features()
        (tf.float() * weight).sum().backward()

    return fn


def eval_fns(mp, mf, images: torch.Tensor, nb: int) -> Dict[str, Callable[[], None]]:
    """A cold evaluation of ``nb`` test batches: plain (text features recomputed for every
    batch, as the original) and fast (text once per evaluation); and its two parts."""

    def plain() -> None:
        with torch.no_grad():
            for _ in range(nb):
                mp(images).argmax(dim=1)

    def fast() -> None:
        with torch.no_grad(), mf.frozen_text_features():
            for _ in range(nb):
                mf(images).argmax(dim=1)

    def text() -> None:
        with torch.no_grad():
            mf.text_features()

    def img() -> None:
        with torch.no_grad():
            mf.encode_image(images)

    return {"plain": plain, "fast": fast, "text": text, "img": img}


# --------------------------------------------------------------------------------------------
# Timing


def sync(plan: Plan) -> None:
    if plan.cuda:
        torch.cuda.synchronize(plan.device)


def progress(total: int, desc: str):
    """A progress bar on stderr for long cases (a full-size CPU case runs for minutes before
    its row prints); off where stderr is not a terminal, so logs hold only the rows."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, disable=None, file=sys.stderr)


def bench(
    plan: Plan,
    fns: Dict[str, Callable[[], None]],
    reps: int = 0,
    warmup: int = -1,
    desc: str = "",
):
    """Median seconds per function: warm-up rounds, then ``reps`` interleaved rounds whose
    order alternates (a, b, c / c, b, a / ...). Returns {name: (median, [times])}."""
    reps = reps or plan.reps
    warmup = plan.warmup if warmup < 0 else warmup
    names = list(fns)
    with progress((warmup + reps) * len(names), desc or "timing") as bar:
        for _ in range(warmup):
            for n in names:
                fns[n]()
                sync(plan)
                bar.update()
        times: Dict[str, List[float]] = {n: [] for n in names}
        for r in range(reps):
            for n in names if r % 2 == 0 else names[::-1]:
                sync(plan)
                t0 = time.perf_counter()
                fns[n]()
                sync(plan)
                times[n].append(time.perf_counter() - t0)
                bar.update()
    return {n: (statistics.median(t), t) for n, t in times.items()}


# --------------------------------------------------------------------------------------------
# Result rows


def row(
    case: str,
    setting: str,
    plain: Optional[float],
    fast: Optional[float],
    value: Optional[float],
    target: Optional[Tuple[str, float]],
    unit: str = "s",
    value_fmt: str = "{:.2f}x",
    note: str = "",
    skip: str = "",
) -> Dict[str, Any]:
    """One printed line. ``value`` is compared with ``target`` = (">=" or "<=", bound)."""
    passed: Optional[bool] = None
    if skip:
        result = f"SKIP ({skip})"
    elif target is None or value is None:
        result = "-"
    else:
        op, bound = target
        passed = value >= bound if op == ">=" else value <= bound
        result = "PASS" if passed else "FAIL"
    return dict(
        case=case,
        setting=setting,
        plain=plain,
        fast=fast,
        unit=unit,
        value=value,
        value_fmt=value_fmt,
        target=list(target) if target else None,
        passed=passed,
        result=result,
        note=note,
    )


def _fmt_amount(x: Optional[float], unit: str) -> str:
    if x is None:
        return "-"
    if unit == "B":
        return f"{x / 2**20:.1f} MiB"
    if x >= 100:
        return f"{x:.1f} s"
    if x >= 1:
        return f"{x:.3f} s"
    return f"{x * 1e3:.1f} ms"


def print_row(r: Dict[str, Any]) -> None:
    val = "-" if r["value"] is None else r["value_fmt"].format(r["value"])
    tgt = "-"
    if r["target"]:
        op, bound = r["target"]
        tgt = f"{op} " + r["value_fmt"].format(bound)
    line = (
        f"{r['case']:<16} {r['setting']:<38} {_fmt_amount(r['plain'], r['unit']):>11} "
        f"{_fmt_amount(r['fast'], r['unit']):>11} {val:>9} {tgt:>9}  {r['result']}"
    )
    print(line, flush=True)
    if r["note"]:
        print(f"{'':<17}  {r['note']}", flush=True)


HEADER = (
    f"{'case':<16} {'setting':<38} {'plain':>11} {'fast':>11} {'ratio':>9} {'target':>9}  result"
)


# --------------------------------------------------------------------------------------------
# Cases: model-level timing


class _Models:
    """Plain and fast CustomCLIPs sharing one CLIP per shape and class count."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.cache: Dict[Tuple[str, int], Any] = {}

    def get(self, key: str, n_cls: int):
        k = (key, n_cls)
        if k not in self.cache:
            shape = self.plan.shapes[key]
            names = benchmark_classnames(n_cls)
            plain = build_coop(self.plan, build_clip(self.plan, shape), shape, names, False)
            fast = build_coop(self.plan, build_clip(self.plan, shape, "fast"), shape, names, True)
            self.cache[k] = (shape, names, plain, fast)
        return self.cache[k]

    def clear(self) -> None:
        self.cache.clear()
        gc.collect()
        if self.plan.cuda:
            torch.cuda.empty_cache()


def case_train_step(plan: Plan, models: _Models, large: bool) -> Dict[str, Any]:
    case = "train_step_1000" if large else "train_step_100"
    n_cls = plan.n_large if large else plan.n_small
    targets = {("RN50", False): 2.5, ("RN50", True): 8.0, ("ViT-B/16", False): 2.0}
    rows, info = [], {}
    for key in plan.shapes:
        shape, names, (mp, op), (mf, of) = models.get(key, n_cls)
        images, labels = batch_for(plan, shape, shape.batch, n_cls)
        no_fit = plain_does_not_fit(plan, key) if large else ""
        fns = {"fast": train_step_fn(mf, of, images, labels)}
        if not no_fit:
            fns["plain"] = train_step_fn(mp, op, images, labels)
        fns["image"] = image_forward_fn(mf, images)
        if not large:
            fns["image_plain"] = image_forward_fn(mp, images)
        t = bench(
            plan, fns, desc=f"{'train_step_1000' if large else 'train_step_100'} {shape.name}"
        )
        tf, ti = t["fast"][0], t["image"][0]
        mean_len, max_len = name_token_stats(names)
        setting = f"{shape.name} {n_cls} cls b{shape.batch}"
        tgt = targets.get((key, large))
        info[setting] = {n: v[1] for n, v in t.items()}
        if no_fit:
            rows.append(
                row(
                    case,
                    setting,
                    None,
                    tf,
                    None,
                    (">=", tgt) if tgt else None,
                    note=f"fast step {_fmt_amount(tf, 's')}, image forward alone "
                    f"{_fmt_amount(ti, 's')}; see memory_1000"
                    + _extrapolated_plain(plan, key, n_cls, tf),
                    skip=no_fit,
                )
            )
            continue
        tp = t["plain"][0]
        rows.append(
            row(
                case,
                setting,
                tp,
                tf,
                tp / tf,
                (">=", tgt) if tgt else None,
                note=f"text mode {mf.text_mode}; name tokens mean {mean_len:.1f} max {max_len}; "
                f"bound if text were free (plain / image fwd) {tp / ti:.1f}x",
            )
        )
        if not large:
            plan._plain_small[key] = (tp, t["image_plain"][0])
            rows.append(
                row(
                    case,
                    f"{shape.name} fast step / image fwd",
                    ti,
                    tf,
                    tf / ti,
                    ("<=", 1.15),
                    value_fmt="{:.2f}",
                    note="'plain' column = the fast path's image forward alone (no_grad), the "
                    f"physical limit; {_image_side_note(mf)}the image forward as the original "
                    f"runs it takes {_fmt_amount(t['image_plain'][0], 's')} "
                    f"(fast step / that = {tf / t['image_plain'][0]:.2f})",
                )
            )
    return {"rows": rows, "times": info}


def speedup_row(
    case: str, setting: str, t: Dict[str, Any], target: Tuple[str, float], note: str, info: Dict
) -> Dict[str, Any]:
    """The row of ``bench``'s timings ``t`` of "plain" against "fast" at ``setting``; every
    timing's details go to ``info[setting]``."""
    info[setting] = {n: v[1] for n, v in t.items()}
    tp, tf = t["plain"][0], t["fast"][0]
    return row(case, setting, tp, tf, tp / tf, target, note=note)


def _extrapolated_plain(plan: Plan, key: str, n_cls: int, fast: float) -> str:
    """An estimate (never judged) of a plain step that cannot run here: its text side grows
    linearly with the class count, so scale the measured 100-class plain text side."""
    if key not in plan._plain_small:
        return ""
    step, image = plan._plain_small[key]
    est = image + (step - image) * n_cls / plan.n_small
    return (
        f"; the plain step extrapolated from {plan.n_small} classes (text side x "
        f"{n_cls // plan.n_small}): ~{_fmt_amount(est, 's')}, i.e. ~{est / fast:.1f}x"
    )


def _image_side_note(model) -> str:
    return "channels-last ResNet encoder; " if getattr(model, "channels_last", False) else ""


def case_text_fraction(plan: Plan, models: _Models) -> Dict[str, Any]:
    rows, info = [], {}
    for key in plan.shapes:
        shape, names, (mp, _), (mf, _) = models.get(key, plan.n_small)
        images, _ = batch_for(plan, shape, shape.batch, plan.n_small)
        g = torch.Generator().manual_seed(1)
        weight = torch.randn(len(names), mf.text_features().shape[-1], generator=g)
        weight = weight.to(plan.device)

        t = bench(
            plan,
            {
                "fast_text": text_forward_backward_fn(mf, weight),
                "plain_text": text_forward_backward_fn(mp, weight),
                "image": image_forward_fn(mf, images),
            },
            desc=f"text_fraction {shape.name}",
        )
        ti, tft, tpt = t["image"][0], t["fast_text"][0], t["plain_text"][0]
        rows.append(
            row(
                "text_fraction",
                f"{shape.name} {plan.n_small} cls text / img b{shape.batch}",
                tpt,
                tft,
                tft / ti,
                ("<=", 0.15),
                value_fmt="{:.3f}",
                note=f"text fwd+bwd (plain/fast) vs image fwd {_fmt_amount(ti, 's')}; "
                f"ratio = fast text / image fwd (plain text / image = {tpt / ti:.2f})",
            )
        )
        info[shape.name] = {n: v[1] for n, v in t.items()}
    return {"rows": rows, "times": info}


def case_eval_1000(plan: Plan, models: _Models) -> Dict[str, Any]:
    """A cold evaluation at 1000 classes, judged at the targets' batch (the training batch,
    32 at full size; Dassl's default test batch too) and reported, unjudged, at CoOp's own test
    batch (100), where the image side weighs ~3x more against the per-batch class prompts."""
    rows, info = [], {}
    n_cls = plan.n_eval
    for key in plan.shapes:
        shape, _, (mp, _), (mf, _) = models.get(key, n_cls)
        for batch, judged in ((shape.batch, True), (shape.test_batch, False)):
            images, _ = batch_for(plan, shape, batch, n_cls)
            nb = plan.eval_batches
            t = bench(
                plan,
                eval_fns(mp, mf, images, nb),
                reps=min(plan.reps, 3 if plan.quick else 5),
                # the quick models ran in train_step_1000 already
                warmup=min(plan.warmup, 0 if plan.quick else 1),
                desc=f"eval_1000 {shape.name} b{batch}",
            )
            tp, tf = t["plain"][0], t["fast"][0]
            # extrapolation to an ImageNet-sized split (50,000 images), per-batch costs as
            # measured
            big = math.ceil(50000 / batch)
            per_plain, per_img = tp / nb, t["img"][0]
            ratio_big = per_plain * big / (t["text"][0] + per_img * big)
            setting = f"{shape.name} {n_cls} cls {nb}x{batch} imgs"
            why = "" if judged else f"CoOp's test batch {batch}, not judged; "
            rows.append(
                row(
                    "eval_1000",
                    setting,
                    tp,
                    tf,
                    tp / tf,
                    (">=", 3.0) if judged else None,
                    note=f"{why}cold (no feature cache); fast text once "
                    f"{_fmt_amount(t['text'][0], 's')}, image batch {_fmt_amount(per_img, 's')}; "
                    f"bound if text were free {tp / (nb * per_img):.1f}x; for 50k images "
                    f"~{ratio_big:.1f}x",
                )
            )
            info[setting] = {n: v[1] for n, v in t.items()}
    models.clear()
    return {"rows": rows, "times": info}


# --------------------------------------------------------------------------------------------
# Deep prompts (MaPLe): the text side truncated, and computed once per evaluation


def build_deep(plan: Plan, clip_model, shape: Shape, classnames: Sequence[str], fast: bool):
    """MaPLe's ``CustomCLIP`` through the real class (prompt depth 9), trained as the MaPLe
    trainer trains it; returns (model, optimizer over the whole model)."""
    from coop.optim import build_optimizer
    from coop.trainers.maple import CustomCLIP, MaPLe

    cfg = _method_cfg(plan, shape, fast, "MAPLE")

    def learnable(name: str) -> bool:
        return MaPLe.is_learnable(None, name)

    model = _build_model(plan, clip_model, CustomCLIP, cfg, classnames, learnable)
    return model, build_optimizer(model, cfg.OPTIM)


def case_deep_prompts(plan: Plan) -> Dict[str, Any]:
    """MaPLe on the ViT shape at 100 classes: a training step (the text side truncated after
    the last end-of-text token) and a cold evaluation (text features once, not per batch)."""
    rows, info = [], {}
    key = "ViT-B/16"
    shape = plan.shapes[key]
    names = benchmark_classnames(plan.n_small)
    clip_model = build_clip(plan, shape, "deep")
    (mp, op), (mf, of) = (build_deep(plan, clip_model, shape, names, f) for f in (False, True))
    images, labels = batch_for(plan, shape, shape.batch, plan.n_small)
    mp.train(), mf.train()
    t = bench(
        plan,
        {
            "plain": train_step_fn(mp, op, images, labels),
            "fast": train_step_fn(mf, of, images, labels),
        },
        desc=f"deep_prompts step {shape.name}",
    )
    setting = f"MaPLe {shape.name} {plan.n_small} cls step b{shape.batch}"
    note = (
        "text side over the positions up to the last end-of-text token (fast) against all "
        "77 (plain); both towers prompted at layers 0-8"
    )
    rows.append(speedup_row("deep_prompts", setting, t, (">=", 1.0), note, info))

    mp.eval(), mf.eval()
    test_images, _ = batch_for(plan, shape, shape.test_batch, plan.n_small)
    nb = plan.eval_batches

    def plain() -> None:
        with torch.no_grad():
            for _ in range(nb):
                mp(test_images).argmax(dim=1)

    def fast() -> None:
        with torch.no_grad(), mf.text_features.frozen():
            for _ in range(nb):
                mf(test_images).argmax(dim=1)

    t = bench(plan, {"plain": plain, "fast": fast}, desc=f"deep_prompts eval {shape.name}")
    setting = f"MaPLe {shape.name} {plan.n_small} cls eval {nb}x{shape.test_batch}"
    note = (
        "text features once per evaluation, truncated (fast), against once per batch over 77 "
        "positions (plain); the prompted image encoder runs in both"
    )
    rows.append(speedup_row("deep_prompts", setting, t, (">=", 1.0), note, info))
    return {"rows": rows, "times": info}


# --------------------------------------------------------------------------------------------
# Memory: one training step, each path in a fresh subprocess


def case_cocoop(plan: Plan, models: _Models) -> Dict[str, Any]:
    """CoCoOp on ViT-B/16 (its paper's backbone) at 100 classes: a training step at its
    protocol's batch of 1 and an evaluation batch of CoOp's test batch size. Plain: the
    original's loop, one pass of the text tower over all 77 positions of every class
    prompt per image; fast: several images' prompts per pass, truncated at the last
    end-of-text token. Every image has its own prompts, so nothing is computed once per
    evaluation."""
    key = "ViT-B/16"
    shape = plan.shapes[key]
    n_cls = plan.n_small
    names = benchmark_classnames(n_cls)
    mp, op = build_cocoop(plan, build_clip(plan, shape), shape, names, False)
    mf, of = build_cocoop(plan, build_clip(plan, shape, "fast"), shape, names, True)
    # the fast path without the batching: truncated, one image per pass
    one = ("FAST.CLASS_CHUNK", str(n_cls))
    m1, _ = build_cocoop(plan, build_clip(plan, shape, "fast"), shape, names, True, one)
    rows, info = [], {}

    images, labels = batch_for(plan, shape, 1, n_cls)
    t = bench(
        plan,
        {
            "plain": train_step_fn(mp, op, images, labels),
            "fast": train_step_fn(mf, of, images, labels),
            "image": image_forward_fn(mf, images),
        },
        desc=f"cocoop train {shape.name}",
    )
    setting = f"{shape.name} {n_cls} cls train b1"
    note = (
        f"text mode {mf.text_encoder.text_mode}; the image forward alone "
        f"{_fmt_amount(t['image'][0], 's')}"
    )
    rows.append(speedup_row("cocoop", setting, t, (">=", COCOOP_TARGET), note, info))

    images, _ = batch_for(plan, shape, shape.test_batch, n_cls)
    per_pass = mf.text_encoder.images_per_pass(shape.test_batch, plan.device.type)
    budget = mf.text_encoder.prompts_per_pass(plan.device.type)

    def evaluate(model, context) -> Callable[[], None]:
        def fn() -> None:
            with context():
                model(images).argmax(dim=1)

        return fn

    t = bench(
        plan,
        {
            "plain": evaluate(mp, torch.no_grad),  # as the original's test loop
            "fast": evaluate(mf, torch.inference_mode),  # as the fast evaluation
            "one_per_pass": evaluate(m1, torch.inference_mode),
            "image": image_forward_fn(mf, images),
        },
        reps=min(plan.reps, 3),
        desc=f"cocoop eval {shape.name}",
    )
    setting = f"{shape.name} {n_cls} cls eval b{shape.test_batch}"
    note = (
        f"{per_pass} images per text pass (at most {budget or 'all'} prompts); truncated at "
        f"one image per pass {_fmt_amount(t['one_per_pass'][0], 's')}; the image forward "
        f"alone {_fmt_amount(t['image'][0], 's')}"
    )
    rows.append(speedup_row("cocoop", setting, t, (">=", COCOOP_TARGET), note, info))
    return {"rows": rows, "times": info}


def _current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _peak_rss() -> int:
    return _status_bytes("VmHWM")


def _available_memory() -> int:
    """MemAvailable of /proc/meminfo in bytes (0 where unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _is_oom(e: BaseException) -> bool:
    text = str(e)
    return isinstance(e, MemoryError) or (
        isinstance(e, RuntimeError)
        and ("can't allocate memory" in text or "out of memory" in text.lower())
    )


def memory_child(spec: Dict[str, Any]) -> Dict[str, Any]:
    """One training step of one path in this (fresh) process and its peak memory. With
    ``limit`` (CPU), private memory is capped there (RLIMIT_DATA), so a step that needs more
    fails with an allocation error instead of pushing the machine into its OOM killer; the
    result is then ``{"oom": True}``."""
    limit = int(spec.get("limit") or 0)
    if limit:
        import resource

        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    try:
        return _memory_step(spec)
    except (RuntimeError, MemoryError) as e:
        if not _is_oom(e):
            raise
        return {"oom": True, "limit": limit, "error": " ".join(str(e).split())[:300]}


def _memory_step(spec: Dict[str, Any]) -> Dict[str, Any]:
    plan = make_plan(spec["quick"], spec["device"])
    plan.fast_opts = tuple(spec.get("fast_opts", ()))  # --fast-opt reaches this path too
    shape = plan.shapes[spec["shape"]]
    n_cls = spec["n_cls"]
    clip_model = build_clip(plan, shape, "fast" if spec["fast"] else "")
    model, optim = build_coop(plan, clip_model, shape, benchmark_classnames(n_cls), spec["fast"])
    images, labels = batch_for(plan, shape, shape.batch, n_cls)
    step = train_step_fn(model, optim, images, labels)
    step()  # warm-up: optimizer state, lazily initialised kernels
    gc.collect()
    if plan.cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {"peak": peak, "extra": peak - base, "base": base, "text_mode": model.text_mode}
    # CPU: the kernel's peak RSS (VmHWM, reset just before the step) and, as a cross-check,
    # the RSS sampled every ~0.5 ms by a thread while the step runs
    base = _current_rss()
    hwm_ok = _reset_peak_rss()
    sampled = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            sampled[0] = max(sampled[0], _current_rss())
            time.sleep(0.0005)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    step()
    stop.set()
    th.join()
    sampled[0] = max(sampled[0], _current_rss())
    peak = _peak_rss() if hwm_ok else sampled[0]
    return {
        "peak": peak,
        "extra": peak - base,
        "base": base,
        "sampled_extra": sampled[0] - base,
        "method": "VmHWM" if hwm_ok else "sampled",
        "data_after": _status_bytes("VmData"),  # what RLIMIT_DATA counts, after the step
        "text_mode": model.text_mode,
    }


def memory_result(plan: Plan, key: str, fast: bool) -> Dict[str, Any]:
    """One 1000-class training step of one path in a fresh subprocess (memoised per plan)."""
    if (key, fast) in plan._memory:
        return plan._memory[(key, fast)]
    env = dict(os.environ)
    # glibc: serve every allocation >= 64 KiB by mmap and give it back on free, so the
    # resident set follows the live tensors (otherwise freed memory stays resident)
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    spec = dict(
        quick=plan.quick,
        device=str(plan.device),
        shape=key,
        n_cls=plan.n_large,
        fast=fast,
        fast_opts=list(plan.fast_opts),
        threads=plan.threads,
        # on a CPU: leave a fifth of the available memory to the rest of the machine
        limit=0 if plan.cuda else int(_available_memory() * 0.8),
    )
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--memory-child", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory child failed:\n{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    plan._memory[(key, fast)] = res
    return res


def plain_does_not_fit(plan: Plan, key: str) -> str:
    """On a CPU at full size: why the plain 1000-class step cannot run here ("" if it can)."""
    if plan.cuda or plan.quick:
        return ""
    res = memory_result(plan, key, fast=False)
    if not res.get("oom"):
        return ""
    return (
        f"plain path does not fit: one step needs more than {_fmt_amount(res['limit'], 'B')} "
        "(4/5 of this machine's available memory)"
    )


def case_memory(plan: Plan) -> Dict[str, Any]:
    rows, info = [], {}
    n_cls = plan.n_large
    for key in plan.shapes:
        shape = plan.shapes[key]
        res = {
            "plain": memory_result(plan, key, fast=False),
            "fast": memory_result(plan, key, fast=True),
        }
        info[shape.name] = res
        setting = f"{shape.name} {n_cls} cls b{shape.batch} step"
        if res["fast"].get("oom"):
            raise RuntimeError(f"the fast path does not fit in memory: {res['fast']['error']}")
        metric = "peak" if plan.cuda else "extra"
        fast_mode = f"fast text mode {res['fast'].get('text_mode', '?')}"
        if res["plain"].get("oom"):
            # the plain step needs more than the cap: the ratio is at most fast / cap
            limit, f = res["plain"]["limit"], res["fast"][metric]
            rows.append(
                row(
                    "memory_1000",
                    setting,
                    limit,
                    f,
                    f / limit,
                    ("<=", 0.5),
                    unit="B",
                    value_fmt="{:.3f}",
                    note="the plain step did not fit: it failed to allocate above the cap of "
                    f"{_fmt_amount(limit, 'B')} (4/5 of the available memory), so the 'plain' "
                    "column is a lower bound and the ratio an upper bound; fast = peak RSS "
                    f"during one step minus RSS before it, weights not included; {fast_mode}",
                )
            )
            continue
        p, f = res["plain"][metric], res["fast"][metric]
        if plan.cuda:
            what = (
                "torch.cuda.max_memory_allocated during one step, weights and inputs included "
                f"(above the {_fmt_amount(res['plain']['base'], 'B')} resident before the step: "
                f"{_fmt_amount(res['plain']['extra'], 'B')} vs "
                f"{_fmt_amount(res['fast']['extra'], 'B')})"
            )
        else:
            how = (
                "kernel peak RSS (VmHWM reset before the step)"
                if res["plain"]["method"] == "VmHWM"
                else "peak of RSS sampled every 0.5 ms"
            )
            what = (
                f"peak RSS during one step minus RSS before it: {how}, fresh process each, "
                "glibc mmap threshold 64 KiB, weights not included; sampled RSS gives "
                f"{_fmt_amount(res['plain']['sampled_extra'], 'B')} vs "
                f"{_fmt_amount(res['fast']['sampled_extra'], 'B')}"
            )
        rows.append(
            row(
                "memory_1000",
                f"{shape.name} {n_cls} cls b{shape.batch} step",
                p,
                f,
                f / p,
                ("<=", 0.5),
                unit="B",
                value_fmt="{:.3f}",
                note=f"ratio = fast/plain; {what}; {fast_mode}",
            )
        )
    return {"rows": rows, "memory": info}


# --------------------------------------------------------------------------------------------
# Cases through coop.train.main


def _feature_implemented(key: str) -> bool:
    """Whether any package module besides config.py reads the FAST config key ``key``."""
    import coop

    roots = {os.path.dirname(os.path.abspath(coop.__file__))}
    for sub in ("coop.trainers", "coop.datasets"):
        with contextlib.suppress(ImportError):
            mod = __import__(sub, fromlist=["_"])
            roots.add(os.path.dirname(os.path.abspath(mod.__file__)))
    for root in roots:
        for dirpath, _, files in os.walk(root):
            for fn in files:
                if not fn.endswith(".py") or (fn == "config.py" and dirpath in roots):
                    continue
                with open(os.path.join(dirpath, fn), encoding="utf-8") as fh:
                    if key in fh.read():
                        return True
    return False


def _dir_files(path: str) -> int:
    return sum(len(files) for _, _, files in os.walk(path)) if os.path.isdir(path) else 0


def run_main(argv: List[str]) -> Dict[str, float]:
    """``coop.train.main(argv)`` in this process, quietly; returns wall times (s) of the
    whole call (``total``), of building the trainer (data, CLIP, model), of every
    ``trainer.test()``, of the training epochs (``epochs``, data loading included), and within
    those of building the opt-in training feature cache (``cache``) and computing its new
    views (``views``)."""
    from coop import registry
    from coop.train import main
    from coop.utils import close_logger

    times = {"build": 0.0, "test": 0.0, "epochs": 0.0, "cache": 0.0, "views": 0.0}
    orig = registry.build_trainer

    def timer(trainer: Any, method: str, name: str) -> None:
        # time every call of trainer.<method> into times[name]
        fn = getattr(trainer, method, None)
        if fn is None:
            return

        def timed(*a, **k):
            t1 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                times[name] += time.perf_counter() - t1

        timed.__wrapped__ = fn  # type: ignore[attr-defined]
        setattr(trainer, method, timed)

    def timed_build(cfg, *args):
        t0 = time.perf_counter()
        trainer = orig(cfg, *args)
        times["build"] += time.perf_counter() - t0
        timer(trainer, "test", "test")
        timer(trainer, "run_epoch", "epochs")  # includes the training cache's build ...
        return trainer

    from coop.fast import trainer_caches

    # the training cache's build (inside the first epoch) and, within it, its new views
    timer(trainer_caches, "build_train_cache", "cache")
    timer(trainer_caches, "compute_train_views", "views")
    buf = io.StringIO()
    registry.build_trainer = timed_build
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            rc = main(argv)
    except BaseException:
        sys.stderr.write(buf.getvalue()[-4000:])
        raise
    finally:
        registry.build_trainer = orig
        for name in ("build_train_cache", "compute_train_views"):
            setattr(trainer_caches, name, getattr(trainer_caches, name).__wrapped__)
        close_logger()
    times["total"] = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"coop.train.main failed (rc {rc}):\n{buf.getvalue()[-4000:]}")
    return times


class _RunEnv:
    """A temp folder with a Caltech101 miniature and a CLIP checkpoint for coop.train.main."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.root = plan.tmp
        self._ckpt = ""
        self._data: Dict[Tuple[int, int, int], str] = {}

    def ckpt(self) -> str:
        if not self._ckpt:
            from coop.testing.tiny_clip import save_tiny_clip

            self._ckpt = save_tiny_clip(os.path.join(self.root, "clip.pt"), **self.plan.run_clip)
        return self._ckpt

    def data(self, n_classes: int, per_class: int, size: int = 0) -> str:
        """A Caltech101 miniature; images of the run checkpoint's resolution unless ``size``."""
        res = size or int(self.plan.run_clip["image_resolution"])
        k = (n_classes, per_class, res)
        if k not in self._data:
            from coop.testing.fixtures import make_caltech101

            path = os.path.join(self.root, f"data_{n_classes}x{per_class}_{res}px")
            make_caltech101(path, n_classes=n_classes, n_per_class=per_class, image_size=res)
            self._data[k] = path
        return self._data[k]

    def argv(
        self, data: str, out: str, *extra: str, seed: int = 1, shots: int = 1, eval_only=False
    ) -> List[str]:
        res = int(self.plan.run_clip["image_resolution"])
        arch = "rn50" if self.plan.run_clip["arch"] == "resnet" else "vit_b16"
        opts = [
            "DATASET.NUM_SHOTS", str(shots),
            "MODEL.BACKBONE.NAME", self.ckpt(),
            "INPUT.SIZE", f"({res}, {res})",
            "TRAINER.COOP.PREC", self.plan.prec,
            "DATALOADER.NUM_WORKERS", str(self.plan.workers),
            "TRAIN.PRINT_FREQ", "1000",
        ]  # fmt: skip
        if not self.plan.cuda:
            opts += ["USE_CUDA", "False"]
        return [
            "--root", data,
            "--seed", str(seed),
            "--trainer", "CoOp",
            "--dataset-config-file", os.path.join(REPO, "configs/datasets/caltech101.yaml"),
            "--config-file", os.path.join(REPO, f"configs/trainers/CoOp/{arch}.yaml"),
            "--output-dir", out,
            *(["--eval-only"] if eval_only else []),
            *opts,
            *extra,
        ]  # fmt: skip


def case_eval_warm(plan: Plan, env: _RunEnv) -> Dict[str, Any]:
    data = env.data(plan.warm_classes, plan.warm_per_class)
    cache = os.path.join(plan.tmp, "feature_cache_eval_warm")
    setting = f"{plan.warm_classes} cls miniature, test split"
    n = [0]

    def out() -> str:
        n[0] += 1
        return os.path.join(plan.tmp, f"eval_warm_{n[0]}")

    plain_opts = ["FAST.ENABLED", "False"]
    fast_opts = ["FAST.EVAL_FEATURE_CACHE", "True", "FAST.CACHE_DIR", cache, *plan.fast_opts]
    run_main(env.argv(data, out(), *plain_opts, eval_only=True))  # warm-up (imports, kernels)
    cold = run_main(env.argv(data, out(), *fast_opts, eval_only=True))  # fills the cache
    if not _feature_implemented("EVAL_FEATURE_CACHE") or _dir_files(cache) == 0:
        return {
            "rows": [
                row(
                    "eval_warm",
                    setting,
                    None,
                    None,
                    None,
                    (">=", 50.0),
                    skip="feature cache not available",
                )
            ]
        }
    plain_t, warm_t = [], []
    reps = min(plan.reps, 3 if plan.quick else 5)
    for r in range(reps):
        order = [(plain_opts, plain_t), (fast_opts, warm_t)]
        for opts, acc in order if r % 2 == 0 else order[::-1]:
            acc.append(run_main(env.argv(data, out(), *opts, eval_only=True)))
    tp = statistics.median(t["test"] for t in plain_t)
    tw = statistics.median(t["test"] for t in warm_t)
    totp = statistics.median(t["total"] for t in plain_t)
    totw = statistics.median(t["total"] for t in warm_t)
    return {
        "rows": [
            row(
                "eval_warm",
                setting,
                tp,
                tw,
                tp / tw,
                (">=", 50.0),
                value_fmt="{:.1f}x",
                note=f"trainer.test() time; whole --eval-only run {_fmt_amount(totp, 's')} vs "
                f"{_fmt_amount(totw, 's')} ({totp / totw:.1f}x); the first (cold) fast test, "
                f"which fills the cache, took {_fmt_amount(cold['test'], 's')}",
            )
        ],
        "times": {"plain": plain_t, "warm": warm_t, "cold": cold},
    }


def lpclip_path(argv: List[str]) -> Dict[str, float]:
    """One linear-probe run the original protocol's way (lpclip): build the few-shot data,
    load CLIP, extract the train, val and test features with the model (test transform),
    then run the C search and score the test split. Returns its wall time and accuracy."""
    from coop.clip_adapter import load_clip
    from coop.data import DataManager, build_data_loader
    from coop.train import build_parser, setup_cfg
    from coop.trainers.linear_probe import accuracy, search_c

    t0, c0 = time.perf_counter(), time.process_time()
    cfg = setup_cfg(build_parser().parse_args(argv))
    with contextlib.redirect_stdout(io.StringIO()):
        dm = DataManager(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.USE_CUDA else "cpu")
    model = load_clip(cfg.MODEL.BACKBONE.NAME)
    if cfg.TRAINER.LINEARPROBECLIP.PREC != "fp16":
        model.float()
    visual = model.visual.to(device).eval()
    tfm = dm.test_loader.dataset.transform
    xy = []
    with torch.no_grad():
        for source in (dm.dataset.train_x, dm.dataset.val, dm.dataset.test):
            loader = build_data_loader(
                cfg, data_source=source, batch_size=200, tfm=tfm, is_train=False
            )
            feats = [visual(b["img"].to(device).type(visual.conv1.weight.dtype)) for b in loader]
            xy.append(
                (torch.cat(feats).double().cpu().numpy(), np.array([d.label for d in source]))
            )
    clf, _ = search_c(xy[0], xy[1], cfg.TRAINER.LINEARPROBECLIP.NUM_STEP)
    acc = 100 * accuracy(clf, *xy[2])
    return {"total": time.perf_counter() - t0, "cpu": time.process_time() - c0, "accuracy": acc}


def case_linear_probe(plan: Plan, env: _RunEnv) -> Dict[str, Any]:
    """A linear-probe run once its image features are cached (a whole coop.train.main run
    of LinearProbeCLIP, the cache filled by a first run of another seed) against the
    original protocol's path (lpclip_path: extract the features, then fit), 16 shots."""
    data = env.data(plan.sweep_classes, plan.sweep_per_class)
    cache = os.path.join(plan.tmp, "feature_cache_linear_probe")
    setting = f"{plan.sweep_classes} cls, 16 shots, per run"
    n = [0]

    def argv(fast: bool, seed: int) -> List[str]:
        n[0] += 1
        out = os.path.join(plan.tmp, f"linear_probe_{n[0]}")
        shutil.rmtree(os.path.join(plan.tmp, f"linear_probe_{n[0] - 1}"), ignore_errors=True)
        opts = ["TRAINER.LINEARPROBECLIP.PREC", plan.prec]
        opts += ["FAST.CACHE_DIR", cache, *plan.fast_opts] if fast else ["FAST.ENABLED", "False"]
        a = env.argv(data, out, *opts, seed=seed, shots=16)
        a[a.index("--trainer") + 1] = "LinearProbeCLIP"
        cfg = a.index("--config-file") + 1
        a[cfg] = a[cfg].replace("trainers/CoOp/", "trainers/LinearProbeCLIP/")
        return a

    def cached_run(seed: int) -> Dict[str, float]:
        c0 = time.process_time()
        a = argv(True, seed)
        t = run_main(a)
        t["cpu"] = time.process_time() - c0
        with open(os.path.join(a[a.index("--output-dir") + 1], "results.json")) as f:
            t["accuracy"] = json.load(f)["metrics"]["accuracy"]
        return t

    cold = cached_run(1)  # fills the cache (and warms imports and kernels)
    lpclip_path(argv(False, 1))
    orig_t: List[Dict[str, float]] = []
    warm_t: List[Dict[str, float]] = []
    reps = min(plan.reps, 3 if plan.quick else 5)
    for r in range(reps):
        seed = 2 + r % 2  # other seeds: other few-shot subsets of the cached images
        order = [(False, orig_t), (True, warm_t)]
        for fast, acc in order if r % 2 == 0 else order[::-1]:
            acc.append(cached_run(seed) if fast else lpclip_path(argv(False, seed)))
    to = statistics.median(t["total"] for t in orig_t)
    tw = statistics.median(t["total"] for t in warm_t)
    fit = statistics.median(t["epochs"] for t in warm_t)
    cpu_o = statistics.median(t["cpu"] for t in orig_t)
    cpu_w = statistics.median(t["cpu"] for t in warm_t)
    shutil.rmtree(os.path.join(plan.tmp, f"linear_probe_{n[0]}"), ignore_errors=True)
    return {
        "rows": [
            row(
                "linear_probe",
                setting,
                to,
                tw,
                to / tw,
                None,
                note=f"lpclip's path (build the data, load CLIP, extract train/val/test "
                f"features, C search) vs a whole coop-train LinearProbeCLIP run with its "
                f"features cached (its fit {_fmt_amount(fit, 's')}, the C search's 23 "
                f"scikit-learn fits, the floor of both); CPU time {_fmt_amount(cpu_o, 's')} "
                f"vs {_fmt_amount(cpu_w, 's')} ({cpu_o / cpu_w:.2f}x); the first run, which "
                f"fills the cache, took {_fmt_amount(cold['total'], 's')}",
            )
        ],
        "times": {"original": orig_t, "cached": warm_t, "cold": cold},
    }


def official_estimate(runs: List[Dict[str, float]], epochs: Dict[int, int], views: int) -> float:
    """Seconds the sweep's ``runs`` (``run_main`` times plus ``shots``) would take at the
    official schedule: their epoch loops scaled from ``epochs`` to the official epoch counts,
    the new cached views they computed from ``views`` to the official view count, everything
    else (build, test, reading cached views) as measured."""
    est = 0.0
    for t in runs:
        shots = int(t["shots"])
        loops = t["epochs"] - t["cache"]
        est += t["total"] - t["epochs"] + loops * OFFICIAL_EPOCHS[shots] / epochs[shots]
        est += t["cache"] - t["views"] + t["views"] * OFFICIAL_VIEWS / views
    return est


def sweep_schedule(div: int = SWEEP_DIV) -> Tuple[Dict[int, int], int]:
    """The sweep's epochs per shot count and its cached views: the official ones divided by
    ``div`` (rounded up, at least 1)."""
    epochs = {k: max(1, math.ceil(e / div)) for k, e in OFFICIAL_EPOCHS.items()}
    return epochs, max(1, math.ceil(OFFICIAL_VIEWS / div))


def case_sweep(plan: Plan, env: _RunEnv) -> Dict[str, Any]:
    data = env.data(plan.sweep_classes, plan.sweep_per_class)
    epochs, views = sweep_schedule()
    train_cache = _feature_implemented("TRAIN_FEATURE_CACHE")
    configs = {
        "plain": ["FAST.ENABLED", "False"],
        "fast": ["FAST.CACHE_DIR", os.path.join(plan.tmp, "sweep_cache_fast"), *plan.fast_opts],
        "fast+train_cache": [
            "FAST.CACHE_DIR", os.path.join(plan.tmp, "sweep_cache_train"),
            "FAST.TRAIN_FEATURE_CACHE", "True",
            "FAST.TRAIN_CACHE_VIEWS", str(views),
            *plan.fast_opts,
        ],
    }  # fmt: skip
    if not train_cache:
        del configs["fast+train_cache"]
    totals = {c: 0.0 for c in configs}
    per_run: Dict[str, List[Dict[str, float]]] = {c: [] for c in configs}
    names = list(configs)
    i = 0
    with progress(len(SHOTS) * len(plan.sweep_seeds) * len(names), "sweep runs") as bar:
        for shots in SHOTS:
            for seed in plan.sweep_seeds:
                order = names[i % len(names) :] + names[: i % len(names)]  # rotate who's first
                i += 1
                for c in order:
                    out = os.path.join(plan.tmp, f"sweep_{c}_{shots}_{seed}")
                    extra = ["OPTIM.MAX_EPOCH", str(epochs[shots]), *configs[c]]
                    t = run_main(env.argv(data, out, *extra, seed=seed, shots=shots))
                    t["shots"] = shots
                    totals[c] += t["total"]
                    per_run[c].append(t)
                    shutil.rmtree(out, ignore_errors=True)
                    bar.set_postfix_str(f"{c}, {shots} shots, seed {seed}")
                    bar.update()
    setting = f"{plan.sweep_classes} cls, 5 shots x {len(plan.sweep_seeds)} seeds"
    ep = "/".join(str(epochs[k]) for k in SHOTS)

    est = {c: official_estimate(per_run[c], epochs, views) for c in configs}

    def est_note(c: str) -> str:
        return (
            f"; at the official epochs{' and views' if c != 'fast' else ''} (estimated from "
            f"the measured epoch loops, not judged): ~{est['plain'] / est[c]:.1f}x"
        )

    rows = [
        row(
            "sweep",
            setting + " (fast)",
            totals["plain"],
            totals["fast"],
            totals["plain"] / totals["fast"],
            (">=", 2.5),
            note=f"{len(SHOTS) * len(plan.sweep_seeds)} coop.train.main runs each, epochs {ep} (official / {SWEEP_DIV}), "
            "whole runs incl. data, model build, test" + est_note("fast"),
        )
    ]
    if train_cache:
        rows.append(
            row(
                "sweep",
                setting + " (fast+train cache)",
                totals["plain"],
                totals["fast+train_cache"],
                totals["plain"] / totals["fast+train_cache"],
                (">=", 10.0),
                note=f"FAST.TRAIN_FEATURE_CACHE True, TRAIN_CACHE_VIEWS {views} "
                f"(official {OFFICIAL_VIEWS} / {SWEEP_DIV}"
                f"{'' if OFFICIAL_VIEWS % SWEEP_DIV == 0 else ', rounded up'})"
                + est_note("fast+train_cache"),
            )
        )
    else:
        rows.append(
            row(
                "sweep",
                setting + " (fast+train cache)",
                totals["plain"],
                None,
                None,
                (">=", 10.0),
                skip="train feature cache not available",
            )
        )
    return {"rows": rows, "totals": totals, "runs": per_run, "official_estimate": est}


# --------------------------------------------------------------------------------------------
# Whole processes

# images per class of the eval_process miniature: its 50/20/30 split leaves 3 test images
# per class, 300 at 100 classes
PROCESS_PER_CLASS = 10
# what the eval_process children must not inherit from this process: its own opt-out of the
# malloc tuning (see main) and any glibc tuning of the shell, so each child runs with the
# package's defaults as `coop-train` does from a clean shell
_CHILD_ENV_DROP = (
    "COOP_MALLOC_TUNING",
    "MALLOC_MMAP_MAX_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
)


def shape_checkpoint(plan: Plan, shape: Shape) -> str:
    """A random-weight checkpoint of ``shape`` in OpenAI's state-dict format, through
    ``coop.testing.tiny_clip.save_tiny_clip`` (memoised in the plan's temp folder)."""
    name = re.sub(r"[^A-Za-z0-9]+", "_", shape.name)
    path = os.path.join(plan.tmp, f"clip_{name}.pt")
    if not os.path.isfile(path):
        from coop.testing.tiny_clip import save_tiny_clip

        embed, res, layers, width, patch, _, _, text_width, _, text_layers = shape.clip_args
        kw = dict(
            embed_dim=embed,
            image_resolution=res,
            vision_width=width,
            vision_layers=layers,
            text_width=text_width,
            text_layers=text_layers,
        )
        if patch is None:
            save_tiny_clip(path, arch="resnet", **kw)
        else:
            save_tiny_clip(path, arch="vit", patch_size=patch, **kw)
    return path


def coop_train_command() -> List[str]:
    """The ``coop-train`` console script beside this Python, else ``python -m coop.train``."""
    script = shutil.which("coop-train", path=os.path.dirname(sys.executable))
    return [script] if script else [sys.executable, "-m", "coop.train"]


def run_process(argv: List[str], env: Dict[str, str], log_path: str) -> Dict[str, float]:
    """Run ``argv`` as a child process (output into ``log_path``); its wall time and its
    own resource use: CPU seconds (``user``, ``sys``), minor page faults and peak RSS
    (bytes), its data-loading workers' CPU and faults included."""
    with open(log_path, "wb") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            tail = f.read()[-4000:]
        raise RuntimeError(f"{' '.join(argv[:3])} ... failed (rc {proc.returncode}):\n{tail}")
    return {
        "wall": wall,
        "user": usage.ru_utime,
        "sys": usage.ru_stime,
        "minflt": float(usage.ru_minflt),
        "maxrss": float(usage.ru_maxrss) * 1024,  # KiB on Linux
    }


def _split_size(data: str, split: str) -> int:
    with open(os.path.join(data, "caltech-101", "split_zhou_Caltech101.json")) as f:
        return len(json.load(f)[split])


def case_eval_process(plan: Plan, env: _RunEnv) -> Dict[str, Any]:
    """Whole ``coop-train --eval-only`` processes, plain (``FAST.ENABLED False``) against the
    defaults, each timed run cold (a new ``FAST.CACHE_DIR``), with the official command line:
    start-up, data, CLIP loading and the whole test pass, as a user's process pays them."""
    child_env = {k: v for k, v in os.environ.items() if k not in _CHILD_ENV_DROP}
    if plan.threads:
        child_env["OMP_NUM_THREADS"] = str(plan.threads)  # torch's threads in the child
    n = [0]

    def run(shape: Shape, data: str, fast: bool) -> Dict[str, float]:
        n[0] += 1
        out = os.path.join(plan.tmp, f"eval_process_{n[0]}")
        res = shape.resolution
        arch = "vit_b16" if shape.clip_args[4] else "rn50"
        argv = coop_train_command() + [
            "--root", data,
            "--seed", "1",
            "--trainer", "CoOp",
            "--dataset-config-file", os.path.join(REPO, "configs/datasets/caltech101.yaml"),
            "--config-file", os.path.join(REPO, f"configs/trainers/CoOp/{arch}.yaml"),
            "--output-dir", os.path.join(out, "output"),
            "--eval-only",
            "DATASET.NUM_SHOTS", "16",
            "MODEL.BACKBONE.NAME", shape_checkpoint(plan, shape),
            "INPUT.SIZE", f"({res}, {res})",
            "TRAINER.COOP.PREC", plan.prec,
            "FAST.CACHE_DIR", os.path.join(out, "cache"),  # cold: a new cache each run
            *([] if plan.cuda else ["USE_CUDA", "False"]),
            *([] if fast else ["FAST.ENABLED", "False"]),
            *(plan.fast_opts if fast else ()),
        ]  # fmt: skip
        os.makedirs(out, exist_ok=True)
        t = run_process(argv, child_env, os.path.join(out, "stdout.txt"))
        shutil.rmtree(out, ignore_errors=True)
        return t

    n_cls = plan.n_small
    reps = min(plan.reps, 3 if plan.quick else 5)
    # --quick: the first mini shape only (a process of each takes 10-25 s there)
    shapes = list(plan.shapes.values())[: 1 if plan.quick else None]
    rows, info = [], {}
    for shape in shapes:
        data = env.data(n_cls, PROCESS_PER_CLASS, size=shape.resolution)
        n_test = _split_size(data, "test")
        times: Dict[str, List[Dict[str, float]]] = {"plain": [], "fast": []}
        with progress(min(plan.warmup, 1) + 2 * reps, f"eval_process {shape.name}") as bar:
            for _ in range(min(plan.warmup, 1)):  # page cache, the few-shot split file
                run(shape, data, fast=True)  # the cheaper path
                bar.update()
            for r in range(reps):
                order = ["plain", "fast"] if r % 2 == 0 else ["fast", "plain"]
                for name in order:
                    times[name].append(run(shape, data, fast=name == "fast"))
                    bar.update()

        def med(name: str, what: str, times=times) -> float:
            return statistics.median(t[what] for t in times[name])

        tp, tf = med("plain", "wall"), med("fast", "wall")
        cpu_p = statistics.median(t["user"] + t["sys"] for t in times["plain"])
        cpu_f = statistics.median(t["user"] + t["sys"] for t in times["fast"])
        rows.append(
            row(
                "eval_process",
                f"{shape.name} {n_cls} cls {n_test} imgs",
                tp,
                tf,
                tp / tf,
                (">=", 1.0),
                note=f"whole coop-train --eval-only processes, each cold (new FAST.CACHE_DIR), "
                f"{plan.threads or 'default'} torch threads; CPU s (user+sys) "
                f"{cpu_p:.1f} vs {cpu_f:.1f} ({cpu_p / cpu_f:.2f}x), of it sys "
                f"{med('plain', 'sys'):.1f} vs {med('fast', 'sys'):.1f}; minor faults "
                f"{med('plain', 'minflt') / 1e6:.2f}M vs {med('fast', 'minflt') / 1e6:.2f}M; "
                f"peak RSS {_fmt_amount(med('plain', 'maxrss'), 'B')} vs "
                f"{_fmt_amount(med('fast', 'maxrss'), 'B')}",
            )
        )
        info[shape.name] = times
    return {"rows": rows, "times": info}


# --------------------------------------------------------------------------------------------
# Driver


def machine_line(plan: Plan) -> str:
    dev = str(plan.device)
    if plan.cuda:
        dev += f" ({torch.cuda.get_device_name(plan.device)})"
    return (
        f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} | {platform.node()} | "
        f"{platform.processor() or platform.machine()} | {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} torch threads | torch {torch.__version__} | device {dev} | "
        f"PREC {plan.prec} | {'quick' if plan.quick else 'full'}"
        + (f" | fast opts {' '.join(plan.fast_opts)}" if plan.fast_opts else "")
    )


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="reduced shapes, a few CPU minutes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {CASES}")
    p.add_argument("--json", default="", help="write all results to this file")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (default: 1 with --quick on a CPU, where other load on a small "
        "machine makes multi-threaded timings erratic; else torch's default)",
    )
    p.add_argument(
        "--reps",
        type=int,
        default=0,
        help="timed repetitions per measurement (default 3 with --quick, else 7); fewer for a "
        "full-size run on a CPU",
    )
    p.add_argument(
        "--warmup", type=int, default=-1, help="warm-up rounds (default 1 with --quick, else 2)"
    )
    p.add_argument(
        "--eval-batches",
        type=int,
        default=0,
        help="test batches of the cold evaluation (eval_1000; default 3 with --quick, else 10)",
    )
    p.add_argument(
        "--sweep-seeds",
        type=int,
        default=len(SEEDS),
        help=f"seeds per shot count in the sweep (1-{len(SEEDS)}; default {len(SEEDS)}, as the paper)",
    )
    p.add_argument(
        "--fast-opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config opt for every fast path, e.g. FAST.CUDA_GRAPHS=True (repeatable)",
    )
    p.add_argument("--keep", action="store_true", help="keep the temp folder")
    p.add_argument("--memory-child", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.memory_child:
        spec = json.loads(args.memory_child)
        if spec.get("threads"):
            torch.set_num_threads(spec["threads"])
        print(json.dumps(memory_child(spec)))
        return 0

    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        p.error(f"--device takes cpu, cuda or cuda:N, got {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        p.error(f"unknown case(s) {unknown}; choose from {CASES}")

    if args.reps < 0 or args.warmup < -1 or args.eval_batches < 0 or args.threads < 0:
        p.error("--reps, --warmup, --eval-batches and --threads must not be negative")
    if not 1 <= args.sweep_seeds <= len(SEEDS):
        p.error(f"--sweep-seeds must be between 1 and {len(SEEDS)}, got {args.sweep_seeds}")
    plan = make_plan(args.quick, args.device)
    if args.reps:
        plan.reps = args.reps
    if args.warmup >= 0:
        plan.warmup = args.warmup
    if args.eval_batches:
        plan.eval_batches = args.eval_batches
    plan.sweep_seeds = SEEDS[: args.sweep_seeds]
    fast_opts: List[str] = []
    for opt in args.fast_opt:
        key, sep, value = opt.partition("=")
        if not sep or not key.startswith("FAST."):
            p.error(f"--fast-opt takes FAST.KEY=VALUE, got {opt!r}")
        fast_opts += [key, value]
    if fast_opts:
        from coop.config import ConfigError, get_cfg_default, merge_from_list

        try:
            merge_from_list(get_cfg_default(), fast_opts, where="--fast-opt")
        except ConfigError as e:
            p.error(str(e))
    plan.fast_opts = tuple(fast_opts)
    threads = args.threads or (1 if plan.quick and not plan.cuda else 0)
    if threads:
        torch.set_num_threads(threads)
    plan.threads = torch.get_num_threads()
    plan.tmp = tempfile.mkdtemp(prefix="coop-bench-")
    # the cases that call coop.train.main in this process compare plain and fast runs in
    # it: a fast run must not leave the process's malloc tuned for the plain runs after it
    # (eval_process starts its children without this)
    os.environ["COOP_MALLOC_TUNING"] = "0"
    if plan.cuda:
        torch.backends.cudnn.benchmark = True  # as coop.train does on CUDA
    print(machine_line(plan), flush=True)
    print(HEADER, flush=True)

    models = _Models(plan)
    env = _RunEnv(plan)
    dispatch = {
        "train_step_100": lambda: case_train_step(plan, models, large=False),
        "train_step_1000": lambda: case_train_step(plan, models, large=True),
        "text_fraction": lambda: case_text_fraction(plan, models),
        "eval_1000": lambda: case_eval_1000(plan, models),
        "cocoop": lambda: case_cocoop(plan, models),
        "eval_warm": lambda: case_eval_warm(plan, env),
        "linear_probe": lambda: case_linear_probe(plan, env),
        "sweep": lambda: case_sweep(plan, env),
        "eval_process": lambda: case_eval_process(plan, env),
        "memory_1000": lambda: case_memory(plan),
        "deep_prompts": lambda: case_deep_prompts(plan),
    }
    results: Dict[str, Any] = {}
    all_rows: List[Dict[str, Any]] = []
    t_start = time.perf_counter()
    try:
        for case in [c for c in CASES if c in cases]:
            t0 = time.perf_counter()
            try:
                res = dispatch[case]()
            except Exception as e:  # report and go on with the other cases
                traceback.print_exc()
                res = {
                    "rows": [row(case, "error", None, None, None, None, skip="")],
                    "error": repr(e),
                }
                msg = " ".join(str(e).split())
                res["rows"][0]["result"] = f"ERROR ({type(e).__name__}: {msg})"[:200]
                res["rows"][0]["passed"] = False
            res["seconds"] = time.perf_counter() - t0
            for r in res["rows"]:
                print_row(r)
            results[case] = res
            all_rows.extend(res["rows"])
    finally:
        if args.keep:
            print(f"temp folder kept: {plan.tmp}", flush=True)
        else:
            shutil.rmtree(plan.tmp, ignore_errors=True)

    judged = [r for r in all_rows if r["passed"] is not None]
    met = sum(1 for r in judged if r["passed"])
    skipped = sum(1 for r in all_rows if r["result"].startswith("SKIP"))
    elapsed = time.perf_counter() - t_start
    tail = f" ({skipped} skipped)" if skipped else ""
    print(f"SUMMARY: {met}/{len(judged)} targets met{tail} [{elapsed:.0f} s]", flush=True)
    if args.json:
        payload = {
            "machine": machine_line(plan),
            "quick": plan.quick,
            "device": str(plan.device),
            "cases": results,
            "summary": {"met": met, "judged": len(judged), "skipped": skipped},
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
