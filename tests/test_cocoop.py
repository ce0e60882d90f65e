"""CoCoOp (trainers/cocoop.py): config, model, the batched text path against the original's
per-image loop, training and checkpoints end to end.

Expected values come from protocol §(h) (model), §(b)/§(c) (config) and §(k) (scripts)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from helpers_train import loss_lines, read_results
from torch import nn

from coop.clip_adapter import load_clip, tokenize
from coop.config import ConfigError, get_cfg_default, merge_from_list
from coop.train import build_parser, main, setup_cfg
from coop.trainers.cocoop import CoCoOp, CustomCLIP, PromptLearner

NAMES = ["face", "leopard", "motorbike", "car_side", "water lilly", "ant", "yin_yang"]
META_NET = {  # name -> shape, ViT-B/16: visual output 512, text width 512, hidden 512 // 16
    "meta_net.linear1.weight": (32, 512),
    "meta_net.linear1.bias": (32,),
    "meta_net.linear2.weight": (512, 32),
    "meta_net.linear2.bias": (512,),
}


def _cfg(*opts: str, size: int = 32):
    cfg = get_cfg_default()
    cfg.INPUT.SIZE = (size, size)
    merge_from_list(cfg, ["TRAINER.COCOOP.PREC", "fp32", *opts])
    return cfg


class _StubCLIP(nn.Module):
    """What the prompt learner reads of CLIP, at ViT-B/16's sizes (no encoders)."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(49408, 512)
        self.ln_final = nn.LayerNorm(512)
        self.visual = nn.Module()
        self.visual.output_dim = 512
        self.visual.input_resolution = 224
        self.dtype = dtype


@pytest.fixture(scope="module")
def stub():
    return _StubCLIP()


def cocoop_argv(root: str, out: str, ckpt: str, *extra: str):
    """scripts/cocoop/base2new_train.sh's command (its YAML), with what a CPU test needs."""
    return [
        "--root", root,
        "--seed", "1",
        "--trainer", "CoCoOp",
        "--dataset-config-file", "configs/datasets/caltech101.yaml",
        "--config-file", "configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml",
        "--output-dir", out,
        "DATASET.NUM_SHOTS", "2",
        "MODEL.BACKBONE.NAME", ckpt,
        "INPUT.SIZE", "(32, 32)",
        "TRAINER.COCOOP.PREC", "fp32",
        "DATALOADER.NUM_WORKERS", "0",
        "OPTIM.MAX_EPOCH", "2",
        *extra,
    ]  # fmt: skip


def _accuracy(out: str) -> float:
    return read_results(out)["metrics"]["accuracy"]


# ---------------------------------------------------------------------- config
def test_config_defaults_are_the_originals():
    cfg = get_cfg_default()
    node = cfg.TRAINER.COCOOP
    assert dict(node) == {"N_CTX": 16, "CTX_INIT": "", "PREC": "fp16"}
    assert type(node.N_CTX) is int and type(node.CTX_INIT) is str
    assert CoCoOp.config_node_name() == "COCOOP"
    fresh = get_cfg_default()
    del fresh.TRAINER["COCOOP"]
    CoCoOp.add_config(fresh)  # the node is the method's own
    assert dict(fresh.TRAINER.COCOOP) == dict(node)


def test_protocol_configs_are_the_scripts_yaml_files():
    from coop.config import _configs_dir

    # scripts/cocoop/*.sh: CFG=vit_b16_c4_ep10_batch1_ctxv1 for base-to-new and xd; the
    # original has no few-shot grid for CoCoOp
    assert CoCoOp.protocol_configs == {
        "base2new": "vit_b16_c4_ep10_batch1_ctxv1",
        "xd": "vit_b16_c4_ep10_batch1_ctxv1",
    }
    folder = os.path.join(_configs_dir(), "trainers", CoCoOp.config_folder())
    assert CoCoOp.config_folder() == "CoCoOp"
    assert os.path.isfile(os.path.join(folder, "vit_b16_c4_ep10_batch1_ctxv1.yaml"))


