"""The published numbers: typed in as published.md gives them, consistent where the spec says
they are, looked up by method, backbone and cell, and extendable from a CSV."""

from __future__ import annotations

import numpy as np
import pytest

from coop.published import (
    ELEVEN,
    METHODS,
    SOURCES,
    STATUSES,
    XD_TARGETS,
    PublishedError,
    PublishedIndex,
    published_numbers,
    read_published_csv,
    with_extra,
)


def _values(table_prefix, method, metric="accuracy", datasets=ELEVEN, backbone=None):
    out = {
        p.dataset: p.value
        for p in published_numbers()
        if p.table.startswith(table_prefix)
        and p.method == method
        and p.metric == metric
        and p.dataset in datasets
        and (backbone is None or p.backbone == backbone)
    }
    assert set(out) == set(datasets), (table_prefix, method, metric)
    return out


def _one(table_prefix, method, dataset, metric="accuracy", backbone=None):
    (p,) = [
        p
        for p in published_numbers()
        if p.table.startswith(table_prefix)
        and p.method == method
        and p.dataset == dataset
        and p.metric == metric
        and (backbone is None or p.backbone == backbone)
    ]
    return p


def test_every_number_has_a_known_method_source_and_status():
    numbers = published_numbers()
    assert len(numbers) > 250
    for p in numbers:
        assert p.method in METHODS and p.source in SOURCES and p.status in STATUSES
        assert 0 < p.value < 100 and p.protocol in ("fewshot", "base2new", "xd", "dg")
    keys = [(p.table, p.method, p.backbone, p.protocol, p.dataset, p.shots, p.metric)
            for p in numbers]  # fmt: skip
    assert len(keys) == len(set(keys))


@pytest.mark.parametrize(
    "method, stated", [("Zero-shot CLIP", 58.77), ("CoOp M=16", 73.42)]
)  # fmt: skip
def test_coop_16_shot_columns_recompute_to_their_averages(method, stated):
    values = _values("CoOp IJCV Fig. 3", method)
    assert np.mean(list(values.values())) == pytest.approx(stated, abs=0.005)
    assert _one("CoOp IJCV Fig. 3", method, "Average").value == stated


def test_coop_md_example_is_the_population_std_of_its_seeds():
    p = _one("CoOp COOP.md", "CoOp M=16", "Caltech101")
    seeds = [91.81, 92.01, 92.17]
    assert (p.value, p.status) == (92.00, "V")
    assert round(np.mean(seeds), 2) == p.value and round(np.std(seeds), 2) == 0.15


@pytest.mark.parametrize("method", ["Zero-shot CLIP", "CoOp", "CoCoOp"])
def test_cocoop_base_to_new_rows_recompute_to_the_verified_averages(method):
    base = _values("CoCoOp Table 1", method, "base")
    new = _values("CoCoOp Table 1", method, "new")
    h = _values("CoCoOp Table 1", method, "H")
    avg = {m: _one("CoCoOp Table 1", method, "Average", m) for m in ("base", "new", "H")}
    assert {p.status for p in avg.values()} == {"V"}
    b, n = np.mean(list(base.values())), np.mean(list(new.values()))
    assert b == pytest.approx(avg["base"].value, abs=0.01)
    assert n == pytest.approx(avg["new"].value, abs=0.01)
    # the average H is the harmonic mean of the averages, not the mean of the H column
    assert 2 * b * n / (b + n) == pytest.approx(avg["H"].value, abs=0.01)
    assert abs(np.mean(list(h.values())) - avg["H"].value) > 0.1
    for d in ELEVEN:  # each row's H is its own base and new's harmonic mean
        assert 2 * base[d] * new[d] / (base[d] + new[d]) == pytest.approx(h[d], abs=0.01)


def test_readme_base_to_new_averages_have_consistent_h():
    for p in published_numbers():
        if p.table.startswith("Base-to-new averages") and p.metric == "base":
            n = _one(p.table, p.method, "Average", "new").value
            h = _one(p.table, p.method, "Average", "H").value
            assert 2 * p.value * n / (p.value + n) == pytest.approx(h, abs=0.01), p.method
    assert _one("Base-to-new averages", "ProGrad", "Average", "base").status == "X"
    assert _one("Base-to-new averages", "KgCoOp", "Average", "H").value == 77.0


@pytest.mark.parametrize("method, stated", [("CoOp", 63.88), ("CoCoOp", 65.74)])
def test_cross_dataset_targets_recompute_to_their_averages(method, stated):
    targets = _values("CoCoOp Table 2", method, datasets=XD_TARGETS)
    assert np.mean(list(targets.values())) == pytest.approx(stated, abs=0.005)


def test_verified_cells_of_the_dg_table():
    verified = {
        (p.backbone, p.method, p.dataset): p.value
        for p in published_numbers()
        if p.table.startswith("CoOp IJCV Table 1") and p.status == "V"
    }
    assert verified == {
        ("RN50", "Zero-shot CLIP", "ImageNet"): 58.18,
        ("RN50", "Linear probe CLIP", "ImageNet"): 55.87,
        ("RN50", "CoOp M=16", "ImageNet"): 62.95,
        ("ViT-B/32", "CoOp M=16", "ImageNet"): 66.85,
    }
    assert _one("CoOp IJCV Table 1", "CoOp M=4", "ImageNetR", backbone="ViT-B/16").value == 75.21


