"""KgCoOp: its config (the original's keys and YAML values), the knowledge score and loss, the
model as the original builds it (forced init words, hand-crafted features, random draws),
training end to end with an --eval-only reload, and the fast text path."""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers_train import build_from_argv, coop_node_argv, read_results, step_summaries
from torch import nn

from coop.clip_adapter import load_clip, tokenize
from coop.config import CN, ConfigError, get_cfg_default, merge_from_file
from coop.io import CheckpointError
from coop.train import main
from coop.trainers.coop import CoOp
from coop.trainers.kgcoop import TEMPLATES, KgCoOp, KgCoOpCLIP, knowledge_score

YAML = "configs/trainers/KgCoOp/vit_b16_ep100_ctxv1.yaml"


def _argv(root, out, ckpt, *opts):
    return coop_node_argv(root, out, ckpt, "KgCoOp", YAML, *opts)


def _trainer(root, ckpt, tmp_path, *opts):
    return build_from_argv(KgCoOp, _argv(root, str(tmp_path / "o"), ckpt, *opts))


def _encode(ckpt, texts):
    """L2-normalised fp32 text features of ``texts`` by a freshly loaded CLIP."""
    clip_model = load_clip(ckpt).float()
    with torch.no_grad():
        f = clip_model.encode_text(tokenize(texts))
    return f / f.norm(dim=-1, keepdim=True)


# ---------------------------------------------------------------------- config
def test_config_defaults_and_shipped_yamls_are_the_originals():
    cfg = get_cfg_default()
    opts = cfg.TRAINER.COOP
    assert (opts.N_CTX, opts.CSC, opts.PREC, opts.CLASS_TOKEN_POSITION) == (
        16,
        False,
        "fp16",
        "end",
    )
    assert opts.W == 1.0 and opts.ALPHA == 1.0
    assert not opts.CTX_INIT  # the original's False; CoOp's "" in the shared node
    assert opts.KG_USE_CTX_INIT is False  # ours: the original's forced words by default
    assert KgCoOp.config_node_name() == "COOP" and KgCoOp.config_folder() == "KgCoOp"
    assert KgCoOp.protocol_configs == {"base2new": "vit_b16_ep100_ctxv1",
                                       "fewshot": "vit_b16_ep100_ctxv1"}  # fmt: skip
    assert KgCoOp.protocol_shots == {"fewshot": (4,)}  # xd_train.sh: 4 shots, all classes

    for name, backbone in (("rn50_ep100", "RN50"), ("vit_b16_ep100_ctxv1", "ViT-B/16")):
        cfg = get_cfg_default()
        merge_from_file(cfg, f"configs/trainers/KgCoOp/{name}.yaml")
        assert cfg.MODEL.BACKBONE.NAME == backbone
        assert cfg.DATALOADER.TRAIN_X.BATCH_SIZE == 128 and cfg.DATALOADER.TEST.BATCH_SIZE == 100
        assert cfg.DATALOADER.NUM_WORKERS == 8 and cfg.TRAIN.PRINT_FREQ == 5
        o = cfg.OPTIM
        assert (o.NAME, o.LR, o.MAX_EPOCH, o.LR_SCHEDULER) == ("sgd", 0.002, 100, "cosine")
        assert (o.WARMUP_EPOCH, o.WARMUP_TYPE, o.WARMUP_CONS_LR) == (1, "constant", 1e-5)
        assert cfg.INPUT.INTERPOLATION == "bicubic" and tuple(cfg.INPUT.SIZE) == (224, 224)
        assert list(cfg.INPUT.TRANSFORMS) == ["random_resized_crop", "random_flip", "normalize"]
        assert cfg.TRAINER.COOP.CTX_INIT  # truthy, as the original's True


@pytest.mark.parametrize("order", ["coop_first", "kgcoop_first"])
def test_the_shared_node_does_not_depend_on_registration_order(order):
    cfg = CN()
    cfg.TRAINER = CN()
    hooks = [CoOp.add_config, KgCoOp.add_config]
    for hook in hooks if order == "coop_first" else hooks[::-1]:
        hook(cfg)
    assert cfg.TRAINER.COOP.W == 1.0 and cfg.TRAINER.COOP.N_CTX == 16
    assert cfg.TRAINER.COOP.CTX_INIT == ""


