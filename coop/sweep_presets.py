"""The paper's protocols as lists of ``coop-train`` runs (``coop-sweep <preset>``).

Every preset builds the runs the original scripts start, with their arguments and output
folders, for any registered trainer (``--trainer``, default CoOp). What differs between
methods is read from the trainer class (documented on
:class:`coop.clip_trainer.CLIPTrainer`), never from a list of names here:

- the YAML a protocol runs it with: ``protocol_configs[protocol]`` in
  ``configs/trainers/<config_folder()>/``, refined per dataset (``"<protocol>.<dataset>"``),
  shot count (``"<protocol>.<K>shots"``) or both (``"<protocol>.<dataset>.<K>shots"``),
  the most specific key first; a protocol without one stops with an error; ``--backbone``
  swaps the backbone part of the file name (``rn50_ep50`` -> ``vit_b16_ep50``) and ``--cfg``
  names one file for every run;
- the output folders: ``protocol_dirs[key]`` (keys ``fewshot``, ``base2new_train``,
  ``base2new_test``, ``xd_train``, ``xd_test``, ``dg_train``, ``dg_test``, ``zeroshot``),
  format strings over ``{dataset} {trainer} {cfg} {shots} {seed}`` and the method's own
  config keys (``{N_CTX}`` is ``TRAINER.<NODE>.N_CTX`` as the run will have it; an
  evaluation takes them from the run it loads); ``{output}`` first puts the folder beside
  ``--output`` instead of under it. A key the method does not declare takes
  :data:`DEFAULT_DIRS` (CoOp's ``main.sh`` and CoCoOp's scripts; the DG folders default to
  the cross-dataset ones);
- the opts: ``protocol_opts[key]`` (the scripts' own, in their order, refined per dataset
  and shot count), then the protocol's (``DATASET.NUM_SHOTS``, ``DATASET.SUBSAMPLE_CLASSES``),
  then the sweep's trailing opts. Without a declaration, a method key in the folder is
  passed as an opt, as the scripts pass what their folder names show;
- the shot counts: ``protocol_shots[protocol]`` where they differ from the papers';
- the load epoch of an evaluation: ``OPTIM.MAX_EPOCH`` of the training run's config;
- the ablations' keys: ``N_CTX``, ``CSC`` and ``CLASS_TOKEN_POSITION`` of the method's node.

The ``prompts`` preset runs ``coop-prompts`` (zero-shot CLIP with hand-written templates)
instead of ``coop-train``: one run per dataset, with the backbone's YAML as ``zeroshot.sh``
takes it.
"""

from __future__ import annotations

import argparse
import os
import string
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from coop.sweep_exec import Run

PAPER_SHOTS = (1, 2, 4, 8, 16)
PAPER_SEEDS = (1, 2, 3)
# the eleven datasets of the few-shot, base-to-new and cross-dataset protocols, in the
# order of the CoOp/CoCoOp papers
PAPER_DATASETS = (
    "imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
    "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101",
)  # fmt: skip
DG_TARGETS = ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")
SOURCE = "imagenet"  # the training set of cross-dataset transfer and domain generalisation
BACKBONES = ("rn50", "rn101", "vit_b32", "vit_b16")  # the paper's backbone study
ZEROSHOT_TRAINER = "ZeroshotCLIP"  # zeroshot.sh's trainer

