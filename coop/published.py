"""The published numbers that ``coop-report`` puts beside ours, typed in from the papers'
tables and the repositories' READMEs, each with its source and verification status.

Status: ``V`` = read in the named source (a README, an issue quoting the paper, a results
log); ``R`` = recalled from the paper's table, internally consistent (its column means give
the stated averages) but not read in a source, so shown as unverified; ``X`` = sources
disagree. A number is keyed by (table, method, backbone, protocol, dataset, shots, metric);
``dataset`` is the dataset's ``DATASET.NAME``, or ``Average`` for a stated average; in the
``xd`` and ``dg`` tables the ``ImageNet`` cell is the source dataset's own accuracy.

A published method names the trainer that reproduces it and the config values that must
match (:data:`METHODS`); a zero-shot method's numbers hold for any shot count. Users with
more numbers (e.g. the authors' spreadsheet of the few-shot curves) add a CSV with
``coop-report --published FILE`` (columns as :func:`read_published_csv` says).
"""

from __future__ import annotations

import csv
import functools
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

STATUSES = ("V", "R", "X")


@dataclass(frozen=True)
class PublishedMethod:
    """How one of our runs is recognised as a published method."""

    trainer: str
    where: Tuple[Tuple[str, str], ...] = ()  # (dotted config key, value as text)
    zero_shot: bool = False  # no training: the number holds at every shot count


@dataclass(frozen=True)
class Published:
    table: str
    method: str
    backbone: str
    protocol: str  # fewshot, base2new, xd, dg
    dataset: str
    shots: int  # 0 = zero-shot
    metric: str  # accuracy, base, new, H
    value: float
    status: str
    source: str


# CoOp's IJCV runs: random context init; the CoCoOp-paper CoOp rows: ctxv1 ("a photo of a")
_COOP16 = (
    ("TRAINER.COOP.CTX_INIT", ""),
    ("TRAINER.COOP.N_CTX", "16"),
    ("TRAINER.COOP.CSC", "False"),
    ("TRAINER.COOP.CLASS_TOKEN_POSITION", "end"),
)
_COOP4 = (
    ("TRAINER.COOP.CTX_INIT", ""),
    ("TRAINER.COOP.N_CTX", "4"),
    ("TRAINER.COOP.CSC", "False"),
    ("TRAINER.COOP.CLASS_TOKEN_POSITION", "end"),
)

METHODS: Dict[str, PublishedMethod] = {
    "Zero-shot CLIP": PublishedMethod("ZeroshotCLIP", zero_shot=True),
    "Linear probe CLIP": PublishedMethod("LinearProbeCLIP"),
    "CoOp M=16": PublishedMethod("CoOp", _COOP16),
    "CoOp M=4": PublishedMethod("CoOp", _COOP4),
    "CoOp": PublishedMethod("CoOp", (("TRAINER.COOP.CTX_INIT", "a photo of a"),)),
    "CoCoOp": PublishedMethod("CoCoOp"),
    "KgCoOp": PublishedMethod("KgCoOp"),
    "ProGrad": PublishedMethod("ProGrad"),
    "MaPLe": PublishedMethod("MaPLe"),
    "PromptSRC": PublishedMethod("PromptSRC"),
    "CLIP-Adapter": PublishedMethod("CLIP_Adapter"),
    "Tip-Adapter": PublishedMethod("TipAdapter"),
    "Tip-Adapter-F": PublishedMethod("TipAdapterF"),
}

