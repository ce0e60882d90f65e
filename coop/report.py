"""``coop-report``: every run under an output tree in the papers' tables, beside the published
numbers, with the runs that are missing, and optionally the paper's few-shot curves.

    coop-report output
    coop-report output --ci95 --output-dir report --figures report/curves
    coop-report output --expected planned_runs.json --format markdown

Runs are found by their ``results.json`` (written by every ``coop-train`` run), or, for a
run without one (a real Dassl's run, an older run), by its ``log.txt``: the config block it
prints at the start and the last ``=> result`` block. Nothing is read from folder names, so
any method and any sweep layout appears without changes here:

- a run's **method** is its trainer and backbone plus the config values that tell its runs
  apart from the same trainer's other runs in the same cell (e.g. CoOp's ``N_CTX``,
  ``CSC``, ``CLASS_TOKEN_POSITION``, or ``MAX_EPOCH`` when two schedules were run);
- an evaluation-only run (``--eval-only --model-dir``) takes method, shot count and seed
  from the run it loaded; it is a **cross-dataset** (``xd``) or, on an ImageNet variant from
  an ImageNet model, a **domain-generalisation** (``dg``) result; ``SUBSAMPLE_CLASSES``
  ``base`` / ``new`` runs form the **base-to-new** table;
- everything else is a **few-shot** result at its ``NUM_SHOTS`` (0 for a run without
  few-shot training, e.g. zero-shot CLIP).

Seeds are summarised as ``parse_test_res.py`` does: the mean and the population standard
deviation (``np.std``), or with ``--ci95`` ``1.96 * std / sqrt(n)``. The 11-dataset average
is the mean of the per-dataset means and is given only when all eleven datasets are there.
Base-to-new H is the harmonic mean of the seed-averaged base and new accuracies; the average
row's H comes from the averaged base and new, as the papers compute it.
"""

from __future__ import annotations

import argparse
import ast
import csv
import io
import json
import logging
import math
import os
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from coop.published import (
    DG_TARGETS,
    ELEVEN,
    SOURCES,
    XD_TARGETS,
    Published,
    PublishedError,
    PublishedIndex,
    config_text,
    with_extra,
)

logger = logging.getLogger(__name__)

# Config keys that never tell methods apart: where a run is, its seed, which data it reads,
# and switches that do not change results (loader workers, caches, the speed options).
_IGNORED = (
    "VERSION", "OUTPUT_DIR", "RESUME", "SEED", "USE_CUDA", "VERBOSE", "DATASET.ROOT",
    "DATASET.NAME", "DATASET.NUM_SHOTS", "DATASET.SUBSAMPLE_CLASSES",
    "DATASET.SOURCE_DOMAINS", "DATASET.TARGET_DOMAINS", "DATALOADER.NUM_WORKERS",
    "MODEL.BACKBONE.NAME", "TRAIN.PRINT_FREQ", "TRAIN.CHECKPOINT_FREQ", "TEST.SPLIT",
    "TEST.PER_CLASS_RESULT", "TEST.COMPUTE_CMAT", "FAST.",
)  # fmt: skip
_TITLES = {"OxfordFlowers": "Flowers102", "DescribableTextures": "DTD",
           "ImageNetSketch": "ImageNet-Sketch", "ImageNetA": "ImageNet-A",
           "ImageNetR": "ImageNet-R"}  # fmt: skip
PROTOCOLS = ("fewshot", "base2new", "xd", "dg")


class ReportError(ValueError):
    """Bad input to the report (a missing folder, an unreadable file), with its path."""


def dataset_title(name: str) -> str:
    """The name the papers print for a ``DATASET.NAME``."""
    return _TITLES.get(name, name)


def _dataset_order(name: str) -> Tuple[int, str]:
    order = ELEVEN + DG_TARGETS
    return (order.index(name), "") if name in order else (len(order), name)


def _ignored(key: str) -> bool:
    return key.endswith("CACHE_DIR") or any(
        key == k or (k.endswith(".") and key.startswith(k)) for k in _IGNORED
    )


def _norm(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_norm(v) for v in value)
    if value is None:
        return ""
    return value