_MAIN_SH = "{dataset}/{trainer}/{cfg}_{shots}shots/nctx{N_CTX}_csc{CSC}_ctp{CLASS_TOKEN_POSITION}/seed{seed}"  # fmt: skip
DEFAULT_DIRS = {
    # scripts/coop/main.sh (for a method whose node has CoOp's N_CTX, CSC and
    # CLASS_TOKEN_POSITION; a method without them gets FEWSHOT_PLAIN)
    "fewshot": _MAIN_SH,
    # scripts/cocoop/base2new_train.sh and base2new_test.sh
    "base2new_train": "base2new/train_base/{dataset}/shots_{shots}/{trainer}/{cfg}/seed{seed}",
    "base2new_test": "base2new/test_new/{dataset}/shots_{shots}/{trainer}/{cfg}/seed{seed}",
    # scripts/cocoop/xd_train.sh and xd_test.sh (cross-dataset and domain generalisation)
    "xd_train": "{dataset}/{trainer}/{cfg}_{shots}shots/seed{seed}",
    "xd_test": "evaluation/{trainer}/{cfg}_{shots}shots/{dataset}/seed{seed}",
    # scripts/coop/zeroshot.sh
    "zeroshot": "{trainer}/{cfg}/{dataset}",
    # coop-prompts (the paper's prompt-engineering comparison has no script)
    "prompts": "prompt_study/{cfg}/{dataset}",
}
# PromptSRC's few_shot.sh: the few-shot folder of a method without CoOp's context keys
FEWSHOT_PLAIN = "{dataset}/{trainer}/{cfg}_{shots}shots/seed{seed}"
_PROTOCOL_OF_DIR = {"dg_train": "xd_train", "dg_test": "xd_test"}
# the fields every folder pattern may use (any other names a key of the method's node)
_PLAIN_FIELDS = ("dataset", "trainer", "cfg", "shots", "seed", "output")

# the ablation knobs: command-line flag -> key of the method's config node
KNOBS = {"nctx": "N_CTX", "csc": "CSC", "ctp": "CLASS_TOKEN_POSITION"}
STUDIES = ("csc", "ctp", "nctx", "init", "backbone")
STUDY_VALUES = {
    "csc": [False, True],  # unified vs class-specific context
    "ctp": ["end", "middle"],  # class token at the end vs in the middle
    "nctx": [4, 8, 16],  # context length
}
# shot counts of each study by default: the init and backbone studies use the 16-shot
# configs (rn50_ctxv1, rn101, vit_b32: no 100-epoch file exists for them)
STUDY_SHOTS = {"csc": PAPER_SHOTS, "ctp": PAPER_SHOTS, "nctx": PAPER_SHOTS,
               "init": (16,), "backbone": (16,)}  # fmt: skip
INIT_SUFFIX = "_ctxv1"  # the YAML of the same schedule with CTX_INIT "a photo of a"


class SweepError(ValueError):
    """A bad sweep argument, reported before any run starts."""


# ---------------------------------------------------------------------------- trainer facts
def trainer_class(name: str) -> Any:
    from coop.registry import TRAINER_REGISTRY, RegistryError

    try:
        return TRAINER_REGISTRY.get(name)
    except RegistryError as e:
        raise SweepError(f"--trainer: {e}") from None


def _config_folder(cls: Any) -> str:
    folder = getattr(cls, "config_folder", None)
    return folder() if callable(folder) else cls.__name__


def _node_name(cls: Any) -> Optional[str]:
    node = getattr(cls, "config_node_name", None)
    return node() if callable(node) else None


def backbone_tokens() -> List[str]:
    """Backbone names as YAML file names spell them (``RN50`` -> ``rn50``, ``ViT-B/16`` ->
    ``vit_b16``), longest first."""
    from coop.validation import BACKBONE_CTX_DIM

    tokens = {
        n.lower().replace("-", "_").replace("/", "").replace("@", "_") for n in BACKBONE_CTX_DIM
    }
    return sorted(tokens, key=len, reverse=True)


def with_backbone(stem: str, backbone: Optional[str]) -> str:
    """``stem`` with its backbone part replaced by ``backbone`` (``rn50_ep100`` ->
    ``rn101_ep100``); unchanged without a backbone or when the stem names none."""
    if not backbone:
        return stem
    for token in backbone_tokens():
        if stem == token or stem.startswith(token + "_"):
            return backbone + stem[len(token) :]
    return stem


def _refinements(base: str, dataset: str, shots: int) -> List[str]:
    """The keys that refine ``base`` for a dataset and shot count, most specific first."""
    return [f"{base}.{dataset}.{shots}shots", f"{base}.{dataset}", f"{base}.{shots}shots", base]