SOURCES: Dict[str, str] = {
    "coop-md": "CoOp COOP.md (parse_test_res.py example: seeds 91.81 / 92.01 / 92.17)",
    "coop-85": "CoOp issue #85 (quotes IJCV Table 1)",
    "coop-88": "CoOp issue #88 ('reported one 62.95%')",
    "coop-45": "CoOp issue #45 ('paper 66.85')",
    "coop-fig3": "CoOp IJCV Fig. 3 values (authors' spreadsheet), recalled",
    "coop-tab1": "CoOp IJCV Table 1 (domain generalization), recalled",
    "cocoop-tab1": "CoCoOp CVPR'22 Table 1; averages in the MaPLe / PromptSRC READMEs",
    "coop-27": "CoOp issue #27 (DTD CoOp H)",
    "cocoop-tab2": "CoCoOp CVPR'22 Table 2 (cross-dataset), recalled",
    "cocoop-tab3": "CoCoOp CVPR'22 Table 3 (domain generalization), recalled",
    "kgcoop-readme": "KgCoOp README (base-to-new average)",
    "prograd-x": "KgCoOp README 82.48 / 70.75 / 76.16; a QCoOp summary lists 82.79 / 68.55 / 75.00",
    "maple-readme": "MaPLe README (base-to-new average, 3 seeds)",
    "promptsrc-readme": "PromptSRC README (base-to-new average, 3 seeds)",
    "maple-paper": "MaPLe paper, cross-dataset and DG tables, recalled",
    "promptsrc-paper": "PromptSRC paper, cross-dataset and DG tables, recalled",
    "tip-exp-log": "Tip-Adapter exp.log (RN50; 11-dataset means computed from it)",
}

ELEVEN = (
    "ImageNet", "Caltech101", "OxfordPets", "StanfordCars", "OxfordFlowers", "Food101",
    "FGVCAircraft", "SUN397", "DescribableTextures", "EuroSAT", "UCF101",
)  # fmt: skip
DG_TARGETS = ("ImageNetV2", "ImageNetSketch", "ImageNetA", "ImageNetR")
XD_TARGETS = ELEVEN[1:]

