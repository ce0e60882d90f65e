"""Every bad input stops ``coop-train`` with exit status 2 and exactly one line
``coop-train: error: <message>`` on stderr (no traceback), and leaves everything written
before untouched: the checkpoints, ``results.json`` and log of earlier runs in the output
folder, the ``--model-dir`` files and the dataset's split file.

``BAD_INPUTS`` below is the table: an id, the bad input, and the message (``{...}`` are the
test's paths). Checks that can be made before CLIP is loaded are made then (config, output
folder, ``--model-dir`` files and their context shape, dataset files); the rest name the
file, epoch or batch where they happen.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import pickle
import shutil
from types import SimpleNamespace

import pytest
import torch
from helpers_train import coop_argv, read_results

from coop.train import main

# (id, bad input, message on stderr after "coop-train: error: ")
BAD_INPUTS = [
    ("missing-root", "--root names a folder that does not exist",
     "Caltech101 not found: the folder {tmp}/nowhere/caltech-101 does not exist. DATASET.ROOT "
     "({tmp}/nowhere) must contain the folder 'caltech-101' (see DATASETS.md ...)"),
    ("malformed-split", "the split JSON is not valid JSON",
     "Split file {split} is not valid JSON: Expecting property name enclosed in double quotes: "
     "line 1 column 2 (char 1)"),
    ("split-missing-image", "the split JSON names an image that does not exist",
     "Image file not found: {images}/Faces/missing.jpg (listed in split file {split})"),
    ("split-label-out-of-range", "a test label (10) outside the 10 train classes",
     "Split file {split}: test[0] has label 10, out of the range of the train labels 0..9 "
     "(10 classes)"),
    ("split-label-two-names", "one label with two class names",
     "Split file {split}: label 0 is 'face' in train[0] but 'zebra' in test[0]; each label "
     "must name one class"),
    ("corrupt-jpeg", "a training image with corrupt bytes (read in epoch 2)",
     "Cannot read image {corrupt}: Truncated File Read"),
    ("empty-class-folder", "no split JSON, and an empty class folder when generating it",
     "The category folder {images}/zzz_empty has 0 image(s), too few for a 50%/20%/30% split "
     "(train 0, val 0, test 0; each must be > 0)"),
    ("ckpt-class-count", "--eval-only with a CSC checkpoint of 10 classes, 5 classes here",
     "The checkpoint {csc_ckpt} does not fit this model: 'ctx' has shape (10, 16, 64) there "
     "but (5, 16, 64) here (5 classes, N_CTX 16, CSC True, backbone {tiny_vit})"),
    ("ckpt-n-ctx", "--eval-only with a 16-token checkpoint, N_CTX 8 here",
     "The checkpoint {finished_ckpt} does not fit this model: 'ctx' has shape (16, 64) there "
     "but (8, 64) here (10 classes, N_CTX 8, CSC False, backbone {tiny_vit})"),
    ("ckpt-backbone", "--eval-only with a width-64 context on a text-width-128 CLIP",
     "The checkpoint {finished_ckpt} does not fit this model: 'ctx' has shape (16, 64) there "
     "but (16, 128) here (10 classes, N_CTX 16, CSC False, backbone {wide_clip})"),
    ("eval-missing-epoch", "--eval-only --load-epoch 7, only epoch 1 exists",
     "No checkpoint model.pth.tar-7 in --model-dir {finished} (looked for "
     "{finished}/<model name>/model.pth.tar-7); available: prompt_learner/model.pth.tar-1"),
    ("eval-missing-model-dir", "--eval-only --model-dir that does not exist",
     "--model-dir {tmp}/no_model does not exist or is not a folder"),
    ("config-typo", "opts key DATASET.NUM_SHOT",
     "Unknown config key 'DATASET.NUM_SHOT' in the command-line opts; did you mean "
     "'DATASET.NUM_SHOTS'?"),
    ("wrong-type", "DATASET.NUM_SHOTS abc",
     "Bad value for 'DATASET.NUM_SHOTS' in the command-line opts: Type mismatch (<class 'int'> "
     "vs. <class 'str'>) with values (4 vs. abc) for config key: DATASET.NUM_SHOTS"),
    ("unknown-trainer", "--trainer CoOP",
     "\"CoOP\" is not a registered trainer; did you mean 'CoOp'? Registered: ...CoOp, ..."),
    ("unknown-dataset", "DATASET.NAME Caltech102",
     "\"Caltech102\" is not a registered dataset; did you mean 'Caltech101'? Registered: ..."),
    ("input-size-file", "INPUT.SIZE (64, 64) with a 32-pixel CLIP checkpoint file",
     "INPUT.SIZE (64, 64) does not match the input resolution 32 of the CLIP backbone "
     "'{tiny_vit}'; set INPUT.SIZE (32, 32)"),
    ("input-size-name", "INPUT.SIZE (32, 32) with backbone RN50 (refused before any download)",
     "INPUT.SIZE (32, 32) does not match the input resolution 224 of the CLIP backbone 'RN50'; "
     "set INPUT.SIZE (224, 224)"),
    ("nan-loss", "the model's logits become NaN in epoch 2 (PREC fp32)",
     "Loss is infinite or NaN (nan) at epoch 2/3, batch 1/5 with TRAINER.COOP.PREC fp32; "
     "training stopped and nothing was saved after this batch (the last checkpoint, if any, "
     "is kept). Use a lower OPTIM.LR (TRAINER.COOP.PREC is fp32 already)"),
    ("nan-loss-fp16", "the same with PREC fp16",
     "Loss is infinite or NaN (nan) at epoch 2/3, batch 1/5 with TRAINER.COOP.PREC fp16; "
     "training stopped and nothing was saved after this batch (the last checkpoint, if any, "
     "is kept). Use TRAINER.COOP.PREC amp or fp32 (or bf16 where the hardware supports it), "
     "or a lower OPTIM.LR"),
    ("output-dir-under-file", "--output-dir inside an existing regular file",
     "Cannot create the output folder {tmp}/a_file/out: Not a directory (a part of the path "
     "is a regular file)"),
    ("unwritable-output", "the checkpoint folder refuses writes (permission denied)",
     "Cannot write {out}/prompt_learner/model.pth.tar-2: permission denied (the folder is "
     "read-only or not yours)"),
    ("disk-full", "the disk fills up while the epoch-2 checkpoint is written",
     "Cannot write {out}/prompt_learner/model.pth.tar-2: the disk is full (no space left on "
     "device). The previous version of the file, if any, is unchanged; free some space and "
     "run the same command again"),
    ("malicious-pickle", "a checkpoint whose pickle would run code (it is not run)",
     "{evil_ckpt} is not a model checkpoint: expected a dict with a 'state_dict' entry"),
    ("malicious-raw-pickle", "a plain pickle (no torch zip) that would run code",
     "Cannot read checkpoint {evil_raw}: Invalid magic number; corrupt file?"),
]  # fmt: skip

TRAIN_OPTS = (
    "OPTIM.MAX_EPOCH", "3", "TRAIN.CHECKPOINT_FREQ", "1", "DATALOADER.TRAIN_X.BATCH_SIZE", "8",
)  # fmt: skip


class Interrupted(Exception):
    pass


class _Evil:
    """Unpickling this would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def prev(caltech_root, tiny_vit, tmp_path_factory):
    """Earlier runs: an unfinished training run (stopped after epoch 1 of 3, with
    model.pth.tar-1 and resume.pth.tar) and a finished 1-epoch run (with results.json)."""
    from coop.hosts import on_host
    from coop.trainers.coop import CoOp as CoOpMethod

    CoOp = on_host(CoOpMethod)  # the class that runs on the bundled engine

    base = tmp_path_factory.mktemp("bad_inputs")
    data0 = str(base / "data0")
    shutil.copytree(caltech_root, data0)
    env = pytest.MonkeyPatch()
    env.setenv("COOP_CACHE_DIR", str(base / "feature_cache"))  # not the user's cache

    partial = str(base / "partial")
    original = CoOp.after_epoch

    def after_epoch_then_stop(self):
        original(self)
        raise Interrupted

    CoOp.after_epoch = after_epoch_then_stop
    try:
        with pytest.raises(Interrupted):
            main(coop_argv(data0, partial, tiny_vit, 1, 4, *TRAIN_OPTS))
    finally:
        CoOp.after_epoch = original
    assert sorted(os.listdir(os.path.join(partial, "prompt_learner"))) == [
        "checkpoint",
        "model.pth.tar-1",
        "resume.pth.tar",
    ]
    finished = str(base / "finished")
    assert main(coop_argv(data0, finished, tiny_vit, 1, 4, "OPTIM.MAX_EPOCH", "1")) == 0
    assert os.path.exists(os.path.join(finished, "results.json"))

    from coop.testing.tiny_clip import save_tiny_clip

    wide = save_tiny_clip(str(base / "wide_rn.pt"), arch="resnet", text_width=128)
    csc = str(base / "csc_model")
    os.makedirs(os.path.join(csc, "prompt_learner"))
    torch.save(
        {"state_dict": {"ctx": torch.zeros(10, 16, 64)}, "epoch": 1},
        os.path.join(csc, "prompt_learner", "model.pth.tar-1"),
    )
    with open(os.path.join(data0, "caltech-101", "split_fewshot", "shot_4-seed_1.json")) as f:
        fewshot_train = json.load(f)["train"]
    yield SimpleNamespace(
        data0=data0, partial=partial, finished=finished, wide=wide, csc=csc,
        fewshot_train=fewshot_train, tiny_vit=tiny_vit,
    )  # fmt: skip
    env.undo()