def declared_protocols(cls: Any) -> List[str]:
    """The protocols ``protocol_configs`` names (``dg`` where ``xd`` is declared)."""
    table = dict(getattr(cls, "protocol_configs", {}) or {})
    names = {key.split(".", 1)[0] for key in table}
    if "xd" in names:
        names.add("dg")
    return sorted(names)


def protocol_cfg(cls: Any, protocol: str, dataset: str, shots: int) -> str:
    """The YAML stem the method declares for ``protocol`` (see the module docstring)."""
    table = dict(getattr(cls, "protocol_configs", {}) or {})
    keys = _refinements(protocol, dataset, shots)
    if protocol == "dg":  # domain generalisation trains as cross-dataset transfer does
        keys += _refinements("xd", dataset, shots)
    for key in keys:
        if key in table:
            return table[key]
    declared = ", ".join(declared_protocols(cls)) or "none"
    raise SweepError(
        f"trainer {cls.__name__} declares no config for the {protocol} protocol (its "
        f"original ships no script for it; protocols declared: {declared}); pass --cfg NAME "
        f"to run it with the default folders and arguments"
    )


def protocol_shots(cls: Any, protocol: str, default: Sequence[int]) -> List[int]:
    """The shot counts the method's original runs ``protocol`` with (else ``default``)."""
    own = dict(getattr(cls, "protocol_shots", {}) or {})
    if protocol == "dg" and "dg" not in own:
        protocol = "xd"
    shots = own.get(protocol, default)
    return [int(k) for k in ((shots,) if isinstance(shots, int) else shots)]


def declared_opts(cls: Any, key: str, dataset: str, shots: int) -> Optional[List[str]]:
    """The opts the method's scripts pass for run kind ``key`` (a ``protocol_dirs`` key),
    refinements applied on top (a pair's value changed in place, a new key appended);
    None when the method declares none for that kind."""
    table = dict(getattr(cls, "protocol_opts", {}) or {})

    def declares(kind: str) -> bool:
        return any(k == kind or k.startswith(kind + ".") for k in table)

    if not declares(key):
        key = _PROTOCOL_OF_DIR.get(key, key)
        if not declares(key):
            return None
    merged: Dict[str, str] = {}  # insertion order is the scripts' order
    for name in reversed(_refinements(key, dataset, shots)):
        pairs = [str(v) for v in table.get(name, ())]
        if len(pairs) % 2:
            raise SweepError(
                f"trainer {cls.__name__}: protocol_opts[{name!r}] must alternate KEY and "
                f"VALUE, got an odd number of items {pairs}"
            )
        for k, v in zip(pairs[0::2], pairs[1::2]):
            merged[k] = v
    return [item for pair in merged.items() for item in pair]


def dir_pattern(cls: Any, key: str, node_keys: Iterable[str]) -> str:
    """The output folder pattern of ``key`` for the method (its own, else the default)."""
    own = dict(getattr(cls, "protocol_dirs", {}) or {})
    if key in own:
        return own[key]
    key = _PROTOCOL_OF_DIR.get(key, key)
    if key in own:
        return own[key]
    if key == "fewshot" and not set(KNOBS.values()) <= set(node_keys):
        return FEWSHOT_PLAIN
    return DEFAULT_DIRS[key]


# ---------------------------------------------------------------------------- configs
class _Configs:
    """The effective config of a run (defaults -> dataset YAML -> method YAML -> opts), as
    ``coop-train`` will build it, memoised."""

    def __init__(self) -> None:
        self._memo: Dict[Tuple, Any] = {}

    def get(self, dataset_file: str, cfg_file: str, opts: Sequence[str], what: str) -> Any:
        from coop.config import ConfigError, get_cfg_default, merge_from_file, merge_from_list

        key = (dataset_file, cfg_file, tuple(opts))
        if key not in self._memo:
            cfg = get_cfg_default()
            try:
                merge_from_file(cfg, dataset_file, kind="dataset config")
                merge_from_file(cfg, cfg_file, kind="config")
                merge_from_list(cfg, opts, where="the sweep's opts")
            except ConfigError as e:
                raise SweepError(f"{what}: {e}") from None
            self._memo[key] = cfg
        return self._memo[key]


