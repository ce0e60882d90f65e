"""coop-report: tables over an output tree, the published numbers beside ours, the missing
runs, every format, and the paper's figures."""

from __future__ import annotations

import csv
import io
import json
import os
import re

import numpy as np
import pytest

from coop.published import ELEVEN
from coop.report import Report, collect, main, render, write_reports

COOP_END = {"N_CTX": 16, "CSC": False, "CLASS_TOKEN_POSITION": "end", "CTX_INIT": "",
            "PREC": "fp16"}  # fmt: skip
COOP_MID = dict(COOP_END, CLASS_TOKEN_POSITION="middle")
CTXV1 = dict(COOP_END, CTX_INIT="a photo of a")
END_LABEL = "CoOp (CLASS_TOKEN_POSITION=end)"
MID_LABEL = "CoOp (CLASS_TOKEN_POSITION=middle)"


def _config(out, trainer, dataset, shots, seed, sub, backbone, node, epochs):
    return {
        "OUTPUT_DIR": out,
        "SEED": seed,
        "DATASET": {
            "NAME": dataset,
            "ROOT": "/data",
            "NUM_SHOTS": shots,
            "SUBSAMPLE_CLASSES": sub,
        },  # fmt: skip
        "MODEL": {"BACKBONE": {"NAME": backbone}},
        "OPTIM": {"MAX_EPOCH": epochs, "LR": 0.002},
        "DATALOADER": {"NUM_WORKERS": 8},
        "TRAINER": {"NAME": trainer, "COOP": dict(node or COOP_END)},
    }