def _digest(folder):
    out = {}
    for path in glob.glob(os.path.join(folder, "**"), recursive=True):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                out[path] = hashlib.sha256(f.read()).hexdigest()
    return out


def _edit_split(path, fn):
    with open(path, encoding="utf-8") as f:
        split = json.load(f)
    fn(split)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(split, f)


def _setup(case, c, monkeypatch):
    """Make the bad input of ``case``; returns the argv."""
    base = coop_argv(c.data, c.out, c.tiny_vit, 1, 4, *TRAIN_OPTS)
    evald = ["--eval-only", "--model-dir", c.finished, "--load-epoch", "1"]
    if case == "missing-root":
        return coop_argv(c.tmp + "/nowhere", c.out, c.tiny_vit, 1, 4, *TRAIN_OPTS)
    if case == "malformed-split":
        with open(c.split, "w") as f:
            f.write("{not json")
    elif case == "split-missing-image":
        _edit_split(c.split, lambda s: s["train"][0].__setitem__(0, "Faces/missing.jpg"))
    elif case == "split-label-out-of-range":
        _edit_split(c.split, lambda s: s["test"][0].__setitem__(1, 10))
    elif case == "split-label-two-names":
        _edit_split(c.split, lambda s: s["test"][0].__setitem__(2, "zebra"))
    elif case == "corrupt-jpeg":
        with open(c.corrupt, "wb") as f:
            f.write(b"\xff\xd8\xff\xe0 this is not a JPEG" * 4)
    elif case == "empty-class-folder":
        os.unlink(c.split)
        os.makedirs(os.path.join(c.images, "zzz_empty"))
    elif case == "ckpt-class-count":
        opts = ("DATASET.SUBSAMPLE_CLASSES", "base", "TRAINER.COOP.CSC", "True")
        return ["--eval-only", "--model-dir", c.csc, "--load-epoch", "1", *base, *opts]
    elif case == "ckpt-n-ctx":
        return [*evald, *base, "TRAINER.COOP.N_CTX", "8"]
    elif case == "ckpt-backbone":
        return [*evald, *coop_argv(c.data, c.out, c.wide_clip, 1, 4)]
    elif case == "eval-missing-epoch":
        return ["--eval-only", "--model-dir", c.finished, "--load-epoch", "7", *base]
    elif case == "eval-missing-model-dir":
        return ["--eval-only", "--model-dir", c.tmp + "/no_model", *base]
    elif case == "config-typo":
        return [*base, "DATASET.NUM_SHOT", "4"]
    elif case == "wrong-type":
        return [*base, "DATASET.NUM_SHOTS", "abc"]
    elif case == "unknown-trainer":
        argv = list(base)
        argv[argv.index("CoOp")] = "CoOP"
        return argv
    elif case == "unknown-dataset":
        return [*base, "DATASET.NAME", "Caltech102"]
    elif case == "input-size-file":
        return [*base, "INPUT.SIZE", "(64, 64)"]
    elif case == "input-size-name":
        return [*base, "MODEL.BACKBONE.NAME", "RN50", "MODEL.BACKBONE.CACHE_DIR", c.clip_cache]
    elif case in ("nan-loss", "nan-loss-fp16"):
        from coop.trainers.coop import CustomCLIP

        forward = CustomCLIP.forward
        monkeypatch.setattr(CustomCLIP, "forward", lambda m, x: forward(m, x) * float("nan"))
        if case == "nan-loss-fp16":
            return [*base, "TRAINER.COOP.PREC", "fp16"]
    elif case == "output-dir-under-file":
        with open(os.path.join(c.tmp, "a_file"), "w") as f:
            f.write("a regular file\n")
        return coop_argv(c.data, c.tmp + "/a_file/out", c.tiny_vit, 1, 4, *TRAIN_OPTS)
    elif case in ("unwritable-output", "disk-full"):
        import errno
        import tempfile

        import coop.io

        real_mkstemp, real_fsync = tempfile.mkstemp, os.fsync
        ckpt_dir = os.path.join(c.out, "prompt_learner")

        def mkstemp(*a, **k):
            if case == "unwritable-output" and os.path.abspath(k.get("dir", "")) == ckpt_dir:
                raise PermissionError(errno.EACCES, "Permission denied")
            return real_mkstemp(*a, **k)

        def fsync(fd):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if case == "disk-full" and os.path.dirname(target) == ckpt_dir:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_fsync(fd)

        monkeypatch.setattr(coop.io.tempfile, "mkstemp", mkstemp)
        monkeypatch.setattr(os, "fsync", fsync)
    elif case == "malicious-pickle":
        os.makedirs(os.path.dirname(c.evil_ckpt))
        torch.save({"state_dict": _Evil(c.marker), "epoch": 1}, c.evil_ckpt)
        return ["--eval-only", "--model-dir", c.evil_dir, "--load-epoch", "1", *base]
    elif case == "malicious-raw-pickle":
        os.makedirs(os.path.dirname(c.evil_raw))
        with open(c.evil_raw, "wb") as f:
            pickle.dump(_Evil(c.marker), f)
        return ["--eval-only", "--model-dir", c.evil_dir, "--load-epoch", "1", *base]
    return base