def _check_dataset(dataset: str) -> str:
    from coop.config import ConfigError, resolve_config_path

    path = f"configs/datasets/{dataset}.yaml"
    try:
        resolve_config_path(path, "dataset config")
    except ConfigError as e:
        raise SweepError(f"unknown dataset '{dataset}' ({e})") from None
    return path


def _check_cfg_file(folder: str, stem: str, what: str) -> str:
    from coop.config import ConfigError, resolve_config_path

    path = f"configs/trainers/{folder}/{stem}.yaml"
    try:
        resolve_config_path(path)
    except ConfigError as e:
        raise SweepError(f"no trainer config '{stem}' for {what} ({e}); pass --cfg") from None
    return path


@dataclass
class Step:
    """One kind of run of a protocol (a training run or an evaluation of one)."""

    dir_key: str  # key of the folder pattern
    dataset: str
    shots: int  # the protocol's shot count (in the folder); 0: none
    seed: int  # -1: no --seed
    protocol_opts: List[str] = field(default_factory=list)  # e.g. DATASET.NUM_SHOTS K
    eval_only: bool = False


class Planner:
    """Builds the runs of one trainer's presets (the module docstring says what it reads
    from the trainer class)."""

    def __init__(self, args: argparse.Namespace, trainer: str) -> None:
        self.args = args
        self.cls = trainer_class(trainer)
        self.trainer = trainer
        self.folder = _config_folder(self.cls)
        self.node = _node_name(self.cls)
        self.configs = _Configs()
        self.user_opts = list(args.opts or [])
        self._node_keys: Optional[List[str]] = None

    def node_keys(self) -> List[str]:
        """The keys of the method's config node (none for a method without one)."""
        if self._node_keys is None:
            from coop.config import get_cfg_default

            node = get_cfg_default().TRAINER.get(self.node) if self.node else None
            self._node_keys = list(node.keys()) if node is not None else []
        return self._node_keys

    def stem(self, protocol: str, dataset: str, shots: int) -> str:
        if self.args.cfg:
            return self.args.cfg
        return with_backbone(protocol_cfg(self.cls, protocol, dataset, shots), self.args.backbone)

    def knob_opts(self, knobs: Dict[str, Any]) -> List[str]:
        """``TRAINER.<NODE>.<KEY> value`` for the given knob values (flag name -> value)."""
        opts: List[str] = []
        keys = self.node_keys()
        for flag, value in knobs.items():
            if value is None:
                continue
            key = KNOBS[flag]
            if key not in keys:
                raise SweepError(
                    f"--{flag}: trainer {self.trainer} has no TRAINER."
                    f"{self.node or '<node>'}.{key} key"
                )
            opts += [f"TRAINER.{self.node}.{key}", str(value)]
        return opts

    def make_run(
        self, step: Step, stem: str, knobs: Dict[str, Any], after: Optional[Run] = None,
        load_epoch: Optional[int] = None,
    ) -> Run:  # fmt: skip
        """One run: its folder from the pattern, its argv as the original script's."""
        dataset_file = _check_dataset(step.dataset)
        what = f"{step.dataset}, {step.shots} shots" if step.shots else step.dataset
        cfg_file = _check_cfg_file(self.folder, stem, what)
        pattern = dir_pattern(self.cls, step.dir_key, self.node_keys())
        fields = [f for _, f, _, _ in string.Formatter().parse(pattern) if f]
        method_keys = [f for f in fields if f not in _PLAIN_FIELDS]
        user_keys = set(self.user_opts[0::2])
        knob_pairs = self.knob_opts(knobs)
        knob_values = dict(zip(knob_pairs[0::2], knob_pairs[1::2]))
        declared = declared_opts(self.cls, step.dir_key, step.dataset, step.shots)
        script: List[str] = []  # the script's own opts, a flag's value in place
        for key, value in zip((declared or [])[0::2], (declared or [])[1::2]):
            if key not in user_keys:  # the user's own value comes later
                script += [key, knob_values.get(key, value)]
        tail = step.protocol_opts + self.user_opts
        cfg = self.configs.get(
            dataset_file, cfg_file, script + knob_pairs + tail, f"{self.trainer} {what}"
        )
        # an evaluation's folder shows its model's settings (the scripts' COMMON_DIR)
        shown = self.run_cfg(after) if after is not None else cfg
        node = shown.TRAINER.get(self.node) if self.node else None
        values: Dict[str, Any] = {
            "dataset": step.dataset, "trainer": self.trainer, "cfg": stem,
            "shots": step.shots, "seed": step.seed, "output": self.args.output,
        }  # fmt: skip
        folder_opts: List[str] = []
        for key in method_keys:
            if node is None or key not in node:
                raise SweepError(
                    f"the {step.dir_key} folder pattern {pattern!r} of trainer {self.trainer} "
                    f"names {{{key}}}, which is not a key of its config node; declare "
                    f"protocol_dirs[{step.dir_key!r}] on the trainer"
                )
            values[key] = node[key]
            # without the scripts' opts declared, the keys the folder shows are passed as
            # opts, as the scripts pass their arguments (a user's own opt comes later)
            full = f"TRAINER.{self.node}.{key}"
            if declared is None and full not in user_keys:
                folder_opts += [full, str(node[key])]
        opts = script + folder_opts
        for key, value in knob_values.items():
            if key not in opts[0::2] and key not in user_keys:
                opts += [key, value]
        opts += tail
        folder = pattern.format(**values)
        out = folder if "output" in fields else os.path.join(self.args.output, folder)
        argv = ["--root", self.args.root]
        if step.seed >= 0:
            argv += ["--seed", str(step.seed)]
        argv += [
            "--trainer", self.trainer,
            "--dataset-config-file", dataset_file,
            "--config-file", cfg_file,
            "--output-dir", out,
        ]  # fmt: skip
        if after is not None:
            argv += ["--model-dir", after.out, "--load-epoch", str(load_epoch)]
        if step.eval_only:
            argv.append("--eval-only")
        argv += opts
        group = os.path.dirname(out) if step.seed >= 0 else out
        return Run(
            dataset=step.dataset, trainer=self.trainer, cfg=stem, shots=step.shots,
            seed=step.seed, out=out, argv=argv, eval_only=step.eval_only,
            after=[after.done_file()] if after is not None else [], group=group,
        )  # fmt: skip

    def run_cfg(self, run: Run) -> Any:
        """The config a planned run will have (from its argv)."""
        argv = run.argv
        dataset_file = argv[argv.index("--dataset-config-file") + 1]
        cfg_file = argv[argv.index("--config-file") + 1]
        opts = argv[argv.index("--output-dir") + 2 :]
        while opts and opts[0].startswith("--"):  # --model-dir M --load-epoch E --eval-only
            opts = opts[1:] if opts[0] == "--eval-only" else opts[2:]
        return self.configs.get(dataset_file, cfg_file, opts, run.label)

    def max_epoch(self, run: Run) -> int:
        """``OPTIM.MAX_EPOCH`` of a training run's config: the epoch its last checkpoint
        has, which the evaluations load."""
        return int(self.run_cfg(run).OPTIM.MAX_EPOCH)

    def shots(self, protocol: str, default: Sequence[int]) -> List[int]:
        """``--shots``, else the shot counts the method's original runs ``protocol`` with."""
        return _shots(self.args, protocol_shots(self.cls, protocol, default))