@pytest.mark.parametrize(
    "opts, message",
    [
        (("TRAINER.COCOOP.PREC", "fp8"), "TRAINER.COCOOP.PREC must be one of"),
        (
            ("TRAINER.COCOOP.CTX_INIT", "", "TRAINER.COCOOP.N_CTX", "0"),
            "TRAINER.COCOOP.N_CTX must be at least 1, got 0",
        ),
    ],
)
def test_bad_values_are_refused_before_anything_is_written(
    data_root, tiny_vit, tmp_path, opts, message
):
    out = tmp_path / "o"
    argv = cocoop_argv(data_root, str(out), tiny_vit, *opts)
    with pytest.raises(ConfigError, match=message):
        setup_cfg(build_parser().parse_args(argv))
    assert not out.exists()
    cfg = get_cfg_default()
    merge_from_list(cfg, list(opts))
    with pytest.raises(ConfigError, match=message):
        CoCoOp.check_cfg(cfg)


# ---------------------------------------------------------------------- model
@pytest.mark.parametrize(
    "opts, ctx_shape, count",
    [
        # 4 x 512 context + (512 x 32 + 32) + (32 x 512 + 512)
        (("TRAINER.COCOOP.N_CTX", "4", "TRAINER.COCOOP.CTX_INIT", "a photo of a"), (4, 512), 35360),
        (("TRAINER.COCOOP.N_CTX", "16"), (16, 512), 41504),  # 16 x 512 + the same meta-net
    ],
)  # fmt: skip
def test_shapes_and_parameter_count_at_vit_b16_size(stub, opts, ctx_shape, count):
    pl = PromptLearner(_cfg(*opts, size=224), NAMES, stub)
    shapes = {n: tuple(p.shape) for n, p in pl.named_parameters()}
    assert shapes == {"ctx": ctx_shape, **META_NET}
    assert sum(p.numel() for p in pl.parameters()) == count
    assert [n for n, _ in pl.meta_net.named_children()] == ["linear1", "relu", "linear2"]
    assert isinstance(pl.meta_net.relu, nn.ReLU) and pl.meta_net.relu.inplace
    assert set(pl.state_dict()) == {"ctx", *META_NET}  # the class-name buffers are rebuilt


def test_context_and_meta_net_are_drawn_in_the_originals_order(stub):
    cfg = _cfg("TRAINER.COCOOP.N_CTX", "16", size=224)
    torch.manual_seed(3)
    pl = PromptLearner(cfg, NAMES, stub)
    torch.manual_seed(3)  # the original: ctx normal(0, 0.02), then two default Linear inits
    ctx = torch.empty(16, 512).normal_(std=0.02)
    linear1, linear2 = nn.Linear(512, 32), nn.Linear(32, 512)
    assert torch.equal(pl.ctx, ctx)
    assert torch.equal(pl.meta_net.linear1.weight, linear1.weight)
    assert torch.equal(pl.meta_net.linear1.bias, linear1.bias)
    assert torch.equal(pl.meta_net.linear2.weight, linear2.weight)
    assert torch.equal(pl.meta_net.linear2.bias, linear2.bias)


@pytest.mark.parametrize("prec, dtype", [("fp16", torch.float16), ("fp32", torch.float32)])
def test_the_meta_net_takes_the_precision(prec, dtype):
    clip16 = _StubCLIP(dtype=torch.float16 if prec == "fp16" else torch.float32)
    pl = PromptLearner(_cfg("TRAINER.COCOOP.PREC", prec, size=224), NAMES, clip16)
    assert {p.dtype for p in pl.parameters()} == {dtype}


