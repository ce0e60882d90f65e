"""``coop-parse``: the original ``parse_test_res.py``, reading the runs' ``log.txt`` files.

For each non-hidden subfolder of DIRECTORY (normally ``seed1``, ``seed2``, ``seed3``), in
sorted order, it reads ``<sub>/log.txt``. From the line that
equals the end signal (``Finish training``, or ``=> result`` with ``--test-log`` for
evaluation-only runs) on, lines are matched against ``* <keyword>: <number>%``; the last
match is the run's value. It prints each run's value, then the mean and the population
standard deviation (``np.std``), or with ``--ci95`` the 95% confidence interval
``1.96 * std / sqrt(n)``. ``--multi-exp`` treats every subfolder as an experiment folder of
seed folders and ends with the mean of the experiments' means.

One difference from the original, which reads ``log.txt`` only: when ``log.txt`` holds no
result, the newest time-stamped ``log.txt-<time>`` that does is used and its path printed.
A resumed run (the package resumes unfinished runs) keeps its first ``log.txt`` and logs its
end there; the original would leave that seed out without a word.

    coop-parse output/caltech101/CoOp/rn50_16shots/nctx16_cscFalse_ctpend
    coop-parse output/evaluation/CoOp/rn50_ep50_16shots/nctx16_cscFalse_ctpend/imagenetv2 --test-log
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import List, Optional, Tuple


class ParseError(ValueError):
    """A folder or log that yields no result, with the path that is wrong."""


def _subfolders(directory: str) -> List[str]:
    if not os.path.isdir(directory):
        raise ParseError(f"{directory}: no such folder")
    return sorted(
        name
        for name in os.listdir(directory)
        if not name.startswith(".") and os.path.isdir(os.path.join(directory, name))
    )


def parse_log(path: str, keyword: str, end_signal: str) -> Optional[float]:
    """The last ``* <keyword>: <number>%`` value from the end-signal line on, or None."""
    pattern = re.compile(r"\* " + re.escape(keyword) + r": ([\.\deE+-]+)%")
    seen_end, value = False, None
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if line == end_signal:
                seen_end = True
            if not seen_end:
                continue
            match = pattern.search(line)
            if match:
                value = float(match.group(1))
    return value


def _resumed_log(folder: str, keyword: str, end_signal: str) -> Tuple[str, Optional[float]]:
    """The newest ``log.txt-<time stamp>`` of ``folder`` that holds a result, and the result
    (``("", None)`` when none does). A run that was resumed writes its end there, since the
    first ``log.txt`` is kept."""
    stamped = sorted(
        (n for n in os.listdir(folder) if n.startswith("log.txt-")), reverse=True
    )  # time stamps sort in time order
    for name in stamped:
        path = os.path.join(folder, name)
        value = parse_log(path, keyword, end_signal)
        if value is not None:
            return path, value
    return "", None


def parse_directory(
    directory: str, keyword: str, end_signal: str, ci95: bool
) -> Tuple[float, float]:
    """Print each seed folder's value and the summary of ``directory``; returns
    ``(mean, spread)``."""
    import numpy as np

    values = []
    for sub in _subfolders(directory):
        path = os.path.join(directory, sub, "log.txt")
        if not os.path.isfile(path):
            raise ParseError(f"{path} does not exist (every subfolder must hold a run's log.txt)")
        value = parse_log(path, keyword, end_signal)
        if value is None:  # a resumed run logs on in log.txt-<time stamp>: the newest one
            path, value = _resumed_log(os.path.join(directory, sub), keyword, end_signal)
        if value is None:
            continue
        values.append(value)
        print(f"file: {path}. {keyword}: {value:.2f}%. ")
    if not values:
        raise ParseError(
            f"no '* {keyword}: ...%' line after '{end_signal}' in the logs under {directory}"
            + ("" if end_signal == "=> result" else " (evaluation-only runs need --test-log)")
        )
    mean = float(np.mean(values))
    spread = float(np.std(values))
    if ci95:
        spread = 1.96 * spread / float(np.sqrt(len(values)))
    print("===")
    print(f"Summary of directory: {directory}")
    print(f"* {keyword}: {mean:.2f}% +- {spread:.2f}%")
    print("===")
    return mean, spread


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="coop-parse",
        description="Mean and spread of a metric over the seed folders of an experiment "
        "(the original parse_test_res.py).",
    )
    p.add_argument("directory", help="the folder holding seed1, seed2, ...")
    p.add_argument("--ci95", action="store_true", help="print the 95%% confidence interval")
    p.add_argument("--test-log", action="store_true", help="the logs are evaluation-only runs")
    p.add_argument("--multi-exp", action="store_true", help="every subfolder is an experiment")
    p.add_argument("--keyword", default="accuracy", help="the metric (default accuracy)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    end_signal = "=> result" if args.test_log else "Finish training"
    try:
        if not args.multi_exp:
            parse_directory(args.directory, args.keyword, end_signal, args.ci95)
            return 0
        means = []
        for sub in _subfolders(args.directory):
            mean, _ = parse_directory(
                os.path.join(args.directory, sub), args.keyword, end_signal, args.ci95
            )
            means.append(mean)
        if not means:
            raise ParseError(f"{args.directory} has no experiment folders")
        import numpy as np

        print("Average performance")
        print(f"* {args.keyword}: {np.mean(means):.2f}%")
    except (ParseError, OSError) as e:
        print(f"coop-parse: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
