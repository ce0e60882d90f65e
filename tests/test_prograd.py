"""ProGrad: its config (the original's keys and YAML values), the two losses, the gradient
projection rule and the step that applies it, the zero-shot teacher, the prompt learner's
template initialisation, training end to end with an --eval-only reload, and the fast text
path."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from helpers_train import build_from_argv, coop_node_argv, read_results, step_summaries
from torch import nn

from coop.clip_adapter import load_clip, tokenize
from coop.config import ConfigError, get_cfg_default, merge_from_file, merge_from_list
from coop.io import CheckpointError
from coop.train import main
from coop.trainers.prograd import (
    ProGrad,
    ProGradPromptLearner,
    prograd_losses,
    project_gradient,
)

YAML = "configs/trainers/ProGrad/rn50.yaml"


def _argv(root, out, ckpt, *opts):
    return coop_node_argv(root, out, ckpt, "ProGrad", YAML, *opts)


def _trainer(root, ckpt, tmp_path, *opts):
    return build_from_argv(ProGrad, _argv(root, str(tmp_path / "o"), ckpt, *opts))


# ---------------------------------------------------------------------- config
def test_config_defaults_and_shipped_yamls_are_the_originals():
    cfg = get_cfg_default()
    opts, loss = cfg.TRAINER.COOP, cfg.LOSS
    assert (opts.N_CTX, opts.CSC, opts.PREC, opts.CLASS_TOKEN_POSITION) == (
        16,
        False,
        "fp16",
        "end",
    )
    assert not opts.CTX_INIT and opts.ALPHA == 1.0
    assert (loss.GM, loss.NAME, loss.ALPHA, loss.T, loss.LAMBDA) == (False, "", 0.0, 1.0, 1.0)
    assert ProGrad.config_node_name() == "COOP" and ProGrad.config_folder() == "ProGrad"
    # README: 1 shot rn50_ep50, 2 and 4 shots rn50_ep100, 8 and 16 shots rn50; base-to-new
    # rn50_ep100 (ImageNet rn50_ep50); eval.sh's 4-shot ImageNet model; no xd script
    assert ProGrad.protocol_configs == {
        "fewshot": "rn50",
        "fewshot.1shots": "rn50_ep50",
        "fewshot.2shots": "rn50_ep100",
        "fewshot.4shots": "rn50_ep100",
        "fewshot.imagenet": "rn50_ep50",
        "base2new": "rn50_ep100",
        "base2new.imagenet": "rn50_ep50",
        "dg": "rn50_ep50",
    }
    assert ProGrad.protocol_shots == {"base2new": (4,), "dg": (4,)}
    for name, epochs in (("rn50", 200), ("rn50_ep100", 100), ("rn50_ep50", 50)):
        cfg = get_cfg_default()
        merge_from_file(cfg, f"configs/trainers/ProGrad/{name}.yaml")
        assert cfg.MODEL.BACKBONE.NAME == "RN50"
        assert cfg.DATALOADER.TRAIN_X.BATCH_SIZE == 32 and cfg.DATALOADER.TEST.BATCH_SIZE == 100
        assert cfg.DATALOADER.NUM_WORKERS == 8 and cfg.TRAIN.PRINT_FREQ == 5
        o = cfg.OPTIM
        assert (o.NAME, o.LR, o.MAX_EPOCH, o.LR_SCHEDULER) == ("sgd", 0.002, epochs, "cosine")
        assert (o.WARMUP_EPOCH, o.WARMUP_TYPE, o.WARMUP_CONS_LR) == (1, "constant", 1e-5)
        assert cfg.INPUT.INTERPOLATION == "bicubic"
        assert (cfg.LOSS.NAME, cfg.LOSS.T, cfg.LOSS.LAMBDA) == ("prograd", 1.0, 1.0)
        assert cfg.TRAINER.COOP.CTX_INIT  # truthy, as the original's True


@pytest.mark.parametrize(
    "opts, message",
    [
        (["LOSS.NAME", ""], "ProGrad needs LOSS.NAME 'prograd'"),
        (["LOSS.T", "0.0"], "LOSS.T .* must be > 0"),
        (["TRAINER.COOP.PREC", "amp"], "ProGrad has no amp path"),
        (["TRAINER.COOP.CLASS_TOKEN_POSITION", "middle"], "no 'middle' class token position"),
        (["DATASET.NAME", "UCF101", "TRAINER.COOP.N_CTX", "4"], "'a photo of a person doing' .6."),
        (["FAST.TRAIN_FEATURE_CACHE", "True"], "needs TRAINER.COOP.PREC fp32"),
    ],
)
def test_bad_settings_are_refused(opts, message):
    cfg = get_cfg_default()
    merge_from_file(cfg, YAML)
    merge_from_list(cfg, opts)
    with pytest.raises(ConfigError, match=message):
        ProGrad.check_cfg(cfg)


# ---------------------------------------------------------------------- losses and rule
def test_losses_on_hand_made_logits():
    s = torch.tensor([[1.0, 2.0, 0.0]], requires_grad=True)  # student
    z = torch.tensor([[0.0, 1.0, 1.0]])  # teacher
    label, T = torch.tensor([1]), 2.0
    xe, kl = prograd_losses(s, z, label, T)

    def softmax(v):
        e = [math.exp(x) for x in v]
        return [x / sum(e) for x in e]

    assert xe.item() == pytest.approx(-math.log(softmax([1.0, 2.0, 0.0])[1]), rel=1e-6)
    p, q = softmax([0.0, 0.5, 0.5]), softmax([0.5, 1.0, 0.0])
    expected = T * T * sum(-pc * math.log(qc) for pc, qc in zip(p, q))
    assert kl.item() == pytest.approx(expected, rel=1e-6)
    # its gradient is that of T² KL(p ‖ q): the teacher's entropy is a constant
    (g,) = torch.autograd.grad(kl, s)
    s2 = s.detach().clone().requires_grad_(True)
    true_kl = T * T * F.kl_div(F.log_softmax(s2 / T, -1), torch.tensor([p]), reduction="sum")
    (g2,) = torch.autograd.grad(true_kl, s2)
    assert torch.allclose(g, g2, atol=1e-6)


@pytest.mark.parametrize("lam, expected", [(1.0, [0.5, 0.5]), (0.5, [0.75, 0.25])])
def test_a_conflicting_gradient_loses_lambda_times_its_component(lam, expected):
    g_ce, g_kl = torch.tensor([1.0, 0.0]), torch.tensor([-2.0, 2.0])  # g_ce·g_kl < 0
    g = project_gradient(g_ce, g_kl, lam)
    assert torch.allclose(g, torch.tensor(expected), atol=1e-6)
    if lam == 1.0:  # the plane orthogonal to g_kl
        assert abs(torch.dot(g, g_kl).item()) < 1e-6


@pytest.mark.parametrize(
    "g_kl",
    [[3.0, 1.0], [0.0, 5.0], [0.0, 0.0]],  # agreeing, orthogonal (a tie), no KL gradient
)
def test_a_non_conflicting_gradient_is_kept_as_it_is(g_kl):
    g_ce = torch.tensor([1.0, 0.0])
    assert torch.equal(project_gradient(g_ce, torch.tensor(g_kl), 1.0), g_ce)


def test_the_rule_takes_a_parameter_as_one_flat_vector():
    g_ce = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    g_kl = torch.tensor([[-1.0, 0.0], [0.0, 0.5]])  # conflicts as a whole: 1·(-1) + 1·0.5 < 0
    g = project_gradient(g_ce, g_kl, 1.0)
    u = g_kl.flatten() / g_kl.norm()
    expected = g_ce.flatten() - torch.dot(g_ce.flatten(), u) * u
    assert torch.allclose(g.flatten(), expected, atol=1e-6)
    assert g.shape == (2, 2)


# ---------------------------------------------------------------------- model and step
def test_the_step_applies_the_projected_gradient_to_the_context_only(data_root, tiny_vit, tmp_path):
    trainer = _trainer(data_root, tiny_vit, tmp_path, "LOSS.LAMBDA", "0.8")
    model = trainer.model
    batch = next(iter(trainer.train_loader_x))
    image, label = trainer.parse_batch_train(batch)
    ctx = model.prompt_learner.ctx
    logits, teacher = trainer.train_output(image=image)
    xe, kl = prograd_losses(logits, teacher, label, 1.0)
    g_kl, g_ce = (torch.autograd.grad(loss, ctx, retain_graph=True)[0] for loss in (kl, xe))
    cos = F.cosine_similarity(g_kl.flatten(), g_ce.flatten(), dim=0).item()
    u = g_kl / g_kl.norm()
    expected = g_ce - 0.8 * (g_ce * u).sum() * u if cos < 0 else g_ce

    trainer.batch_idx, trainer.num_batches = 0, 5
    summary = trainer.forward_backward(batch)
    assert summary["xe_loss"] == pytest.approx(xe.item(), rel=1e-6)
    assert summary["kl_loss"] == pytest.approx(kl.item(), rel=1e-6)
    assert torch.allclose(ctx.grad, expected, atol=1e-7)
    assert [n for n, p in model.named_parameters() if p.grad is not None] == ["prompt_learner.ctx"]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["prompt_learner.ctx"]
    # a template-initialised context has N_CTX vectors
    trainer.check_checkpoint({"ctx": torch.zeros(16, 64)}, "model.pth.tar-200")
    with pytest.raises(CheckpointError, match=r"'ctx' has shape \(4, 64\) there but \(16, 64\)"):
        trainer.check_checkpoint({"ctx": torch.zeros(4, 64)}, "model.pth.tar-200")


@pytest.mark.parametrize("prec", ["fp32", "bf16"])
def test_the_teacher_is_zero_shot_clip_in_fp32(data_root, tiny_vit, tmp_path, prec):
    trainer = _trainer(data_root, tiny_vit, tmp_path, "TRAINER.COOP.PREC", prec)
    teacher = trainer.model.teacher
    # fp32 students share their image features; others keep an fp32 image encoder
    assert (teacher.image_encoder is None) == (prec == "fp32")
    clip_model = load_clip(tiny_vit).float()
    names = [c.replace("_", " ") for c in trainer.dm.dataset.classnames]
    image = next(iter(trainer.train_loader_x))["img"]
    with torch.no_grad():
        t = clip_model.encode_text(tokenize([f"a photo of a {c}." for c in names]))
        f = clip_model.encode_image(image)
        t, f = t / t.norm(dim=-1, keepdim=True), f / f.norm(dim=-1, keepdim=True)
        expected = clip_model.logit_scale.exp() * f @ t.t()
    assert torch.allclose(teacher.text_features, t, atol=1e-6)
    with trainer.autocast():
        _, teacher_logits = trainer.train_output(image=image)
    assert teacher_logits.dtype == torch.float32
    assert torch.allclose(teacher_logits, expected, atol=1e-4)


@pytest.mark.parametrize(
    "dataset, n_words, first_suffix_word",
    [
        ("OxfordPets", 8, "a"),  # "a type of pet, a photo of a": 8 words, 9 tokens
        ("Food101", 7, "of"),  # "a type of food, a photo of": 7 words, 8 tokens
        ("DescribableTextures", 3, None),  # "a texture of": one token per word
    ],
)
def test_the_context_starts_from_prograds_template(tiny_vit, dataset, n_words, first_suffix_word):
    cfg = get_cfg_default()
    merge_from_file(cfg, YAML)
    merge_from_list(cfg, ["DATASET.NAME", dataset, "INPUT.SIZE", "(32, 32)"])
    clip_model = load_clip(tiny_vit).float()
    learner = ProGradPromptLearner(cfg, ["golden retriever"], clip_model)
    ctx = learner.ctx.detach()
    template = {
        "OxfordPets": "a type of pet, a photo of a",
        "Food101": "a type of food, a photo of",
        "DescribableTextures": "a texture of",
    }[dataset]
    tokens = tokenize(template)[0]
    with torch.no_grad():
        embed = clip_model.token_embedding(tokens)
    assert ctx.shape == (16, 64)
    assert torch.equal(ctx[: 16 - n_words], torch.zeros(16 - n_words, 64))  # no random draw
    assert torch.equal(ctx[16 - n_words :], embed[1 : 1 + n_words])
    # the prompt is "X ... X <template> golden retriever." with the context over its first
    # 16 tokens: a token past them stays fixed in front of the class name
    prompt = tokenize(" ".join(["X"] * (16 - n_words)) + " " + template + " golden retriever.")
    assert torch.equal(learner.tokenized_prompts, prompt)
    with torch.no_grad():
        suffix0 = learner.token_suffix[0, 0]
        if first_suffix_word is None:
            name = tokenize("golden retriever")[0, 1]
            assert torch.equal(suffix0, clip_model.token_embedding.weight[name])
        else:
            assert torch.equal(suffix0, embed[1 + n_words])
            word = tokenize(first_suffix_word)[0, 1]
            assert torch.equal(suffix0, clip_model.token_embedding.weight[word])


def test_random_numbers_are_drawn_in_the_originals_order(data_root, tiny_vit, tmp_path):
    """The teacher's CLIP is built before the context is drawn (random init)."""
    trainer = _trainer(data_root, tiny_vit, tmp_path, "TRAINER.COOP.CTX_INIT", "")
    clip_model = load_clip(tiny_vit).float()
    torch.manual_seed(0)
    trainer.build_custom_clip(clip_model)
    ours = torch.get_rng_state()
    torch.manual_seed(0)
    load_clip(tiny_vit)  # the teacher
    nn.init.normal_(torch.empty(16, 64), std=0.02)  # ctx
    assert torch.equal(ours, torch.get_rng_state())