# Each block: one table of a paper. A row is "backbone | method | shots | values"; a value
# may end in a status letter that overrides the block's and "@source" for its own source;
# "-" leaves a cell out.
_BLOCKS: List[dict] = [
    dict(
        table="CoOp COOP.md example",
        protocol="fewshot",
        metric="accuracy",
        status="V",
        source="coop-md",
        columns=("Caltech101",),
        rows="RN50 | CoOp M=16 | 16 | 92.00",
    ),
    dict(
        table="CoOp IJCV Fig. 3 (16 shots)",
        protocol="fewshot",
        metric="accuracy",
        status="R",
        source="coop-fig3",
        columns=ELEVEN + ("Average",),
        rows="""
        RN50 | Zero-shot CLIP | 0  | 58.18V@coop-85 86.29 85.77 55.61 66.14 77.31 17.28 58.52 42.32 37.56 61.46 58.77
        RN50 | CoOp M=16      | 16 | 62.95V@coop-88 91.83 87.01 73.36 94.51 74.67 31.26 69.26 63.58 83.53 75.71 73.42
        """,
    ),
    dict(
        table="CoOp IJCV Table 1 (DG)",
        protocol="dg",
        metric="accuracy",
        status="R",
        source="coop-tab1",
        columns=("ImageNet",) + DG_TARGETS,
        rows="""
        RN50     | Zero-shot CLIP    | 0  | 58.18V@coop-85 51.34 33.32 21.65 56.00
        RN50     | Linear probe CLIP | 16 | 55.87V@coop-85 45.97 19.07 12.74 34.86
        RN50     | CoOp M=16         | 16 | 62.95V@coop-88 55.11 32.74 22.12 54.96
        RN50     | CoOp M=4          | 16 | 63.33 55.40 34.67 23.06 56.60
        RN101    | Zero-shot CLIP    | 0  | 61.62 54.81 38.71 28.05 64.38
        RN101    | Linear probe CLIP | 16 | 59.75 50.05 26.80 19.44 47.19
        RN101    | CoOp M=16         | 16 | 66.60 58.66 39.08 28.89 63.00
        RN101    | CoOp M=4          | 16 | 65.98 58.60 40.40 29.60 64.98
        ViT-B/32 | Zero-shot CLIP    | 0  | 62.05 54.79 40.82 29.57 65.99
        ViT-B/32 | Linear probe CLIP | 16 | 59.58 49.73 28.06 19.67 47.20
        ViT-B/32 | CoOp M=16         | 16 | 66.85V@coop-45 58.08 40.44 30.62 64.45
        ViT-B/32 | CoOp M=4          | 16 | 66.34 58.24 41.48 31.34 65.78
        ViT-B/16 | Zero-shot CLIP    | 0  | 66.73 60.83 46.15 47.77 73.96
        ViT-B/16 | Linear probe CLIP | 16 | 65.85 56.26 34.77 35.68 58.43
        ViT-B/16 | CoOp M=16         | 16 | 71.92 64.18 46.71 48.41 74.32
        ViT-B/16 | CoOp M=4          | 16 | 71.73 64.56 47.89 49.93 75.21
        """,
    ),
    dict(
        table="CoCoOp Table 1 (base-to-new)",
        protocol="base2new",
        status="R",
        source="cocoop-tab1",
        columns=("base", "new", "H"),
        by_dataset=True,
        rows="""
        Average             | 69.34V 74.22V 71.70V | 82.69V 63.22V 71.66V | 80.47V 71.69V 75.83V
        ImageNet            | 72.43 68.14 70.22 | 76.47 67.88 71.92 | 75.98 70.43 73.10
        Caltech101          | 96.84 94.00 95.40 | 98.00 89.81 93.73 | 97.96 93.81 95.84
        OxfordPets          | 91.17 97.26 94.12 | 93.67 95.29 94.47 | 95.20 97.69 96.43
        StanfordCars        | 63.37 74.89 68.65 | 78.12 60.40 68.13 | 70.49 73.59 72.01
        OxfordFlowers       | 72.08 77.80 74.83 | 97.60 59.67 74.06 | 94.87 71.75 81.71
        Food101             | 90.10 91.22 90.66 | 88.33 82.26 85.19 | 90.70 91.29 90.99
        FGVCAircraft        | 27.19 36.29 31.09 | 40.44 22.30 28.75 | 33.41 23.71 27.74
        SUN397              | 69.36 75.35 72.23 | 80.60 65.89 72.51 | 79.74 76.86 78.27
        DescribableTextures | 53.24 59.90 56.37 | 79.44 41.18 54.24V@coop-27 | 77.01 56.00 64.85
        EuroSAT             | 56.48 64.05 60.03 | 92.19 54.74 68.69 | 87.49 60.04 71.21
        UCF101              | 70.53 77.50 73.85 | 84.69 56.05 67.46 | 82.33 73.45 77.64
        """,
        methods=(
            ("ViT-B/16", "Zero-shot CLIP", 0),
            ("ViT-B/16", "CoOp", 16),
            ("ViT-B/16", "CoCoOp", 16),
        ),  # fmt: skip
    ),
    dict(
        table="Base-to-new averages (READMEs)",
        protocol="base2new",
        status="V",
        source="kgcoop-readme",
        columns=("base", "new", "H"),
        dataset="Average",
        rows="""
        ViT-B/16 | KgCoOp    | 16 | 80.73 73.6 77.0
        ViT-B/16 | ProGrad   | 16 | 82.48X@prograd-x 70.75X@prograd-x 76.16X@prograd-x
        ViT-B/16 | MaPLe     | 16 | 82.28@maple-readme 75.14@maple-readme 78.55@maple-readme
        ViT-B/16 | PromptSRC | 16 | 84.26@promptsrc-readme 76.10@promptsrc-readme 79.97@promptsrc-readme
        ViT-B/16 | CoOp      | 16 | 82.63 67.99 74.60
        """,
    ),
    dict(
        table="CoCoOp Table 2 (cross-dataset)",
        protocol="xd",
        metric="accuracy",
        status="R",
        source="cocoop-tab2",
        columns=("ImageNet",) + XD_TARGETS + ("Average",),
        rows="""
        ViT-B/16 | CoOp   | 16 | 71.51 93.70 89.14 64.51 68.71 85.30 18.47 64.15 41.92 46.39 66.55 63.88
        ViT-B/16 | CoCoOp | 16 | 71.02 94.43 90.14 65.32 71.88 86.06 22.94 67.36 45.73 45.37 68.21 65.74
        """,
    ),
    dict(
        table="CoCoOp Table 3 (DG)",
        protocol="dg",
        metric="accuracy",
        status="R",
        source="cocoop-tab3",
        columns=("ImageNet",) + DG_TARGETS,
        rows="""
        ViT-B/16 | Zero-shot CLIP | 0  | 66.73 60.83 46.15 47.77 73.96
        ViT-B/16 | CoOp           | 16 | 71.51 64.20 47.99 49.71 75.21
        ViT-B/16 | CoCoOp         | 16 | 71.02 64.07 48.75 50.63 76.18
        """,
    ),
    dict(
        table="MaPLe / PromptSRC papers (cross-dataset)",
        protocol="xd",
        metric="accuracy",
        status="R",
        source="maple-paper",
        columns=("ImageNet", "Average"),
        rows="""
        ViT-B/16 | MaPLe     | 16 | 70.72 66.30
        ViT-B/16 | PromptSRC | 16 | 71.27@promptsrc-paper 65.81@promptsrc-paper
        """,
    ),
    dict(
        table="MaPLe / PromptSRC papers (DG)",
        protocol="dg",
        metric="accuracy",
        status="R",
        source="maple-paper",
        columns=DG_TARGETS,
        rows="""
        ViT-B/16 | MaPLe     | 16 | 64.07 49.15 50.90 76.98
        ViT-B/16 | PromptSRC | 16 | 64.35@promptsrc-paper 49.55@promptsrc-paper 50.90@promptsrc-paper 77.80@promptsrc-paper
        """,
    ),
    dict(
        table="Tip-Adapter exp.log (11-dataset means)",
        protocol="fewshot",
        metric="accuracy",
        status="V",
        source="tip-exp-log",
        columns=("Average",),
        by_shots=True,
        rows="""
        RN50 | CLIP-Adapter  | 62.67 65.55 68.61 71.40 74.44
        RN50 | Tip-Adapter   | 62.33 64.62 66.54 68.50 70.32
        RN50 | Tip-Adapter-F | 64.60 66.65 69.67 72.45 75.83
        """,
    ),
    dict(
        table="Tip-Adapter exp.log (ImageNet, 16 shots)",
        protocol="fewshot",
        metric="accuracy",
        status="V",
        source="tip-exp-log",
        columns=("ImageNet",),
        rows="""
        RN50 | CLIP-Adapter  | 16 | 63.59
        RN50 | Tip-Adapter   | 16 | 62.01
        RN50 | Tip-Adapter-F | 16 | 65.51
        """,
    ),
]