# ---------------------------------------------------------------------------- presets
def _int_list(text: str, what: str) -> List[int]:
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise SweepError(f"--{what} takes comma-separated integers, got {text!r}") from None
    if not values:
        raise SweepError(f"--{what} is empty")
    return values


def _names(text: str, what: str) -> List[str]:
    names = [d.strip() for d in str(text).split(",") if d.strip()]
    if not names:
        raise SweepError(f"--{what} is empty")
    return names


def _shots(args: argparse.Namespace, default: Sequence[int]) -> List[int]:
    shots = _int_list(args.shots, "shots") if args.shots else list(default)
    if any(s < 1 for s in shots):
        raise SweepError(f"--shots must be positive, got {args.shots}")
    return shots


def _knobs(args: argparse.Namespace) -> Dict[str, Any]:
    """main.sh's NCTX, CSC and CTP from the flags (None: the config's value)."""
    if args.csc is not None and args.csc not in ("False", "True"):
        raise SweepError(f"--csc is False or True, got {args.csc!r}")
    if args.ctp is not None and args.ctp not in ("end", "middle", "front"):
        raise SweepError(f"--ctp is end, middle or front, got {args.ctp!r}")
    if args.nctx is not None and args.nctx < 1:
        raise SweepError(f"--nctx must be positive, got {args.nctx}")
    return {"nctx": args.nctx, "csc": args.csc, "ctp": args.ctp}