# eval-only cases write into a copy of the finished run (it holds results.json); training
# cases resume a copy of the unfinished run and fail in its epoch 2
_TRAINING = {"corrupt-jpeg", "nan-loss", "nan-loss-fp16", "unwritable-output", "disk-full"}
# refused before CLIP is loaded (nothing after "Loading CLIP" in the log)
_BEFORE_CLIP = {
    "missing-root", "malformed-split", "split-missing-image", "split-label-out-of-range",
    "split-label-two-names", "empty-class-folder", "ckpt-class-count", "ckpt-n-ctx",
    "eval-missing-epoch", "eval-missing-model-dir", "malicious-pickle", "malicious-raw-pickle",
}  # fmt: skip


@pytest.mark.parametrize("case, what, message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input(case, what, message, prev, tmp_path, monkeypatch, capsys):
    data = str(tmp_path / "data")
    shutil.copytree(prev.data0, data)
    out = str(tmp_path / "out")
    shutil.copytree(prev.partial if case in _TRAINING else prev.finished, out)
    images = os.path.join(data, "caltech-101", "101_ObjectCategories")
    evil_dir = str(tmp_path / "evil")
    c = SimpleNamespace(
        tmp=str(tmp_path), data=data, out=out, tiny_vit=prev.tiny_vit, wide_clip=prev.wide,
        finished=prev.finished, csc=prev.csc, images=images,
        split=os.path.join(data, "caltech-101", "split_zhou_Caltech101.json"),
        corrupt=os.path.join(data, "caltech-101", prev.fewshot_train[0][0]),
        csc_ckpt=os.path.join(prev.csc, "prompt_learner", "model.pth.tar-1"),
        finished_ckpt=os.path.join(prev.finished, "prompt_learner", "model.pth.tar-1"),
        evil_dir=evil_dir, evil_ckpt=os.path.join(evil_dir, "prompt_learner", "model.pth.tar-1"),
        evil_raw=os.path.join(evil_dir, "prompt_learner", "model.pth.tar-1"),
        marker=str(tmp_path / "pwned"), clip_cache=str(tmp_path / "clip_cache"),
    )  # fmt: skip
    argv = _setup(case, c, monkeypatch)
    before = {**_digest(out), **_digest(prev.finished), **_digest(prev.csc)}
    if os.path.exists(c.split):
        before.update(_digest(os.path.dirname(c.split)))
    split_existed = os.path.exists(c.split)

    rc = main(argv)

    err = capsys.readouterr().err
    assert rc == 2, err[-3000:]
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("coop-train: error: ")]
    assert len(lines) == 1, err
    print(f"{case}: {lines[0]}")  # the table with real paths: pytest -rP
    expected = message.format(**vars(c))
    for part in expected.split("..."):  # "..." marks a shortened part of the table
        assert part.strip() in lines[0], (part, lines[0])
    # nothing written before is lost or changed; no temporary file is left behind
    for path, digest in before.items():
        assert os.path.isfile(path), f"{path} was removed"
        with open(path, "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == digest, f"{path} was changed"
    assert os.path.exists(c.split) == split_existed  # a failed generation writes nothing
    assert not glob.glob(os.path.join(tmp_path, "**", "*.tmp"), recursive=True)
    assert not os.path.exists(c.marker)  # the malicious pickle did not run
    logs = sorted(glob.glob(os.path.join(out, "log.txt*")), key=os.path.getmtime)
    if case in _BEFORE_CLIP:
        assert "Loading CLIP" not in open(logs[-1]).read()
    if case in _TRAINING:
        log = open(logs[-1]).read()
        assert "Previous epoch: 1" in log and f"Error: {lines[0][19:]}" in log
    if case == "input-size-name":
        assert not os.path.exists(c.clip_cache)  # refused before any download


def test_bad_inputs_table_is_big_enough():
    assert len(BAD_INPUTS) >= 15
    assert len({b[0] for b in BAD_INPUTS}) == len(BAD_INPUTS)


def test_skip_unreadable_images_when_asked(prev, tmp_path, capsys):
    """DATALOADER.SKIP_UNREADABLE True: the corrupt training image is skipped and counted."""
    data = str(tmp_path / "data")
    shutil.copytree(prev.data0, data)
    corrupt = os.path.join(data, "caltech-101", prev.fewshot_train[0][0])
    with open(corrupt, "wb") as f:
        f.write(b"not an image")
    out = str(tmp_path / "out")
    argv = coop_argv(data, out, prev.tiny_vit, 1, 4, "OPTIM.MAX_EPOCH", "1")
    assert main([*argv, "DATALOADER.SKIP_UNREADABLE", "True"]) == 0
    log = open(os.path.join(out, "log.txt")).read()
    skipped = "Skipped 1 unreadable image(s) in epoch 1/1 (DATALOADER.SKIP_UNREADABLE): "
    assert skipped + corrupt in log
    res = read_results(out)
    assert res["skipped_unreadable"] == 0 and res["total"] == 60  # the test images are fine


def test_malicious_pickle_beside_the_weights_is_not_run(prev, tmp_path):
    """A checkpoint with good weights and a code-running object: the weights load, the
    object is never built."""
    ckpt = torch.load(
        os.path.join(prev.finished, "prompt_learner", "model.pth.tar-1"), weights_only=True
    )
    marker = str(tmp_path / "pwned")
    model_dir = str(tmp_path / "evil")
    os.makedirs(os.path.join(model_dir, "prompt_learner"))
    ckpt["optimizer"] = _Evil(marker)
    ckpt["scheduler"] = {"successor": _Evil(marker)}
    torch.save(ckpt, os.path.join(model_dir, "prompt_learner", "model.pth.tar-1"))
    out = str(tmp_path / "out")
    argv = coop_argv(prev.data0, out, prev.tiny_vit, 1, 4)
    assert main(["--eval-only", "--model-dir", model_dir, "--load-epoch", "1", *argv]) == 0
    assert not os.path.exists(marker)
    assert read_results(out)["metrics"] == read_results(prev.finished)["metrics"]


def test_worker_error_is_one_line_from_the_console(prev, tmp_path):
    """Through the real command line with a DataLoader worker: the worker's traceback is not
    printed; stderr is the one error line, naming the corrupt image."""
    import subprocess
    import sys

    data = str(tmp_path / "data")
    shutil.copytree(prev.data0, data)
    corrupt = os.path.join(data, "caltech-101", prev.fewshot_train[0][0])
    with open(corrupt, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 this is not a JPEG")
    out = str(tmp_path / "out")
    argv = coop_argv(data, out, prev.tiny_vit, 1, 4, "OPTIM.MAX_EPOCH", "1")
    argv[argv.index("DATALOADER.NUM_WORKERS") + 1] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "coop.train", *argv], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"coop-train: error: Cannot read image {corrupt}: Truncated File Read"
    ], proc.stderr