class PublishedError(ValueError):
    """A published-numbers file that cannot be read, with the file and line."""


def _cell(text: str, status: str, source: str) -> Optional[Tuple[float, str, str]]:
    if text == "-":
        return None
    if "@" in text:
        text, source = text.split("@", 1)
    if text[-1] in STATUSES:
        text, status = text[:-1], text[-1]
    return float(text), status, source


def _parse_blocks() -> List[Published]:
    out: List[Published] = []
    for b in _BLOCKS:
        lines = [ln.strip() for ln in b["rows"].strip().splitlines() if ln.strip()]
        for line in lines:
            parts = [p.strip() for p in line.split("|")]
            if b.get("by_dataset"):  # "dataset | m1 values | m2 values ..."
                dataset, groups = parts[0], parts[1:]
                for (backbone, method, shots), values in zip(b["methods"], groups):
                    for metric, text in zip(b["columns"], values.split()):
                        c = _cell(text, b["status"], b["source"])
                        if c:
                            out.append(Published(b["table"], method, backbone, b["protocol"],
                                                 dataset, shots, metric, *c))  # fmt: skip
                continue
            if b.get("by_shots"):  # "backbone | method | value per shot count 1..16"
                backbone, method, values = parts
                for shots, text in zip((1, 2, 4, 8, 16), values.split()):
                    c = _cell(text, b["status"], b["source"])
                    out.append(Published(b["table"], method, backbone, b["protocol"],
                                         b["columns"][0], shots, b["metric"], *c))  # fmt: skip
                continue
            backbone, method, shots, values = parts
            for column, text in zip(b["columns"], values.split()):
                c = _cell(text, b["status"], b["source"])
                if c is None:
                    continue
                if "dataset" in b:  # the columns are metrics of one dataset
                    dataset, metric = b["dataset"], column
                else:
                    dataset, metric = column, b["metric"]
                out.append(Published(b["table"], method, backbone, b["protocol"], dataset,
                                     int(shots), metric, *c))  # fmt: skip
    return out


@functools.lru_cache(maxsize=1)
def published_numbers() -> Tuple[Published, ...]:
    """Every number typed in from the papers (parsed on first use)."""
    return tuple(_parse_blocks())


CSV_COLUMNS = ("table", "method", "backbone", "protocol", "dataset", "shots", "metric",
               "value", "status", "source")  # fmt: skip