def test_the_same_bias_is_added_to_every_context_token(tiny_vit):
    """Hand-made tensors: the bias of an image is linear2(relu(linear1(f)))."""
    clip = load_clip(tiny_vit).float()  # text width 64, visual output 64: hidden 4
    pl = PromptLearner(_cfg("TRAINER.COCOOP.N_CTX", "3"), NAMES, clip)
    with torch.no_grad():
        pl.ctx.copy_(torch.arange(3 * 64, dtype=torch.float32).view(3, 64))
        for p in pl.meta_net.parameters():
            p.zero_()
        pl.meta_net.linear1.weight[0, 0] = 2.0  # h0 = relu(2 f0)
        pl.meta_net.linear1.bias[1] = -1.0  # h1 = relu(-1) = 0
        pl.meta_net.linear2.weight[:, 0] = torch.linspace(0, 1, 64)
        pl.meta_net.linear2.bias.fill_(0.5)
    feats = torch.zeros(2, 64)
    feats[0, 0], feats[1, 0] = 0.25, -3.0  # h0 = 0.5 and 0
    with torch.no_grad():
        ctx = pl.instance_context(feats)
        prompts = pl(feats)
    bias = torch.stack([0.5 * torch.linspace(0, 1, 64) + 0.5, torch.full((64,), 0.5)])
    expected = torch.arange(3 * 64, dtype=torch.float32).view(1, 3, 64) + bias[:, None, :]
    assert ctx.shape == (2, 3, 64)
    torch.testing.assert_close(ctx, expected, rtol=0, atol=1e-6)
    # prompts (B, n_cls, 77, D): [SOS | shifted context | class name, ".", EOS, padding]
    assert prompts.shape == (2, len(NAMES), 77, 64)
    embedded = clip.token_embedding(tokenize([f"X X X {n.replace('_', ' ')}." for n in NAMES]))
    for b in range(2):
        for c in range(len(NAMES)):
            assert torch.equal(prompts[b, c, 1:4], ctx[b])
            assert torch.equal(prompts[b, c, :1], embedded[c, :1])
            assert torch.equal(prompts[b, c, 4:], embedded[c, 4:])


# ---------------------------------------------------------------------- batched == loop
def _forward_backward(model, images, labels):
    model.prompt_learner.zero_grad()
    logits = model(images)
    F.cross_entropy(logits, labels).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.prompt_learner.named_parameters()}


@pytest.mark.parametrize(
    "fast_opts, passes",
    [
        (("FAST.CLASS_CHUNK", "14"), [14, 14, 7]),  # 2 images (of 7 classes) per pass
        (("FAST.CLASS_CHUNK", "0"), [35]),  # the whole batch in one pass
        (("FAST.CLASS_CHUNK", "4"), [7] * 5),  # one image per pass, classes in 2 chunks
        (("FAST.TEXT", "plain", "FAST.CLASS_CHUNK", "14"), [14, 14, 7]),  # all 77 positions
    ],
)
def test_batched_text_path_equals_the_per_image_loop(tiny_vit, fast_opts, passes):
    """fp32: logits and every prompt-learner gradient equal the original's loop over the
    images within 1e-5 (relative and absolute; float rounding of other kernel shapes)."""
    clip = load_clip(tiny_vit).float()
    for p in clip.parameters():
        p.requires_grad_(False)
    torch.manual_seed(0)
    loop = CustomCLIP(_cfg("FAST.ENABLED", "False", "TRAINER.COCOOP.N_CTX", "4"), NAMES, clip)
    fast = CustomCLIP(_cfg("TRAINER.COCOOP.N_CTX", "4", *fast_opts), NAMES, clip)
    with torch.no_grad():  # every hidden unit active, so every weight gets a gradient
        loop.prompt_learner.meta_net.linear1.bias.add_(1.0)
    fast.prompt_learner.load_state_dict(loop.prompt_learner.state_dict())
    assert loop.text_encoder.text_mode == "loop"
    mode = "plain" if "plain" in fast_opts else "truncate"
    assert fast.text_encoder.text_mode == mode

    g = torch.Generator().manual_seed(1)
    images = torch.randn(5, 3, 32, 32, generator=g)
    labels = torch.randint(0, len(NAMES), (5,), generator=g)
    seen = []  # (prompts, positions) of each text-tower pass in the forward
    hook = clip.transformer.resblocks[0].ln_1.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].shape[:2])
    )
    try:
        want_logits, want_grads = _forward_backward(loop, images, labels)
        assert seen == [(77, len(NAMES))] * 5  # the original: one pass per image, (L, N, D)
        seen.clear()
        got_logits = fast.logits(fast.encode_image(images))
        passes_seen = list(seen)
    finally:
        hook.remove()
    F.cross_entropy(got_logits, labels).backward()
    got_grads = {n: p.grad for n, p in fast.prompt_learner.named_parameters()}

    # the longest prompt "X X X X <name>." ends at its EOT token
    ids = tokenize([f"X X X X {n.replace('_', ' ')}." for n in NAMES])
    length = int(ids.argmax(dim=-1).max()) + 1
    if mode == "plain":
        assert passes_seen == [(77, n) for n in passes]
    elif fast_opts[1] == "4":  # checkpointed class chunks of 4 and 3
        assert passes_seen == [(4, length), (3, length)] * 5
    else:
        assert passes_seen == [(n, length) for n in passes]
    assert got_logits.shape == (5, len(NAMES))
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    assert set(got_grads) == set(want_grads) == {"ctx", *META_NET}
    for name, grad in want_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-5, atol=1e-5)