def test_lookup_picks_the_most_specific_method_and_a_verified_number():
    idx = PublishedIndex()
    cfg = {"TRAINER.COOP.N_CTX": 16, "TRAINER.COOP.CSC": False,
           "TRAINER.COOP.CLASS_TOKEN_POSITION": "end", "TRAINER.COOP.CTX_INIT": ""}  # fmt: skip
    # Caltech101: COOP.md's verified 92.00 before the recalled 91.83
    p = idx.lookup("CoOp", cfg, "RN50", "fewshot", "Caltech101", 16, "accuracy")
    assert (p.value, p.status) == (92.00, "V")
    p = idx.lookup("CoOp", cfg, "RN50", "fewshot", "Food101", 16, "accuracy")
    assert (p.value, p.status) == (74.67, "R")
    assert idx.lookup("CoOp", cfg, "RN50", "fewshot", "Food101", 8, "accuracy") is None
    assert idx.lookup("CoOp", cfg, "RN101", "fewshot", "Food101", 16, "accuracy") is None
    mid = dict(cfg, **{"TRAINER.COOP.CLASS_TOKEN_POSITION": "middle"})
    assert idx.lookup("CoOp", mid, "RN50", "fewshot", "Food101", 16, "accuracy") is None
    four = dict(cfg, **{"TRAINER.COOP.N_CTX": 4})
    assert idx.lookup("CoOp", four, "RN50", "dg", "ImageNetA", 16, "accuracy").value == 23.06
    ctxv1 = dict(cfg, **{"TRAINER.COOP.CTX_INIT": "a photo of a"})
    assert idx.lookup("CoOp", ctxv1, "ViT-B/16", "dg", "ImageNetA", 16, "accuracy").value == 49.71
    assert idx.lookup("CoOp", cfg, "ViT-B/16", "dg", "ImageNetA", 16, "accuracy").value == 48.41
    # a zero-shot method's number holds at any shot count
    p = idx.lookup("ZeroshotCLIP", {}, "RN50", "fewshot", "DescribableTextures", 0, "accuracy")
    assert p.value == 42.32
    assert idx.lookup("ZeroshotCLIP", {}, "ViT-B/16", "base2new", "Average", 16, "H").value == 71.70


def test_a_csv_adds_numbers_and_methods(tmp_path):
    path = tmp_path / "extra.csv"
    path.write_text(
        "table,method,backbone,protocol,dataset,shots,metric,value,status,source,trainer,where\n"
        "sheet,CoOp M=16,RN50,fewshot,Food101,8,accuracy,73.1,R,spreadsheet,,\n"
        "sheet,Mine,RN50,fewshot,Food101,8,accuracy,75.5,V,my paper,MyTrainer,TRAINER.MY.K=3\n"
    )
    numbers, methods = read_published_csv(str(path))
    assert [p.value for p in numbers] == [73.1, 75.5]
    assert methods["Mine"].trainer == "MyTrainer" and methods["Mine"].where == (
        ("TRAINER.MY.K", "3"),
    )
    idx = with_extra([str(path)])
    cfg = {"TRAINER.COOP.N_CTX": 16, "TRAINER.COOP.CSC": False,
           "TRAINER.COOP.CLASS_TOKEN_POSITION": "end", "TRAINER.COOP.CTX_INIT": ""}  # fmt: skip
    assert idx.lookup("CoOp", cfg, "RN50", "fewshot", "Food101", 8, "accuracy").value == 73.1
    got = idx.lookup("MyTrainer", {"TRAINER.MY.K": 3}, "RN50", "fewshot", "Food101", 8, "accuracy")
    assert got.value == 75.5
    assert (
        idx.lookup("MyTrainer", {"TRAINER.MY.K": 4}, "RN50", "fewshot", "Food101", 8, "accuracy")
        is None
    )


@pytest.mark.parametrize(
    "body, message",
    [
        ("table,method\n", "missing column(s) backbone, protocol"),
        ("t,Nobody,RN50,fewshot,DTD,1,accuracy,1,V,s\n", "line 2: unknown method 'Nobody'"),
        ("t,CoOp M=16,RN50,fewshot,DTD,1,accuracy,high,V,s\n", "line 2: value and shots must"),
        ("t,CoOp M=16,RN50,fewshot,DTD,1,accuracy,1,maybe,s\n", "line 2: status is one of"),
    ],
)
def test_a_bad_csv_gets_one_clear_error(tmp_path, body, message):
    path = tmp_path / "bad.csv"
    header = "table,method,backbone,protocol,dataset,shots,metric,value,status,source\n"
    path.write_text(body if body.startswith("table") else header + body)
    with pytest.raises(PublishedError, match=r"bad\.csv") as e:
        read_published_csv(str(path))
    assert message in str(e.value)
