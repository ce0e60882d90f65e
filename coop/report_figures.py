"""The paper's figures over a :class:`coop.report.Report`: the few-shot curves of
``draw_curves.py`` (one per dataset and their average), drawn from our runs, and one chart
per ablated config key (a factor of a method's variant).

Style of ``draw_curves.py``: x ticks 0, 1, 2, 4, 8, 16; a zero-shot method is a star at x=0
with a white horizontal line and the text "Zero-shot\\nCLIP" below it; the CoOp curves use
colours C0 (end), C2 (mid), C1 (end, CSC), C3 (mid, CSC) with 'o' markers of size 3; the
linear probe is C4, dotted; grey (#EBEBEB) face with a white x grid, font size 12, y limits
padded by 5% of the range, legend at the lower right. Other methods take the next colours.
The star's colour is not given by the original; it is black here. Where the zero-shot text
would fall below the axes (the zero-shot score is the lowest), it goes above the star.
"""

from __future__ import annotations

import os
from typing import Dict, List, Mapping, Sequence, Tuple

from coop.published import ELEVEN, config_text
from coop.report import Method, Report, Table, dataset_title

# (trainer, config values that must match, colour, line style, legend label)
PAPER_STYLES: Tuple[Tuple[str, Tuple[Tuple[str, str], ...], str, str, str], ...] = tuple(
    (
        "CoOp",
        (
            ("TRAINER.COOP.N_CTX", "16"),
            ("TRAINER.COOP.CSC", csc),
            ("TRAINER.COOP.CLASS_TOKEN_POSITION", ctp),
        ),
        colour,
        "-",
        rf"CLIP + CoOp ($M\!=\!16$, {name})",
    )  # fmt: skip
    for ctp, csc, colour, name in (
        ("end", "False", "C0", "end"),
        ("middle", "False", "C2", "mid"),
        ("end", "True", "C1", "end, CSC"),
        ("middle", "True", "C3", "mid, CSC"),
    )
) + (("LinearProbeCLIP", (), "C4", ":", "Linear probe CLIP"),)
ZERO_SHOT_TEXT = {"ZeroshotCLIP": "Zero-shot\nCLIP"}
ZERO_SHOT_COLOUR = "k"
X_TICKS = [0, 1, 2, 4, 8, 16]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    return plt


def method_styles(report: Report, methods: Sequence[Method]) -> Dict[Method, Tuple[str, str, str]]:
    """Colour, line style and legend label of each method: the paper's where the method is
    one of its curves, else the next free colour and the method's own label."""
    styles: Dict[Method, Tuple[str, str, str]] = {}
    taken: set = set()
    backbones = {m.backbone for m in methods}
    for m in methods:
        cfg = report.rep_config.get(m, {})
        for i, (trainer, where, colour, ls, label) in enumerate(PAPER_STYLES):
            if i in taken or m.trainer != trainer:
                continue
            if all(config_text(cfg.get(k, "<unset>")) == v for k, v in where):
                taken.add(i)
                styles[m] = (colour, ls, label)
                break
    used = {s[0] for s in styles.values()}
    free = (f"C{i}" for i in range(5, 100) if f"C{i}" not in used)
    for m in methods:
        if m not in styles:
            styles[m] = (next(free), "-", report.label(m))
    if len(backbones) > 1:
        styles = {m: (c, ls, f"{lab} [{m.backbone}]") for m, (c, ls, lab) in styles.items()}
    return styles


Series = Dict[Method, Tuple[List[int], List[float]]]


