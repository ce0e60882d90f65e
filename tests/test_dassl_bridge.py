"""The plugin inside the real Dassl (installed by ``.ci/run`` from ``shared/third_party``).

Without Dassl these tests skip with the reason; the config-extension test needs no Dassl."""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers_train import coop_argv, killed_then_resumed, loss_lines
from yacs.config import CfgNode as CN

from coop.train import main


def _dassl():
    return pytest.importorskip(
        "dassl.engine", reason="Dassl is not installed (.ci/run installs it)"
    )


def _accuracy(log: str) -> float:
    lines = [ln for ln in open(log, encoding="utf-8") if ln.startswith("* accuracy:")]
    assert lines, f"no accuracy line in {log}"
    return float(lines[-1].split(":")[1].strip().rstrip("%"))


def _short(root: str, out: str, ckpt: str, *extra: str):
    return coop_argv(root, out, ckpt, 1, 4, "OPTIM.MAX_EPOCH", "2", *extra)


# ---------------------------------------------------------------------- a user's train.py
USER_SCRIPT = """
import sys
import coop.dassl_plugin  # the one line a Dassl user adds
from dassl.config import get_cfg_default
from dassl.engine import build_trainer
from dassl.utils import set_random_seed, setup_logger
import dassl.data, dassl.engine, dassl.evaluation

from coop.config import resolve_config_path

root, out, ckpt = sys.argv[1:4]
cfg = get_cfg_default()
cfg.merge_from_file(resolve_config_path("configs/datasets/caltech101.yaml"))
cfg.merge_from_file(resolve_config_path("configs/trainers/CoOp/rn50.yaml"))
cfg.DATASET.ROOT, cfg.OUTPUT_DIR, cfg.SEED, cfg.TRAINER.NAME = root, out, 1, "CoOp"
cfg.merge_from_list([
    "DATASET.NUM_SHOTS", 4, "MODEL.BACKBONE.NAME", ckpt, "INPUT.SIZE", (32, 32),
    "TRAINER.COOP.PREC", "fp32", "DATALOADER.NUM_WORKERS", 0, "OPTIM.MAX_EPOCH", 2,
])
cfg.freeze()
set_random_seed(cfg.SEED)
setup_logger(cfg.OUTPUT_DIR)
trainer = build_trainer(cfg)
print("MRO:", " ".join(f"{c.__module__}.{c.__qualname__}" for c in type(trainer).__mro__))
assert isinstance(trainer, dassl.engine.TrainerX)
assert type(trainer.dm) is dassl.data.DataManager, type(trainer.dm)
assert isinstance(trainer.evaluator, dassl.evaluation.EvaluatorBase), type(trainer.evaluator)
assert isinstance(trainer.dm.dataset, dassl.data.datasets.DatasetBase)
logging_warning = __import__("logging").getLogger("coop.user").warning
logging_warning("a warning from coop reaches log.txt")
trainer.train()
"""