def read_published_csv(path: str) -> Tuple[List[Published], Dict[str, PublishedMethod]]:
    """Extra published numbers from a CSV with the columns :data:`CSV_COLUMNS` (and, for a
    method not in :data:`METHODS`, ``trainer`` and optionally ``where`` as
    ``KEY=VALUE;KEY=VALUE`` and ``zero_shot`` as true/false)."""
    numbers: List[Published] = []
    methods: Dict[str, PublishedMethod] = {}
    try:
        f = open(path, encoding="utf-8", newline="")
    except OSError as e:
        raise PublishedError(f"--published {path}: {e.strerror or e}") from None
    with f:
        reader = csv.DictReader(f)
        missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise PublishedError(f"{path}: missing column(s) {', '.join(missing)}")
        for i, row in enumerate(reader, 2):
            where = f"{path}, line {i}"
            try:
                value, shots = float(row["value"]), int(row["shots"])
            except ValueError:
                raise PublishedError(
                    f"{where}: value and shots must be numbers, got {row['value']!r}, "
                    f"{row['shots']!r}"
                ) from None
            if row["status"] not in STATUSES:
                raise PublishedError(f"{where}: status is one of V, R, X, got {row['status']!r}")
            name = row["method"]
            if name not in METHODS and name not in methods:
                if not row.get("trainer"):
                    raise PublishedError(
                        f"{where}: unknown method {name!r}; give its trainer in a 'trainer' "
                        f"column (known: {', '.join(METHODS)})"
                    )
                pairs = [p for p in (row.get("where") or "").split(";") if p.strip()]
                if any("=" not in p for p in pairs):
                    raise PublishedError(f"{where}: 'where' is KEY=VALUE;KEY=VALUE")
                methods[name] = PublishedMethod(
                    row["trainer"],
                    tuple(tuple(s.strip() for s in p.split("=", 1)) for p in pairs),
                    (row.get("zero_shot") or "").lower() in ("1", "true", "yes"),
                )
            numbers.append(
                Published(
                    row["table"],
                    name,
                    row["backbone"],
                    row["protocol"],
                    row["dataset"],
                    shots,
                    row["metric"],
                    value,
                    row["status"],
                    row["source"],
                )  # fmt: skip
            )
    return numbers, methods


def config_text(value: object) -> str:
    """A config value as the text the ``where`` constraints compare with."""
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(config_text(v) for v in value) + ")"
    return str(value)


@dataclass
class PublishedIndex:
    """Looks up the published number for one of our cells."""

    numbers: Sequence[Published] = field(default_factory=published_numbers)
    methods: Mapping[str, PublishedMethod] = field(default_factory=lambda: dict(METHODS))

    def matching_methods(self, trainer: str, config: Mapping[str, object]) -> List[str]:
        """The published methods a run of ``trainer`` with ``config`` (flat dotted keys)
        reproduces, most specific first."""
        names = [
            name
            for name, m in self.methods.items()
            if m.trainer == trainer
            and all(config_text(config.get(k, "<unset>")) == v for k, v in m.where)
        ]
        return sorted(names, key=lambda n: -len(self.methods[n].where))

    def lookup(
        self,
        trainer: str,
        config: Mapping[str, object],
        backbone: str,
        protocol: str,
        dataset: str,
        shots: int,
        metric: str,
    ) -> Optional[Published]:
        """The best published number for this cell: the most specific method, then a
        verified number before a recalled one before a disputed one, then table order."""
        for name in self.matching_methods(trainer, config):
            zero_shot = self.methods[name].zero_shot
            found = [
                p
                for p in self.numbers
                if p.method == name
                and p.backbone == backbone
                and p.protocol == protocol
                and p.dataset == dataset
                and p.metric == metric
                and (zero_shot or p.shots == shots)
            ]
            if found:
                return min(found, key=lambda p: STATUSES.index(p.status))
        return None


def with_extra(paths: Iterable[str]) -> PublishedIndex:
    """The built-in numbers plus those of the CSV files ``paths``."""
    numbers = list(published_numbers())
    methods = dict(METHODS)
    for path in paths:
        extra, extra_methods = read_published_csv(path)
        numbers.extend(extra)
        methods.update(extra_methods)
    return PublishedIndex(numbers, methods)