def curve_data(report: Report) -> Dict[str, Tuple[str, Series]]:
    """Per figure name (a dataset's title, or ``average``): its title and each method's
    shot counts and mean scores; a zero-shot method has the single point x=0. The average
    is over the 11 datasets when all are there, else over those that are, and has a method's
    shot counts where it has every one of them."""
    few = [k for k in report.cells if k[0] == "fewshot"]
    datasets = sorted({k[1] for k in few}, key=lambda d: (ELEVEN + (d,)).index(d))
    out: Dict[str, Tuple[str, Series]] = {}
    for d in datasets:
        series: Series = {}
        for m in report.methods("fewshot"):
            pts = sorted((k[2], report.stat(k).mean) for k in few if k[1] == d and k[4] == m)
            if pts:
                series[m] = ([p[0] for p in pts], [p[1] for p in pts])
        out[dataset_title(d)] = (dataset_title(d), series)
    average_over = [d for d in ELEVEN if d in datasets]
    average_over = average_over if len(average_over) == len(ELEVEN) else datasets
    if len(average_over) > 1:
        series = {}
        for m in report.methods("fewshot"):
            xs, ys = [], []
            for shots in sorted({k[2] for k in few if k[4] == m}):
                means = report.fewshot_means(m, shots)
                if all(d in means for d in average_over):
                    xs.append(shots)
                    ys.append(sum(means[d] for d in average_over) / len(average_over))
            if xs:
                series[m] = (xs, ys)
        out["average"] = (f"Average over {len(average_over)} datasets", series)
    return out


def curve_tables(report: Report) -> List[Table]:
    """The numbers each few-shot curve draws (:func:`curve_data`), one table per figure:
    a row per method, a column per shot count (the zero-shot method's at 0), and the
    number of seeds each method's means are over (in the average: per dataset)."""
    few = [k for k in report.cells if k[0] == "fewshot"]
    tables = []
    for name, (title, series) in curve_data(report).items():
        if not series:
            continue
        shots = sorted({x for xs, _ in series.values() for x in xs})
        rows = []
        for m, (xs, ys) in series.items():
            n = sorted({len(report.cells[k]) for k in few if k[4] == m
                        and (name == "average" or dataset_title(k[1]) == name)})  # fmt: skip
            seeds = str(n[0]) if n[0] == n[-1] else f"{n[0]}-{n[-1]}"
            means = dict(zip(xs, ys))
            rows.append([report.label(m), m.backbone, seeds, *(means.get(s) for s in shots)])
        tables.append(Table(
            f"curve_{_safe(name)}", f"{title}: {report.metric} (%), mean over seeds",
            ["Method", "Backbone", "Seeds", *(f"{s} shot{'s' * (s != 1)}" for s in shots)], rows,
        ))  # fmt: skip
    return tables


def draw_curve(
    report: Report, title: str, series: Mapping[Method, Tuple[List[int], List[float]]],
    bold: bool = False,
):  # fmt: skip
    """One figure in draw_curves.py's style (returned, not saved)."""
    plt = _pyplot()
    with plt.rc_context({"font.size": 12}):
        fig, ax = plt.subplots()
        ax.set_facecolor("#EBEBEB")
        ax.grid(axis="x", color="white")
        values = [v for _, ys in series.values() for v in ys]
        lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
        span = (hi - lo) or 1.0
        styles = method_styles(report, list(series))
        for m, (xs, ys) in series.items():
            colour, ls, label = styles[m]
            if xs == [0]:  # zero-shot: a star at x=0 and a white line across
                ax.axhline(ys[0], color="white", zorder=0)
                ax.plot(xs, ys, marker="*", markersize=12, color=ZERO_SHOT_COLOUR,
                        linestyle="none", label="_" + label)  # fmt: skip
                # below the star as in the original, or above it where that leaves the axes
                below = ys[0] - 0.11 * span
                y = below if below >= lo - 0.05 * span else ys[0] + 0.03 * span
                ax.text(-0.5, y, ZERO_SHOT_TEXT.get(m.trainer, label))
                continue
            ax.plot(xs, ys, marker="o", markersize=3, color=colour, linestyle=ls, label=label)
        ax.set_xticks(X_TICKS)
        ax.set_ylim(lo - 0.05 * span, hi + 0.05 * span)
        ax.set_xlabel("Number of labeled training examples per class")
        ax.set_ylabel("Score (%)")
        ax.set_title(title, fontweight="bold" if bold else "normal")
        if any(not h.get_label().startswith("_") for h in ax.lines):
            ax.legend(loc="lower right")
    return fig