def test_dassl_train_script_runs_coop_on_dassls_engine(data_root, tiny_vit, tmp_path):
    _dassl()
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(USER_SCRIPT))
    out = str(tmp_path / "out")
    env = {**os.environ, "PYTHONPATH": ""}
    proc = subprocess.run(
        [sys.executable, str(script), data_root, out, tiny_vit],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = open(os.path.join(out, "log.txt"), encoding="utf-8").read()
    mro = next(ln for ln in log.splitlines() if ln.startswith("MRO:"))
    assert "dassl.engine.trainer.TrainerX" in mro and "coop.engine" not in mro
    assert mro.split()[1] == "coop.trainers.coop.CoOp"
    assert len(loss_lines(os.path.join(out, "log.txt"))) == 2  # one batch per epoch, 2 epochs
    assert "* accuracy:" in log and "Loading CLIP" in log
    assert "a warning from coop reaches log.txt" in log
    assert "Dassl compatibility: load_checkpoint reads through coop's restricted reader" in log
    assert os.path.isfile(os.path.join(out, "prompt_learner", "model.pth.tar-2"))


# ---------------------------------------------------------------------- Dassl-side choices
def test_dassl_transforms_samplers_and_evaluators_work_under_the_plugin(
    data_root, tiny_vit, tmp_path
):
    _dassl()
    from dassl.evaluation import EVALUATOR_REGISTRY, Classification

    seen = []

    class MyEvaluator(Classification):
        def process(self, mo, gt):
            seen.append(int(gt.numel()))
            super().process(mo, gt)

    EVALUATOR_REGISTRY._obj_map["MyEvaluator"] = MyEvaluator
    try:
        out = str(tmp_path / "o")
        argv = _short(
            data_root, out, tiny_vit,
            "INPUT.TRANSFORMS", "['random_resized_crop', 'random_flip', 'colorjitter', 'normalize']",
            "DATALOADER.TRAIN_X.SAMPLER", "RandomClassSampler",
            "DATALOADER.TRAIN_X.N_INS", "4",
            "TEST.EVALUATOR", "MyEvaluator",
        )  # fmt: skip
        assert main(["--engine", "dassl", *argv]) == 0
    finally:
        del EVALUATOR_REGISTRY._obj_map["MyEvaluator"]
    assert sum(seen) == 60  # every test image went through the user's evaluator
    log = open(os.path.join(out, "log.txt"), encoding="utf-8").read()
    assert "+ color jitter" in log and "* accuracy:" in log
    # the bundled engine refuses what it does not implement, naming the key
    assert main(_short(data_root, str(tmp_path / "b"), tiny_vit, "TEST.EVALUATOR", "X")) == 2


# ---------------------------------------------------------------------- a user's trainer
def test_a_users_dassl_trainer_reuses_our_prompt_learner(data_root, tiny_vit, tmp_path):
    _dassl()
    import torch.nn.functional as F
    from dassl.config import get_cfg_default
    from dassl.engine import TRAINER_REGISTRY, TrainerX, build_trainer
    from dassl.optim import build_lr_scheduler, build_optimizer

    from coop.clip_adapter import load_clip
    from coop.config import merge_from_file
    from coop.dassl_bridge import extend_dassl_cfg, register_into_dassl
    from coop.trainers.coop import CustomCLIP

    register_into_dassl()

    class MyPromptTrainer(TrainerX):
        def build_model(self):
            clip_model = load_clip(self.cfg.MODEL.BACKBONE.NAME).float()
            self.model = CustomCLIP(self.cfg, self.dm.dataset.classnames, clip_model)
            for name, p in self.model.named_parameters():
                p.requires_grad_("prompt_learner" in name)
            self.optim = build_optimizer(self.model.prompt_learner, self.cfg.OPTIM)
            self.sched = build_lr_scheduler(self.optim, self.cfg.OPTIM)
            self.register_model("prompt_learner", self.model.prompt_learner, self.optim, self.sched)

        def forward_backward(self, batch):
            image, label = batch["img"], batch["label"]
            loss = F.cross_entropy(self.model(image), label)
            self.model_backward_and_update(loss)
            if self.batch_idx + 1 == self.num_batches:
                self.update_lr()
            return {"loss": loss.item()}

    TRAINER_REGISTRY._obj_map["MyPromptTrainer"] = MyPromptTrainer
    try:
        cfg = extend_dassl_cfg(get_cfg_default())
        merge_from_file(cfg, "configs/datasets/caltech101.yaml")
        merge_from_file(cfg, "configs/trainers/CoOp/rn50.yaml")
        cfg.merge_from_list(
            ["DATASET.ROOT", data_root, "DATASET.NUM_SHOTS", 2, "MODEL.BACKBONE.NAME", tiny_vit,
             "INPUT.SIZE", (32, 32), "DATALOADER.NUM_WORKERS", 0, "OPTIM.MAX_EPOCH", 1,
             "OUTPUT_DIR", str(tmp_path / "o"), "TRAINER.NAME", "MyPromptTrainer"]
        )  # fmt: skip
        trainer = build_trainer(cfg)
        before = trainer.model.prompt_learner.ctx.detach().clone()
        trainer.train()
    finally:
        del TRAINER_REGISTRY._obj_map["MyPromptTrainer"]
    assert not torch.equal(before, trainer.model.prompt_learner.ctx.detach())


# ---------------------------------------------------------------------- registration
def test_a_clashing_name_is_one_clear_error_unless_replaced(monkeypatch):
    _dassl()
    from dassl.data.datasets import DATASET_REGISTRY
    from dassl.engine import TRAINER_REGISTRY

    from coop.dassl_bridge import register_into_dassl
    from coop.registry import RegistryError

    class CoOp:  # the official repository's trainers/coop.py registers one
        pass

    class Caltech101:
        pass

    CoOp.__module__, Caltech101.__module__ = "trainers.coop", "datasets.caltech101"
    CoOp.__qualname__, Caltech101.__qualname__ = "CoOp", "Caltech101"
    monkeypatch.setitem(TRAINER_REGISTRY._obj_map, "CoOp", CoOp)
    monkeypatch.setitem(DATASET_REGISTRY._obj_map, "Caltech101", Caltech101)
    with pytest.raises(RegistryError) as e:
        register_into_dassl()
    msg = str(e.value)
    assert "trainers.coop.CoOp (ours: coop.trainers.coop.CoOp)" in msg
    assert "datasets.caltech101.Caltech101" in msg and "replace=True" in msg
    assert TRAINER_REGISTRY.get("CoOp") is CoOp  # nothing registered by the refused call
    register_into_dassl(replace=True)
    assert TRAINER_REGISTRY.get("CoOp").__module__ == "coop.trainers.coop"
    assert issubclass(TRAINER_REGISTRY.get("CoOp"), __import__("dassl").engine.TrainerX)
    assert register_into_dassl() == []  # idempotent


def test_a_config_without_our_keys_stops_with_the_call_to_add(data_root, tiny_vit, tmp_path):
    _dassl()
    from dassl.config import defaults as dassl_defaults
    from dassl.config import get_cfg_default
    from dassl.engine import build_trainer

    from coop.config import ConfigError
    from coop.dassl_bridge import register_into_dassl

    register_into_dassl()
    cfg = get_cfg_default()
    for node in ("FAST",):  # as a config made before the plugin was registered
        cfg.pop(node)
    cfg.TRAINER.pop("COOP")
    cfg.DATASET.NAME, cfg.DATASET.ROOT, cfg.TRAINER.NAME = "Caltech101", data_root, "CoOp"
    with pytest.raises(ConfigError, match=r"extend_dassl_cfg\(cfg\)"):
        build_trainer(cfg)
    assert "FAST" in dassl_defaults._C  # registration added our keys to Dassl's defaults


def test_extend_dassl_cfg_adds_our_keys_and_keeps_dassl_values():
    from coop.dassl_bridge import extend_dassl_cfg

    dassl_cfg = CN()
    dassl_cfg.OPTIM = CN()
    dassl_cfg.OPTIM.LR = 0.123
    dassl_cfg.TRAINER = CN()
    dassl_cfg.TRAINER.NAME = "CoOp"
    extend_dassl_cfg(dassl_cfg)
    assert dassl_cfg.OPTIM.LR == 0.123
    assert dassl_cfg.TRAINER.NAME == "CoOp"
    assert dassl_cfg.TRAINER.COOP.N_CTX == 16
    assert dassl_cfg.DATASET.SUBSAMPLE_CLASSES == "all"
    assert dassl_cfg.FAST.ENABLED is True
    assert dassl_cfg.OPTIM.WARMUP_CONS_LR == 1e-5


def test_missing_dassl_is_a_clear_error(monkeypatch, tmp_path):
    from coop.dassl_bridge import DasslNotInstalledError, register_into_dassl

    monkeypatch.setitem(sys.modules, "dassl", None)
    with pytest.raises(DasslNotInstalledError, match="Dassl is not installed"):
        register_into_dassl()
    rc = main(["--engine", "dassl", "--trainer", "CoOp", "--output-dir", str(tmp_path)])
    assert rc == 2


# ---------------------------------------------------------------------- logging and torch
def test_registration_undoes_dassls_logging_disable():
    _dassl()
    import dassl.data  # noqa: F401 - its WILDS module disables logging below WARNING+1

    from coop.dassl_bridge import register_into_dassl

    logging.disable(logging.WARNING)  # what importing dassl.data did, once
    register_into_dassl()
    assert logging.root.manager.disable == logging.NOTSET
    assert logging.getLogger("coop.anything").isEnabledFor(logging.WARNING)


def test_dassl_warmup_scheduler_runs_on_this_torch_and_matches_ours():
    _dassl()
    from dassl.optim import build_lr_scheduler as dassl_sched

    from coop.config import get_cfg_default
    from coop.dassl_bridge import register_into_dassl
    from coop.optim import build_lr_scheduler

    register_into_dassl()
    cfg = get_cfg_default().OPTIM
    cfg.MAX_EPOCH, cfg.WARMUP_EPOCH, cfg.WARMUP_TYPE = 6, 2, "constant"
    lrs = []
    for build in (dassl_sched, build_lr_scheduler):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.LR)
        sched = build(opt, cfg)
        seq = []
        for _ in range(cfg.MAX_EPOCH):
            seq.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        lrs.append(seq)
    assert lrs[0] == lrs[1]


