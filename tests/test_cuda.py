"""The CUDA paths: every precision trains on the GPU, the fast paths give the plain path's
numbers there, both feature caches work there, and a prompt trained on the GPU evaluates on a
CPU. Skipped where torch sees no CUDA device (CI has none); on a GPU machine run
``python -m pytest tests/test_cuda.py``."""

from __future__ import annotations

import os
import re

import pytest
import torch
from helpers_train import coop_argv, read_results, zeroshot_argv

from coop.clip_adapter import load_clip
from coop.config import get_cfg_default
from coop.train import main
from coop.trainers.coop import CustomCLIP

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# per-batch loss tolerance of fast against plain (losses ~2-3; logits are scaled by 100):
# fp32 convolutions may run in TF32 on the GPU
LOSS_TOL = {"fp32": 5e-3, "fp16": 3e-2, "amp": 3e-2, "bf16": 0.15}  # bf16: 8-bit mantissa
CTX_TOL = {"fp32": 1e-2, "fp16": 5e-2, "amp": 5e-2, "bf16": 1e-1}


def _losses(out: str):
    """The logged training losses (one per batch, or one per epoch with the training cache)."""
    with open(os.path.join(out, "log.txt"), encoding="utf-8") as f:
        return [float(m.group(1)) for m in re.finditer(r"^epoch \[.* loss (\S+)", f.read(), re.M)]


def _ctx(out: str, epoch: int) -> torch.Tensor:
    path = os.path.join(out, "prompt_learner", f"model.pth.tar-{epoch}")
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]["ctx"]


def _train_on_gpu(root: str, out: str, ckpt: str, prec: str, fast: str, *extra: str) -> None:
    argv = coop_argv(
        root, out, ckpt, 1, 4, "OPTIM.MAX_EPOCH", "2", "DATALOADER.TRAIN_X.BATCH_SIZE", "8",
        "TRAIN.PRINT_FREQ", "1", "FAST.ENABLED", fast, *extra,
    )  # fmt: skip
    argv[argv.index("TRAINER.COOP.PREC") + 1] = prec
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    assert main(argv) == 0
    # the model and the batches were on the GPU (a tiny CLIP alone is over 1 MB there)
    assert torch.cuda.max_memory_allocated() > 2**20


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("prec", ["fp16", "fp32", "amp", "bf16"])
def test_every_precision_trains_on_the_gpu_and_fast_matches_plain(
    prec, data_root, tiny_rn, tmp_path
):
    """ResNet encoder (channels-last, folded norms on the fast path), end-position context
    (10 classes: the text side truncates on a GPU): same losses and context as the plain
    path."""
    runs = {}
    for fast in ("False", "True"):
        out = str(tmp_path / fast)
        _train_on_gpu(data_root, out, tiny_rn, prec, fast)
        runs[fast] = (_losses(out), _ctx(out, 2), read_results(out)["metrics"])
    log = open(os.path.join(tmp_path / "True", "log.txt"), encoding="utf-8").read()
    assert "Text encoder fast path: truncate" in log
    (lp, cp, mp), (lf, cf, mf) = runs["False"], runs["True"]
    assert len(lp) == len(lf) == 10
    assert all(torch.isfinite(torch.tensor(lp + lf)))
    assert lf == pytest.approx(lp, abs=LOSS_TOL[prec])
    # the original's fp16 trains the context in fp16; every other precision keeps fp32
    assert cp.dtype == cf.dtype == (torch.float16 if prec == "fp16" else torch.float32)
    assert not torch.equal(cp, torch.zeros_like(cp))
    assert _rel(cf, cp) < CTX_TOL[prec]
    assert 0.0 <= mf["accuracy"] <= 100.0 and 0.0 <= mp["accuracy"] <= 100.0


