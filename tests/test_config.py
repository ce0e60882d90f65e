"""Config defaults, shipped YAMLs, merge order, errors and the CLI's error reporting.

Expected values come from protocol §(b), §(c) and §(d).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from coop.config import (
    ConfigError,
    get_cfg_default,
    iter_yaml_files,
    merge_from_file,
    merge_from_list,
)
from coop.registry import RegistryError
from coop.train import build_parser, main, setup_cfg

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
TRANSFORMS = ["random_resized_crop", "random_flip", "normalize"]

DATASET_NAMES = {
    "caltech101": "Caltech101",
    "dtd": "DescribableTextures",
    "eurosat": "EuroSAT",
    "fgvc_aircraft": "FGVCAircraft",
    "food101": "Food101",
    "imagenet": "ImageNet",
    "imagenet_a": "ImageNetA",
    "imagenet_r": "ImageNetR",
    "imagenet_sketch": "ImageNetSketch",
    "imagenetv2": "ImageNetV2",
    "oxford_flowers": "OxfordFlowers",
    "oxford_pets": "OxfordPets",
    "stanford_cars": "StanfordCars",
    "sun397": "SUN397",
    "ucf101": "UCF101",
}

# §(c) per-file table: backbone, TRAIN_X.BS, TEST.BS, MAX_EPOCH, PRINT_FREQ, trainer keys
ctxv1 = {"TRAINER.COOP.CTX_INIT": "a photo of a"}
TRAINER_TABLE = {
    "CoOp/rn50.yaml": ("RN50", 32, 100, 200, 5, {}),
    "CoOp/rn50_ep100.yaml": ("RN50", 32, 100, 100, 5, {}),
    "CoOp/rn50_ep50.yaml": ("RN50", 32, 100, 50, 5, {}),
    "CoOp/rn50_ctxv1.yaml": ("RN50", 32, 100, 200, 5, ctxv1),
    "CoOp/rn50_ep50_ctxv1.yaml": ("RN50", 32, 100, 50, 5, ctxv1),
    "CoOp/rn50_val.yaml": ("RN50", 200, 200, 10, 10, {}),
    "CoOp/rn101.yaml": ("RN101", 32, 100, 200, 5, {}),
    "CoOp/rn101_ep50.yaml": ("RN101", 32, 100, 50, 5, {}),
    "CoOp/vit_b32.yaml": ("ViT-B/32", 32, 100, 200, 5, {}),
    "CoOp/vit_b32_ep50.yaml": ("ViT-B/32", 32, 100, 50, 5, {}),
    "CoOp/vit_b16.yaml": ("ViT-B/16", 32, 100, 200, 5, {}),
    "CoOp/vit_b16_ep100.yaml": ("ViT-B/16", 32, 100, 100, 5, {}),
    "CoOp/vit_b16_ep50.yaml": ("ViT-B/16", 32, 100, 50, 5, {}),
    "CoOp/vit_b16_ctxv1.yaml": ("ViT-B/16", 32, 100, 200, 5, ctxv1),
    "CoOp/vit_b16_ep100_ctxv1.yaml": ("ViT-B/16", 32, 100, 100, 5, ctxv1),
    "CoOp/vit_b16_ep50_ctxv1.yaml": ("ViT-B/16", 32, 100, 50, 5, ctxv1),
    "CoCoOp/vit_b16_c4_ep10_batch1.yaml": (
        "ViT-B/16",
        1,
        100,
        10,
        20,
        {"TRAINER.COCOOP.N_CTX": 4, "TRAINER.COCOOP.CTX_INIT": "", "TRAINER.COCOOP.PREC": "fp16"},
    ),
    "CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml": (
        "ViT-B/16",
        1,
        100,
        10,
        20,
        {
            "TRAINER.COCOOP.N_CTX": 4,
            "TRAINER.COCOOP.CTX_INIT": "a photo of a",
            "TRAINER.COCOOP.PREC": "fp16",
        },
    ),
    "CoCoOp/vit_b16_c8_ep10_batch1.yaml": (
        "ViT-B/16",
        1,
        100,
        10,
        20,
        {"TRAINER.COCOOP.N_CTX": 8, "TRAINER.COCOOP.CTX_INIT": "", "TRAINER.COCOOP.PREC": "fp16"},
    ),
    "CoCoOp/vit_b16_c16_ep10_batch1.yaml": (
        "ViT-B/16",
        1,
        100,
        10,
        20,
        {"TRAINER.COCOOP.N_CTX": 16, "TRAINER.COCOOP.CTX_INIT": "", "TRAINER.COCOOP.PREC": "fp16"},
    ),
}


def _get(cfg, key):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _merged(*paths):
    cfg = get_cfg_default()
    for p in paths:
        merge_from_file(cfg, p)
    return cfg


def _args(*argv):
    return build_parser().parse_args(list(argv))


BASE_ARGV = (
    "--trainer",
    "CoOp",
    "--dataset-config-file",
    "configs/datasets/caltech101.yaml",
    "--config-file",
    "configs/trainers/CoOp/rn50.yaml",
)


# --------------------------------------------------------------------------------------------
# Shipped YAMLs


def _shipped_rel():
    out = {}
    for path in iter_yaml_files():
        rel = path.replace(os.sep, "/").split("/configs/", 1)[1]
        out[rel] = path
    return out


def test_shipped_yaml_set_is_complete():
    # CoOp's and CoCoOp's files; each sibling method's test checks its own folder
    folders = {k.split("/")[0] for k in TRAINER_TABLE}
    rel = {r for r in _shipped_rel() if r.startswith("datasets/") or r.split("/")[1] in folders}
    expected = {f"datasets/{k}.yaml" for k in DATASET_NAMES} | {
        f"trainers/{k}" for k in TRAINER_TABLE
    }
    assert rel == expected


@pytest.mark.parametrize("path", list(iter_yaml_files()), ids=lambda p: os.path.basename(p))
def test_every_shipped_yaml_merges_into_defaults(path):
    cfg = get_cfg_default()
    merge_from_file(cfg, path)
    cfg.freeze()


@pytest.mark.parametrize("stem, name", sorted(DATASET_NAMES.items()))
def test_dataset_yaml_sets_name(stem, name):
    cfg = _merged(f"configs/datasets/{stem}.yaml")
    assert cfg.DATASET.NAME == name


@pytest.mark.parametrize("rel", sorted(TRAINER_TABLE))
def test_trainer_yaml_values(rel):
    backbone, bs_train, bs_test, max_epoch, print_freq, trainer_keys = TRAINER_TABLE[rel]
    cfg = _merged(f"configs/trainers/{rel}")

    assert cfg.MODEL.BACKBONE.NAME == backbone
    assert cfg.DATALOADER.TRAIN_X.BATCH_SIZE == bs_train
    assert cfg.DATALOADER.TEST.BATCH_SIZE == bs_test
    assert cfg.OPTIM.MAX_EPOCH == max_epoch
    assert cfg.TRAIN.PRINT_FREQ == print_freq

    # shared by every file
    assert cfg.DATALOADER.NUM_WORKERS == 8
    assert tuple(cfg.INPUT.SIZE) == (224, 224)
    assert cfg.INPUT.INTERPOLATION == "bicubic"
    assert list(cfg.INPUT.PIXEL_MEAN) == CLIP_MEAN
    assert list(cfg.INPUT.PIXEL_STD) == CLIP_STD
    assert list(cfg.INPUT.TRANSFORMS) == TRANSFORMS

    if rel == "CoOp/rn50_val.yaml":
        # no OPTIM or TRAIN keys: Dassl's defaults
        assert cfg.OPTIM.NAME == "adam"
        assert cfg.OPTIM.LR == 0.0003
        assert cfg.OPTIM.LR_SCHEDULER == "single_step"
        assert cfg.OPTIM.WARMUP_EPOCH == -1
        assert cfg.OPTIM.WARMUP_TYPE == "linear"
    else:
        assert cfg.OPTIM.NAME == "sgd"
        assert cfg.OPTIM.LR == 0.002
        assert cfg.OPTIM.LR_SCHEDULER == "cosine"
        assert cfg.OPTIM.WARMUP_EPOCH == 1
        assert cfg.OPTIM.WARMUP_TYPE == "constant"
        assert cfg.OPTIM.WARMUP_CONS_LR == 1e-5
        assert isinstance(cfg.OPTIM.WARMUP_CONS_LR, float)

    # never set by any file: Dassl / CoOp defaults
    assert cfg.OPTIM.WEIGHT_DECAY == 5e-4
    assert cfg.OPTIM.MOMENTUM == 0.9
    assert cfg.OPTIM.SGD_DAMPNING == 0
    assert cfg.OPTIM.SGD_NESTEROV is False
    assert cfg.TEST.FINAL_MODEL == "last_step"
    assert cfg.TRAINER.COOP.PREC == "fp16"
    assert cfg.TRAINER.COOP.N_CTX == 16
    assert cfg.TRAINER.COOP.CSC is False
    assert cfg.TRAINER.COOP.CLASS_TOKEN_POSITION == "end"

    defaults = {
        "TRAINER.COOP.CTX_INIT": "",
        "TRAINER.COCOOP.N_CTX": 16,
        "TRAINER.COCOOP.CTX_INIT": "",
        "TRAINER.COCOOP.PREC": "fp16",
    }
    defaults.update(trainer_keys)
    for key, value in defaults.items():
        assert _get(cfg, key) == value, key


def test_yaml_tuple_and_float_parsing():
    cfg = _merged("configs/trainers/CoOp/rn50.yaml")
    assert isinstance(cfg.INPUT.SIZE, tuple)
    assert isinstance(cfg.INPUT.SIZE[0], int)
    assert isinstance(cfg.OPTIM.WARMUP_CONS_LR, float)


# --------------------------------------------------------------------------------------------
# Defaults (§(d)) and extend_cfg (§(b))

DASSL_DEFAULTS = {
    "OUTPUT_DIR": "./output",
    "RESUME": "",
    "SEED": -1,
    "USE_CUDA": True,
    "VERBOSE": True,
    "INPUT.SIZE": (224, 224),
    "INPUT.INTERPOLATION": "bilinear",
    "INPUT.TRANSFORMS": (),
    "INPUT.NO_TRANSFORM": False,
    "INPUT.PIXEL_MEAN": [0.485, 0.456, 0.406],
    "INPUT.PIXEL_STD": [0.229, 0.224, 0.225],
    "INPUT.RRCROP_SCALE": (0.08, 1.0),
    "INPUT.CROP_PADDING": 4,
    "DATASET.ROOT": "",
    "DATASET.NAME": "",
    "DATASET.NUM_SHOTS": -1,
    "DATASET.SOURCE_DOMAINS": (),
    "DATASET.TARGET_DOMAINS": (),
    "DATALOADER.NUM_WORKERS": 4,
    "DATALOADER.K_TRANSFORMS": 1,
    "DATALOADER.RETURN_IMG0": False,
    "DATALOADER.TRAIN_X.SAMPLER": "RandomSampler",
    "DATALOADER.TRAIN_X.BATCH_SIZE": 32,
    "DATALOADER.TRAIN_X.N_DOMAIN": 0,
    "DATALOADER.TRAIN_X.N_INS": 16,
    "DATALOADER.TEST.SAMPLER": "SequentialSampler",
    "DATALOADER.TEST.BATCH_SIZE": 32,
    "MODEL.INIT_WEIGHTS": "",
    "MODEL.BACKBONE.NAME": "",
    "OPTIM.NAME": "adam",
    "OPTIM.LR": 0.0003,
    "OPTIM.WEIGHT_DECAY": 5e-4,
    "OPTIM.MOMENTUM": 0.9,
    "OPTIM.SGD_DAMPNING": 0,
    "OPTIM.SGD_NESTEROV": False,
    "OPTIM.ADAM_BETA1": 0.9,
    "OPTIM.ADAM_BETA2": 0.999,
    "OPTIM.STAGED_LR": False,
    "OPTIM.LR_SCHEDULER": "single_step",
    "OPTIM.STEPSIZE": (-1,),
    "OPTIM.GAMMA": 0.1,
    "OPTIM.MAX_EPOCH": 10,
    "OPTIM.WARMUP_EPOCH": -1,
    "OPTIM.WARMUP_TYPE": "linear",
    "OPTIM.WARMUP_CONS_LR": 1e-5,
    "OPTIM.WARMUP_MIN_LR": 1e-5,
    "OPTIM.WARMUP_RECOUNT": True,
    "TRAIN.CHECKPOINT_FREQ": 0,
    "TRAIN.PRINT_FREQ": 10,
    "TRAIN.COUNT_ITER": "train_x",
    "TEST.EVALUATOR": "Classification",
    "TEST.PER_CLASS_RESULT": False,
    "TEST.COMPUTE_CMAT": False,
    "TEST.NO_TEST": False,
    "TEST.SPLIT": "test",
    "TEST.FINAL_MODEL": "last_step",
    "TRAINER.NAME": "",
}

EXTEND_CFG = {
    "TRAINER.COOP.N_CTX": 16,
    "TRAINER.COOP.CSC": False,
    "TRAINER.COOP.CTX_INIT": "",
    "TRAINER.COOP.PREC": "fp16",
    "TRAINER.COOP.CLASS_TOKEN_POSITION": "end",
    "TRAINER.COCOOP.N_CTX": 16,
    "TRAINER.COCOOP.CTX_INIT": "",
    "TRAINER.COCOOP.PREC": "fp16",
    "DATASET.SUBSAMPLE_CLASSES": "all",
}


@pytest.mark.parametrize("key, value", sorted({**DASSL_DEFAULTS, **EXTEND_CFG}.items()))
def test_default_value(key, value):
    actual = _get(get_cfg_default(), key)
    assert actual == value
    assert type(actual) is type(value)


def test_defaults_are_fresh_copies():
    a = get_cfg_default()
    a.OPTIM.LR = 1.0
    assert get_cfg_default().OPTIM.LR == 0.0003


# --------------------------------------------------------------------------------------------
# Unknown keys, wrong types, malformed opts, missing files


@pytest.mark.parametrize(
    "yaml_text, bad, suggestion",
    [
        ("TRAINER:\n  COOP:\n    NCTX: 4\n", "TRAINER.COOP.NCTX", "TRAINER.COOP.N_CTX"),
        ("DATASET:\n  NUM_SHOT: 4\n", "DATASET.NUM_SHOT", "DATASET.NUM_SHOTS"),
        ("OPTIM:\n  LRR: 0.1\n", "OPTIM.LRR", "OPTIM.LR"),
    ],
)
def test_unknown_key_in_yaml(tmp_path, yaml_text, bad, suggestion):
    path = tmp_path / "typo.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as ei:
        merge_from_file(get_cfg_default(), str(path))
    msg = str(ei.value)
    assert str(path) in msg
    assert bad in msg
    assert f"did you mean '{suggestion}'" in msg


@pytest.mark.parametrize(
    "opts, bad, suggestion",
    [
        (["TRAINER.COOP.NCTX", "4"], "TRAINER.COOP.NCTX", "TRAINER.COOP.N_CTX"),
        (["DATASET.NUM_SHOT", "4"], "DATASET.NUM_SHOT", "DATASET.NUM_SHOTS"),
        (
            ["DATASET.NUM_SHOTS", "4", "OPTIM.MAX_EPOCHS", "3"],
            "OPTIM.MAX_EPOCHS",
            "OPTIM.MAX_EPOCH",
        ),
    ],
)
def test_unknown_key_in_opts(opts, bad, suggestion):
    with pytest.raises(ConfigError) as ei:
        merge_from_list(get_cfg_default(), opts)
    msg = str(ei.value)
    assert "opts" in msg
    assert bad in msg
    assert f"did you mean '{suggestion}'" in msg


@pytest.mark.parametrize(
    "key, value",
    [
        ("OPTIM.MAX_EPOCH", "abc"),
        ("TRAINER.COOP.N_CTX", "4.5"),
        ("TRAINER.COOP.CSC", "1"),
        ("OPTIM.LR", "fast"),
    ],
)
def test_wrong_type_in_opts(key, value):
    with pytest.raises(ConfigError) as ei:
        merge_from_list(get_cfg_default(), [key, value])
    assert key in str(ei.value)


def test_opts_values_are_literal_evaluated():
    cfg = get_cfg_default()
    merge_from_list(
        cfg,
        [
            "TRAINER.COOP.N_CTX",
            "4",
            "TRAINER.COOP.CSC",
            "True",
            "TRAINER.COOP.CLASS_TOKEN_POSITION",
            "middle",
            "OPTIM.LR",
            "1e-3",
            "INPUT.SIZE",
            "(32, 32)",
        ],
    )
    assert cfg.TRAINER.COOP.N_CTX == 4
    assert cfg.TRAINER.COOP.CSC is True
    assert cfg.TRAINER.COOP.CLASS_TOKEN_POSITION == "middle"
    assert cfg.OPTIM.LR == 1e-3
    assert cfg.INPUT.SIZE == (32, 32)


def test_wrong_type_in_yaml(tmp_path):
    path = tmp_path / "bad_type.yaml"
    path.write_text("OPTIM:\n  MAX_EPOCH: many\n")
    with pytest.raises(ConfigError) as ei:
        merge_from_file(get_cfg_default(), str(path))
    assert str(path) in str(ei.value)


def test_odd_number_of_opts():
    with pytest.raises(ConfigError) as ei:
        merge_from_list(get_cfg_default(), ["DATASET.NUM_SHOTS", "16", "OPTIM.MAX_EPOCH"])
    assert "pairs" in str(ei.value)


def test_missing_config_file_names_the_path(tmp_path):
    missing = str(tmp_path / "nope" / "rn51.yaml")
    with pytest.raises(ConfigError) as ei:
        merge_from_file(get_cfg_default(), missing)
    assert missing in str(ei.value)


def test_missing_shipped_style_path_names_the_path():
    with pytest.raises(ConfigError) as ei:
        merge_from_file(get_cfg_default(), "configs/trainers/CoOp/rn51.yaml")
    assert "configs/trainers/CoOp/rn51.yaml" in str(ei.value)


def test_missing_config_file_through_setup_cfg(tmp_path):
    missing = str(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError) as ei:
        setup_cfg(_args("--trainer", "CoOp", "--config-file", missing))
    assert missing in str(ei.value)


def test_configs_paths_resolve_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not os.path.exists("configs")
    cfg = _merged("configs/datasets/oxford_pets.yaml", "configs/trainers/CoOp/vit_b16_ep50.yaml")
    assert cfg.DATASET.NAME == "OxfordPets"
    assert cfg.MODEL.BACKBONE.NAME == "ViT-B/16"
    assert cfg.OPTIM.MAX_EPOCH == 50
    # and through the CLI's setup
    cfg = setup_cfg(_args(*BASE_ARGV))
    assert cfg.DATASET.NAME == "Caltech101"
    assert cfg.OPTIM.MAX_EPOCH == 200


def test_local_file_takes_precedence_when_it_exists(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs" / "trainers" / "CoOp").mkdir(parents=True)
    (tmp_path / "configs" / "trainers" / "CoOp" / "rn50.yaml").write_text(
        "OPTIM:\n  MAX_EPOCH: 3\n"
    )
    cfg = _merged("configs/trainers/CoOp/rn50.yaml")
    assert cfg.OPTIM.MAX_EPOCH == 3


# --------------------------------------------------------------------------------------------
# Merge order: defaults -> dataset YAML -> method YAML -> CLI args -> opts -> freeze


def test_merge_order(tmp_path):
    ds = tmp_path / "ds.yaml"
    ds.write_text(
        'DATASET:\n  NAME: "Caltech101"\n  NUM_SHOTS: 2\nOPTIM:\n  MAX_EPOCH: 7\n'
        "TRAIN:\n  PRINT_FREQ: 3\n"
    )
    cfg = setup_cfg(
        _args(
            "--trainer",
            "CoOp",
            "--dataset-config-file",
            str(ds),
            "--config-file",
            "configs/trainers/CoOp/rn50_ep50.yaml",
            "--backbone",
            "ViT-B/16",
            "--root",
            "/data/a",
            "--output-dir",
            "/out/x",
            "MODEL.BACKBONE.NAME",
            "ViT-B/32",
            "DATASET.ROOT",
            "/data/b",
        )
    )
    assert cfg.OPTIM.MAX_EPOCH == 50  # method YAML after dataset YAML
    assert cfg.TRAIN.PRINT_FREQ == 5
    assert cfg.DATASET.NUM_SHOTS == 2  # dataset YAML key the method YAML does not set
    assert cfg.MODEL.BACKBONE.NAME == "ViT-B/32"  # opts after --backbone after YAML
    assert cfg.DATASET.ROOT == "/data/b"  # opts after --root
    assert cfg.OUTPUT_DIR == "/out/x"
    assert cfg.TRAINER.NAME == "CoOp"
    assert cfg.is_frozen()


def test_cli_args_override_yaml():
    cfg = setup_cfg(_args(*BASE_ARGV, "--backbone", "ViT-B/16", "--transforms", "center_crop"))
    assert cfg.MODEL.BACKBONE.NAME == "ViT-B/16"
    assert list(cfg.INPUT.TRANSFORMS) == ["center_crop"]


def test_empty_cli_values_do_not_override():
    cfg = setup_cfg(_args(*BASE_ARGV))
    assert cfg.MODEL.BACKBONE.NAME == "RN50"
    assert cfg.OUTPUT_DIR == "./output"
    assert cfg.DATASET.ROOT == ""


def test_seed_zero_is_used():
    assert setup_cfg(_args(*BASE_ARGV, "--seed", "0")).SEED == 0
    assert setup_cfg(_args(*BASE_ARGV, "--seed", "3")).SEED == 3
    assert setup_cfg(_args(*BASE_ARGV)).SEED == -1


def test_coop_opts_from_the_paper_scripts():
    cfg = setup_cfg(
        _args(
            *BASE_ARGV,
            "TRAINER.COOP.N_CTX",
            "16",
            "TRAINER.COOP.CSC",
            "False",
            "TRAINER.COOP.CLASS_TOKEN_POSITION",
            "end",
            "DATASET.NUM_SHOTS",
            "16",
        )
    )
    assert cfg.TRAINER.COOP.N_CTX == 16
    assert cfg.TRAINER.COOP.CSC is False
    assert cfg.DATASET.NUM_SHOTS == 16


# --------------------------------------------------------------------------------------------
# Validation through setup_cfg


@pytest.mark.parametrize(
    "opts, key, value, allowed",
    [
        (["TRAINER.COOP.PREC", "fp8"], "TRAINER.COOP.PREC", "fp8", ["fp16", "fp32", "amp"]),
        (
            ["TRAINER.COOP.CLASS_TOKEN_POSITION", "left"],
            "TRAINER.COOP.CLASS_TOKEN_POSITION",
            "left",
            ["end", "middle", "front"],
        ),
        (
            ["DATASET.SUBSAMPLE_CLASSES", "half"],
            "DATASET.SUBSAMPLE_CLASSES",
            "half",
            ["all", "base", "new"],
        ),
    ],
)
def test_validation_rejects_bad_choice(opts, key, value, allowed):
    with pytest.raises(ConfigError) as ei:
        setup_cfg(_args(*BASE_ARGV, *opts))
    msg = str(ei.value)
    assert key in msg and value in msg
    for a in allowed:
        assert a in msg


def test_unknown_trainer_suggests_the_right_one():
    argv = list(BASE_ARGV)
    argv[1] = "CoOP"
    with pytest.raises((ConfigError, RegistryError)) as ei:
        setup_cfg(_args(*argv))
    assert "CoOP" in str(ei.value)
    assert "did you mean 'CoOp'" in str(ei.value)


def test_unknown_dataset_name():
    with pytest.raises((ConfigError, RegistryError)) as ei:
        setup_cfg(_args(*BASE_ARGV, "DATASET.NAME", "Caltech102"))
    msg = str(ei.value)
    assert "Caltech102" in msg
    assert "Caltech101" in msg


def test_missing_trainer_is_refused():
    with pytest.raises(ConfigError):
        setup_cfg(_args(*BASE_ARGV[2:]))


# --------------------------------------------------------------------------------------------
# CLI error reporting


def _write_typo_yaml(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("TRAINER:\n  COOP:\n    NCTX: 4\n")
    return path


def test_cli_reports_config_typo_in_one_line(tmp_path, capsys):
    path = _write_typo_yaml(tmp_path)
    rc = main(["--trainer", "CoOp", "--config-file", str(path)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("coop-train: error: ")]
    assert len(lines) == 1
    assert str(path) in lines[0]
    assert "TRAINER.COOP.N_CTX" in lines[0]


def test_cli_reports_opts_typo(capsys):
    rc = main([*BASE_ARGV, "DATASET.NUM_SHOT", "16"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("coop-train: error: ")]
    assert len(lines) == 1
    assert "DATASET.NUM_SHOTS" in lines[0]


def test_cli_subprocess_stderr_is_exactly_one_line(tmp_path):
    path = _write_typo_yaml(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "coop.train", "--trainer", "CoOp", "--config-file", str(path)],
        capture_output=True,
        text=True,
        cwd=str(tmp_path),
        timeout=60,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("coop-train: error: ")


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("FAST.TEXT", "prefix", "FAST.TEXT must be one of ['auto', 'shared_prefix', 'truncate', "
         "'plain'], got 'prefix'"),
        ("FAST.GPU_SHARED_PREFIX_MIN_CLASSES", -1,
         "FAST.GPU_SHARED_PREFIX_MIN_CLASSES must be >= 0, got -1"),
    ],
)  # fmt: skip
def test_fast_text_settings_are_checked(key, value, message):
    from coop.validation import validate_cfg

    cfg = get_cfg_default()
    cfg.TRAINER.NAME, cfg.DATASET.NAME, cfg.MODEL.BACKBONE.NAME = "CoOp", "Caltech101", "RN50"
    validate_cfg(cfg)
    section, name = key.split(".")
    cfg[section][name] = value
    with pytest.raises(ConfigError) as ei:
        validate_cfg(cfg)
    assert str(ei.value) == message