def flatten(node: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """A nested config as ``{"TRAINER.COOP.N_CTX": 16, ...}`` (lists as tuples)."""
    out: Dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = _norm(value)
    return out


# ---------------------------------------------------------------------------------------
# Reading runs


@dataclass
class Run:
    """One evaluation: a run folder's test result and what produced it."""

    path: str
    trainer: str
    dataset: str
    backbone: str
    shots: int  # NUM_SHOTS, 0 for no few-shot sampling
    subsample: str
    seed: int
    metrics: Dict[str, float]
    config: Dict[str, Any]
    model_dir: str = ""
    from_log: bool = False
    source: Optional[Run] = None  # the run whose model this evaluation loaded
    protocol: str = "fewshot"
    method: Optional[Method] = None

    @property
    def ident(self) -> Run:
        """The run that defines method, shot count and seed (the trained one)."""
        return self.source or self

    @property
    def source_dataset(self) -> str:
        return self.source.dataset if self.source else "ImageNet"


def _shots(num_shots: Any) -> int:
    try:
        return max(int(num_shots), 0)
    except (TypeError, ValueError):
        return 0


def read_results_json(folder: str) -> Optional[Run]:
    """The run a ``results.json`` describes, or None if it is not a test result."""
    path = os.path.join(folder, "results.json")
    try:
        with open(path, encoding="utf-8") as f:
            res = json.load(f)
        config = flatten(res.get("config") or {})
        run = Run(
            path=folder,
            trainer=str(res["trainer"]),
            dataset=str(res["dataset"]),
            backbone=str(res["backbone"]),
            shots=_shots(res.get("num_shots")),
            subsample=str(res.get("subsample_classes") or "all"),
            seed=int(res.get("seed", -1)),
            metrics={k: float(v) for k, v in res["metrics"].items()},
            config=config,
            model_dir=str(res.get("model_dir") or ""),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ReportError(f"{path}: not a readable results file ({e})") from None
    if res.get("split", "test") != "test":
        return None
    if not run.model_dir:  # results.json does not say which model an evaluation loaded
        run.model_dir = read_log(os.path.join(folder, "log.txt"))[0].get("model_dir", "")
    return run


def _literal(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return _norm(ast.literal_eval(value))
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return value
    return _norm(value)


_RESULT_LINE = re.compile(r"^\* ([\w ]+): ([\d.,eE+-]+)(%?)$")
_LOG_METRIC = {"error": "error_rate"}


def read_log(path: str) -> Tuple[Dict[str, str], Dict[str, Any], Dict[str, float]]:
    """A run's ``log.txt``: its printed arguments, its printed config (flat) and the
    metrics of its last ``=> result`` block. Missing parts come back empty."""
    args: Dict[str, str] = {}
    config_lines: List[str] = []
    metrics: Dict[str, float] = {}
    section = ""
    try:
        f = open(path, encoding="utf-8", errors="replace")
    except OSError:
        return args, {}, metrics
    with f:
        for raw in f:
            line = raw.rstrip("\n")
            s = line.strip()
            if s in ("** Arguments **", "** Config **"):
                section = "args" if "Arg" in s else "config"
                continue
            if s and set(s) == {"*"}:
                continue
            if s == "=> result":
                section, metrics = "result", {}
                continue
            if section == "config":
                if s.startswith("Collecting env info"):
                    section = ""
                else:
                    config_lines.append(line)
            elif section == "args":
                key, sep, value = line.partition(": ")
                if sep and key.isidentifier():
                    args[key] = value
                elif line.endswith(":") and line[:-1].isidentifier():
                    args[line[:-1]] = ""
                else:
                    section = ""
            elif section == "result":
                m = _RESULT_LINE.match(s)
                if m and m.group(3):  # a percentage (not the total / correct counts)
                    name = m.group(1).replace(" ", "_")
                    metrics[_LOG_METRIC.get(name, name)] = float(m.group(2))
                elif not m:
                    section = ""
    config: Dict[str, Any] = {}
    if config_lines:
        import yaml

        try:
            loaded = yaml.safe_load("\n".join(config_lines))
        except yaml.YAMLError:
            loaded = None
        if isinstance(loaded, dict):
            config = {k: _literal(v) for k, v in flatten(loaded).items()}
    return args, config, metrics


def run_from_log(folder: str) -> Optional[Run]:
    """The run a ``log.txt`` describes (config block and last result), or None when the log
    holds no result or no config."""
    args, config, metrics = read_log(os.path.join(folder, "log.txt"))
    if not metrics or not config.get("DATASET.NAME"):
        return None
    seed = config.get("SEED", -1)
    return Run(
        path=folder,
        trainer=str(config.get("TRAINER.NAME") or args.get("trainer", "")),
        dataset=str(config["DATASET.NAME"]),
        backbone=str(config.get("MODEL.BACKBONE.NAME", "")),
        shots=_shots(config.get("DATASET.NUM_SHOTS")),
        subsample=str(config.get("DATASET.SUBSAMPLE_CLASSES") or "all"),
        seed=int(seed) if isinstance(seed, int) else -1,
        metrics=metrics,
        config=config,
        model_dir=args.get("model_dir", ""),
        from_log=True,
    )


@dataclass
class Collected:
    runs: List[Run]
    incomplete: List[Tuple[str, str]]  # (folder, why it gives no result)
    skipped: List[str] = field(default_factory=list)  # results of other splits


def collect(root: str) -> Collected:
    """Every run under ``root`` (a folder with ``results.json``, else with a ``log.txt``
    that holds a result). A ``results.json`` that cannot be read falls back to the log; a
    folder that yields no result is listed with the reason."""
    if not os.path.isdir(root):
        raise ReportError(f"{root}: no such folder")
    runs: List[Run] = []
    incomplete: List[Tuple[str, str]] = []
    skipped: List[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        why = "log.txt holds no result yet"
        if "results.json" in filenames:
            try:
                run = read_results_json(dirpath)
            except ReportError as e:
                logger.warning("%s; reading its log.txt instead", e)
                why = f"{e}, and log.txt holds no result"
            else:
                (runs.append(run) if run else skipped.append(dirpath))
                continue
        if "log.txt" in filenames or "results.json" in filenames:
            run = run_from_log(dirpath)
            (runs.append(run) if run else incomplete.append((dirpath, why)))
    _link_sources(runs)
    for run in runs:
        run.protocol = _protocol(run)
    return Collected(runs, incomplete, skipped)


def _link_sources(runs: Sequence[Run]) -> None:
    """Point each evaluation at the run in the tree whose model it loaded (by its real
    path, else by the longest matching path tail, for a relative ``--model-dir``)."""
    by_path = {os.path.realpath(r.path): r for r in runs}
    for run in runs:
        if not run.model_dir:
            continue
        md = run.model_dir.rstrip("/")
        candidates = [os.path.realpath(md)] if os.path.isabs(md) else []
        candidates.append(os.path.realpath(os.path.join(run.path, md)))
        found = next((by_path[c] for c in candidates if c in by_path), None)
        if found is None:
            tail = os.path.normpath(md).lstrip("./").split(os.sep)
            for n in range(len(tail), 0, -1):
                suffix = os.sep + os.path.join(*tail[-n:])
                hits = [r for p, r in by_path.items() if p.endswith(suffix)]
                if len(hits) == 1:
                    found = hits[0]
                    break
                if hits:
                    break
        if found is not None and found is not run:
            run.source = found.ident


def _protocol(run: Run) -> str:
    if run.subsample in ("base", "new"):
        return "base2new"
    src = run.source
    if src is not None and src.dataset != run.dataset:
        return "dg" if src.dataset == "ImageNet" and run.dataset in DG_TARGETS else "xd"
    if src is None and run.dataset in DG_TARGETS:
        return "dg"  # e.g. zero-shot CLIP on an ImageNet variant
    return "fewshot"


# ---------------------------------------------------------------------------------------
# Methods


def backbone_name(backbone: str) -> str:
    """A backbone for display: the file name of a checkpoint path, else the CLIP name."""
    if backbone.startswith((".", "/", "~")) or backbone.endswith((".pt", ".pth", ".bin")):
        return os.path.basename(backbone)
    return backbone


@dataclass(frozen=True)
class Method:
    trainer: str
    backbone: str
    variant: Tuple[Tuple[str, str], ...] = ()  # (dotted key, value as text)

    def label(self, short: Mapping[str, str]) -> str:
        if not self.variant:
            return self.trainer
        parts = ", ".join(f"{short.get(k, k)}={v}" for k, v in self.variant)
        return f"{self.trainer} ({parts})"


def assign_methods(
    runs: Sequence[Run], ignore: Iterable[str] = (), by: Iterable[str] = ()
) -> Dict[str, str]:
    """Give every run its method; returns the short names of the variant keys.

    A trainer's variant keys are the config keys (of the trained runs) whose values differ
    between its runs of one cell (protocol, dataset, shot count, class subset), plus ``by``,
    less ``ignore``. A key that only changes from cell to cell, such as the paper's epochs
    per shot count, therefore keeps one method across the curve."""
    ignore, by = set(ignore), list(by)
    by_trainer: Dict[str, List[Run]] = defaultdict(list)
    for run in runs:
        by_trainer[run.ident.trainer].append(run)
    all_keys: set = set()
    for trainer, trainer_runs in by_trainer.items():
        cells: Dict[tuple, List[Run]] = defaultdict(list)
        for run in trainer_runs:
            cells[(run.protocol, run.dataset, run.ident.shots, run.subsample)].append(run)
        keys = {k for k in by}
        for cell in cells.values():
            if len(cell) < 2:
                continue
            names = set().union(*(r.ident.config for r in cell))
            for k in names:
                if _ignored(k) or k in ignore or k in keys:
                    continue
                if len({config_text(r.ident.config.get(k, "<unset>")) for r in cell}) > 1:
                    keys.add(k)
        variant = sorted(keys)
        all_keys.update(variant)
        for run in trainer_runs:
            cfg = run.ident.config
            run.method = Method(
                trainer,
                backbone_name(run.ident.backbone),
                tuple((k, config_text(cfg.get(k, "<unset>"))) for k in variant),
            )
    last = defaultdict(list)
    for k in all_keys:
        last[k.rsplit(".", 1)[-1]].append(k)
    return {
        k: (k.rsplit(".", 1)[-1] if len(last[k.rsplit(".", 1)[-1]]) == 1 else k) for k in all_keys
    }


# ---------------------------------------------------------------------------------------
# Numbers


@dataclass
class Stat:
    """Seeds' values summarised as parse_test_res.py does."""

    values: List[float]
    ci95: bool = False

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return sum(self.values) / len(self.values)

    @property
    def std(self) -> float:  # population (np.std, ddof 0)
        m = self.mean
        return math.sqrt(sum((v - m) ** 2 for v in self.values) / len(self.values))

    @property
    def spread(self) -> float:
        return 1.96 * self.std / math.sqrt(self.n) if self.ci95 else self.std


@dataclass(frozen=True)
class Pub:
    """A published number in a table cell."""

    value: float
    status: str


def harmonic(base: float, new: float) -> float:
    return 2 * base * new / (base + new) if base + new else 0.0


@dataclass
class Table:
    name: str  # file stem
    title: str
    columns: List[str]
    rows: List[List[Any]]
    notes: List[str] = field(default_factory=list)


class Report:
    """Every table over one collection of runs."""

    def __init__(
        self,
        collected: Collected,
        metric: str = "accuracy",
        ci95: bool = False,
        published: Optional[PublishedIndex] = None,
        published_backbone: str = "",
        expected: Sequence[str] = (),
        ignore: Iterable[str] = (),
        by: Iterable[str] = (),
    ):
        self.collected = collected
        self.metric = metric
        self.ci95 = ci95
        self.published = published
        self.published_backbone = published_backbone
        self.short = assign_methods(collected.runs, ignore, by)
        self.duplicates: List[Tuple[Run, Run]] = []
        # (protocol, dataset, shots, subsample, method, source dataset) -> {seed: run}
        self.cells: Dict[tuple, Dict[int, Run]] = defaultdict(dict)
        for run in sorted(collected.runs, key=lambda r: (r.from_log, r.source is not None, r.path)):
            if metric not in run.metrics:
                continue
            key = (run.protocol, run.dataset, run.ident.shots, run.subsample, run.method,
                   run.source_dataset if run.protocol in ("xd", "dg") else "")  # fmt: skip
            seeds = self.cells[key]
            if run.ident.seed in seeds:
                self.duplicates.append((seeds[run.ident.seed], run))
                continue
            seeds[run.ident.seed] = run
        self.expected = list(expected)
        self.used_sources: Dict[str, None] = {}
        self._zero_shot: Dict[Method, bool] = {}
        self.rep_config: Dict[Method, Dict[str, Any]] = {}
        for run in collected.runs:
            self.rep_config.setdefault(run.method, run.ident.config)

    # -- helpers ------------------------------------------------------------------------
    def label(self, method: Method) -> str:
        return method.label(self.short)

    def full_label(self, method: Method) -> str:
        return f"{self.label(method)} [{method.backbone}]"

    def stat(self, key: tuple) -> Optional[Stat]:
        seeds = self.cells.get(key)
        if not seeds:
            return None
        return Stat([r.metrics[self.metric] for _, r in sorted(seeds.items())], self.ci95)

    def is_zero_shot(self, method: Method) -> bool:
        """No run of the method sampled a few-shot training set and none loaded a model."""
        if method not in self._zero_shot:
            self._zero_shot[method] = all(
                k[2] == 0 for k in self.cells if k[4] == method
            ) and not any(r.source for r in self.collected.runs if r.method == method)
        return self._zero_shot[method]

    def lookup(
        self, method: Method, protocol: str, dataset: str, shots: int, metric: str = ""
    ) -> Optional[Published]:
        if self.published is None:
            return None
        metric = metric or self.metric
        backbone = method.backbone
        if self.published_backbone:
            backbone = self.published_backbone
        found = self.published.lookup(
            method.trainer, self.rep_config.get(method, {}), backbone, protocol, dataset,
            shots, metric,
        )  # fmt: skip
        if found:
            self.used_sources[found.source] = None
        return found

    def _spread_name(self) -> str:
        return "95% CI" if self.ci95 else "std"

    def methods(self, protocol: str) -> List[Method]:
        found = {k[4] for k in self.cells if k[0] == protocol}
        return sorted(found, key=lambda m: (not self.is_zero_shot(m), self.label(m), m.backbone))

    # -- few-shot -----------------------------------------------------------------------
    def fewshot_cells(self) -> List[tuple]:
        return sorted(
            (k for k in self.cells if k[0] == "fewshot"),
            key=lambda k: (_dataset_order(k[1]), k[2], self.label(k[4]), k[4].backbone),
        )

    def fewshot_table(self) -> Table:
        cols = ["Dataset", "Shots", "Method", "Backbone", "Seeds",
                f"{self.metric} (mean +- {self._spread_name()})", "Published", "Diff",
                "Status", "Source"]  # fmt: skip
        rows = []
        for key in self.fewshot_cells():
            _, dataset, shots, _, method, _ = key
            st = self.stat(key)
            pub = self.lookup(method, "fewshot", dataset, shots)
            rows.append(self._row_with_pub(
                [dataset_title(dataset), shots, self.label(method), method.backbone, st.n, st],
                st.mean, pub))  # fmt: skip
        return Table("fewshot", f"Few-shot {self.metric} (%) per dataset", cols, rows)

    def _row_with_pub(self, row: List[Any], ours: Optional[float], pub: Optional[Published]):
        if pub is None:
            return row + [None, None, "", ""]
        diff = None if ours is None else ours - pub.value
        return row + [pub.value, diff, pub.status, f"{pub.table} ({pub.source})"]

    def fewshot_means(self, method: Method, shots: int) -> Dict[str, float]:
        return {
            k[1]: self.stat(k).mean
            for k in self.cells
            if k[0] == "fewshot" and k[4] == method and k[2] == shots
        }

    def fewshot_average_table(self) -> Table:
        cols = ["Shots", "Method", "Backbone", "Datasets", f"Average {self.metric}",
                "Published", "Diff", "Status", "Source", "Missing datasets"]  # fmt: skip
        rows = []
        pairs = sorted({(k[2], k[4]) for k in self.cells if k[0] == "fewshot"},
                       key=lambda p: (p[0], self.label(p[1]), p[1].backbone))  # fmt: skip
        for shots, method in pairs:
            means = self.fewshot_means(method, shots)
            missing = [d for d in ELEVEN if d not in means]
            avg = None if missing else sum(means[d] for d in ELEVEN) / len(ELEVEN)
            pub = self.lookup(method, "fewshot", "Average", shots)
            n = sum(d in means for d in ELEVEN)
            row = self._row_with_pub([shots, self.label(method), method.backbone, n, avg], avg, pub)
            rows.append(row + [", ".join(dataset_title(d) for d in missing)])
        return Table(
            "fewshot_average",
            f"Few-shot average over the 11 datasets ({self.metric}, %)",
            cols,
            rows,
            ["The average is the mean of the per-dataset means, given only when all 11 "
             "datasets are there."],
        )  # fmt: skip

    # -- base-to-new --------------------------------------------------------------------
    def base2new_table(self) -> Table:
        sp = self._spread_name()
        cols = ["Dataset", "Method", "Backbone", "Shots", "Seeds (base/new)",
                f"Base (mean +- {sp})", f"New (mean +- {sp})", "H", "Pub. base", "Pub. new",
                "Pub. H", "Diff base", "Diff new", "Diff H", "Status", "Source"]  # fmt: skip
        groups = sorted({(k[4], k[2]) for k in self.cells if k[0] == "base2new"},
                        key=lambda g: (self.label(g[0]), g[0].backbone, g[1]))  # fmt: skip
        rows: List[List[Any]] = []
        notes = []
        for method, shots in groups:
            datasets = sorted({k[1] for k in self.cells if k[0] == "base2new" and k[4] == method
                               and k[2] == shots}, key=_dataset_order)  # fmt: skip
            bases, news = {}, {}
            for d in datasets:
                b = self.stat(("base2new", d, shots, "base", method, ""))
                n = self.stat(("base2new", d, shots, "new", method, ""))
                h = harmonic(b.mean, n.mean) if b and n else None
                if b:
                    bases[d] = b.mean
                if n:
                    news[d] = n.mean
                seeds = f"{b.n if b else 0}/{n.n if n else 0}"
                rows.append(self._b2n_row(d, method, shots, seeds, b, n, h))
            missing = [d for d in ELEVEN if d not in bases or d not in news]
            if missing:
                notes.append(f"{self.label(method)} ({method.backbone}, {shots} shots): no "
                             f"11-dataset average, missing "
                             f"{', '.join(dataset_title(d) for d in missing)}")  # fmt: skip
                continue
            b_avg = sum(bases[d] for d in ELEVEN) / len(ELEVEN)
            n_avg = sum(news[d] for d in ELEVEN) / len(ELEVEN)
            rows.append(self._b2n_row("Average", method, shots, "", b_avg, n_avg,
                                      harmonic(b_avg, n_avg)))  # fmt: skip
        notes.append("H = 2BN/(B+N) of the seed-averaged base and new; the average row's H "
                     "comes from the averaged base and new.")  # fmt: skip
        return Table(
            "base2new", f"Base-to-new generalization ({self.metric}, %)", cols, rows, notes
        )

    def _b2n_row(self, dataset, method, shots, seeds, b, n, h) -> List[Any]:
        pubs = [self.lookup(method, "base2new", dataset, shots, m) for m in ("base", "new", "H")]
        ours = [x.mean if isinstance(x, Stat) else x for x in (b, n, h)]
        diffs = [o - p.value if o is not None and p else None for o, p in zip(ours, pubs)]
        found = [p for p in pubs if p]
        status = "/".join(sorted({p.status for p in found}))
        source = "; ".join(sorted({f"{p.table} ({p.source})" for p in found}))
        title = dataset if dataset == "Average" else dataset_title(dataset)
        return [title, self.label(method), method.backbone, shots, seeds, b, n, h,
                *[p.value if p else None for p in pubs], *diffs, status, source]  # fmt: skip

    # -- cross-dataset and domain generalization ----------------------------------------
    def transfer_table(self, protocol: str) -> Optional[Table]:
        """Source vs targets for ``xd`` or ``dg``: per method a row of ours, one of the
        published numbers and one of the differences."""
        keys = [k for k in self.cells if k[0] == protocol]
        if not keys:
            return None
        targets = sorted({k[1] for k in keys}, key=_dataset_order)
        sources = sorted({k[5] for k in keys}, key=_dataset_order)
        groups = {(k[5], k[4], k[2]) for k in keys}
        backbones = {k[4].backbone for k in keys}
        # zero-shot methods evaluated on the targets with the same backbones join the table
        for k in self.cells:
            if (k[0] in ("fewshot", "dg") and self.is_zero_shot(k[4]) and k[1] in targets
                    and k[4].backbone in backbones):  # fmt: skip
                for src in sources:
                    groups.add((src, k[4], k[2]))
        average = protocol == "xd"
        cols = ["Method", "Backbone", "Shots", "Row", "Source"] + [
            dataset_title(t) for t in targets
        ]
        cols += ["Average"] if average else []
        cols += ["Status", "Published in"]
        rows = []
        notes = []
        for src, method, shots in sorted(groups, key=lambda g: (_dataset_order(g[0]),
                                         not self.is_zero_shot(g[1]), self.label(g[1]), g[2])):  # fmt: skip
            src_stat = self._source_stat(method, src, shots)
            stats = [self._target_stat(protocol, t, src, method, shots) for t in targets]
            pubs = [self.lookup(method, protocol, d, shots) for d in [src] + targets]
            ours = [s.mean if s else None for s in [src_stat] + stats]
            avg = None
            if average:
                got = {t: s.mean for t, s in zip(targets, stats) if s}
                missing = [t for t in XD_TARGETS if t not in got]
                if missing:
                    notes.append(
                        f"{self.label(method)} ({method.backbone}): no target average,"
                        f" missing {', '.join(dataset_title(t) for t in missing)}"
                    )
                else:
                    avg = sum(got[t] for t in XD_TARGETS) / len(XD_TARGETS)
                p = self.lookup(method, protocol, "Average", shots)
                pubs.append(p)
                ours.append(avg)
            head = [self.label(method), method.backbone, shots]
            tail = [avg] if average else []
            rows.append(head + ["ours", src_stat] + stats + tail + ["", ""])
            found = [p for p in pubs if p]
            if found:
                pub_cells = [Pub(p.value, p.status) if p else None for p in pubs]
                diffs = [o - p.value if o is not None and p else None for o, p in zip(ours, pubs)]
                status = "/".join(sorted({p.status for p in found}))
                where = "; ".join(sorted({f"{p.table} ({p.source})" for p in found}))
                rows.append(head + ["published"] + pub_cells + [status, where])
                rows.append(head + ["difference"] + diffs + ["", ""])
        title = {"xd": "Cross-dataset transfer", "dg": "Domain generalization"}[protocol]
        notes.append("Source: the model's own test set (" + ", ".join(dataset_title(s) for s in sources)
                     + "); targets: evaluation-only runs of the same models."
                     + (" Average: the 10 targets, given only when all are there." if average else ""))  # fmt: skip
        return Table(protocol, f"{title} ({self.metric}, %)", cols, rows, notes)

    def _source_stat(self, method: Method, src: str, shots: int) -> Optional[Stat]:
        """The trained models' own test results (seeds of the runs the targets loaded)."""
        if self.is_zero_shot(method):
            return self.stat(("fewshot", src, shots, "all", method, ""))
        models = {}
        for k, seeds in self.cells.items():
            if k[0] in ("xd", "dg") and k[4] == method and k[5] == src and k[2] == shots:
                for seed, run in seeds.items():
                    models[seed] = run.source
        if not models:
            return None
        vals = [
            r.metrics[self.metric] for _, r in sorted(models.items()) if self.metric in r.metrics
        ]
        return Stat(vals, self.ci95) if vals else None

    def _target_stat(self, protocol, target, src, method, shots) -> Optional[Stat]:
        st = self.stat((protocol, target, shots, "all", method, src))
        if st is None and self.is_zero_shot(method):
            st = self.stat(("fewshot", target, shots, "all", method, "")) or self.stat(
                ("dg", target, shots, "all", method, "ImageNet")
            )
        return st

    # -- missing runs -------------------------------------------------------------------
    def missing_table(self) -> Table:
        cols = ["Kind", "Protocol", "Dataset", "Shots", "Method", "Detail"]
        rows: List[List[Any]] = []
        by_pm: Dict[tuple, Dict[tuple, set]] = defaultdict(dict)
        for k, seeds in self.cells.items():
            by_pm[(k[0], k[4])][k] = {s for s in seeds if s >= 0}
        for (protocol, method), cells in sorted(
            by_pm.items(), key=lambda x: (x[0][0], self.label(x[0][1]))
        ):
            want = set().union(*cells.values())
            for k, have in sorted(
                cells.items(), key=lambda x: (_dataset_order(x[0][1]), x[0][2], x[0][3])
            ):
                lost = sorted(want - have)
                if lost:
                    where = f" ({k[3]} classes)" if protocol == "base2new" else ""
                    where += f" (from {dataset_title(k[5])})" if k[5] else ""
                    rows.append(["seeds", protocol, dataset_title(k[1]), k[2], self.full_label(method),
                                 f"seed {', '.join(map(str, lost))} missing (have "
                                 f"{', '.join(map(str, sorted(have)))}){where}"])  # fmt: skip
        rows += self._missing_cells()
        for path, why in self.collected.incomplete:
            rows.append(["incomplete", "", "", "", "", f"{path}: {why}"])
        known = {os.path.realpath(r.path) for r in self.collected.runs}
        for path in self.expected:
            if os.path.realpath(path) not in known:
                rows.append(["expected", "", "", "", "", f"{path}: no result"])
        for kept, dup in self.duplicates:
            rows.append(["duplicate", dup.protocol, dataset_title(dup.dataset), dup.ident.shots,
                         self.full_label(dup.method), f"{dup.path} repeats seed {dup.ident.seed} of "
                         f"{kept.path} (not counted)"])  # fmt: skip
        return Table("missing", "Missing runs", cols, rows,
                     ["Seeds are checked against all the seeds a method has in the protocol; "
                      "cells against the datasets and shot counts seen in the protocol."])  # fmt: skip

    def _missing_cells(self) -> List[List[Any]]:
        rows = []
        # the grid of a method: the datasets and shot counts of the trained methods with its
        # backbone (for a zero-shot method: the datasets of all methods with its backbone)
        few = [k for k in self.cells if k[0] == "fewshot"]
        for method in self.methods("fewshot"):
            zero_shot = self.is_zero_shot(method)
            same = [k for k in few if k[4].backbone == method.backbone
                    and (zero_shot or not self.is_zero_shot(k[4]))]  # fmt: skip
            datasets = sorted({k[1] for k in same}, key=_dataset_order)
            shots = sorted({k[2] for k in same if k[2] > 0})
            have = {(k[1], k[2]) for k in few if k[4] == method}
            grid = (
                [(d, 0) for d in datasets]
                if self.is_zero_shot(method)
                else [(d, s) for d in datasets for s in shots]
            )
            for d, s in grid:
                if (d, s) not in have:
                    rows.append(["cell", "fewshot", dataset_title(d), s, self.full_label(method),
                                 "no run"])  # fmt: skip
        b2n = [k for k in self.cells if k[0] == "base2new"]
        for method, s in sorted({(k[4], k[2]) for k in b2n}, key=lambda g: self.full_label(g[0])):
            datasets = sorted({k[1] for k in b2n if k[4].backbone == method.backbone},
                              key=_dataset_order)  # fmt: skip
            for d in datasets:
                for sub in ("base", "new"):
                    if ("base2new", d, s, sub, method, "") not in self.cells:
                        rows.append(["cell", "base2new", dataset_title(d), s, self.full_label(method),
                                     f"no {sub}-class run"])  # fmt: skip
        for protocol in ("xd", "dg"):
            keys = [k for k in self.cells if k[0] == protocol]
            for src, method, s in sorted({(k[5], k[4], k[2]) for k in keys},
                                         key=lambda g: (g[0], self.label(g[1]))):  # fmt: skip
                same = {k[1] for k in keys if k[4].backbone == method.backbone and k[5] == src}
                for t in sorted(same, key=_dataset_order):
                    if (protocol, t, s, "all", method, src) not in self.cells:
                        rows.append(["cell", protocol, dataset_title(t), s, self.full_label(method),
                                     f"no evaluation of the {dataset_title(src)} model"])  # fmt: skip
        return rows

    def tables(self) -> List[Table]:
        out = []
        if any(k[0] == "fewshot" for k in self.cells):
            out += [self.fewshot_table(), self.fewshot_average_table()]
        if any(k[0] == "base2new" for k in self.cells):
            out.append(self.base2new_table())
        for protocol in ("xd", "dg"):
            t = self.transfer_table(protocol)
            if t:
                out.append(t)
        out.append(self.missing_table())
        if self.used_sources:
            out.append(self.sources_table())
        return out

    def sources_table(self) -> Table:
        rows = [[key, SOURCES.get(key, key)] for key in self.used_sources]
        return Table("sources", "Sources of the published numbers", ["Key", "Source"], rows,
                     ["Status: V = read in the source; R = recalled from the paper's table, "
                      "unverified; X = sources disagree."])  # fmt: skip


# ---------------------------------------------------------------------------------------
# Formats


def _text(cell: Any, fmt: str) -> str:
    pm = {"terminal": " +- ", "markdown": " ± ", "latex": r" $\pm$ ", "csv": ""}[fmt]
    if cell is None:
        return "" if fmt == "csv" else "-"
    if isinstance(cell, Stat):
        return f"{_two(cell.mean)}{pm}{_two(cell.spread)}"
    if isinstance(cell, Pub):
        return f"{_two(cell.value)} [{cell.status}]"
    if isinstance(cell, float):
        return _two(cell)
    return str(cell)


def _two(x: float) -> str:
    text = f"{x:.2f}"
    return "0.00" if text == "-0.00" else text


def render_terminal(table: Table) -> str:
    cells = [[_text(c, "terminal") for c in row] for row in table.rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(table.columns)]
    line = "  ".join(h.ljust(w) for h, w in zip(table.columns, widths)).rstrip()
    out = [table.title, "=" * len(table.title), line, "-" * len(line)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    if not cells:
        out.append("(none)")
    out += table.notes
    return "\n".join(out) + "\n"


def render_markdown(table: Table) -> str:
    def esc(s: str) -> str:
        return s.replace("|", r"\|")

    out = [f"## {table.title}", "", "| " + " | ".join(map(esc, table.columns)) + " |",
           "|" + "|".join("---" for _ in table.columns) + "|"]  # fmt: skip
    out += ["| " + " | ".join(esc(_text(c, "markdown")) for c in r) + " |" for r in table.rows]
    if not table.rows:
        out.append("| " + " | ".join(["(none)"] + [""] * (len(table.columns) - 1)) + " |")
    out += [""] + [f"*{n}*" for n in table.notes]
    return "\n".join(out) + "\n"


_LATEX_SPECIAL = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
                  "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}", "\\": r"\textbackslash{}"}  # fmt: skip


def latex_escape(s: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in s)


def render_latex(table: Table) -> str:
    def cell(c: Any) -> str:
        return _text(c, "latex") if isinstance(c, Stat) else latex_escape(_text(c, "latex"))

    out = [r"\begin{table}[t]", r"\centering", r"\caption{" + latex_escape(table.title) + "}",
           r"\begin{tabular}{" + "l" * len(table.columns) + "}", r"\toprule",
           " & ".join(latex_escape(h) for h in table.columns) + r" \\", r"\midrule"]  # fmt: skip
    out += [" & ".join(cell(c) for c in r) + r" \\" for r in table.rows]
    out += [r"\bottomrule", r"\end{tabular}"]
    out += [r"\par\smallskip{\footnotesize " + latex_escape(n) + "}" for n in table.notes]
    out.append(r"\end{table}")
    return "\n".join(out) + "\n"


def render_csv(table: Table, ci95: bool = False) -> str:
    """One row per table row; a mean +- spread cell becomes two columns (the spread's
    named ``<column> std`` or ``<column> ci95``), a published cell its value."""
    stat_cols = {i for r in table.rows for i, c in enumerate(r) if isinstance(c, Stat)}
    spread = "ci95" if ci95 else "std"
    header = []
    for i, h in enumerate(table.columns):
        header += [h, f"{h} {spread}"] if i in stat_cols else [h]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in table.rows:
        out = []
        for i, c in enumerate(r):
            if i in stat_cols:
                out += [f"{c.mean:.4f}", f"{c.spread:.4f}"] if isinstance(c, Stat) else ["", ""]
            elif isinstance(c, Pub):
                out.append(f"{c.value:.2f}")
            elif isinstance(c, float):
                out.append(f"{c:.4f}")
            else:
                out.append("" if c is None else str(c))
        w.writerow(out)
    return buf.getvalue()


FORMATS = ("terminal", "markdown", "latex", "csv")


def render(tables: Sequence[Table], fmt: str, ci95: bool = False) -> str:
    if fmt == "terminal":
        return "\n".join(render_terminal(t) for t in tables)
    if fmt == "markdown":
        return "# Results\n\n" + "\n".join(render_markdown(t) for t in tables)
    if fmt == "latex":
        return ("% needs \\usepackage{booktabs}\n"
                + "\n".join(render_latex(t) for t in tables))  # fmt: skip
    return "\n".join(f"# {t.name}\n{render_csv(t, ci95)}" for t in tables)


def write_reports(tables: Sequence[Table], out_dir: str, ci95: bool = False) -> List[str]:
    """``report.txt``, ``report.md``, ``report.tex`` and one ``<table>.csv`` per table."""
    from coop.io import atomic_write_text

    os.makedirs(out_dir, exist_ok=True)
    written = []
    for fmt, name in (
        ("terminal", "report.txt"),
        ("markdown", "report.md"),
        ("latex", "report.tex"),
    ):
        path = os.path.join(out_dir, name)
        atomic_write_text(path, render(tables, fmt, ci95))
        written.append(path)
    for t in tables:
        path = os.path.join(out_dir, f"{t.name}.csv")
        atomic_write_text(path, render_csv(t, ci95))
        written.append(path)
    return written


# ---------------------------------------------------------------------------------------
# Command line


def read_expected(path: str) -> List[str]:
    """The run folders a JSON list names (strings, or objects with ``output_dir``)."""
    try:
        with open(path, encoding="utf-8") as f:
            items = json.load(f)
    except OSError as e:
        raise ReportError(f"--expected {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise ReportError(f"--expected {path}: not JSON ({e})") from None
    if not isinstance(items, list):
        raise ReportError(f"--expected {path}: must hold a JSON list of run folders")
    out = []
    for i, item in enumerate(items):
        folder = item.get("output_dir") if isinstance(item, dict) else item
        if not isinstance(folder, str) or not folder:
            raise ReportError(
                f"--expected {path}: item {i} is neither a folder nor an object with "
                f"'output_dir': {item!r}"
            )
        out.append(folder)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="coop-report",
        description="Tables (and the paper's few-shot curves) over every run of an output "
        "tree, beside the published numbers, with the missing runs.",
    )
    p.add_argument("root", help="the output tree (folders with results.json or log.txt)")
    p.add_argument("--format", choices=FORMATS, default="terminal", help="what to print")
    p.add_argument("--output-dir", default="", help="also write report.{txt,md,tex} and CSVs here")
    p.add_argument("--ci95", action="store_true", help="95%% confidence interval instead of std")
    p.add_argument("--metric", default="accuracy", help="accuracy (default), macro_f1, ...")
    p.add_argument("--expected", default="", help="JSON list of the run folders there should be")
    p.add_argument("--published", action="append", default=[], metavar="CSV",
                   help="more published numbers (columns: see coop.published)")  # fmt: skip
    p.add_argument("--no-published", action="store_true", help="leave the published numbers out")
    p.add_argument("--published-backbone", default="",
                   help="compare with the published numbers of this backbone (for runs on a "
                   "checkpoint file), e.g. RN50")  # fmt: skip
    p.add_argument("--ignore-key", action="append", default=[], metavar="KEY",
                   help="a config key that does not make a separate method")  # fmt: skip
    p.add_argument("--by-key", action="append", default=[], metavar="KEY",
                   help="a config key that always makes a separate method")  # fmt: skip
    p.add_argument("--figures", default="", metavar="DIR", help="draw the figures (PNG and PDF)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        collected = collect(args.root)
        if not collected.runs:
            raise ReportError(f"{args.root}: no run with a result (results.json or log.txt)")
        published = None if args.no_published else with_extra(args.published)
        expected = read_expected(args.expected) if args.expected else []
        report = Report(collected, args.metric, args.ci95, published, args.published_backbone,
                        expected, args.ignore_key, args.by_key)  # fmt: skip
        if not report.cells:
            raise ReportError(f"{args.root}: no run has the metric '{args.metric}'")
        tables = report.tables()
        print(render(tables, args.format, args.ci95), end="")
        if args.output_dir:
            for path in write_reports(tables, args.output_dir, args.ci95):
                print(f"wrote {path}")
        if args.figures:
            from coop.report_figures import draw_figures, save_figures

            for path in save_figures(draw_figures(report), args.figures):
                print(f"wrote {path}")
    except (ReportError, PublishedError, OSError) as e:
        print(f"coop-report: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