def ablation_data(
    report: Report,
) -> Dict[str, Tuple[str, Dict[str, Tuple[List[int], List[float]]]]]:
    """Per ablation (``<trainer>_<key>``): its title and, per value of the key, the shot
    counts and the mean score over the datasets every compared method has at that count.
    The compared methods are the trainer's methods that equal its most-run one in every
    other variant key and backbone."""
    methods = [m for m in report.methods("fewshot") if not report.is_zero_shot(m)]
    few = [k for k in report.cells if k[0] == "fewshot"]
    out = {}
    for trainer in sorted({m.trainer for m in methods}):
        mine = [m for m in methods if m.trainer == trainer]
        runs = {m: sum(len(report.cells[k]) for k in few if k[4] == m) for m in mine}
        ref = max(mine, key=lambda m: (runs[m], report.label(m)))
        factors = [k for k, _ in ref.variant] + ["backbone"]
        for factor in factors:

            def rest(m: Method, factor=factor):
                v = dict(m.variant)
                v.pop(factor, None)
                return (m.backbone if factor != "backbone" else "", tuple(sorted(v.items())))

            group = [m for m in mine if rest(m) == rest(ref)]
            value = (lambda m: m.backbone) if factor == "backbone" else (
                lambda m, f=factor: dict(m.variant)[f])  # fmt: skip
            if len({value(m) for m in group}) < 2:
                continue
            shots = sorted({k[2] for k in few if k[4] in group})
            series: Dict[str, Tuple[List[int], List[float]]] = {}
            for s in shots:
                means = {m: report.fewshot_means(m, s) for m in group}
                common = set.intersection(*(set(v) for v in means.values()))
                if not common:
                    continue
                for m in group:
                    xs, ys = series.setdefault(value(m), ([], []))
                    xs.append(s)
                    ys.append(sum(means[m][d] for d in common) / len(common))
            if series:
                name = report.short.get(factor, factor)
                out[f"{trainer}_{name}"] = (f"{trainer}: {name}", series)
    return out


def draw_ablation(title: str, series: Mapping[str, Tuple[List[int], List[float]]]):
    """A line chart over the shot counts, or bars where there is one shot count."""
    plt = _pyplot()
    with plt.rc_context({"font.size": 12}):
        fig, ax = plt.subplots()
        ax.set_facecolor("#EBEBEB")
        shots = sorted({x for xs, _ in series.values() for x in xs})
        if len(shots) > 1:
            ax.grid(axis="x", color="white")
            for i, (value, (xs, ys)) in enumerate(series.items()):
                ax.plot(xs, ys, marker="o", markersize=3, color=f"C{i}", label=str(value))
            ax.set_xticks(shots)
            ax.set_xlabel("Number of labeled training examples per class")
            ax.legend(loc="lower right")
        else:
            ax.grid(axis="y", color="white")
            labels = [str(v) for v in series]
            ax.bar(labels, [ys[0] for _, ys in series.values()],
                   color=[f"C{i}" for i in range(len(labels))])  # fmt: skip
            ax.set_xlabel(f"{shots[0]} shots")
        ax.set_ylabel("Score (%)")
        ax.set_title(title)
    return fig


def draw_figures(report: Report) -> Dict[str, object]:
    """Every figure, by file stem (dataset titles, ``average``, ``ablation_<trainer>_<key>``),
    as matplotlib figures not yet saved."""
    figs: Dict[str, object] = {}
    for name, (title, series) in curve_data(report).items():
        if series:
            figs[name] = draw_curve(report, title, series, bold=name == "average")
    for name, (title, series) in ablation_data(report).items():
        figs[f"ablation_{name}"] = draw_ablation(title, series)
    return figs


def save_figures(figs: Mapping[str, object], out_dir: str, formats=("png", "pdf")) -> List[str]:
    """Write each figure as ``<out_dir>/<name>.<fmt>`` and close it; returns the paths."""
    plt = _pyplot()
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for name, fig in figs.items():
        for fmt in formats:
            path = os.path.join(out_dir, f"{_safe(name)}.{fmt}")
            fig.savefig(path, bbox_inches="tight")
            written.append(path)
        plt.close(fig)
    return written


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
