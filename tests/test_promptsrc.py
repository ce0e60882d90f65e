"""PromptSRC (trainers/promptsrc.py): config node and shipped YAMLs, parameters at ViT-B/16
shape, which parameters train, the losses on hand-made tensors, the GPA weights and the
aggregated model, an exact resume, a run with ``--eval-only`` reload."""

from __future__ import annotations

import glob
import math
import os
import types

import pytest
import torch
from helpers_train import (
    build_from_argv,
    killed_then_resumed,
    loss_lines,
    method_argv,
    read_results,
)

from coop.clip_adapter import import_clip
from coop.config import ConfigError, get_cfg_default, merge_from_file
from coop.train import build_parser, main, setup_cfg
from coop.trainers import promptsrc
from coop.trainers.promptsrc import PromptSRC, TrainingOutput, gpa_weights

B2N = "vit_b16_c2_ep20_batch4_4+4ctx"
XD = "vit_b16_c2_ep20_batch4_4+4ctx_cross_datasets"
FEW = "vit_b16_c2_ep50_batch4_4+4ctx_few_shot"


def _trainer(root, ckpt, out, *extra):
    argv = method_argv(root, out, ckpt, "PromptSRC", B2N, "DATASET.NUM_SHOTS", "2", *extra)
    return build_from_argv(PromptSRC, argv, seed=1)


def test_config_defaults_are_the_originals_and_ours_keep_them():
    cfg = get_cfg_default()
    assert dict(cfg.TRAINER.PROMPTSRC) == {
        "N_CTX_VISION": 4,
        "N_CTX_TEXT": 4,
        "CTX_INIT": "a photo of a",
        "PREC": "fp16",
        "PROMPT_DEPTH_VISION": 9,
        "PROMPT_DEPTH_TEXT": 9,
        "TEXT_LOSS_WEIGHT": 25,
        "IMAGE_LOSS_WEIGHT": 10,
        "GPA_MEAN": 15,
        "GPA_STD": 1,
        "GPA_ALL_WEIGHTS": True,  # ours: the original's behaviour
        "KL_BATCHMEAN": False,  # ours: the original's behaviour
    }


@pytest.mark.parametrize(
    "stem, epochs, depth, mean, std",
    [(B2N, 20, 9, 15, 1), (XD, 20, 3, 6, 10), (FEW, 50, 9, 30, 30)],
)
def test_shipped_yamls_hold_the_originals_values(stem, epochs, depth, mean, std):
    cfg = get_cfg_default()
    merge_from_file(cfg, f"configs/trainers/PromptSRC/{stem}.yaml")
    assert (cfg.OPTIM.NAME, cfg.OPTIM.LR, cfg.OPTIM.MAX_EPOCH) == ("sgd", 0.0025, epochs)
    assert (cfg.OPTIM.WARMUP_EPOCH, cfg.OPTIM.WARMUP_TYPE, cfg.OPTIM.WARMUP_CONS_LR) == (
        1, "constant", 1e-5,
    )  # fmt: skip
    assert cfg.DATALOADER.TRAIN_X.BATCH_SIZE == 4 and cfg.TRAIN.PRINT_FREQ == 20
    p = cfg.TRAINER.PROMPTSRC
    assert (p.PROMPT_DEPTH_VISION, p.PROMPT_DEPTH_TEXT, p.N_CTX_VISION, p.N_CTX_TEXT) == (
        depth, depth, 4, 4,
    )  # fmt: skip
    assert (p.GPA_MEAN, p.GPA_STD, p.TEXT_LOSS_WEIGHT, p.IMAGE_LOSS_WEIGHT) == (mean, std, 25, 10)
    assert (p.CTX_INIT, p.PREC) == ("a photo of a", "fp16")
    assert PromptSRC.protocol_configs == {"fewshot": FEW, "base2new": B2N, "xd": XD}
    assert len(os.listdir("configs/trainers/PromptSRC")) == 3


def test_parameter_count_at_vit_b16_shape(monkeypatch):
    import_clip()
    from clip.model import CLIP

    def vit_b16(cfg):
        with torch.device("meta"):  # shapes only: no weights are made
            return CLIP(512, 224, 12, 768, 16, 77, 49408, 512, 8, 12)

    monkeypatch.setattr(promptsrc.fast, "load_clip_for", vit_b16)
    monkeypatch.setattr(promptsrc, "PROMPTSRC_TEMPLATES", ["a photo of a {}."])  # shapes only
    cfg = get_cfg_default()
    cfg.INPUT.SIZE = (224, 224)
    model = promptsrc.CustomCLIP(cfg, ["cat", "dog"], vit_b16(cfg), torch.device("meta"))
    trained = {n: p.numel() for n, p in model.named_parameters() if PromptSRC.is_learnable(None, n)}
    # ctx 4x512, visual.VPT 4x768, blocks 1-8 of both towers: 4x768 and 4x512
    assert sum(trained.values()) == 46_080
    assert len(trained) == 1 + 1 + 8 + 8
    assert trained["image_encoder.transformer.resblocks.8.VPT_shallow"] == 4 * 768
    assert "image_encoder.transformer.resblocks.9.VPT_shallow" not in trained