def _fewshot_runs(
    p: Planner, datasets: Sequence[str], shots: Sequence[int], seeds: Sequence[int],
    knobs: Dict[str, Any], protocol: str = "fewshot", stem_of=None,
) -> List[Run]:  # fmt: skip
    runs = []
    for dataset in datasets:
        for k in shots:
            stem = p.stem(protocol, dataset, k)
            if stem_of is not None:
                stem = stem_of(stem)
            for seed in seeds:
                step = Step("fewshot", dataset, k, seed, ["DATASET.NUM_SHOTS", str(k)])
                runs.append(p.make_run(step, stem, knobs))
    return runs


def plan_fewshot(args: argparse.Namespace) -> List[Run]:
    """scripts/coop/main.sh over datasets x shots x seeds (``--zeroshot``: zeroshot.sh
    first, per dataset)."""
    p = Planner(args, args.trainer)
    datasets = _names(args.datasets, "datasets")
    shots, seeds = p.shots("fewshot", PAPER_SHOTS), _int_list(args.seeds, "seeds")
    knobs = _knobs(args)
    runs: List[Run] = []
    for dataset in datasets:
        if getattr(args, "zeroshot", False):  # zeroshot.sh DATASET <backbone> first
            zs = argparse.Namespace(**{**vars(args), "datasets": dataset})
            runs += plan_zeroshot(zs, ZEROSHOT_TRAINER, [args.backbone or "rn50"])
        runs += _fewshot_runs(p, [dataset], shots, seeds, knobs)
    return runs


def plan_linear_probe(args: argparse.Namespace) -> List[Run]:
    """The linear-probe baseline over the few-shot grid (trainer ``LinearProbeCLIP`` by
    default), with the method's few-shot folders."""
    return plan_fewshot(args)


def plan_zeroshot(
    args: argparse.Namespace, trainer: Optional[str] = None, backbones: Optional[List[str]] = None
) -> List[Run]:
    """scripts/coop/zeroshot.sh DATASET CFG for every dataset and backbone (CFG: the
    backbone's YAML, e.g. rn50): no seed, no few-shot step, evaluation only."""
    p = Planner(args, trainer or args.trainer)
    if backbones is None:
        backbones = [args.cfg] if args.cfg else _names(args.backbones, "backbones")
    runs = []
    for dataset in _names(args.datasets, "datasets"):
        for backbone in backbones:
            runs.append(p.make_run(Step("zeroshot", dataset, 0, -1, eval_only=True), backbone, {}))
    return runs