def test_dassl_load_checkpoint_never_unpickles_arbitrary_objects(tmp_path):
    _dassl()
    from coop.dassl_bridge import register_into_dassl

    register_into_dassl()
    from dassl.utils import load_checkpoint

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = str(tmp_path / "model.pth.tar-1")
    torch.save({"state_dict": {"ctx": torch.ones(2)}, "epoch": 1, "x": Evil()}, path)
    ckpt = load_checkpoint(path)
    assert torch.equal(ckpt["state_dict"]["ctx"], torch.ones(2)) and ckpt.get("x") is None
    assert not marker.exists()


# ---------------------------------------------------------------------- checkpoints
def test_a_dassl_written_checkpoint_is_evaluated_by_coop_train(data_root, tiny_vit, tmp_path):
    _dassl()
    trained = str(tmp_path / "dassl_run")
    assert main(["--engine", "dassl", *_short(data_root, trained, tiny_vit)]) == 0
    ckpt = os.path.join(trained, "prompt_learner", "model.pth.tar-2")
    with pytest.raises(pickle.UnpicklingError):  # Dassl's own file: pickled objects
        torch.load(ckpt, weights_only=True)
    out = str(tmp_path / "eval")
    argv = ["--eval-only", "--model-dir", trained, "--load-epoch", "2"]
    assert main([*argv, *coop_argv(data_root, out, tiny_vit, 1, 4)]) == 0
    assert _accuracy(os.path.join(out, "log.txt")) == _accuracy(os.path.join(trained, "log.txt"))