def test_a_prompt_layout_other_than_end_is_refused():
    cfg = get_cfg_default()
    cfg.TRAINER.COOP.CLASS_TOKEN_POSITION = "front"
    with pytest.raises(ConfigError, match="class name at the end of the prompt only"):
        KgCoOp.check_cfg(cfg)


# ---------------------------------------------------------------------- loss
def test_knowledge_score_and_loss_on_hand_made_tensors():
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # learned class text features (normalised)
    w_clip = torch.tensor([[1.0, 1.0], [0.0, 2.0]])  # hand-crafted, normalised inside
    expected_score = 1.0 - (1 / math.sqrt(2) + 1.0) / 2
    assert knowledge_score(w, w_clip).item() == pytest.approx(expected_score, rel=1e-6)

    logits, label = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0])
    ce = (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(1.0))) / 2
    fake = SimpleNamespace(
        cfg=SimpleNamespace(TRAINER=SimpleNamespace(COOP=SimpleNamespace(W=8.0))),
        model=SimpleNamespace(clip_text_features=w_clip),
    )
    loss = KgCoOp.compute_loss(fake, (logits, w), label)
    assert loss.item() == pytest.approx(ce + 8.0 * expected_score, rel=1e-6)


def test_the_templates_are_coops_except_dtd():
    assert TEMPLATES["DescribableTextures"] == "a photo of a {}, a type of texture."
    assert TEMPLATES["OxfordPets"] == "a photo of a {}, a type of pet."
    assert TEMPLATES["Caltech101"] == "a photo of a {}."


# ---------------------------------------------------------------------- model
@pytest.mark.parametrize(
    "opts, words",
    [
        ([], "a photo of a"),
        (["TRAINER.COOP.CTX_INIT", "itap of a"], "a photo of a"),  # the original's fixed words
        (
            ["TRAINER.COOP.CTX_INIT", "itap of a", "TRAINER.COOP.KG_USE_CTX_INIT", "True"],
            "itap of a",
        ),
    ],
)
def test_the_context_starts_from_the_originals_words(data_root, tiny_vit, tmp_path, opts, words):
    trainer = _trainer(data_root, tiny_vit, tmp_path, *opts)
    clip_model = load_clip(tiny_vit).float()
    n = len(words.split())
    with torch.no_grad():
        expected = clip_model.token_embedding(tokenize(words))[0, 1 : 1 + n]
    assert torch.equal(trainer.model.prompt_learner.ctx.detach(), expected)


def test_the_model_trains_only_the_context_against_the_hand_crafted_features(
    data_root, tiny_vit, tmp_path
):
    trainer = _trainer(data_root, tiny_vit, tmp_path, "TRAINER.COOP.W", "8.0")
    model = trainer.model
    names = trainer.dm.dataset.classnames
    expected = _encode(tiny_vit, [f"a photo of a {c.replace('_', ' ')}." for c in names])
    assert torch.allclose(model.clip_text_features, expected, atol=1e-6)
    # the context starts as "a photo of a": the learned prompts are the hand-written ones
    with torch.no_grad():
        assert knowledge_score(model.text_features(), model.clip_text_features) < 1e-6

    batch = next(iter(trainer.train_loader_x))
    image, label = trainer.parse_batch_train(batch)
    with torch.no_grad():  # perturb the context so that the knowledge term is not zero
        model.prompt_learner.ctx.add_(0.05 * torch.randn_like(model.prompt_learner.ctx))
        logits = model(image)
        w = F.normalize(model.text_features(), dim=-1)
        w_clip = F.normalize(model.clip_text_features, dim=-1)
        score = 1 - (w * w_clip).sum(-1).mean()
    assert score > 1e-4
    trainer.batch_idx, trainer.num_batches = 0, 5
    summary = trainer.forward_backward(batch)
    expected_loss = F.cross_entropy(logits, label) + 8.0 * score
    assert summary["loss"] == pytest.approx(expected_loss.item(), rel=1e-5)
    with_grad = [n for n, p in model.named_parameters() if p.grad is not None]
    assert with_grad == ["prompt_learner.ctx"]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["prompt_learner.ctx"]