def plan_prompts(args: argparse.Namespace) -> List[Run]:
    """The prompt study (``coop-prompts``: zero-shot CLIP's test accuracy per hand-written
    template) on every dataset, with the backbone's YAML (``--backbone``, default rn50)."""
    from coop.config import ConfigError
    from coop.prompt_study import template_list

    p = Planner(args, ZEROSHOT_TRAINER)
    stem = args.cfg or args.backbone or "rn50"
    cfg_file = _check_cfg_file(p.folder, stem, "the prompt study")
    for spec in args.template:  # a bad template stops before any run
        try:
            template_list(spec, "")
        except ConfigError as e:
            raise SweepError(str(e)) from None
    pattern = dir_pattern(p.cls, "prompts", ())
    runs = []
    for dataset in _names(args.datasets, "datasets"):
        dataset_file = _check_dataset(dataset)
        p.configs.get(dataset_file, cfg_file, p.user_opts, f"prompt study on {dataset}")
        out = os.path.join(
            args.output, pattern.format(dataset=dataset, cfg=stem, trainer=p.trainer)
        )
        argv = ["--root", args.root, "--dataset-config-file", dataset_file]
        argv += ["--config-file", cfg_file, "--output-dir", out]
        for spec in args.template:
            argv += ["--template", spec]
        runs.append(Run(
            dataset=dataset, trainer=ZEROSHOT_TRAINER, cfg=stem, shots=0, seed=-1, out=out,
            argv=argv + p.user_opts, eval_only=True, group=out, command="coop-prompts",
        ))  # fmt: skip
    return runs


def plan_ablation(args: argparse.Namespace) -> List[Run]:
    """The CoOp paper's studies over main.sh's grid, each varying one thing from the
    default (M=16, end, unified, random init, the method's backbone): ``csc`` (unified vs
    class-specific context), ``ctp`` (end vs middle; with ``csc`` their product: the four
    curves of the few-shot figure), ``nctx`` (4, 8, 16), ``init`` (random vs the
    ``_ctxv1`` YAML's "a photo of a"), ``backbone`` (rn50, rn101, vit_b32, vit_b16)."""
    p = Planner(args, args.trainer)
    datasets = _names(args.datasets, "datasets")
    seeds = _int_list(args.seeds, "seeds")
    studies = _names(args.studies, "studies")
    unknown = [s for s in studies if s not in STUDIES]
    if unknown:
        raise SweepError(
            f"--studies: unknown study {unknown[0]!r}; choose from {', '.join(STUDIES)}"
        )
    base = _knobs(args)
    variants: List[Tuple[str, Dict[str, Any], Optional[str]]] = []  # (study, knobs, backbone)
    if "csc" in studies or "ctp" in studies:
        cscs = STUDY_VALUES["csc"] if "csc" in studies else [base["csc"]]
        ctps = STUDY_VALUES["ctp"] if "ctp" in studies else [base["ctp"]]
        study = "csc" if "csc" in studies else "ctp"
        for ctp in ctps:
            for csc in cscs:
                variants.append((study, {**base, "csc": csc, "ctp": ctp}, None))
    if "nctx" in studies:
        for n in STUDY_VALUES["nctx"]:
            variants.append(("nctx", {**base, "nctx": n}, None))
    if "init" in studies:
        variants.append(("init", dict(base), None))
        variants.append(("init", dict(base), INIT_SUFFIX))
    if "backbone" in studies:
        for b in BACKBONES:
            variants.append(("backbone", dict(base), "backbone:" + b))
    runs: List[Run] = []
    seen = set()
    for study, knobs, change in variants:
        shots = _shots(args, STUDY_SHOTS[study])
        if change == INIT_SUFFIX:
            stem_of = lambda s: s + INIT_SUFFIX  # noqa: E731
        elif change and change.startswith("backbone:"):
            stem_of = (lambda b: lambda s: with_backbone(s, b))(change.split(":", 1)[1])
        else:
            stem_of = None
        for run in _fewshot_runs(p, datasets, shots, seeds, knobs, stem_of=stem_of):
            if run.out not in seen:  # the default setting is in every study
                seen.add(run.out)
                runs.append(run)
    return runs