def test_a_killed_dassl_run_resumes_with_the_same_learning_rates(
    data_root, tiny_vit, tmp_path, monkeypatch
):
    _dassl()
    import glob

    from coop.dassl_bridge import dassl_host, register_into_dassl
    from coop.hosts import on_host
    from coop.trainers.coop import CoOp

    register_into_dassl()
    cls = on_host(CoOp, dassl_host())
    extra = ("OPTIM.MAX_EPOCH", "4", "TRAIN.CHECKPOINT_FREQ", "1", "OPTIM.WARMUP_EPOCH", "1")
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    assert main(["--engine", "dassl", *_short(data_root, full, tiny_vit, *extra)]) == 0

    argv = ["--engine", "dassl", *_short(data_root, part, tiny_vit, *extra)]
    assert killed_then_resumed(monkeypatch, cls, lambda: main(argv)) == 0

    def lrs(lines):
        return [ln.split()[-1] for ln in lines]  # epoch [e/4] ... lr X, per batch

    resumed = max(glob.glob(os.path.join(part, "log.txt-*")))
    log = open(resumed, encoding="utf-8").read()
    assert "Previous epoch: 2" in log and "the schedule is replayed for 2 epoch(s)" in log
    assert lrs(loss_lines(resumed)) == lrs(loss_lines(os.path.join(full, "log.txt")))[2:]