def test_what_trains_and_that_frozen_weights_stay_put(data_root, tiny_vit3, tmp_path):
    trainer = _trainer(data_root, tiny_vit3, str(tmp_path / "o"), "OPTIM.WEIGHT_DECAY", "0.1")
    model = trainer.model
    assert trainer.get_model_names() == ["VLPromptLearner"]
    assert trainer._models["VLPromptLearner"] is model
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {
        "prompt_learner.ctx", "image_encoder.VPT",
        "image_encoder.transformer.resblocks.1.VPT_shallow",
        "image_encoder.transformer.resblocks.2.VPT_shallow",
        "text_encoder.transformer.resblocks.1.VPT_shallow",
        "text_encoder.transformer.resblocks.2.VPT_shallow",
    }  # fmt: skip
    assert any(
        n.startswith("prompt_learner.ZS_image_encoder.") for n, _ in model.named_parameters()
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = next(iter(trainer.train_loader_x))
    trainer.batch_idx, trainer.num_batches = 0, 2
    trainer.set_model_mode("train")
    trainer.forward_backward(batch)
    for name, p in model.named_parameters():
        if name in trained:
            assert p.grad is not None and not torch.equal(p.detach(), before[name]), name
        else:  # no gradient: neither SGD nor its weight decay touches it
            assert p.grad is None and torch.equal(p.detach(), before[name]), name


def _normalised(*shape, seed):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("batchmean", [False, True])
def test_the_loss_on_hand_made_tensors(batchmean):
    cfg = get_cfg_default()
    cfg.TRAINER.PROMPTSRC.KL_BATCHMEAN = batchmean
    b, c, d = 3, 5, 8
    out = TrainingOutput(
        logits=torch.randn(b, c, generator=torch.Generator().manual_seed(1)) * 4,
        text_features=_normalised(c, d, seed=2),
        zs_text_features=_normalised(c, d, seed=3),
        zs_image_features=_normalised(b, d, seed=4),
        image_features=_normalised(b, d, seed=5),
        zs_logits=torch.randn(b, c, generator=torch.Generator().manual_seed(6)) * 4,
    )
    label = torch.tensor([0, 3, 4])
    loss = PromptSRC.compute_loss(types.SimpleNamespace(cfg=cfg), out, label)

    def log_softmax(row):
        m = max(row)
        lse = m + math.log(sum(math.exp(v - m) for v in row))
        return [v - lse for v in row]

    logits, zs = out.logits.tolist(), out.zs_logits.tolist()
    ce = -sum(log_softmax(logits[i])[label[i]] for i in range(b)) / b
    kl = 0.0
    for i in range(b):
        lp, lq = log_softmax(logits[i]), log_softmax(zs[i])
        kl += sum(math.exp(q) * (q - p) for p, q in zip(lp, lq))  # KL(p_zs || p)
    kl /= b if batchmean else b * c
    l1_text = (out.text_features - out.zs_text_features).abs().sum().item() / (c * d)
    l1_image = (out.image_features - out.zs_image_features).abs().sum().item() / (b * d)
    expected = ce + kl + 25 * l1_text + 10 * l1_image
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_gpa_weights_are_a_normalised_gaussian_over_the_epochs():
    for epochs, mean, std in ((20, 15, 1), (20, 6, 10), (50, 30, 30), (50, 45, 5)):
        w = gpa_weights(epochs, mean, std)
        density = [math.exp(-((e - mean) ** 2) / (2 * std**2)) for e in range(1, epochs + 1)]
        assert w == pytest.approx([x / sum(density) for x in density], rel=1e-12)
        assert sum(w) == pytest.approx(1.0, abs=1e-12)
        assert max(range(epochs), key=w.__getitem__) + 1 == min(mean, epochs)
    b2n = gpa_weights(20, 15, 1)
    assert [round(x, 4) for x in b2n[11:18]] == [0.0044, 0.054, 0.242, 0.3989, 0.242, 0.054, 0.0044]
    xd = gpa_weights(20, 6, 10)
    assert (round(xd[0], 4), round(xd[5], 4), round(xd[19], 4)) == (0.0554, 0.0628, 0.0236)


@pytest.mark.parametrize("all_weights", [True, False])
def test_gpa_aggregates_a_hand_made_sequence(data_root, tiny_vit3, tmp_path, all_weights):
    trainer = _trainer(
        data_root, tiny_vit3, str(tmp_path / "o"), "OPTIM.MAX_EPOCH", "3",
        "TRAINER.PROMPTSRC.GPA_MEAN", "2", "TRAINER.PROMPTSRC.GPA_STD", "2",
        "TRAINER.PROMPTSRC.GPA_ALL_WEIGHTS", str(all_weights),
    )  # fmt: skip
    model = trainer.model
    ctx, vpt = model.prompt_learner.ctx, model.image_encoder.VPT
    frozen = model.image_encoder.conv1.weight
    frozen_value = frozen.detach().clone()
    w = [math.exp(-((e - 2) ** 2) / (2 * 2**2)) for e in (1, 2, 3)]
    w = [x / sum(w) for x in w]
    seq = [(torch.full_like(ctx, float(e)), torch.full_like(vpt, -2.0 * e)) for e in (1, 2, 3)]
    with torch.no_grad():
        for epoch, (c, v) in enumerate(seq, 1):
            ctx.copy_(c)
            vpt.copy_(v)
            trainer.aggregate_epoch(epoch)
    expected_ctx = sum(wi * e for wi, e in zip(w, (1, 2, 3)))
    assert torch.allclose(ctx, torch.full_like(ctx, expected_ctx), rtol=1e-6)
    assert torch.allclose(vpt, torch.full_like(vpt, -2.0 * expected_ctx), rtol=1e-6)
    # frozen weights: summed with the weights in float32 (the original), or kept
    replay = frozen_value * w[0]
    for wi in w[1:]:
        replay = replay + frozen_value * wi
    assert torch.equal(frozen.detach(), replay if all_weights else frozen_value)
    assert torch.allclose(frozen.detach(), frozen_value, rtol=1e-6, atol=1e-7)


def test_a_killed_run_resumes_to_the_same_gpa_model(data_root, tiny_vit3, tmp_path, monkeypatch):
    from coop.hosts import on_host

    extra = ("OPTIM.MAX_EPOCH", "3", "DATASET.NUM_SHOTS", "1", "TRAINER.PROMPTSRC.GPA_MEAN", "2")
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    assert main(method_argv(data_root, full, tiny_vit3, "PromptSRC", B2N, *extra)) == 0

    argv = method_argv(data_root, part, tiny_vit3, "PromptSRC", B2N, *extra)
    assert killed_then_resumed(monkeypatch, on_host(PromptSRC), lambda: main(argv)) == 0

    resumed = max(glob.glob(os.path.join(part, "log.txt-*")))
    assert (
        loss_lines(resumed)
        == loss_lines(os.path.join(full, "log.txt"))[-len(loss_lines(resumed)) :]
    )
    states = [
        torch.load(os.path.join(d, "VLPromptLearner", "model.pth.tar-3"), weights_only=True)
        for d in (full, part)
    ]
    a, b = (s["state_dict"] for s in states)
    assert a.keys() == b.keys() and any(k.startswith("gpa.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_results(full)["metrics"] == read_results(part)["metrics"]


def test_a_run_and_its_eval_only_reload_give_the_same_accuracy(data_root, tiny_vit3, tmp_path):
    out = str(tmp_path / "train")
    extra = ("OPTIM.MAX_EPOCH", "1", "DATASET.NUM_SHOTS", "1")
    assert main(method_argv(data_root, out, tiny_vit3, "PromptSRC", B2N, *extra)) == 0
    log = open(os.path.join(out, "log.txt"), encoding="utf-8").read()
    assert "Using GPA model for final inference..." in log
    ev = str(tmp_path / "eval")
    argv = ["--eval-only", "--model-dir", out, "--load-epoch", "1"]
    assert main([*argv, *method_argv(data_root, ev, tiny_vit3, "PromptSRC", B2N, *extra)]) == 0
    assert read_results(ev)["metrics"]["accuracy"] == read_results(out)["metrics"]["accuracy"]


def test_text_features_once_per_evaluation_give_the_plain_numbers(data_root, tiny_vit3, tmp_path):
    logits = {}
    for fast in ("True", "False"):
        trainer = _trainer(data_root, tiny_vit3, str(tmp_path / fast), "FAST.ENABLED", fast)
        calls = []
        trainer.model.text_encoder.register_forward_hook(lambda *a, calls=calls: calls.append(1))
        trainer.set_model_mode("eval")
        images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(3))
        with trainer.evaluation_context(), torch.no_grad():
            logits[fast] = torch.cat([trainer.model_inference(x) for x in images.split(2)])
        assert len(calls) == (1 if fast == "True" else 3)
    assert torch.allclose(logits["True"], logits["False"], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("TRAINER.PROMPTSRC.PROMPT_DEPTH_TEXT", "0", "PROMPT_DEPTH_TEXT must be >= 1"),
        ("TRAINER.PROMPTSRC.GPA_STD", "0", "GPA_STD must be > 0"),
        ("FAST.TRAIN_FEATURE_CACHE", "True", "trains its image encoder"),
    ],
)
def test_bad_config_is_one_clear_error(data_root, tiny_vit3, tmp_path, key, value, message):
    argv = method_argv(data_root, str(tmp_path / "o"), tiny_vit3, "PromptSRC", B2N, key, value)
    with pytest.raises(ConfigError, match=message):
        setup_cfg(build_parser().parse_args(argv))