def _train_then_eval(
    p: Planner, protocol: str, train_key: str, test_key: str, sources: Sequence[str],
    targets_of, seeds: Sequence[int], shots: int, knobs: Dict[str, Any],
    train_opts, test_opts,
) -> List[Run]:  # fmt: skip
    runs = []
    for source in sources:
        stem = p.stem(protocol, source, shots)
        for seed in seeds:
            train = p.make_run(Step(train_key, source, shots, seed, train_opts(shots)), stem, knobs)
            runs.append(train)
            epoch = p.max_epoch(train)
            for target in targets_of(source):
                step = Step(test_key, target, shots, seed, test_opts(shots), eval_only=True)
                runs.append(p.make_run(step, stem, knobs, after=train, load_epoch=epoch))
    return runs


def plan_base2new(args: argparse.Namespace) -> List[Run]:
    """base2new_train.sh (train on the base classes) then base2new_test.sh (evaluate the
    last epoch on the new classes), per dataset and seed."""
    p = Planner(args, args.trainer)
    shots = p.shots("base2new", (16,))
    if len(shots) != 1:
        raise SweepError("--shots: base-to-new takes one shot count")
    return _train_then_eval(
        p, "base2new", "base2new_train", "base2new_test", _names(args.datasets, "datasets"),
        lambda d: [d], _int_list(args.seeds, "seeds"), shots[0], _knobs(args),
        lambda k: ["DATASET.NUM_SHOTS", str(k), "DATASET.SUBSAMPLE_CLASSES", "base"],
        lambda k: ["DATASET.NUM_SHOTS", str(k), "DATASET.SUBSAMPLE_CLASSES", "new"],
    )  # fmt: skip


def _transfer(args: argparse.Namespace, protocol: str, default_targets: Sequence[str]) -> List[Run]:
    p = Planner(args, args.trainer)
    shots = p.shots(protocol, (16,))
    if len(shots) != 1:
        raise SweepError(f"--shots: {protocol} takes one shot count")
    source = args.source
    targets = _names(args.targets, "targets") if args.targets else list(default_targets)
    return _train_then_eval(
        p, protocol, f"{protocol}_train", f"{protocol}_test", [source], lambda _s: targets,
        _int_list(args.seeds, "seeds"), shots[0], _knobs(args),
        lambda k: ["DATASET.NUM_SHOTS", str(k)], lambda k: [],
    )  # fmt: skip


def plan_xd(args: argparse.Namespace) -> List[Run]:
    """xd_train.sh (ImageNet, all classes, 16 shots) then xd_test.sh on the ten other
    datasets (full test splits, the last epoch)."""
    return _transfer(args, "xd", [d for d in PAPER_DATASETS if d != args.source])


def plan_dg(args: argparse.Namespace) -> List[Run]:
    """Domain generalisation: the ImageNet model evaluated on ImageNetV2, -Sketch, -A and
    -R (CoOp's eval.sh folders for CoOp, xd_test.sh's by default)."""
    return _transfer(args, "dg", DG_TARGETS)


PRESETS = {
    "fewshot": plan_fewshot,
    "ablation": plan_ablation,
    "zeroshot": plan_zeroshot,
    "linear-probe": plan_linear_probe,
    "base2new": plan_base2new,
    "xd": plan_xd,
    "dg": plan_dg,
    "prompts": plan_prompts,
}
DEFAULT_TRAINER = {"zeroshot": ZEROSHOT_TRAINER, "linear-probe": "LinearProbeCLIP"}
# presets that train nothing, and so take no trainer, seeds, shots or context knobs
NO_TRAINING = ("prompts",)


def plan(preset: str, args: argparse.Namespace, check_root: bool = True) -> List[Run]:
    """The runs of ``preset`` in dependency order (a training run before its evaluations);
    raises :class:`SweepError` for anything that would make a run fail at once
    (``check_root``: the datasets folder must exist, which a status query does not need)."""
    if check_root and not os.path.isdir(args.root):
        raise SweepError(f"--root {args.root}: no such folder")
    from coop.registry import register_builtins

    register_builtins()
    return PRESETS[preset](args)