def test_random_numbers_are_drawn_in_the_originals_order(data_root, tiny_vit, tmp_path):
    """Random init: ctx, the unused bias vector, the second CLIP, the unused meta-net and
    adapter, in this order (what a seeded run draws afterwards depends on it)."""
    trainer = _trainer(data_root, tiny_vit, tmp_path, "TRAINER.COOP.CTX_INIT", "")
    clip_model = load_clip(tiny_vit).float()
    torch.manual_seed(0)
    KgCoOpCLIP(trainer.cfg, trainer.dm.dataset.classnames, clip_model, "cpu")
    ours = torch.get_rng_state()

    torch.manual_seed(0)
    nn.init.normal_(torch.empty(16, 64), std=0.02)  # ctx (N_CTX 16, tiny width 64)
    nn.init.normal_(torch.empty(1, 512), std=0.02)  # bias_vectors
    load_clip(tiny_vit)  # the second CLIP
    nn.Linear(512, 512), nn.Linear(512, 128, bias=False), nn.Linear(128, 512, bias=False)
    assert torch.equal(ours, torch.get_rng_state())


def test_an_original_checkpoint_loads_without_its_unused_weights(data_root, tiny_vit, tmp_path):
    trainer = _trainer(data_root, tiny_vit, tmp_path)
    ctx = torch.randn(4, 64)
    original = {
        "ctx": ctx,
        "bias_vectors": torch.zeros(1, 512),
        "meta_net.linear1.weight": torch.zeros(512, 512),
        "meta_net.linear1.bias": torch.zeros(512),
        "token_prefix": torch.zeros(10, 1, 64),
        "token_suffix": torch.zeros(10, 72, 64),
    }
    prepared = trainer.prepare_loaded_state_dict("prompt_learner", original, "model.pth.tar-100")
    assert list(prepared) == ["ctx"] and torch.equal(prepared["ctx"], ctx)
    trainer.check_checkpoint(original, "model.pth.tar-100")  # 4 vectors: fits
    with pytest.raises(CheckpointError, match=r"'ctx' has shape \(16, 64\) there but \(4, 64\)"):
        trainer.check_checkpoint({"ctx": torch.zeros(16, 64)}, "model.pth.tar-100")


# ---------------------------------------------------------------------- runs
def test_trains_end_to_end_and_eval_only_reproduces(data_root, tiny_vit, tmp_path):
    a = str(tmp_path / "a")
    argv = _argv(data_root, a, tiny_vit, "OPTIM.MAX_EPOCH", "2", "TRAINER.COOP.W", "8.0")
    assert main(argv) == 0
    ckpt = torch.load(os.path.join(a, "prompt_learner", "model.pth.tar-2"), weights_only=True)
    assert list(ckpt["state_dict"]) == ["ctx"] and ckpt["state_dict"]["ctx"].shape == (4, 64)
    e = str(tmp_path / "e")
    argv = _argv(data_root, e, tiny_vit, "OPTIM.MAX_EPOCH", "2")
    assert main(["--model-dir", a, "--load-epoch", "2", "--eval-only", *argv]) == 0
    assert read_results(e)["metrics"] == read_results(a)["metrics"]
    assert read_results(e)["trainer"] == "KgCoOp"


def test_fast_text_path_gives_the_plain_paths_losses(data_root, tiny_vit, tmp_path):
    trainers = {
        fast: _trainer(
            data_root, tiny_vit, tmp_path / fast, "FAST.ENABLED", fast, "TRAINER.COOP.W", "8.0"
        )
        for fast in ("True", "False")
    }
    assert trainers["True"].model.text_mode == "shared_prefix"
    assert trainers["False"].model.text_mode == "plain"
    batches = list(trainers["True"].train_loader_x)[:3]
    losses = {
        fast: [s["loss"] for s in step_summaries(trainer, batches)]
        for fast, trainer in trainers.items()
    }
    assert losses["True"] == pytest.approx(losses["False"], rel=1e-5)
    ctx = [t.model.prompt_learner.ctx.detach() for t in trainers.values()]
    assert torch.allclose(*ctx, atol=1e-6)