def test_shared_prefix_training_on_the_gpu_matches_plain(data_root, learnable_clip, tmp_path):
    runs = {}
    for fast in ("False", "True"):
        out = str(tmp_path / fast)
        _train_on_gpu(data_root, out, learnable_clip, "fp16", fast, "FAST.TEXT", "shared_prefix")
        runs[fast] = (_losses(out), _ctx(out, 2))
    log = open(os.path.join(tmp_path / "True", "log.txt"), encoding="utf-8").read()
    assert "Text encoder fast path: shared_prefix" in log
    (lp, cp), (lf, cf) = runs["False"], runs["True"]
    assert len(lp) == len(lf) == 10
    assert lf == pytest.approx(lp, abs=LOSS_TOL["fp16"])
    assert _rel(cf, cp) < CTX_TOL["fp16"]


def test_eval_feature_cache_on_the_gpu_gives_the_uncached_metrics(data_root, tiny_vit, tmp_path):
    cache = str(tmp_path / "cache")
    metrics = []
    for i, opts in enumerate(
        (["FAST.ENABLED", "False"], ["FAST.CACHE_DIR", cache], ["FAST.CACHE_DIR", cache])
    ):
        out = str(tmp_path / f"zs{i}")
        assert main(zeroshot_argv(data_root, out, tiny_vit, *opts)) == 0
        metrics.append(read_results(out)["metrics"])
    entries = [f for f in os.listdir(os.path.join(cache, "features")) if f.endswith(".pt")]
    assert len(entries) == 1
    assert metrics[2] == metrics[1]  # warm == cold, exactly
    assert metrics[1]["accuracy"] == pytest.approx(metrics[0]["accuracy"], abs=2 * 100 / 60)


def test_training_feature_cache_on_the_gpu(data_root, learnable_clip, tmp_path):
    outs = []
    for i in range(2):
        out = str(tmp_path / f"t{i}")
        _train_on_gpu(
            data_root, out, learnable_clip, "fp16", "True",
            "FAST.TRAIN_FEATURE_CACHE", "True", "FAST.TRAIN_CACHE_VIEWS", "2",
            "FAST.CACHE_DIR", str(tmp_path / "cache"),
        )  # fmt: skip
        outs.append(out)
    log = open(os.path.join(outs[0], "log.txt"), encoding="utf-8").read()
    assert "Training feature cache (opt-in deviation): 2 augmented views" in log
    assert len(_losses(outs[0])) == 2  # one line per epoch
    # the second run reads the first one's views: the same batches, the same losses
    assert _losses(outs[1]) == pytest.approx(_losses(outs[0]), abs=1e-3)
    assert _rel(_ctx(outs[1], 2), _ctx(outs[0], 2)) < 1e-2


def test_prompt_trained_on_the_gpu_evaluates_on_the_cpu(data_root, tiny_rn, tmp_path):
    out = str(tmp_path / "train")
    _train_on_gpu(data_root, out, tiny_rn, "fp16", "True")
    trained = read_results(out)["metrics"]["accuracy"]
    ev = str(tmp_path / "eval_cpu")
    argv = coop_argv(data_root, ev, tiny_rn, 1, 4, "USE_CUDA", "False")
    assert main(["--eval-only", "--model-dir", out, "--load-epoch", "2", *argv]) == 0
    log = open(os.path.join(ev, "log.txt"), encoding="utf-8").read()
    assert "model.pth.tar-2" in log
    # fp16 on the GPU against fp32 on the CPU: at most a couple of test images differ
    assert read_results(ev)["metrics"]["accuracy"] == pytest.approx(trained, abs=3 * 100 / 60)


@pytest.mark.parametrize("text", ["truncate", "shared_prefix"])
def test_fast_text_step_does_not_wait_for_the_gpu(tiny_vit, text):
    cfg = get_cfg_default()
    cfg.INPUT.SIZE = (32, 32)
    cfg.FAST.TEXT = text
    names = ["face", "hello kitty", "a very long class name of words"]
    model = CustomCLIP(cfg, names, load_clip(tiny_vit).float()).cuda()
    assert model.text_mode == text
    model.text_features().sum().backward()  # the first pass builds the cached layouts
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        model.text_features().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)


def _graph_cfg(text: str, graphs: bool, prec: str = "fp32"):
    cfg = get_cfg_default()
    cfg.INPUT.SIZE = (32, 32)
    cfg.FAST.TEXT = text
    cfg.FAST.CUDA_GRAPHS = graphs
    cfg.TRAINER.COOP.PREC = prec
    return cfg