def test_cached_image_features_give_the_models_logits(tiny_vit):
    clip = load_clip(tiny_vit).float()
    model = CustomCLIP(_cfg(), NAMES, clip).eval()
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        feats = model.encode_image(images)
        raw = clip.visual(images)
        assert torch.equal(feats, raw / raw.norm(dim=-1, keepdim=True))  # L2-normalised
        assert torch.equal(model.logits(feats), model(images))
    assert CoCoOp.image_encoder_frozen  # evaluation may read cached image features


# ---------------------------------------------------------------------- the trainer
def _trainer(data_root, ckpt, out, *extra):
    from coop.hosts import on_host

    cfg = setup_cfg(build_parser().parse_args(cocoop_argv(data_root, out, ckpt, *extra)))
    return on_host(CoCoOp)(cfg)


def test_exactly_the_prompt_learner_is_trained(data_root, tiny_vit, tmp_path):
    trainer = _trainer(data_root, tiny_vit, str(tmp_path / "o"))
    model = trainer.model
    before = {n: p.detach().clone() for n, p in model.prompt_learner.named_parameters()}
    trainer.batch_idx, trainer.num_batches = 0, 2
    summary = trainer.forward_backward(next(iter(trainer.train_loader_x)))
    assert set(summary) == {"loss"}  # the original logs the loss only
    learned = {f"prompt_learner.{n}" for n in ("ctx", *META_NET)}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == learned
    assert {n for n, p in model.named_parameters() if p.requires_grad} == learned
    assert len(trainer.optim.param_groups[0]["params"]) == len(learned)
    for name, p in model.prompt_learner.named_parameters():
        assert p.grad.abs().sum() > 0 and not torch.equal(p.detach(), before[name]), name
    assert trainer.get_model_names() == ["prompt_learner"]


def test_a_step_on_cached_features_is_the_step_on_their_logits(data_root, tiny_vit, tmp_path):
    """FAST.TRAIN_FEATURE_CACHE feeds {"feat", "label"} batches: the loss is the
    cross-entropy of the model's logits of those features."""
    trainer = _trainer(data_root, tiny_vit, str(tmp_path / "o"))
    images, labels = trainer.parse_batch_train(next(iter(trainer.train_loader_x)))
    with torch.no_grad():
        feats = trainer.image_features(images)
        want = F.cross_entropy(trainer.model(images), labels).item()
    trainer.batch_idx, trainer.num_batches = 0, 2
    got = trainer.forward_backward({"feat": feats, "label": labels})["loss"]
    assert got == pytest.approx(want, rel=1e-6)


