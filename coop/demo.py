"""``coop-demo`` (what ``make demo`` runs): the CoOp paper's story on one dataset.

It ends with three parts, in this order:

(a) prompt sensitivity: zero-shot CLIP's test accuracy with hand-written prompt templates
    (``coop-prompts``' default templates);
(b) CoOp against zero-shot CLIP and linear-probe CLIP over shot counts: the seeds' mean
    per method and shot count, and the few-shot curve in the paper's style (PNG and PDF,
    drawn by ``coop-report``'s figure code);
(c) what CoOp learned: the vocabulary words nearest to each learned context vector of one
    CoOp run (``coop-interpret``).

Every run is a run of a ``coop-sweep`` preset (``prompts``, ``fewshot`` with the zero-shot
baseline first, ``linear-probe``), in this process and in the scripts' folders under
``<output-dir>/output``, so running the demo again skips the finished runs; the table and
the curve come from ``coop-report`` over that folder. Each run's own output is in its
folder (``log.txt``, ``.sweep.console.txt``); ``--verbose`` prints it too.

With no dataset root it runs on embedded demo data: a generated miniature in Caltech101's
real layout and a tiny CLIP checkpoint in OpenAI's format, partly aligned to it, both made
by :mod:`coop.testing` (nothing is downloaded), at 32 px, CoOp for 50 epochs at every shot
count. With ``--root`` it runs the paper's settings on ``--dataset``: the RN50 configs
(``--backbone`` for another), CoOp with M=16 and the class token at the end on the paper's
schedule (50 epochs for 1 shot, 100 for 2 and 4, 200 for 8 and 16). Both use the paper's
shots 1, 2, 4, 8, 16 and seeds 1, 2, 3, and the linear probe's full C search.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import os.path as osp
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

# CLIP names -> the backbone part of the YAML names (rn50_ep50, vit_b16, ...)
_BACKBONE_CFG = {"RN50": "rn50", "RN101": "rn101", "ViT-B/32": "vit_b32", "ViT-B/16": "vit_b16"}
SHOTS = "1,2,4,8,16"  # the paper's shot counts
SEEDS = "1,2,3"
DEMO_CFG = "rn50_ep50"  # one 50-epoch schedule for every shot count on the demo data
QUICK_EPOCHS = 5
TOPK = 3  # nearest words per context vector
REAL_RUN_TIME = (
    "With --root this is 1 prompt study, 1 zero-shot run, 15 CoOp runs (5 shot counts x 3 "
    "seeds, 50 to 200 epochs each) and 15 linear-probe runs: roughly one to two hours on one "
    "recent GPU for Caltech101 with RN50, most of it in the 8- and 16-shot CoOp runs and "
    "the probes' C searches (scikit-learn, on the CPU); larger datasets take proportionally "
    "longer (ImageNet: a day or more). The embedded demo data takes a few minutes on a CPU."
)


class DemoError(ValueError):
    """A bad demo argument or a run that failed."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="coop-demo",
        description=__doc__.split("\n\n")[0].split(": ", 1)[1],
        epilog=REAL_RUN_TIME,
    )
    p.add_argument("--root", default="", help="dataset root (omit to use the embedded demo data)")
    p.add_argument(
        "--backbone", default="", help="CLIP backbone name (default RN50) or checkpoint path"
    )
    p.add_argument("--dataset", default="caltech101", help="dataset config stem (with --root)")
    p.add_argument(
        "--shots",
        default=None,
        help=f"comma-separated shot counts (default {SHOTS})",
    )
    p.add_argument(
        "--seeds",
        "--seed",
        default=None,
        help=f"comma-separated seeds (default {SEEDS}; --quick: 1)",
    )
    p.add_argument("--output-dir", default="demo_output")
    p.add_argument("--epochs", type=int, default=None, help="override CoOp's OPTIM.MAX_EPOCH")
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"a smoke run: shots 1,4, seed 1 and {QUICK_EPOCHS} CoOp epochs (unless given)",
    )
    p.add_argument("--verbose", action="store_true", help="print every run's own output too")
    return p


