"""``coop-data``: list, check and prepare the benchmark datasets.

- ``coop-data list``: one line per registered dataset (folder, image folder, split file,
  class count, published split sizes, how it is obtained).
- ``coop-data check --root DATA [NAME ...]``: builds each dataset through its real loader,
  exactly as training would (``NUM_SHOTS -1``), decodes a sample of its images and prints
  one ``OK``/``WARN``/``FAIL``/``SKIP`` line per dataset. Nothing is written into the data
  root. Exit status 1 when a dataset fails (with ``--strict`` also on WARN/SKIP).
- ``coop-data prepare --root DATA NAME``: downloads what public sources offer (resumable,
  md5-checked when a checksum is known), lays it out as the loader expects, and prints the
  manual steps for the rest (the official split files, ImageNet, ...). It never deletes or
  overwrites a file it did not create.

Dataset facts come from :mod:`coop.dataset_info`. Names are registry names
(``DATASET.NAME``) or config stems (``configs/datasets/<stem>.yaml``), case-insensitive.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Iterable, List, Optional, Sequence, Tuple

from coop.dataset_info import DATASETS, DatasetInfo, Download, ManualStep, resolve_name

__all__ = [
    "DataToolError",
    "DownloadError",
    "CheckResult",
    "fetch",
    "download_file",
    "sample_evenly",
    "list_lines",
    "check_dataset",
    "prepare_dataset",
    "build_parser",
    "main",
]

PROG = "coop-data"
USER_AGENT = "coop-dassl (coop-data prepare)"
CHUNK_SIZE = 1 << 20

logger = logging.getLogger(__name__)


class DataToolError(Exception):
    """A failure reported to the user as one line."""


class DownloadError(DataToolError):
    """A download that could not be completed (it can be resumed by running again)."""


class _UsageError(DataToolError):
    """Bad command-line input (exit status 2)."""


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


# ======================================================================================
# list
# ======================================================================================


def _published_text(info: DatasetInfo) -> str:
    train, val, test = info.sizes
    if info.test_only:
        return f"test {test} (test only)"
    if info.val_is_test:
        return f"train {train} / val = test / test {test}"
    return f"train {train} / val {val} / test {test}"


def _download_kind(info: DatasetInfo) -> str:
    manual = [s for s in info.manual_steps() if not s.optional and not s.copy_from]
    if info.downloads and manual:
        return "auto + manual"
    if info.downloads:
        return "auto"
    return "manual"


def _ordered_names() -> List[str]:
    """Table order first, then any other registered dataset (e.g. a plug-in's)."""
    from coop.registry import DATASET_REGISTRY

    registered = DATASET_REGISTRY.registered_names()
    return [n for n in DATASETS if n in registered] + [n for n in registered if n not in DATASETS]


def list_lines() -> List[str]:
    """A header line and one line per registered dataset."""
    from coop.registry import DATASET_REGISTRY

    rows: List[Tuple[str, ...]] = [
        (
            "DATASET.NAME",
            "config",
            "folder",
            "image dir",
            "split file",
            "classes",
            "download",
            "published sizes",
        )
    ]
    for name in _ordered_names():
        info = DATASETS.get(name)
        if info is None:  # registered by someone else: only the class attributes are known
            cls = DATASET_REGISTRY.get(name)
            rows.append(
                (
                    name,
                    "?",
                    getattr(cls, "dataset_dir", "?") or "?",
                    getattr(cls, "image_dir", "?") or "?",
                    getattr(cls, "split_file", "?") or "?",
                    "?",
                    "?",
                    "?",
                )
            )
            continue
        rows.append(
            (
                name,
                info.config,
                info.folder,
                ", ".join(info.required_dirs) or "(dataset folder)",
                info.split_description,
                str(info.num_classes),
                _download_kind(info),
                _published_text(info),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows
    ]


# ======================================================================================
# check
# ======================================================================================


@dataclass(frozen=True)
class CheckResult:
    """The verdict on one dataset: status is OK, WARN, FAIL or SKIP."""

    status: str
    name: str
    message: str

    @property
    def line(self) -> str:
        return f"{self.status:<6}{self.name}: {self.message}"


def sample_evenly(items: Sequence[Any], n: int) -> List[Any]:
    """Up to ``n`` evenly spaced items (index ``i * len // n``), always including the first."""
    if n <= 0 or not items:
        return []
    if n >= len(items):
        return list(items)
    return [items[i * len(items) // n] for i in range(n)]


def _sizes_text(train: int, val: Optional[int], test: int) -> str:
    return f"train {train} / val {'none' if val is None else val} / test {test}"


def _scan_split_json(path: str, prefix: str) -> Optional[Tuple[int, str]]:
    """``(number of listed images that do not exist, first such path)``; None when the file
    cannot be parsed (the loader then reports what is wrong with it)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    missing, first = 0, ""
    for key in ("train", "val", "test"):
        entries = data.get(key)
        if not isinstance(entries, list):
            continue
        for entry in entries:
            if isinstance(entry, (list, tuple)) and entry and isinstance(entry[0], str):
                impath = os.path.join(prefix, entry[0])
                if not os.path.isfile(impath):
                    missing += 1
                    first = first or impath
    return missing, first


def _loader_message(name: str, error: BaseException) -> str:
    from coop.data import MissingImageError
    from coop.splits import DatasetNotFoundError, NotWritableError, SplitFileError

    text = _one_line(error) or type(error).__name__
    if text.startswith(f"{name}: "):
        text = text[len(name) + 2 :]
    known = (
        MissingImageError,
        DatasetNotFoundError,
        SplitFileError,
        NotWritableError,
        OSError,
        ValueError,
        ImportError,
    )
    if not isinstance(error, known):
        text = f"{type(error).__name__}: {text}"
    return text


def _build_dataset(info: DatasetInfo, root: str, cache_dir: str) -> Any:
    """The dataset as training builds it (all data, no few-shot, all classes)."""
    from coop.config import get_cfg_default
    from coop.registry import build_dataset

    cfg = get_cfg_default()
    cfg.DATASET.ROOT = root
    cfg.DATASET.NAME = info.name
    cfg.DATASET.NUM_SHOTS = -1
    cfg.DATASET.SUBSAMPLE_CLASSES = "all"
    cfg.DATASET.CACHE_DIR = cache_dir  # any cache (ImageNet's listing) goes here, not to ROOT
    return build_dataset(cfg)


def _decode_failures(name: str, paths: Sequence[str]) -> List[str]:
    """The paths among ``paths`` that cannot be opened and decoded (as training reads them)."""
    from tqdm import tqdm

    from coop.data import UnreadableImageError, read_image

    bad: List[str] = []
    bar = tqdm(
        paths,
        desc=f"{name}: decoding sampled images",
        unit="img",
        file=sys.stderr,
        leave=False,
        disable=True if len(paths) < 50 else None,  # None: only on a terminal
    )
    for path in bar:
        try:
            read_image(path)
        except (UnreadableImageError, OSError):
            bad.append(path)
    return bad


def check_dataset(
    info: DatasetInfo, root: str, explicit: bool = True, sample: int = 20
) -> CheckResult:
    """Check one dataset under ``root`` (absolute); see the module docstring.

    ``explicit``: the dataset was asked for by name, so a missing folder is a FAIL (else a
    SKIP). ``sample``: images decoded per split (evenly spaced; 0 = none).
    """
    name = info.name

    def fail(what: str, path: str) -> CheckResult:
        return CheckResult("FAIL", name, f"{what} ({path})")

    dataset_dir = os.path.join(root, info.folder)
    if not os.path.isdir(dataset_dir):
        if explicit:
            return fail("dataset folder not found", dataset_dir)
        return CheckResult("SKIP", name, f"not found ({dataset_dir})")

    for rel in info.required_dirs:
        path = os.path.normpath(os.path.join(dataset_dir, rel))
        if not os.path.isdir(path):
            return fail(f"missing image folder {rel}", path)

    for rel, source in info.required_files:
        path = os.path.join(dataset_dir, rel)
        if not os.path.isfile(path):
            return fail(f"missing {rel}; {source}", path)

    if info.split_file:
        split_path = os.path.join(dataset_dir, info.split_file)
        if not os.path.isfile(split_path):
            return fail(
                f"missing split file {info.split_file}; the official one is linked from "
                f"CoOp's DATASETS.md (Google Drive), see `{PROG} prepare {info.config}`",
                split_path,
            )
        prefix = os.path.normpath(os.path.join(dataset_dir, info.image_dir))
        scanned = _scan_split_json(split_path, prefix)
        if scanned is not None and scanned[0]:
            n_missing, first = scanned
            return fail(
                f"{info.split_file} lists {n_missing} image(s) that do not exist; first missing",
                first,
            )

    with tempfile.TemporaryDirectory(prefix="coop-data-check-") as cache_dir:
        try:
            dataset = _build_dataset(info, root, cache_dir)
        except Exception as e:  # every loader error becomes one FAIL line
            return fail(_loader_message(name, e), dataset_dir)

    train = dataset.train_x or []
    val = dataset.val
    test = dataset.test or []
    n_classes = dataset.num_classes
    if n_classes != info.num_classes:
        where = os.path.normpath(os.path.join(dataset_dir, info.image_dir))
        return fail(f"{n_classes} classes, but the published dataset has {info.num_classes}", where)

    # each distinct list once (ImageNet's val is its test, a variant's train is its test)
    to_decode: List[str] = []
    seen: set = set()
    for items in (train, val, test):
        if items is None or id(items) in seen:
            continue
        seen.add(id(items))
        to_decode.extend(item.impath for item in sample_evenly(items, sample))
    bad = _decode_failures(name, to_decode)
    if bad:
        return fail(f"{len(bad)} of {len(to_decode)} sampled images cannot be decoded", bad[0])

    actual = (len(train), None if val is None else len(val), len(test))
    summary = f"{n_classes} classes, {_sizes_text(*actual)}"
    if actual != tuple(info.sizes):
        return CheckResult(
            "WARN",
            name,
            f"{summary}; differs from the published split (expected {_sizes_text(*info.sizes)})",
        )
    return CheckResult("OK", name, summary)


def _resolve_names(names: Iterable[str]) -> List[str]:
    out: List[str] = []
    for raw in names:
        name = resolve_name(raw)
        if name is None:
            choices = ", ".join(f"{i.name} ({i.config})" for i in DATASETS.values())
            raise _UsageError(
                f"unknown dataset {raw!r}; use a registry name or config stem: {choices}"
            )
        if name not in out:
            out.append(name)
    return out


def cmd_check(args: argparse.Namespace) -> int:
    root = os.path.abspath(os.path.expanduser(args.root))
    if not os.path.isdir(root):
        raise DataToolError(f"the data root {root} does not exist")
    if args.sample < 0:
        raise _UsageError(f"--sample must be >= 0, got {args.sample}")
    explicit = bool(args.names)
    names = _resolve_names(args.names) if explicit else list(DATASETS)
    results: List[CheckResult] = []
    for name in names:
        result = check_dataset(DATASETS[name], root, explicit=explicit, sample=args.sample)
        print(result.line, flush=True)
        results.append(result)
    counts = {s: sum(r.status == s for r in results) for s in ("OK", "WARN", "FAIL", "SKIP")}
    print(", ".join(f"{n} {s}" for s, n in counts.items() if n), file=sys.stderr)
    if counts["SKIP"] == len(results):
        print(f"{PROG}: error: no dataset found under {root}", file=sys.stderr)
        return 1
    if counts["FAIL"] or (args.strict and (counts["WARN"] or counts["SKIP"])):
        return 1
    return 0


# ======================================================================================
# prepare: downloads
# ======================================================================================


# the network layer; tests replace ``fetch`` (or ``_urlopen``) to stay offline
_urlopen = urllib.request.urlopen


def fetch(url: str, dest: str) -> None:
    """Download ``url`` into ``dest``; an existing partial ``dest`` is continued with an HTTP
    Range request (restarted when the server ignores the range). Shows a tqdm bar."""
    from tqdm import tqdm

    offset = os.path.getsize(dest) if os.path.isfile(dest) else 0
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = _urlopen(request, timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # nothing left to send: the partial file is complete
            return
        raise DownloadError(f"HTTP error {e.code} ({e.reason}) for {url}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DownloadError(f"cannot reach {url}: {reason}") from None
    with response:
        status = getattr(response, "status", None) or response.getcode()
        if offset and status == 206:
            content_range = response.headers.get("Content-Range", "") or ""
            if not content_range.startswith(f"bytes {offset}-"):
                raise DownloadError(
                    f"{url}: the server answered the range {offset}- with {content_range!r}"
                )
            mode = "ab"
        else:
            offset, mode = 0, "wb"  # a full answer: start over
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length and str(length).isdigit() else None
        try:
            bar = tqdm(
                total=total,
                initial=offset,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=os.path.basename(url),
                file=sys.stderr,
                disable=None,  # only on a terminal
            )
            with open(dest, mode) as f, bar:
                while True:
                    chunk = response.read(CHUNK_SIZE)
                    if not chunk:
                        break
                    f.write(chunk)
                    bar.update(len(chunk))
        except OSError as e:
            raise DownloadError(
                f"download of {url} interrupted ({e}); run the same command again to resume"
            ) from None
    if total is not None and os.path.getsize(dest) < total:
        raise DownloadError(
            f"download of {url} stopped at {os.path.getsize(dest)} of {total} bytes; run the "
            f"same command again to resume"
        )


def _md5(path: str) -> str:
    from torchvision.datasets.utils import calculate_md5

    return calculate_md5(path)


def download_file(url: str, dest: str, md5: Optional[str]) -> None:
    """Fetch ``url`` to ``dest`` through ``dest + ".part"`` (resumed when present), verify
    its md5 (when known) and only then rename it to ``dest``.

    An existing ``dest`` with the right checksum (or with no checksum known) is kept and
    nothing is downloaded; one with another checksum is never overwritten (an error). A
    download with the wrong checksum is not installed: it is kept as ``dest + ".corrupt"``.
    """
    name = os.path.basename(dest)
    if os.path.exists(dest):
        if md5 is None:
            print(f"  {dest} exists (no checksum known): using it")
            return
        got = _md5(dest)
        if got == md5:
            print(f"  {dest} already downloaded (md5 ok)")
            return
        raise DataToolError(
            f"{dest} already exists but its md5 is {got}, not {md5}; refusing to overwrite "
            f"it: move it away and run again"
        )
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    part = dest + ".part"
    if os.path.isfile(part):
        print(f"  resuming {url} at byte {os.path.getsize(part)} -> {part}")
    else:
        print(f"  downloading {url} -> {part}")
    try:
        fetch(url, part)
    except DataToolError:
        raise
    except OSError as e:
        raise DownloadError(
            f"download of {url} failed ({e}); run the same command again to resume"
        ) from None
    if md5 is not None:
        got = _md5(part)
        if got != md5:
            corrupt = dest + ".corrupt"
            os.replace(part, corrupt)
            raise DataToolError(
                f"checksum mismatch for {name}: expected md5 {md5}, got {got}; it was not "
                f"installed (kept as {corrupt})"
            )
        print(f"  md5 ok: {name}")
    os.replace(part, dest)


# ======================================================================================
# prepare: layout
# ======================================================================================


def _installed(d: Download, dataset_dir: str) -> bool:
    if not d.extract:  # a plain file: download_file checks it (and its checksum)
        return False
    return all(os.path.exists(os.path.join(dataset_dir, p)) for p in d.provides)


def _extract(archive: str, to: str) -> None:
    import tarfile
    import zipfile

    from torchvision.datasets.utils import extract_archive

    try:
        extract_archive(archive, to)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        raise DataToolError(f"cannot extract {archive}: {_one_line(e)}") from None


def _place(d: Download, staging: str, dataset_dir: str, archive: str) -> None:
    """Move the extracted parts into the dataset folder; existing paths are never replaced."""
    pairs: List[Tuple[str, str]] = []
    for src, dst in d.place:
        target = os.path.normpath(os.path.join(dataset_dir, dst))
        if src.endswith("/*"):
            base = os.path.join(staging, src[:-2])
            if not os.path.isdir(base):
                raise DataToolError(
                    f"{archive} has no folder {src[:-2]}/; its layout is not the expected one: "
                    f"extract it by hand"
                )
            pairs.extend(
                (os.path.join(base, n), os.path.join(target, n)) for n in sorted(os.listdir(base))
            )
        else:
            path = os.path.join(staging, src)
            if not os.path.exists(path):
                raise DataToolError(
                    f"{archive} has no {src}; its layout is not the expected one: extract it "
                    f"by hand"
                )
            pairs.append((path, target))
    for src, target in pairs:
        if os.path.lexists(target):
            print(f"  kept the existing {target} (not overwritten)")
            continue
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.move(src, target)
        print(f"  placed {target}")


def _install(d: Download, url: str, md5: Optional[str], dataset_dir: str, dl_dir: str) -> None:
    if not d.extract:
        download_file(url, os.path.join(dataset_dir, d.filename), md5)
        return
    archive = os.path.join(dl_dir, d.filename)
    download_file(url, archive, md5)
    staging = os.path.join(dl_dir, f".extract-{d.filename}")
    if os.path.isdir(staging):  # left over by an interrupted run of ours
        shutil.rmtree(staging)
    print(f"  extracting {archive}")
    try:
        _extract(archive, staging)
        for inner in d.then_extract:
            inner_path = os.path.join(staging, inner)
            if not os.path.isfile(inner_path):
                raise DataToolError(
                    f"{archive} has no {inner}; its layout is not the expected one: extract it "
                    f"by hand"
                )
            _extract(inner_path, os.path.dirname(inner_path))
        os.makedirs(dataset_dir, exist_ok=True)
        _place(d, staging, dataset_dir, archive)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _step_done(step: ManualStep, dataset_dir: str) -> bool:
    return os.path.exists(os.path.join(dataset_dir, step.check_path))


def _print_plan(
    info: DatasetInfo,
    resolved: Sequence[Tuple[Download, str, Optional[str]]],
    steps: Sequence[ManualStep],
    root: str,
    dataset_dir: str,
    dl_dir: str,
) -> None:
    title = f" ({info.title})" if info.title != info.name else ""
    print(f"{info.name}{title} -> {dataset_dir}")
    if resolved:
        print("Automatic steps:")
        for i, (d, url, md5) in enumerate(resolved, 1):
            print(f"  {i}. download {url}")
            print(f"     checksum: {'md5 ' + md5 if md5 else 'none known (not verified)'}")
            if d.extract:
                print(f"     save as {os.path.join(dl_dir, d.filename)}, extract, then move")
                for src, dst in d.place:
                    target = os.path.normpath(os.path.join(dataset_dir, dst))
                    shown = target + "/" if src.endswith("/*") else target
                    print(f"       {src} -> {shown}")
            else:
                print(f"     save as {os.path.join(dataset_dir, d.filename)}")
            if _installed(d, dataset_dir):
                print("     already in place: skipped")
    else:
        print("Automatic steps: none (nothing of this dataset can be downloaded automatically)")
    if steps:
        print("Manual steps:")
        for i, step in enumerate(steps, 1):
            done = _step_done(step, dataset_dir)
            flags = " [done]" if done else (" [optional]" if step.optional else "")
            print(f"  {chr(ord('a') + i - 1)}.{flags} {step.what}")
            print(f"     from: {step.source}")
            print(f"     place at: {os.path.join(dataset_dir, step.dest)}")
            if step.copy_from and not done:
                src = os.path.join(root, step.copy_from)
                state = "found: it will be copied" if os.path.isfile(src) else "not found yet"
                print(f"     copy of: {src} ({state})")


def prepare_dataset(info: DatasetInfo, root: str, dl_dir: str, dry_run: bool = False) -> int:
    """Print the plan, then run the automatic steps; 1 when one of them failed."""
    dataset_dir = os.path.join(root, info.folder)
    resolved = [(d, *d.resolve()) for d in info.downloads]
    steps = info.manual_steps()
    _print_plan(info, resolved, steps, root, dataset_dir, dl_dir)
    if dry_run:
        print("Dry run: nothing was downloaded or written.")
        return 0

    failures = 0
    for d, url, md5 in resolved:
        if _installed(d, dataset_dir):
            continue
        print(f"{d.filename}:")
        try:
            _install(d, url, md5, dataset_dir, dl_dir)
        except DataToolError as e:
            print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
            failures += 1
    for step in steps:
        if not step.copy_from or _step_done(step, dataset_dir):
            continue
        src = os.path.join(root, step.copy_from)
        if os.path.isfile(src):
            dst = os.path.join(dataset_dir, step.check_path)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copyfile(src, dst + ".part")
            os.replace(dst + ".part", dst)
            print(f"copied {src} -> {dst}")

    check_cmd = f"{PROG} check --root {root} {info.config}"
    if failures:
        print(f"{info.name}: {failures} automatic step(s) failed (see the errors above)")
        return 1
    remaining = [s for s in steps if not s.optional and not _step_done(s, dataset_dir)]
    if remaining:
        print(
            f"{info.name}: {len(remaining)} manual step(s) remain (see above); then run: "
            f"{check_cmd}"
        )
    else:
        print(f"{info.name}: everything is in place; verify with: {check_cmd}")
    if resolved and os.path.isdir(dl_dir):
        print(f"The downloaded archives are kept in {dl_dir}; delete them once the check passes.")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    (name,) = _resolve_names([args.name])
    info = DATASETS[name]
    root = os.path.abspath(os.path.expanduser(args.root))
    dl_dir = args.download_dir or os.path.join(root, "downloads", info.folder)
    dl_dir = os.path.abspath(os.path.expanduser(dl_dir))
    return prepare_dataset(info, root, dl_dir, dry_run=args.dry_run)


def cmd_list(args: argparse.Namespace) -> int:
    for line in list_lines():
        print(line)
    return 0


# ======================================================================================
# command line
# ======================================================================================


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="List, check and prepare the CoOp benchmark datasets.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    pl = sub.add_parser("list", help="show the registered datasets and their expected layout")
    pl.set_defaults(func=cmd_list)

    pc = sub.add_parser(
        "check",
        help="verify datasets under a data root exactly as training will load them",
        description=(
            "Build each dataset through its loader (NUM_SHOTS -1), decode a sample of its "
            "images, and print one OK/WARN/FAIL/SKIP line per dataset. Nothing is written "
            "into the data root. Exit status 1 when a dataset fails."
        ),
    )
    pc.add_argument("--root", required=True, help="the data root (DATASET.ROOT)")
    pc.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help="registry names or config stems (default: all; absent ones are skipped)",
    )
    pc.add_argument(
        "--sample",
        type=int,
        default=20,
        metavar="N",
        help="images decoded per split, evenly spaced (default 20; 0 = none)",
    )
    pc.add_argument(
        "--strict", action="store_true", help="exit 1 also on WARN (sizes) and SKIP (absent)"
    )
    pc.set_defaults(func=cmd_check)

    pp = sub.add_parser(
        "prepare",
        help="download and lay out a dataset; print the manual steps for the rest",
        description=(
            "Download what public sources offer (resumable, md5-checked when a checksum is "
            "known) into the layout the loader expects, and print precise manual steps for "
            "the rest. Existing files are never deleted or overwritten."
        ),
    )
    pp.add_argument("--root", required=True, help="the data root (DATASET.ROOT)")
    pp.add_argument("name", metavar="NAME", help="registry name or config stem")
    pp.add_argument(
        "--download-dir",
        default="",
        help="where archives are saved (default: <ROOT>/downloads/<dataset folder>)",
    )
    pp.add_argument("--dry-run", action="store_true", help="only print the plan")
    pp.set_defaults(func=cmd_prepare)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except _UsageError as e:
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except DataToolError as e:
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted (a download resumes when run again)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