def test_our_checkpoint_is_evaluated_on_dassls_engine(data_root, learnable_clip, tmp_path):
    _dassl()
    ours = str(tmp_path / "ours")
    assert main(_short(data_root, ours, learnable_clip)) == 0
    ckpt = os.path.join(ours, "prompt_learner", "model.pth.tar-2")
    # what Dassl's own load_checkpoint does (and the official code with it): a plain load
    state = torch.load(ckpt, map_location="cpu")
    assert set(state["state_dict"]) == {"ctx"} and state["epoch"] == 2
    out = str(tmp_path / "eval")
    argv = ["--engine", "dassl", "--eval-only", "--model-dir", ours, "--load-epoch", "2"]
    assert main([*argv, *coop_argv(data_root, out, learnable_clip, 1, 4)]) == 0
    assert _accuracy(os.path.join(out, "log.txt")) == _accuracy(os.path.join(ours, "log.txt"))


def test_the_training_feature_cache_gives_the_same_numbers_on_both_engines(
    data_root, learnable_clip, tmp_path
):
    _dassl()
    logs = {}
    for engine in ("bundled", "dassl"):
        out = str(tmp_path / engine)
        argv = _short(
            data_root, out, learnable_clip, "DATASET.NUM_SHOTS", "8",
            "FAST.TRAIN_FEATURE_CACHE", "True", "FAST.TRAIN_CACHE_VIEWS", "2",
            "FAST.CACHE_DIR", str(tmp_path / f"cache_{engine}"),
        )  # fmt: skip
        assert main(["--engine", engine, *argv]) == 0
        logs[engine] = os.path.join(out, "log.txt")
    ours, theirs = (loss_lines(logs[e]) for e in ("bundled", "dassl"))
    assert len(ours) == 4 and ours == theirs
    assert "Training feature cache (opt-in deviation)" in open(logs["dassl"]).read()


def test_a_checkpoint_of_the_original_code_resumes_on_dassls_engine(data_root, tiny_vit, tmp_path):
    """The original stores the class-name token buffers; the method's state-dict
    preparation drops them on Dassl's engine too."""
    _dassl()
    run = str(tmp_path / "run")
    argv = _short(data_root, run, tiny_vit, "TRAIN.CHECKPOINT_FREQ", "1")
    argv[argv.index("OPTIM.MAX_EPOCH") + 1] = "1"
    assert main(argv) == 0
    path = os.path.join(run, "prompt_learner", "model.pth.tar-1")
    ckpt = torch.load(path)
    n_cls, dim = 10, ckpt["state_dict"]["ctx"].shape[-1]
    ckpt["state_dict"]["token_prefix"] = torch.zeros(n_cls, 1, dim)
    ckpt["state_dict"]["token_suffix"] = torch.zeros(n_cls, 60, dim)
    torch.save(ckpt, path)
    out = str(tmp_path / "resumed")
    assert main(["--engine", "dassl", "--resume", run, *_short(data_root, out, tiny_vit)]) == 0
    log = open(os.path.join(out, "log.txt"), encoding="utf-8").read()
    assert "Previous epoch: 1" in log and "epoch [2/2]" in log and "epoch [1/2]" not in log


def test_a_user_error_on_dassls_engine_is_recorded_in_its_log(data_root, tiny_vit, tmp_path):
    _dassl()
    run = str(tmp_path / "run")
    assert main(["--engine", "dassl", *_short(data_root, run, tiny_vit)]) == 0
    out = str(tmp_path / "eval")
    argv = ["--engine", "dassl", "--eval-only", "--model-dir", run, "--load-epoch", "2"]
    rc = main([*argv, *coop_argv(data_root, out, tiny_vit, 1, 4, "TRAINER.COOP.N_CTX", "4")])
    assert rc == 2
    log = open(os.path.join(out, "log.txt"), encoding="utf-8").read()
    assert "Error: The checkpoint" in log and "does not fit this model" in log
    assert "Loading CLIP" not in log  # refused before CLIP was loaded