def _heading(text: str) -> str:
    return f"\n{'=' * len(text)}\n{text}\n{'=' * len(text)}"


def _captured(fn, argv: Sequence[str]) -> Tuple[int, str]:
    """A command's ``main(argv)`` with its printed output kept (to print in its part)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = fn(list(argv))
    return rc, buf.getvalue()


class Setting:
    """What the runs are given: data root, configs and opts, for the demo data or real."""

    def __init__(self, args: argparse.Namespace, out: str) -> None:
        import torch

        self.demo = not args.root
        self.dataset = "caltech101" if self.demo else args.dataset
        self.shots = args.shots or ("1,4" if args.quick else SHOTS)
        self.seeds = args.seeds or ("1" if args.quick else SEEDS)
        epochs = args.epochs if args.epochs is not None else QUICK_EPOCHS if args.quick else None
        if epochs is not None and epochs < 1:
            raise DemoError(f"--epochs must be positive, got {epochs}")
        self.opts: List[str] = []  # for every run
        self.coop_opts: List[str] = ["OPTIM.MAX_EPOCH", str(epochs)] if epochs else []
        self.probe_opts: List[str] = []
        # the tiny model's operations are too small to gain from more threads, and on a
        # busy CPU threads that wait for each other slow every step down
        self.threads = 1 if self.demo and "OMP_NUM_THREADS" not in os.environ else None
        if self.demo:
            self.root, backbone = self._demo_data(out, args.backbone)
            self.cfg_flags = ["--cfg", DEMO_CFG]  # for the CoOp runs
            self.backbone_flags: List[str] = []
            self.opts += ["INPUT.SIZE", "(32, 32)", "DATALOADER.NUM_WORKERS", "0"]
        else:
            if not osp.isdir(args.root):
                raise DemoError(f"--root {args.root}: no such folder")
            self.root, backbone = args.root, args.backbone or "RN50"
            token = _BACKBONE_CFG.get(backbone, "rn50")
            self.cfg_flags = ["--backbone", token]  # the paper's schedule for that backbone
            self.backbone_flags = ["--backbone", token]
        if backbone not in _BACKBONE_CFG:  # a checkpoint file: every run loads it
            self.opts += ["MODEL.BACKBONE.NAME", backbone]
        if self.demo or not torch.cuda.is_available():  # fp16 is for GPUs
            self.coop_opts += ["TRAINER.COOP.PREC", "fp32"]
            self.probe_opts += ["TRAINER.LINEARPROBECLIP.PREC", "fp32"]
        self.backbone = backbone

    @staticmethod
    def _demo_data(out: str, backbone: str) -> Tuple[str, str]:
        """The miniature and the tiny CLIP (made once; deterministic)."""
        from coop.testing.fixtures import make_caltech101
        from coop.testing.pretrain import save_learnable_tiny_clip

        root = osp.join(out, "data")
        dataset_dir = osp.join(root, "caltech-101")
        split = osp.join(dataset_dir, "split_zhou_Caltech101.json")
        if not osp.isfile(split):
            make_caltech101(root, n_classes=10, n_per_class=20)
        clip_file = osp.join(out, "tiny_clip_vit.pt")
        if not backbone and not osp.isfile(clip_file):
            save_learnable_tiny_clip(
                clip_file, split, osp.join(dataset_dir, "101_ObjectCategories")
            )
        return root, backbone or clip_file


def plan_runs(s: Setting, runs_dir: str) -> Dict[str, List[Any]]:
    """The runs of each preset (prompts; zero-shot then CoOp; the linear probe)."""
    from coop.sweep import build_parser as sweep_parser
    from coop.sweep_presets import plan

    common = ["--root", s.root, "--datasets", s.dataset, "--output", runs_dir]
    grid = ["--shots", s.shots, "--seeds", s.seeds]
    argvs = {
        "prompts": [*common, *s.backbone_flags, *s.opts],
        "fewshot": [*common, *grid, "--zeroshot", *s.cfg_flags, *s.opts, *s.coop_opts],
        "linear-probe": [*common, *grid, *s.backbone_flags, *s.opts, *s.probe_opts],
    }
    return {preset: plan(preset, sweep_parser(preset).parse_args(a)) for preset, a in argvs.items()}


def story_runs(runs: Dict[str, List[Any]]) -> Tuple[Any, Any]:
    """The prompt study and the CoOp run whose context part (c) reads (the most shots,
    the first seed)."""
    coop = [r for r in runs["fewshot"] if r.shots > 0]
    chosen = min(coop, key=lambda r: (-r.shots, r.seed))
    return runs["prompts"][0], chosen


def part_prompts(run: Any) -> str:
    from coop.prompt_study import format_table

    path = osp.join(run.out, "prompt_study.json")
    with open(path, encoding="utf-8") as f:
        table = json.load(f)
    return f"{format_table(table)}\n(from {path})"


def part_curves(runs_dir: str, out: str) -> Tuple[str, List[str]]:
    """The method x shots table of the seeds' means and the few-shot curve files."""
    from coop.published import with_extra
    from coop.report import Report, collect, render_terminal, write_reports
    from coop.report_figures import curve_tables, draw_figures, save_figures

    report = Report(collect(runs_dir), published=with_extra([]))
    written = write_reports(report.tables(), osp.join(out, "report"))
    figures = save_figures(draw_figures(report), osp.join(out, "curves"))
    text = "\n".join(render_terminal(t) for t in curve_tables(report))
    text += "\nFew-shot curve (coop-report's figure code, the paper's style):\n"
    text += "\n".join(f"  {p}" for p in figures)
    text += f"\nFull report (all tables, published numbers, missing runs): {written[0]}"
    return text, figures