# ---------------------------------------------------------------------- end to end
def test_train_then_eval_only_reload_gives_the_same_accuracy(data_root, learnable_clip, tmp_path):
    run = str(tmp_path / "train_base")
    assert main(cocoop_argv(data_root, run, learnable_clip)) == 0
    log = os.path.join(run, "log.txt")
    lines = loss_lines(log)
    # 2 shots x 10 classes at batch 1: 20 steps per epoch, printed every 20th (PRINT_FREQ)
    assert [ln.split()[:4] for ln in lines] == [
        ["epoch", "[1/2]", "batch", "[20/20]"],
        ["epoch", "[2/2]", "batch", "[20/20]"],
    ]
    assert all(ln.split()[4] == "loss" and "acc" not in ln for ln in lines)
    ckpt = torch.load(os.path.join(run, "prompt_learner", "model.pth.tar-2"), weights_only=True)
    shapes = {k: tuple(v.shape) for k, v in ckpt["state_dict"].items()}
    hidden = 64 // 16  # the tiny CLIP: visual output 64, text width 64
    assert shapes == {
        "ctx": (4, 64),  # "a photo of a"
        "meta_net.linear1.weight": (hidden, 64),
        "meta_net.linear1.bias": (hidden,),
        "meta_net.linear2.weight": (64, hidden),
        "meta_net.linear2.bias": (64,),
    }
    trained = _accuracy(run)

    # scripts/cocoop/*_test.sh: --model-dir ... --load-epoch N --eval-only
    evaluated = str(tmp_path / "eval")
    argv = ["--model-dir", run, "--load-epoch", "2", "--eval-only"]
    assert main([*argv, *cocoop_argv(data_root, evaluated, learnable_clip)]) == 0
    assert _accuracy(evaluated) == trained
    # the training run's test pass cached the frozen image features; evaluation read them
    eval_log = open(os.path.join(evaluated, "log.txt"), encoding="utf-8").read()
    assert "Using cached image features of the *test* set" in eval_log
    plain = str(tmp_path / "eval_plain")  # the original's computation: the same accuracy
    argv_plain = [*argv, *cocoop_argv(data_root, plain, learnable_clip, "FAST.ENABLED", "False")]
    assert main(argv_plain) == 0
    assert _accuracy(plain) == trained

    # a checkpoint of the original code holds the class-name buffers: dropped on load
    path = os.path.join(run, "prompt_learner", "model.pth.tar-2")
    ckpt["state_dict"]["token_prefix"] = torch.zeros(10, 1, 64)
    ckpt["state_dict"]["token_suffix"] = torch.zeros(10, 72, 64)
    torch.save(ckpt, path)
    original = str(tmp_path / "eval_original")
    assert main([*argv, *cocoop_argv(data_root, original, learnable_clip)]) == 0
    assert _accuracy(original) == trained


def test_a_checkpoint_of_another_context_is_refused_before_clip_loads(
    data_root, tiny_vit, tmp_path, capsys
):
    run = str(tmp_path / "run")
    assert main(cocoop_argv(data_root, run, tiny_vit, "OPTIM.MAX_EPOCH", "1")) == 0
    out = str(tmp_path / "eval")
    argv = ["--model-dir", run, "--load-epoch", "1", "--eval-only"]
    other = ("TRAINER.COCOOP.CTX_INIT", "", "TRAINER.COCOOP.N_CTX", "8")
    assert main([*argv, *cocoop_argv(data_root, out, tiny_vit, *other)]) == 2
    err = capsys.readouterr().err
    path = os.path.join(run, "prompt_learner", "model.pth.tar-1")
    assert (
        f"The checkpoint {path} does not fit this model: 'ctx' has shape (4, 64) there but "
        f"(8, 64) here (10 classes, N_CTX 8, backbone {tiny_vit})"
    ) in err
    assert "Loading CLIP" not in open(os.path.join(out, "log.txt"), encoding="utf-8").read()


def test_the_training_feature_cache_trains_cocoop(data_root, tiny_vit, tmp_path):
    out = str(tmp_path / "o")
    extra = ("FAST.TRAIN_FEATURE_CACHE", "True", "FAST.TRAIN_CACHE_VIEWS", "2")
    assert main(cocoop_argv(data_root, out, tiny_vit, *extra)) == 0
    log = open(os.path.join(out, "log.txt"), encoding="utf-8").read()
    assert "Training feature cache (opt-in deviation): 2 augmented views of 20 images" in log
    assert len(loss_lines(os.path.join(out, "log.txt"))) == 2
    assert os.path.isfile(os.path.join(out, "prompt_learner", "model.pth.tar-2"))
