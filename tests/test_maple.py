"""MaPLe (trainers/maple.py): config node and shipped YAMLs, the prompt learner at ViT-B/16
shape, its random draws, which parameters train, the loss, the fast paths, a run with
``--eval-only`` reload."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from helpers_train import build_from_argv, method_argv, read_results

from coop.clip_adapter import import_clip, tokenize
from coop.config import ConfigError, get_cfg_default, merge_from_file
from coop.io import CheckpointError
from coop.train import build_parser, main, setup_cfg
from coop.trainers.maple import MaPLe, MultiModalPromptLearner

B2N = "vit_b16_c2_ep5_batch4_2ctx"
XD = "vit_b16_c2_ep5_batch4_2ctx_cross_datasets"


def _trainer(root, ckpt, out, *extra):
    argv = method_argv(root, out, ckpt, "MaPLe", B2N, "TRAINER.MAPLE.PROMPT_DEPTH", "3", *extra)
    return build_from_argv(MaPLe, argv, seed=1)


def _vit_b16_shape():
    import_clip()
    from clip.model import CLIP

    with torch.device("meta"):  # shapes only: no weights are made
        return CLIP(512, 224, 12, 768, 16, 77, 49408, 512, 8, 12)


def test_config_defaults_are_the_originals():
    cfg = get_cfg_default()
    assert dict(cfg.TRAINER.MAPLE) == {
        "N_CTX": 2,
        "CTX_INIT": "a photo of a",
        "PREC": "fp16",
        "PROMPT_DEPTH": 9,
    }
    assert MaPLe.config_node_name() == "MAPLE"


@pytest.mark.parametrize(
    "stem, lr, epochs, depth", [(B2N, 0.0035, 5, 9), (XD, 0.0026, 2, 3)]
)  # fmt: skip
def test_shipped_yamls_hold_the_originals_values(stem, lr, epochs, depth):
    cfg = get_cfg_default()
    merge_from_file(cfg, f"configs/trainers/MaPLe/{stem}.yaml")
    assert (cfg.OPTIM.NAME, cfg.OPTIM.LR, cfg.OPTIM.MAX_EPOCH) == ("sgd", lr, epochs)
    assert (cfg.OPTIM.LR_SCHEDULER, cfg.OPTIM.WARMUP_EPOCH, cfg.OPTIM.WARMUP_CONS_LR) == (
        "cosine", 1, 1e-5,
    )  # fmt: skip
    assert cfg.DATALOADER.TRAIN_X.BATCH_SIZE == 4 and cfg.DATALOADER.TEST.BATCH_SIZE == 100
    assert cfg.TRAIN.PRINT_FREQ == 20 and cfg.MODEL.BACKBONE.NAME == "ViT-B/16"
    m = cfg.TRAINER.MAPLE
    assert (m.N_CTX, m.CTX_INIT, m.PREC, m.PROMPT_DEPTH) == (2, "a photo of a", "fp16", depth)
    assert MaPLe.protocol_configs == {"base2new": B2N, "xd": XD}
    assert sorted(os.listdir("configs/trainers/MaPLe")) == sorted([f"{B2N}.yaml", f"{XD}.yaml"])


def test_parameter_count_at_vit_b16_shape():
    cfg = get_cfg_default()
    cfg.INPUT.SIZE = (224, 224)
    learner = MultiModalPromptLearner(cfg, ["cat", "dog"], _vit_b16_shape())
    # ctx 2x512, proj 512->768, 8 deeper prompts 2x512 and 8 projections 512->768
    assert sum(p.numel() for p in learner.parameters()) == 3_555_072
    assert learner.proj.out_features == 768 and len(learner.compound_prompts_text) == 8
    assert tuple(learner.compound_prompts_text[0].shape) == (2, 512)


def test_prompt_learner_draws_and_layout_like_the_original(data_root, tiny_vit3):
    from coop.clip_adapter import load_clip

    clip_model = load_clip(tiny_vit3).float()
    cfg = get_cfg_default()
    cfg.INPUT.SIZE = (32, 32)
    cfg.TRAINER.MAPLE.PROMPT_DEPTH = 3
    torch.manual_seed(7)
    learner = MultiModalPromptLearner(cfg, ["cat", "sea_lion"], clip_model)
    # the same draws made by hand: no ctx draw (CTX_INIT), proj, J-1 prompts, one Linear
    torch.manual_seed(7)
    proj = torch.nn.Linear(64, 64)
    prompts = [torch.empty(2, 64).normal_(std=0.02) for _ in range(2)]
    single = torch.nn.Linear(64, 64)
    assert torch.equal(learner.proj.weight, proj.weight)
    assert all(torch.equal(a, b) for a, b in zip(learner.compound_prompts_text, prompts))
    for p in learner.compound_prompt_projections:  # copies of one initialisation
        assert torch.equal(p.weight, single.weight) and torch.equal(p.bias, single.bias)
    # ctx = "a photo"; "of a" stay fixed tokens before the class name
    ids = tokenize("a photo of a sea lion.")[0]
    assert torch.equal(learner.tokenized_prompts[1], ids)
    emb = clip_model.token_embedding(ids).detach()
    assert torch.equal(learner.ctx.detach(), emb[1:3])
    assert torch.equal(learner.token_suffix[1, :2], emb[3:5])  # "of", "a"
    # coupling: each layer's vision prompt is its projection of the text prompt
    vision = learner.vision_prompts()
    assert torch.allclose(vision[0], learner.proj(learner.ctx))
    assert torch.allclose(vision[2], learner.compound_prompt_projections[1](prompts[1]))


def test_only_the_prompt_learner_trains_and_frozen_weights_stay_put(data_root, tiny_vit3, tmp_path):
    trainer = _trainer(data_root, tiny_vit3, str(tmp_path / "o"), "OPTIM.WEIGHT_DECAY", "0.1")
    model = trainer.model
    assert trainer.get_model_names() == ["MultiModalPromptLearner"]
    assert trainer._models["MultiModalPromptLearner"] is model  # the whole CustomCLIP
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {
        "prompt_learner.ctx", "prompt_learner.proj.weight", "prompt_learner.proj.bias",
        "prompt_learner.compound_prompts_text.0", "prompt_learner.compound_prompts_text.1",
        "prompt_learner.compound_prompt_projections.0.weight",
        "prompt_learner.compound_prompt_projections.0.bias",
        "prompt_learner.compound_prompt_projections.1.weight",
        "prompt_learner.compound_prompt_projections.1.bias",
    }  # fmt: skip
    # the optimizer holds every parameter (as the original builds it over the model)
    n_opt = sum(len(g["params"]) for g in trainer.optim.param_groups)
    assert n_opt == len(list(model.parameters()))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = next(iter(trainer.train_loader_x))
    image, label = trainer.parse_batch_train(batch)
    with torch.no_grad():
        expected = F.cross_entropy(model(image), label).item()
    trainer.batch_idx, trainer.num_batches = 0, 2
    summary = trainer.forward_backward(batch)
    assert summary["loss"] == pytest.approx(expected, rel=1e-6)  # MaPLe's loss: CE
    for name, p in model.named_parameters():
        if name in trained:
            assert p.grad is not None and not torch.equal(p.detach(), before[name]), name
        else:  # no gradient, so neither SGD nor its weight decay touches it
            assert p.grad is None and torch.equal(p.detach(), before[name]), name


def test_image_features_change_with_the_prompts(data_root, tiny_vit3, tmp_path):
    trainer = _trainer(data_root, tiny_vit3, str(tmp_path / "o"))
    assert MaPLe.image_encoder_frozen is False and not trainer.eval_cache_enabled()
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = trainer.model.encode_image(image)
        trainer.model.prompt_learner.compound_prompts_text[0].add_(0.5)
        assert not torch.allclose(before, trainer.model.encode_image(image))


def test_fast_paths_give_the_plain_numbers_and_text_features_once(data_root, tiny_vit3, tmp_path):
    losses, logits = {}, {}
    for fast in ("True", "False"):
        trainer = _trainer(
            data_root, tiny_vit3, str(tmp_path / fast), "FAST.ENABLED", fast,
            "DATALOADER.TEST.BATCH_SIZE", "25",
        )  # fmt: skip
        calls = []
        trainer.model.text_encoder.register_forward_hook(lambda *a, calls=calls: calls.append(1))
        trainer.test()  # 60 test images in batches of 25
        trainer.model.eval()
        with torch.no_grad():
            logits[fast] = trainer.model(torch.randn(3, 3, 32, 32, generator=_gen()))
        assert len(calls) == (2 if fast == "True" else 4)  # once, or once per batch (3) + 1
        batch = next(iter(trainer.train_loader_x))
        trainer.set_model_mode("train")
        trainer.batch_idx, trainer.num_batches = 0, 2
        losses[fast] = [trainer.forward_backward(batch)["loss"] for _ in range(2)]
    assert type(trainer.model.text_encoder).__name__ == "DeepTextEncoder"  # the plain path
    assert torch.allclose(logits["True"], logits["False"], atol=1e-4, rtol=1e-5)
    assert losses["True"] == pytest.approx(losses["False"], rel=1e-5)


def _gen():
    return torch.Generator().manual_seed(3)


def test_a_run_and_its_eval_only_reload_give_the_same_accuracy(data_root, tiny_vit3, tmp_path):
    out = str(tmp_path / "train")
    extra = (
        "OPTIM.MAX_EPOCH",
        "1",
        "TRAINER.MAPLE.PROMPT_DEPTH",
        "3",
        "DATALOADER.TEST.BATCH_SIZE",
        "25",
    )
    assert main(method_argv(data_root, out, tiny_vit3, "MaPLe", B2N, *extra, shots=2)) == 0
    ckpt = os.path.join(out, "MultiModalPromptLearner", "model.pth.tar-1")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert "image_encoder.conv1.weight" in state and "prompt_learner.ctx" in state
    assert "text_encoder.transformer.resblocks.0.attn.in_proj_weight" in state
    assert "prompt_learner.token_prefix" in state  # saved, rebuilt on loading
    ev = str(tmp_path / "eval")
    argv = ["--eval-only", "--model-dir", out, "--load-epoch", "1"]
    assert main([*argv, *method_argv(data_root, ev, tiny_vit3, "MaPLe", B2N, *extra)]) == 0
    trained, reloaded = read_results(out), read_results(ev)
    assert reloaded["metrics"]["accuracy"] == trained["metrics"]["accuracy"]
    assert reloaded["total"] == 60


def test_a_checkpoint_of_another_shape_is_one_clear_error(data_root, tiny_vit3, tmp_path):
    trainer = _trainer(data_root, tiny_vit3, str(tmp_path / "o"))
    state = trainer.model.state_dict()
    state["prompt_learner.ctx"] = torch.zeros(4, 64)
    with pytest.raises(CheckpointError, match="'prompt_learner.ctx' has shape \\(4, 64\\) there"):
        trainer.prepare_loaded_state_dict("MultiModalPromptLearner", state, "x.pth")
    state = trainer.model.state_dict()
    state["prompt_learner.token_prefix"] = torch.zeros(3, 1, 64)  # other class names: rebuilt
    fitted = trainer.prepare_loaded_state_dict("MultiModalPromptLearner", state, "x.pth")
    assert torch.equal(
        fitted["prompt_learner.token_prefix"], trainer.model.prompt_learner.token_prefix
    )


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("TRAINER.MAPLE.PROMPT_DEPTH", "0", "TRAINER.MAPLE.PROMPT_DEPTH must be >= 1"),
        ("TRAINER.MAPLE.PREC", "fp8", "TRAINER.MAPLE.PREC must be one of"),
        ("FAST.TRAIN_FEATURE_CACHE", "True", "trains its image encoder"),
    ],
)
def test_bad_config_is_one_clear_error(data_root, tiny_vit3, tmp_path, key, value, message):
    argv = method_argv(data_root, str(tmp_path / "o"), tiny_vit3, "MaPLe", B2N, key, value)
    with pytest.raises(ConfigError, match=message):
        setup_cfg(build_parser().parse_args(argv))


def test_a_resnet_backbone_is_refused_with_the_reason(data_root, tiny_rn, tmp_path):
    argv = method_argv(data_root, str(tmp_path / "o"), tiny_rn, "MaPLe", B2N)
    assert main(argv) != 0
    log = open(os.path.join(tmp_path, "o", "log.txt"), encoding="utf-8").read()
    assert "Deep vision prompts need a ViT image encoder" in log