def part_words(run: Any, out: str) -> str:
    from coop.interpret import main as interpret_main

    path = osp.join(out, "nearest_words.json")
    rc, printed = _captured(interpret_main, [run.out, str(TOPK), "--output", path])
    if rc != 0:
        raise DemoError(f"coop-interpret failed on {run.out}")
    return printed.rstrip()


@contextlib.contextmanager
def _threads(n: Optional[int]):
    """torch's CPU threads set to ``n`` (None: unchanged) for the block."""
    import torch

    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from coop.sweep_exec import InProcessExecutor
    from coop.sweep_presets import SweepError

    out = osp.abspath(args.output_dir)
    runs_dir = osp.join(out, "output")
    try:
        os.makedirs(out, exist_ok=True)
        setting = Setting(args, out)
        if setting.demo:
            print(
                "No dataset root given: running on the embedded demo data (a generated "
                "Caltech101-layout miniature and a tiny CLIP partly aligned to it; nothing is "
                "downloaded). Its numbers only illustrate the story.\n"
                "Pass --root /path/to/datasets [--backbone RN50] for the paper's settings.\n",
                flush=True,
            )
        runs = plan_runs(setting, runs_dir)
    except (DemoError, SweepError) as e:
        print(f"coop-demo: error: {e}", file=sys.stderr)
        return 2
    todo = [r for preset in ("prompts", "fewshot", "linear-probe") for r in runs[preset]]
    print(f"{len(todo)} runs in {runs_dir} (finished ones are skipped):", flush=True)
    with _threads(setting.threads):
        failed = InProcessExecutor(quiet=not args.verbose).run(todo)
    if failed:
        print(f"coop-demo: error: the run in {failed[0].out} failed", file=sys.stderr)
        return 1
    prompts, coop = story_runs(runs)
    where = "demo data" if setting.demo else setting.root
    print(_heading(f"(a) Prompt sensitivity: zero-shot CLIP with hand-written prompts ({where})"))
    print(part_prompts(prompts))
    print(_heading("(b) CoOp vs zero-shot CLIP vs linear-probe CLIP, by shots per class"))
    print(part_curves(runs_dir, out)[0])
    print(_heading(f"(c) What CoOp learned: nearest words of its context ({coop.label})"))
    print(part_words(coop, out))
    print(f"\nOutputs: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