# ---------------------------------------------------------------------- runs
def test_trains_end_to_end_and_eval_only_reproduces(data_root, tiny_vit, tmp_path):
    a = str(tmp_path / "a")
    assert main(_argv(data_root, a, tiny_vit, "OPTIM.MAX_EPOCH", "2")) == 0
    log = open(os.path.join(a, "log.txt"), encoding="utf-8").read()
    assert "xe_loss" in log and "kl_loss" in log and "epoch [2/2] batch [5/5]" in log
    ckpt = torch.load(os.path.join(a, "prompt_learner", "model.pth.tar-2"), weights_only=True)
    assert list(ckpt["state_dict"]) == ["ctx"] and ckpt["state_dict"]["ctx"].shape == (16, 64)
    e = str(tmp_path / "e")
    argv = _argv(data_root, e, tiny_vit, "OPTIM.MAX_EPOCH", "2")
    assert main(["--model-dir", a, "--load-epoch", "2", "--eval-only", *argv]) == 0
    assert read_results(e)["metrics"] == read_results(a)["metrics"]


def test_fast_text_path_gives_the_plain_paths_losses(data_root, tiny_vit, tmp_path):
    trainers = {
        fast: _trainer(data_root, tiny_vit, tmp_path / fast, "FAST.ENABLED", fast)
        for fast in ("True", "False")
    }
    assert trainers["True"].model.text_mode == "shared_prefix"
    assert trainers["False"].model.text_mode == "plain"
    batches = list(trainers["True"].train_loader_x)[:3]
    losses = {
        fast: [x for s in step_summaries(trainer, batches) for x in (s["xe_loss"], s["kl_loss"])]
        for fast, trainer in trainers.items()
    }
    assert losses["True"] == pytest.approx(losses["False"], rel=1e-5)
    ctx = [t.model.prompt_learner.ctx.detach() for t in trainers.values()]
    assert torch.allclose(*ctx, atol=1e-6)