@pytest.mark.parametrize("text", ["truncate", "shared_prefix", "plain"])
def test_cuda_graph_steps_follow_the_eager_trajectory(tiny_rn, text):
    """Five SGD steps on the text side and a frozen ResNet: the replayed graphs give the
    eager losses, gradients and context, step after step, and record once."""
    from coop.optim import build_optimizer

    names = ["face", "hello kitty", "a very long class name of words", "motorbike"]
    runs = {}
    for graphs in (False, True):
        cfg = _graph_cfg(text, graphs)
        torch.manual_seed(0)
        model = CustomCLIP(cfg, names, load_clip(tiny_rn).float())
        for n, p in model.named_parameters():
            p.requires_grad_("prompt_learner" in n)
        model.cuda().eval()
        optim = build_optimizer(model.prompt_learner, cfg.OPTIM)
        g = torch.Generator().manual_seed(1)
        losses, grads = [], []
        for _ in range(5):
            images = torch.randn(6, 3, 32, 32, generator=g).cuda()
            labels = torch.randint(0, len(names), (6,), generator=g).cuda()
            loss = torch.nn.functional.cross_entropy(model(images), labels)
            optim.zero_grad(set_to_none=len(losses) % 2 == 0)  # both ways of zeroing
            loss.backward()
            grads.append(model.prompt_learner.ctx.grad.detach().clone())
            optim.step()
            losses.append(loss.item())
        runs[graphs] = (losses, grads, model.prompt_learner.ctx.detach().clone(), model)
    (le, ge, ce, _), (lg, gg, cg, graphed) = runs[False], runs[True]
    assert graphed.text_encoder._graphed is not None and graphed.image_encoder._graphed is not None
    assert len(graphed.image_encoder._graphed._graphs) == 1  # one batch shape, recorded once
    assert lg == pytest.approx(le, rel=1e-5, abs=1e-6)
    for a, b in zip(gg, ge):
        assert _rel(a, b) < 1e-4
    assert _rel(cg, ce) < 1e-5


def test_cuda_graph_image_encoder_keeps_earlier_outputs_and_other_shapes(tiny_rn):
    cfg = _graph_cfg("truncate", True, prec="fp16")
    model = CustomCLIP(cfg, ["a", "b"], load_clip(tiny_rn)).cuda().eval()
    eager = CustomCLIP(_graph_cfg("truncate", False, "fp16"), ["a", "b"], load_clip(tiny_rn))
    eager = eager.cuda().eval()
    with torch.no_grad():
        xs = [torch.randn(n, 3, 32, 32, device="cuda") for n in (8, 8, 3, 5, 7, 9, 8)]
        outs = [model.encode_image(x) for x in xs]
        for x, out in zip(xs, outs):  # earlier outputs are not overwritten by later replays
            assert torch.allclose(out.float(), eager.encode_image(x).float(), atol=2e-3)
    # four shapes recorded (8, 3, 5, 7); the fifth (9) ran eagerly
    assert sorted(k[0][0] for k in model.image_encoder._graphed._graphs) == [3, 5, 7, 8]


def test_training_with_cuda_graphs_matches_eager_end_to_end(data_root, tiny_rn, tmp_path):
    runs = {}
    for graphs in ("False", "True"):
        out = str(tmp_path / graphs)
        _train_on_gpu(data_root, out, tiny_rn, "fp16", "True", "FAST.CUDA_GRAPHS", graphs)
        runs[graphs] = (_losses(out), _ctx(out, 2), out)
    log = open(os.path.join(runs["True"][2], "log.txt"), encoding="utf-8").read()
    assert "CUDA graphs (opt-in): text side and image encoder are replayed" in log
    assert "Text side recorded as CUDA graphs" in log
    assert runs["True"][0] == pytest.approx(runs["False"][0], abs=LOSS_TOL["fp16"])
    assert _rel(runs["True"][1], runs["False"][1]) < CTX_TOL["fp16"]