def _log(out, cfg, acc, model_dir="", result=True):
    """A log.txt in the form coop-train and Dassl's train.py print."""
    from yacs.config import CfgNode

    lines = ["***************", "** Arguments **", "***************",
             f"eval_only: {bool(model_dir)}", f"model_dir: {model_dir}",
             f"output_dir: {out}", f"trainer: {cfg['TRAINER']['NAME']}",
             "************", "** Config **", "************", str(CfgNode(cfg)),
             "Collecting env info ...", "** System info **", "torch 2.x", ""]  # fmt: skip
    if result:
        lines += ["Finish training", "=> result", "* total: 1,000", "* correct: 700",
                  f"* accuracy: {acc:.1f}%", f"* error: {100 - acc:.1f}%",
                  "* macro_f1: 50.0%", "Elapsed: 0:00:01"]  # fmt: skip
    with open(os.path.join(out, "log.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def run(root, rel, trainer, dataset, acc, *, shots=16, seed=1, sub="all", backbone="RN50",
        node=None, epochs=200, model_dir="", json_file=True):  # fmt: skip
    out = os.path.join(root, rel)
    os.makedirs(out, exist_ok=True)
    cfg = _config(out, trainer, dataset, shots, seed, sub, backbone, node, epochs)
    _log(out, cfg, acc, model_dir)
    if json_file:
        res = {"trainer": trainer, "dataset": dataset, "backbone": backbone,
               "num_shots": shots, "subsample_classes": sub, "seed": seed, "split": "test",
               "epoch": epochs, "metrics": {"accuracy": acc, "error_rate": 100 - acc,
                                            "macro_f1": acc - 1},
               "total": 1000, "correct": int(acc * 10), "config": cfg}  # fmt: skip
        with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
            json.dump(res, f)
    return out


# accuracies of the few-shot tree: (method, dataset, shots) -> per seed 1, 2, 3
FEW = {
    ("end", "Caltech101", 16): [91.81, 92.01, 92.17],
    ("end", "Caltech101", 1): [85.0, 86.5, 84.1],
    ("end", "OxfordPets", 16): [86.0, 87.5, 88.0],
    ("end", "OxfordPets", 1): [80.0, 81.0, 83.0],  # seed 2 has only a log.txt
    ("mid", "Caltech101", 16): [90.0, 91.0, 89.5],
    ("mid", "OxfordPets", 16): [85.5, 84.0],  # seed 3 missing
    ("mid", "OxfordPets", 1): [79.0, 78.0, 77.5],
    # no ("mid", "Caltech101", 1): a missing cell
}
ZS = {d: 50.0 + i * 1.7 for i, d in enumerate(ELEVEN)}


def _fewshot_tree(root, zs_datasets=ELEVEN):
    for (variant, dataset, shots), accs in FEW.items():
        node = COOP_END if variant == "end" else COOP_MID
        for seed, acc in enumerate(accs, 1):
            rel = f"{dataset.lower()}/CoOp/{variant}_{shots}/seed{seed}"
            log_only = (variant, dataset, shots, seed) == ("end", "OxfordPets", 1, 2)
            run(root, rel, "CoOp", dataset, acc, shots=shots, seed=seed, node=node,
                epochs=50 if shots == 1 else 200, json_file=not log_only)  # fmt: skip
    for dataset in zs_datasets:
        acc = ZS[dataset]
        run(root, f"ZeroshotCLIP/rn50/{dataset}", "ZeroshotCLIP", dataset, acc, shots=-1, seed=-1)
    # a run that has not finished yet
    unfinished = os.path.join(root, "caltech101/CoOp/end_2/seed1")
    os.makedirs(unfinished)
    cfg = _config(unfinished, "CoOp", "Caltech101", 2, 1, "all", "RN50", None, 100)
    _log(unfinished, cfg, 0.0, result=False)
    # a results.json cut short (its log is read instead)
    cut = run(root, "oxfordpets/CoOp/end_16/seed9", "CoOp", "OxfordPets", 10.0, seed=9,
              json_file=False)  # fmt: skip
    with open(os.path.join(cut, "results.json"), "w", encoding="utf-8") as f:
        f.write('{"trainer": "Co')
    _log(cut, _config(cut, "CoOp", "OxfordPets", 16, 9, "all", "RN50", None, 200), 0, result=False)
    return root


@pytest.fixture
def fewshot_tree(tmp_path):
    return _fewshot_tree(str(tmp_path / "output"))


def _report(root, **kw):
    from coop.published import PublishedIndex

    return Report(collect(root), published=PublishedIndex(), **kw)


def _rows(table, **match):
    cols = table.columns
    return [r for r in table.rows if all(r[cols.index(k)] == v for k, v in match.items())]


def _col(table, row, name):
    return row[table.columns.index(name)]


def test_fewshot_table_means_std_and_published(fewshot_tree):
    rep = _report(fewshot_tree)
    t = rep.fewshot_table()
    acc_col = "accuracy (mean +- std)"
    for (variant, dataset, shots), accs in FEW.items():
        label = END_LABEL if variant == "end" else MID_LABEL
        (row,) = _rows(t, Dataset=dataset, Shots=shots, Method=label)
        st = _col(t, row, acc_col)
        if (variant, dataset, shots) == ("end", "OxfordPets", 1):
            accs = [80.0, round(81.0, 1), 83.0]  # the log holds one decimal
        assert st.n == len(accs) == _col(t, row, "Seeds")
        assert st.mean == pytest.approx(np.mean(accs)) and st.std == pytest.approx(np.std(accs))
    # the paper's epochs per shot count (MAX_EPOCH 50 vs 200) do not split a method
    assert {r[2] for r in t.rows} == {END_LABEL, MID_LABEL, "ZeroshotCLIP"}
    # published beside ours: COOP.md's verified 92.00 for CoOp RN50 Caltech101 16 shots
    (row,) = _rows(t, Dataset="Caltech101", Shots=16, Method=END_LABEL)
    assert _col(t, row, "Published") == 92.00 and _col(t, row, "Status") == "V"
    assert _col(t, row, "Diff") == pytest.approx(np.mean([91.81, 92.01, 92.17]) - 92.00)
    assert "COOP.md" in _col(t, row, "Source")
    (row,) = _rows(t, Dataset="OxfordPets", Shots=16, Method=END_LABEL)
    assert (_col(t, row, "Published"), _col(t, row, "Status")) == (87.01, "R")
    (row,) = _rows(t, Dataset="Caltech101", Shots=0, Method="ZeroshotCLIP")
    assert (_col(t, row, "Published"), _col(t, row, "Status")) == (86.29, "R")
    assert _col(t, row, "Diff") == pytest.approx(ZS["Caltech101"] - 86.29)
    (row,) = _rows(t, Dataset="ImageNet", Shots=0, Method="ZeroshotCLIP")
    assert (_col(t, row, "Published"), _col(t, row, "Status")) == (58.18, "V")
    # the middle-position variant has no published number
    (row,) = _rows(t, Dataset="OxfordPets", Shots=16, Method=MID_LABEL)
    assert _col(t, row, "Published") is None and _col(t, row, "Status") == ""


def test_ci95_is_parse_test_res_formula(fewshot_tree):
    t = _report(fewshot_tree, ci95=True).fewshot_table()
    (row,) = _rows(t, Dataset="Caltech101", Shots=16, Method=MID_LABEL)
    st = _col(t, row, "accuracy (mean +- 95% CI)")
    accs = FEW[("mid", "Caltech101", 16)]
    assert st.spread == pytest.approx(1.96 * np.std(accs) / np.sqrt(3))


def test_eleven_dataset_average_only_when_all_are_there(fewshot_tree):
    t = _report(fewshot_tree).fewshot_average_table()
    (zs,) = _rows(t, Method="ZeroshotCLIP")
    assert _col(t, zs, "Average accuracy") == pytest.approx(np.mean(list(ZS.values())))
    assert _col(t, zs, "Published") == 58.77 and _col(t, zs, "Status") == "R"
    assert _col(t, zs, "Diff") == pytest.approx(np.mean(list(ZS.values())) - 58.77)
    (coop16,) = _rows(t, Method=END_LABEL, Shots=16)
    assert _col(t, coop16, "Average accuracy") is None and _col(t, coop16, "Datasets") == 2
    missing = _col(t, coop16, "Missing datasets").split(", ")
    assert "ImageNet" in missing and "DTD" in missing and "Flowers102" in missing
    assert len(missing) == 9 and "Caltech101" not in missing


def test_missing_runs(fewshot_tree, tmp_path):
    expected = [os.path.join(fewshot_tree, "caltech101/CoOp/end_16/seed1"),
                os.path.join(fewshot_tree, "dtd/CoOp/end_16/seed1")]  # fmt: skip
    t = _report(fewshot_tree, expected=expected).missing_table()
    rows = [tuple(r) for r in t.rows]
    seeds = [r for r in rows if r[0] == "seeds"]
    assert seeds == [("seeds", "fewshot", "OxfordPets", 16, MID_LABEL + " [RN50]",
                      "seed 3 missing (have 1, 2)")]  # fmt: skip
    # the grid: the datasets x shot counts of the trained methods (zero-shot CLIP's eleven
    # datasets are not asked of CoOp), and zero-shot CLIP has every dataset
    cells = [(r[2], r[3], r[4]) for r in rows if r[0] == "cell"]
    assert cells == [("Caltech101", 1, MID_LABEL + " [RN50]")]
    incomplete = sorted(r[5] for r in rows if r[0] == "incomplete")
    assert len(incomplete) == 2
    assert incomplete[0].endswith("caltech101/CoOp/end_2/seed1: log.txt holds no result yet")
    assert "oxfordpets/CoOp/end_16/seed9: " in incomplete[1]
    assert "results.json: not a readable results file" in incomplete[1]
    assert incomplete[1].endswith("and log.txt holds no result")
    exp = [r for r in rows if r[0] == "expected"]
    assert len(exp) == 1 and exp[0][5].startswith(expected[1])


def _parse_pm(text, sep):
    mean, spread = text.split(sep)
    return float(mean), float(spread)


def test_every_format_parses_back_to_the_numbers(fewshot_tree, tmp_path):
    rep = _report(fewshot_tree)
    tables = rep.tables()
    out = str(tmp_path / "rep")
    written = write_reports(tables, out)
    names = sorted(os.path.basename(p) for p in written)
    assert names == sorted(["report.txt", "report.md", "report.tex", "fewshot.csv",
                            "fewshot_average.csv", "missing.csv", "sources.csv"])  # fmt: skip
    accs = FEW[("mid", "Caltech101", 16)]
    want = (round(np.mean(accs), 2), round(np.std(accs), 2))

    with open(os.path.join(out, "fewshot.csv"), encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    (row,) = [r for r in rows if r["Dataset"] == "Caltech101" and r["Shots"] == "16"
              and r["Method"] == MID_LABEL]  # fmt: skip
    assert float(row["accuracy (mean +- std)"]) == pytest.approx(np.mean(accs), abs=1e-4)
    assert float(row["accuracy (mean +- std) std"]) == pytest.approx(np.std(accs), abs=1e-4)
    (row,) = [r for r in rows if r["Dataset"] == "Caltech101" and r["Shots"] == "16"
              and r["Method"] == END_LABEL]  # fmt: skip
    assert float(row["Published"]) == 92.0 and row["Status"] == "V"
    assert float(row["Diff"]) == pytest.approx(np.mean([91.81, 92.01, 92.17]) - 92, abs=1e-4)

    with open(os.path.join(out, "report.md"), encoding="utf-8") as f:
        md = f.read()
    line = next(ln for ln in md.splitlines()
                if ln.startswith("| Caltech101 | 16 | " + MID_LABEL))  # fmt: skip
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert _parse_pm(cells[5], "±") == want
    assert "## Missing runs" in md and "seed 3 missing (have 1, 2)" in md

    with open(os.path.join(out, "report.tex"), encoding="utf-8") as f:
        tex = f.read()
    line = next(ln for ln in tex.splitlines() if ln.startswith("Caltech101 & 16 & CoOp (CLASS\\_"))
    assert line.endswith(r"\\")
    cells = [c.strip() for c in line[:-2].split("&")]
    assert "CLASS\\_TOKEN\\_POSITION" in cells[2]
    assert tex.count(r"\begin{tabular}") == len(tables)
    first = next(ln for ln in tex.splitlines() if " & " in ln and "$\\pm$" in ln)
    assert re.fullmatch(r"[\d.]+ \$\\pm\$ [\d.]+", first.split(" & ")[5])
    mid_line = next(
        ln
        for ln in tex.splitlines()
        if ln.startswith("Caltech101 & 16 & CoOp (CLASS\\_TOKEN\\_POSITION=middle)")
    )
    assert _parse_pm(mid_line.split(" & ")[5], r"$\pm$") == want

    text = render(tables, "terminal")
    assert f"{want[0]:.2f} +- {want[1]:.2f}" in text
    # 92.0033 - 92.00 prints as 0.00, not -0.00
    cells = [re.split(r"\s{2,}", ln) for ln in text.splitlines()]
    (row,) = [c for c in cells if c[:3] == ["Caltech101", "16", END_LABEL]]
    assert row[5:9] == ["92.00 +- 0.15", "92.00", "0.00", "V"]
    with open(os.path.join(out, "report.txt"), encoding="utf-8") as f:
        assert f.read() == text


def _b2n_tree(root):
    """CoOp (ctxv1, ViT-B/16) trained on base classes, evaluated on new ones; zero-shot
    CLIP on both."""
    base = {"Caltech101": [97.0, 98.0], "OxfordPets": [93.0, 94.5]}
    new = {"Caltech101": [90.0, 89.0], "OxfordPets": [95.0, 96.0]}
    for d in base:
        for seed in (1, 2):
            train = run(root, f"base2new/train_base/{d}/CoOp/seed{seed}", "CoOp", d,
                        base[d][seed - 1], seed=seed, sub="base", backbone="ViT-B/16",
                        node=CTXV1, epochs=10)  # fmt: skip
            run(root, f"base2new/test_new/{d}/CoOp/seed{seed}", "CoOp", d, new[d][seed - 1],
                seed=seed, sub="new", backbone="ViT-B/16", node=CTXV1, epochs=10,
                model_dir=train)  # fmt: skip
        for sub, acc in (("base", 96.0), ("new", 94.0)):
            run(root, f"base2new/zs_{sub}/{d}", "ZeroshotCLIP", d, acc, shots=-1, seed=-1,
                sub=sub, backbone="ViT-B/16")  # fmt: skip
    return base, new


def test_base_to_new_h_from_seed_averages(tmp_path):
    root = str(tmp_path / "output")
    base, new = _b2n_tree(root)
    rep = _report(root)
    assert {r.protocol for r in rep.collected.runs} == {"base2new"}
    t = rep.base2new_table()
    for d, title in (("Caltech101", "Caltech101"), ("OxfordPets", "OxfordPets")):
        (row,) = _rows(t, Dataset=title, Method="CoOp")
        b, n = np.mean(base[d]), np.mean(new[d])
        assert _col(t, row, "Base (mean +- std)").mean == pytest.approx(b)
        assert _col(t, row, "New (mean +- std)").std == pytest.approx(np.std(new[d]))
        assert _col(t, row, "H") == pytest.approx(2 * b * n / (b + n))
        assert _col(t, row, "Seeds (base/new)") == "2/2"
    (row,) = _rows(t, Dataset="Caltech101", Method="CoOp")
    # CoCoOp Table 1's CoOp row for Caltech101: 98.00 / 89.81 / 93.73
    assert [_col(t, row, c) for c in ("Pub. base", "Pub. new", "Pub. H")] == [98.0, 89.81, 93.73]
    b, n = np.mean(base["Caltech101"]), np.mean(new["Caltech101"])
    assert _col(t, row, "Diff H") == pytest.approx(2 * b * n / (b + n) - 93.73)
    assert _col(t, row, "Diff base") == pytest.approx(b - 98.0)
    (zs,) = _rows(t, Dataset="OxfordPets", Method="ZeroshotCLIP")
    assert _col(t, zs, "H") == pytest.approx(2 * 96 * 94 / 190)
    assert _col(t, zs, "Pub. new") == 97.26
    assert not _rows(t, Dataset="Average")  # two of eleven datasets
    assert any("no 11-dataset average" in n and "ImageNet" in n for n in t.notes)


def test_base_to_new_average_row_uses_averaged_base_and_new(tmp_path):
    root = str(tmp_path / "output")
    bases, news = {}, {}
    for i, d in enumerate(ELEVEN):
        bases[d], news[d] = 70.0 + i, 60.0 + 2.5 * i
        for sub, acc in (("base", bases[d]), ("new", news[d])):
            run(root, f"{sub}/{d}", "ZeroshotCLIP", d, acc, shots=-1, seed=-1, sub=sub,
                backbone="ViT-B/16")  # fmt: skip
    t = _report(root).base2new_table()
    (avg,) = _rows(t, Dataset="Average")
    b, n = np.mean(list(bases.values())), np.mean(list(news.values()))
    assert _col(t, avg, "Base (mean +- std)") == pytest.approx(b)
    assert _col(t, avg, "H") == pytest.approx(2 * b * n / (b + n))
    per_dataset_h = np.mean([2 * bases[d] * news[d] / (bases[d] + news[d]) for d in ELEVEN])
    assert abs(_col(t, avg, "H") - per_dataset_h) > 0.01  # not the mean of the H column
    assert [_col(t, avg, c) for c in ("Pub. base", "Pub. new", "Pub. H")] == [69.34, 74.22, 71.70]
    assert _col(t, avg, "Status") == "V"


KG = {"N_CTX": 4, "CSC": False, "CLASS_TOKEN_POSITION": "end", "CTX_INIT": "a photo of a",
      "PREC": "fp16"}  # fmt: skip


def test_base_to_new_of_kgcoops_weight_folders(tmp_path):
    """KgCoOp's scripts: output/base2new/{train_base,test_new}/<d>/shots_16_<W>/KgCoOp/<cfg>/
    seed<S>, two weights side by side; the test script passes no W (its own config has the
    default 1.0) and loads its model by a relative --model-dir: each evaluation joins the
    weight of the model it loaded."""
    root = str(tmp_path)
    accs = {  # (W, dataset) -> per seed (base, new)
        ("8.0", "DescribableTextures"): [(80.0, 55.0), (81.0, 57.0)],
        ("4.0", "DescribableTextures"): [(82.0, 50.0), (84.0, 52.0)],
        ("8.0", "EuroSAT"): [(90.0, 70.0), (92.0, 74.0)],
    }
    cfg = "vit_b16_ep100_ctxv1"
    for (w, d), seeds in accs.items():
        for seed, (b, n) in enumerate(seeds, 1):
            common = f"{d.lower()}/shots_16_{w}/KgCoOp/{cfg}/seed{seed}"
            run(root, f"output/base2new/train_base/{common}", "KgCoOp", d, b, seed=seed,
                sub="base", backbone="ViT-B/16", node=dict(KG, W=float(w)), epochs=100)  # fmt: skip
            run(root, f"output/base2new/test_new/{common}", "KgCoOp", d, n, seed=seed, sub="new",
                backbone="ViT-B/16", node=dict(KG, W=1.0), epochs=100,
                model_dir=f"output/base2new/train_base/{common}")  # fmt: skip
    t = _report(str(tmp_path / "output")).base2new_table()
    assert len(t.rows) == 3
    for (w, d), seeds in accs.items():
        title = {"DescribableTextures": "DTD"}.get(d, d)
        (row,) = _rows(t, Dataset=title, Method=f"KgCoOp (W={w})")
        b, n = np.mean([s[0] for s in seeds]), np.mean([s[1] for s in seeds])
        assert _col(t, row, "Shots") == 16 and _col(t, row, "Seeds (base/new)") == "2/2"
        assert _col(t, row, "Base (mean +- std)").mean == pytest.approx(b)
        assert _col(t, row, "New (mean +- std)").mean == pytest.approx(n)
        assert _col(t, row, "H") == pytest.approx(2 * b * n / (b + n))


def test_base_to_new_of_prograds_4_shot_folders(tmp_path):
    """ProGrad's scripts: output/base2new/{train_base,test_new}/<d>/shots_4/ProGrad/rn50_ep100/
    seed<S> (ImageNet rn50_ep50), 4-shot training: a row at 4 shots."""
    root = str(tmp_path)
    accs = {("Caltech101", "rn50_ep100", 100): [(95.0, 90.0), (96.0, 91.0), (97.0, 92.5)],
            ("ImageNet", "rn50_ep50", 50): [(70.0, 64.0), (70.5, 65.0), (71.0, 66.0)]}  # fmt: skip
    for (d, cfg, epochs), seeds in accs.items():
        for seed, (b, n) in enumerate(seeds, 1):
            common = f"{d.lower()}/shots_4/ProGrad/{cfg}/seed{seed}"
            run(root, f"output/base2new/train_base/{common}", "ProGrad", d, b, shots=4,
                seed=seed, sub="base", epochs=epochs)  # fmt: skip
            run(root, f"output/base2new/test_new/{common}", "ProGrad", d, n, shots=4, seed=seed,
                sub="new", epochs=epochs, model_dir=f"output/base2new/train_base/{common}")  # fmt: skip
    t = _report(str(tmp_path / "output")).base2new_table()
    assert len(t.rows) == 2
    for (d, _, _), seeds in accs.items():
        (row,) = _rows(t, Dataset=d, Method="ProGrad")
        b, n = np.mean([s[0] for s in seeds]), np.mean([s[1] for s in seeds])
        assert _col(t, row, "Shots") == 4 and _col(t, row, "Seeds (base/new)") == "3/3"
        assert _col(t, row, "Backbone") == "RN50"
        assert _col(t, row, "H") == pytest.approx(2 * b * n / (b + n))


def _xd_tree(root):
    src = {1: 71.0, 2: 72.0}
    tgt = {"Caltech101": {1: 93.0, 2: 94.0}, "OxfordPets": {1: 89.0, 2: 88.0},
           "ImageNetV2": {1: 64.0, 2: 65.0}}  # fmt: skip
    for seed in (1, 2):
        run(root, f"output/imagenet/CoOp/vit_b16_ctxv1_16shots/seed{seed}", "CoOp", "ImageNet",
            src[seed], seed=seed, backbone="ViT-B/16", node=CTXV1, epochs=50)  # fmt: skip
        for d, accs in tgt.items():
            # the test scripts pass --model-dir relative to where they run
            run(root, f"output/evaluation/CoOp/vit_b16_ctxv1_16shots/{d}/seed{seed}", "CoOp",
                d, accs[seed], shots=-1, seed=seed, backbone="ViT-B/16", node=CTXV1,
                model_dir=f"output/imagenet/CoOp/vit_b16_ctxv1_16shots/seed{seed}")  # fmt: skip
    return src, tgt


def test_cross_dataset_and_dg_tables(tmp_path):
    root = str(tmp_path)
    src, tgt = _xd_tree(root)
    # zero-shot CLIP joins the table of its own backbone only
    for backbone, acc in (("ViT-B/16", 92.5), ("RN50", 86.0)):
        run(root, f"zs/{backbone[:3]}", "ZeroshotCLIP", "Caltech101", acc, shots=-1, seed=-1,
            backbone=backbone)  # fmt: skip
    rep = _report(root)
    protocols = {(r.dataset, r.protocol) for r in rep.collected.runs if r.trainer == "CoOp"}
    assert protocols == {("ImageNet", "fewshot"), ("Caltech101", "xd"), ("OxfordPets", "xd"),
                         ("ImageNetV2", "dg")}  # fmt: skip
    xd = rep.transfer_table("xd")
    assert xd.columns[4:7] == ["Source", "Caltech101", "OxfordPets"]
    (zs,) = _rows(xd, Row="ours", Method="ZeroshotCLIP")
    assert zs[1] == "ViT-B/16" and zs[4] is None and zs[5].mean == 92.5 and zs[6] is None
    (ours,) = _rows(xd, Row="ours", Method="CoOp")
    assert ours[4].mean == pytest.approx(np.mean(list(src.values())))
    assert ours[5].mean == pytest.approx(93.5) and ours[6].std == pytest.approx(0.5)
    assert ours[5].n == 2 and _col(xd, ours, "Shots") == 16  # from the loaded model's run
    assert _col(xd, ours, "Average") is None  # 2 of the 10 targets
    assert any("no target average" in n and "DTD" in n for n in xd.notes)
    (pub,) = _rows(xd, Row="published", Method="CoOp")
    assert [pub[4].value, pub[5].value, pub[6].value] == [71.51, 93.70, 89.14]
    assert pub[4].status == "R" and _col(xd, pub, "Average").value == 63.88
    (diff,) = _rows(xd, Row="difference", Method="CoOp")
    assert diff[4] == pytest.approx(71.5 - 71.51) and diff[6] == pytest.approx(88.5 - 89.14)
    dg = rep.transfer_table("dg")
    (ours,) = _rows(dg, Row="ours", Method="CoOp")
    assert dg.columns[5] == "ImageNetV2" and ours[5].mean == pytest.approx(64.5)
    (pub,) = _rows(dg, Row="published", Method="CoOp")
    assert pub[5].value == 64.20  # CoCoOp Table 3's CoOp row
    # the ImageNet training runs are also few-shot results
    (row,) = _rows(rep.fewshot_table(), Dataset="ImageNet")
    assert row[5].mean == pytest.approx(71.5)
    # the grid is per backbone, and a trained method's is that of the trained methods: the
    # ViT-B/16 CoOp misses no Caltech101 cell; zero-shot CLIP misses the source dataset
    cells = [r[2:5] for r in rep.missing_table().rows if r[0] == "cell"]
    assert cells == [["ImageNet", 0, "ZeroshotCLIP [ViT-B/16]"]]


def test_cli_prints_and_writes(fewshot_tree, tmp_path, capsys):
    out = str(tmp_path / "rep")
    assert main([fewshot_tree, "--format", "markdown", "--output-dir", out]) == 0
    printed = capsys.readouterr().out
    assert (
        printed.startswith("# Results") and f"wrote {os.path.join(out, 'fewshot.csv')}" in printed
    )
    assert main([fewshot_tree, "--format", "csv", "--no-published"]) == 0
    text = capsys.readouterr().out
    body = text.split("# fewshot\n", 1)[1].split("\n\n", 1)[0]
    rows = list(csv.DictReader(io.StringIO(body)))
    assert all(r["Published"] == "" for r in rows) and len(rows) == len(FEW) + len(ZS)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["{tmp}/nowhere"], "{tmp}/nowhere: no such folder"),
        (["{tmp}/empty"], "no run with a result"),
        (["{tree}", "--expected", "{tmp}/bad.json"], "bad.json: must hold a JSON list"),
        (["{tree}", "--published", "{tmp}/bad.csv"], "missing column(s)"),
        (["{tree}", "--metric", "top5"], "no run has the metric 'top5'"),
    ],
)
def test_bad_input_gets_one_clear_error(fewshot_tree, tmp_path, capsys, argv, message):
    os.makedirs(tmp_path / "empty")
    (tmp_path / "bad.json").write_text('{"a": 1}')
    (tmp_path / "bad.csv").write_text("table,method\nx,y\n")
    fill = {"tmp": str(tmp_path), "tree": fewshot_tree}
    assert main([a.format(**fill) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("coop-report: error: ") and message.format(**fill) in err
    assert err.count("\n") == 1


def test_expected_list_of_dry_run_objects(fewshot_tree, tmp_path, capsys):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps([{"output_dir": os.path.join(fewshot_tree, "x/seed9")}]))
    assert main([fewshot_tree, "--expected", str(plan)]) == 0
    assert f"{os.path.join(fewshot_tree, 'x/seed9')}: no result" in capsys.readouterr().out


def test_a_method_unknown_to_the_report_appears_from_its_results(tmp_path):
    """A new trainer with its own config node is grouped by what its results.json says."""
    root = str(tmp_path)
    for seed, w in ((1, 8.0), (2, 8.0), (1, 1.0)):
        out = run(root, f"kg/w{w}/seed{seed}", "KgCoOp", "DescribableTextures", 60 + seed + w,
                  seed=seed)  # fmt: skip
        with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
            res = json.load(f)
        res["config"]["TRAINER"]["KGCOOP"] = {"W": w}
        with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
            json.dump(res, f)
    t = _report(root).fewshot_table()
    assert sorted((r[0], r[2], r[4]) for r in t.rows) == [
        ("DTD", "KgCoOp (W=1.0)", 1), ("DTD", "KgCoOp (W=8.0)", 2)
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------
# Figures


def test_curves_plot_the_table_numbers_in_the_paper_style(fewshot_tree, tmp_path):
    from coop.report_figures import draw_figures, save_figures

    lp = {1: 70.0, 16: 88.0}
    for shots, acc in lp.items():
        run(fewshot_tree, f"lp/{shots}/seed1", "LinearProbeCLIP", "Caltech101", acc, shots=shots)
    rep = _report(fewshot_tree)
    figs = draw_figures(rep)
    assert {"Caltech101", "OxfordPets", "ImageNet", "DTD", "average"} <= set(figs)
    ax = figs["Caltech101"].axes[0]
    assert ax.get_title() == "Caltech101"
    assert list(ax.get_xticks()) == [0, 1, 2, 4, 8, 16]
    assert ax.get_facecolor()[:3] == pytest.approx((0xEB / 255,) * 3)
    assert ax.get_xlabel() == "Number of labeled training examples per class"
    assert ax.get_ylabel() == "Score (%)"
    lines = {ln.get_label(): ln for ln in ax.lines}
    end = lines[r"CLIP + CoOp ($M\!=\!16$, end)"]
    assert list(end.get_xdata()) == [1, 16] and end.get_color() == "C0"
    assert list(end.get_ydata()) == pytest.approx(
        [np.mean(FEW[("end", "Caltech101", 1)]), np.mean(FEW[("end", "Caltech101", 16)])]
    )
    mid = lines[r"CLIP + CoOp ($M\!=\!16$, mid)"]
    assert list(mid.get_xdata()) == [16] and mid.get_color() == "C2"
    probe = lines["Linear probe CLIP"]
    assert (probe.get_color(), probe.get_linestyle()) == ("C4", ":")
    assert list(probe.get_xdata()) == [1, 16] and list(probe.get_ydata()) == [70.0, 88.0]
    (star,) = [ln for ln in ax.lines if ln.get_marker() == "*"]
    assert list(star.get_xdata()) == [0] and list(star.get_ydata()) == [ZS["Caltech101"]]
    assert [t.get_text() for t in ax.texts] == ["Zero-shot\nCLIP"]
    values = [ZS["Caltech101"], *lp.values()]
    values += [np.mean(v) for k, v in FEW.items() if k[1] == "Caltech101"]
    span = max(values) - min(values)
    assert ax.get_ylim() == pytest.approx((min(values) - 0.05 * span, max(values) + 0.05 * span))
    assert ax.get_legend() is not None

    avg = figs["average"].axes[0]
    assert avg.get_title() == "Average over 11 datasets"
    assert avg.title.get_fontweight() == "bold"
    (star,) = [ln for ln in avg.lines if ln.get_marker() == "*"]
    assert star.get_ydata()[0] == pytest.approx(np.mean(list(ZS.values())))
    assert len([ln for ln in avg.lines if ln.get_marker() == "o"]) == 0  # CoOp: 2 of 11

    # the ablation of the class token position: end vs middle, over the common datasets
    abl = figs["ablation_CoOp_CLASS_TOKEN_POSITION"].axes[0]
    series = {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in abl.lines}
    pets_end_1 = np.mean([80.0, 81.0, 83.0])
    assert series["end"][0] == [1, 16] and series["end"][1][0] == pytest.approx(pets_end_1)
    assert series["middle"][1][1] == pytest.approx(
        np.mean([np.mean(FEW[("mid", "Caltech101", 16)]), np.mean(FEW[("mid", "OxfordPets", 16)])])
    )

    keep = ("Caltech101", "average", "ablation_CoOp_CLASS_TOKEN_POSITION")
    written = save_figures({k: figs[k] for k in keep}, str(tmp_path / "figs"))
    assert sorted(os.path.basename(p) for p in written) == sorted(
        f"{k}.{ext}" for k in keep for ext in ("png", "pdf")
    )
    for path in written:
        with open(path, "rb") as f:
            head = f.read(8)
        assert os.path.getsize(path) > 1000
        assert head == b"\x89PNG\r\n\x1a\n" if path.endswith(".png") else head.startswith(b"%PDF")


def test_curve_tables_hold_the_numbers_each_curve_draws(fewshot_tree):
    from coop.report import render_terminal
    from coop.report_figures import curve_tables

    run(fewshot_tree, "lp/1/seed1", "LinearProbeCLIP", "Caltech101", 70.0, shots=1)
    tables = {t.title: t for t in curve_tables(_report(fewshot_tree))}
    cal = tables["Caltech101: accuracy (%), mean over seeds"]
    assert cal.columns == ["Method", "Backbone", "Seeds", "0 shots", "1 shot", "16 shots"]
    rows = {r[0]: r[1:] for r in cal.rows}
    end, mid = "CoOp (CLASS_TOKEN_POSITION=end)", "CoOp (CLASS_TOKEN_POSITION=middle)"
    assert rows["ZeroshotCLIP"] == ["RN50", "1", ZS["Caltech101"], None, None]
    assert rows[end][:2] == ["RN50", "3"]
    assert rows[end][2:] == [None, pytest.approx(np.mean([85.0, 86.5, 84.1])),
                             pytest.approx(np.mean([91.81, 92.01, 92.17]))]  # fmt: skip
    assert rows[mid][2:] == [None, None, pytest.approx(np.mean([90.0, 91.0, 89.5]))]
    assert rows["LinearProbeCLIP"] == ["RN50", "1", None, 70.0, None]
    pets = tables["OxfordPets: accuracy (%), mean over seeds"]
    assert {r[0]: r[2] for r in pets.rows}[mid] == "2-3"  # seed 3 missing at 16 shots
    # the average: over the datasets there are (two), where a method has all of them
    avg = tables["Average over 11 datasets: accuracy (%), mean over seeds"]
    assert {r[0]: r[3] for r in avg.rows}["ZeroshotCLIP"] == pytest.approx(
        np.mean(list(ZS.values()))
    )
    text = render_terminal(cal)
    zs_row = ["ZeroshotCLIP", "RN50", "1", f"{ZS['Caltech101']:.2f}", "-", "-"]
    assert zs_row in [ln.split() for ln in text.splitlines()]


def test_cli_figures(tmp_path, capsys):
    tree = _fewshot_tree(str(tmp_path / "output"), zs_datasets=("Caltech101",))
    figs = str(tmp_path / "curves")
    assert main([tree, "--figures", figs]) == 0
    stems = ["Caltech101", "OxfordPets", "average", "ablation_CoOp_CLASS_TOKEN_POSITION"]
    assert sorted(os.listdir(figs)) == sorted(f"{s}.{e}" for s in stems for e in ("pdf", "png"))
    assert f"wrote {os.path.join(figs, 'average.png')}" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------
# A real run


def test_report_over_real_tiny_runs(data_root, tiny_rn, tmp_path, capsys):
    """coop-train on the tiny fixtures, two seeds and zero-shot CLIP; one run keeps only its
    log.txt. The report's numbers are the runs' own."""
    from helpers_train import coop_argv, read_results, zeroshot_argv

    from coop.train import main as train

    out = str(tmp_path / "output")
    accs = []
    for seed in (1, 2):
        run_dir = os.path.join(out, "caltech101", f"seed{seed}")
        assert train(coop_argv(data_root, run_dir, tiny_rn, seed, 1, "OPTIM.MAX_EPOCH", "1")) == 0
        accs.append(read_results(run_dir)["metrics"]["accuracy"])
    zs_dir = os.path.join(out, "zeroshot")
    assert train(zeroshot_argv(data_root, zs_dir, tiny_rn)) == 0
    zs = read_results(zs_dir)["metrics"]["accuracy"]
    os.remove(os.path.join(out, "caltech101", "seed2", "results.json"))
    accs[1] = round(accs[1], 1)  # read from the log: one decimal
    capsys.readouterr()

    assert main([out, "--format", "csv", "--figures", str(tmp_path / "figs")]) == 0
    text = capsys.readouterr().out
    body = text.split("# fewshot\n", 1)[1].split("\n\n", 1)[0]
    rows = {(r["Method"], r["Shots"]): r for r in csv.DictReader(io.StringIO(body))}
    coop = rows[("CoOp", "1")]
    assert coop["Seeds"] == "2" and coop["Dataset"] == "Caltech101"
    assert coop["Backbone"] == "tiny_rn.pt"
    assert float(coop["accuracy (mean +- std)"]) == pytest.approx(np.mean(accs), abs=1e-4)
    assert float(coop["accuracy (mean +- std) std"]) == pytest.approx(np.std(accs), abs=1e-4)
    assert float(rows[("ZeroshotCLIP", "0")]["accuracy (mean +- std)"]) == pytest.approx(zs)
    # a checkpoint file says nothing of the backbone: no published number unless asked
    assert rows[("ZeroshotCLIP", "0")]["Published"] == ""
    assert os.path.getsize(tmp_path / "figs" / "Caltech101.png") > 0

    assert main([out, "--published-backbone", "RN50"]) == 0
    printed = capsys.readouterr().out
    line = next(ln for ln in printed.splitlines() if ln.startswith("Caltech101  0"))
    assert "86.29" in line and f"{zs - 86.29:.2f}" in line
