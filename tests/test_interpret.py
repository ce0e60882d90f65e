"""coop-interpret (coop/interpret.py): nearest vocabulary words of a learned context."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from coop.clip_adapter import get_tokenizer, load_clip
from coop.interpret import find_checkpoint, main

WORDS = ["photo</w>", "a</w>", "of</w>", "dog</w>"]


@pytest.fixture(scope="module")
def embedding(tiny_vit):
    return load_clip(tiny_vit).token_embedding.weight.detach().float()


def _ids(words):
    return [get_tokenizer().encoder[w] for w in words]


def _run_dir(tmp_path, ctx, backbone, epoch=5):
    """A coop-train-like output folder: prompt_learner/model.pth.tar-<epoch>, its pointer,
    and results.json naming the backbone."""
    run = tmp_path / "run"
    (run / "prompt_learner").mkdir(parents=True)
    torch.save(
        {"state_dict": {"ctx": ctx}, "epoch": epoch},
        run / "prompt_learner" / f"model.pth.tar-{epoch}",
    )
    (run / "prompt_learner" / "checkpoint").write_text(f"model.pth.tar-{epoch}\n")
    (run / "results.json").write_text(json.dumps({"backbone": backbone}))
    return str(run)


def _brute_force(vec, emb, k):
    d = np.sqrt(((emb.numpy().astype(np.float64) - vec.numpy().astype(np.float64)) ** 2).sum(1))
    order = np.argsort(d, kind="stable")[:k]
    return order, d[order]


def test_copies_of_token_embeddings_are_their_own_nearest_words(
    tiny_vit, embedding, tmp_path, capsys
):
    ctx = embedding[_ids(WORDS)].clone()  # (4, 64): each row is a token's embedding
    run = _run_dir(tmp_path, ctx, tiny_vit)
    out = str(tmp_path / "words.json")
    assert main([run, "3", "--output", out]) == 0  # the backbone comes from results.json
    printed = capsys.readouterr().out.splitlines()
    assert printed[:3] == [
        "Return the top-3 matched words",
        "Size of token embedding: torch.Size([49408, 64])",
        "Size of context: torch.Size([4, 64])",
    ]
    with open(out, encoding="utf-8") as f:
        res = json.load(f)
    assert res["backbone"] == tiny_vit and res["metric"] == "euclidean"
    assert res["class_specific"] is False and res["checkpoint"].endswith("model.pth.tar-5")
    decoder = get_tokenizer().decoder
    for m, (word, pos) in enumerate(zip(WORDS, res["positions"])):
        assert pos["position"] == m + 1
        assert pos["words"][0] == word and pos["distances"][0] == 0.0
        order, dist = _brute_force(ctx[m], embedding, 3)
        assert pos["words"] == [decoder[int(i)] for i in order]
        assert pos["distances"] == pytest.approx(dist.tolist(), rel=1e-5)
        line = f"{m + 1}: {pos['words']} {['0.0000'] + [f'{d:.4f}' for d in dist[1:]]}"
        assert printed[3 + m] == line


def test_cosine_metric_ranks_by_direction(tiny_vit, embedding, tmp_path):
    ids = _ids(WORDS[:2])
    ctx = embedding[ids] * 3.0  # same directions, three times as long
    path = str(tmp_path / "ctx.pth")
    torch.save({"state_dict": {"ctx": ctx}}, path)
    outs = {}
    for metric in ("cosine", "euclidean"):
        outs[metric] = str(tmp_path / f"{metric}.json")
        argv = [path, "1", "--backbone", tiny_vit, "--metric", metric, "--output", outs[metric]]
        assert main(argv) == 0
    cos = json.load(open(outs["cosine"], encoding="utf-8"))["positions"]
    assert [p["words"][0] for p in cos] == WORDS[:2]
    assert all(abs(p["distances"][0]) < 1e-6 for p in cos)
    euc = json.load(open(outs["euclidean"], encoding="utf-8"))["positions"]
    assert all(p["distances"][0] > 0 for p in euc)  # a longer vector is not at distance 0


def test_class_specific_context_gives_words_per_class_and_position(
    tiny_vit, embedding, tmp_path, capsys
):
    ctx = torch.stack([embedding[_ids(WORDS[:2])], embedding[_ids(WORDS[2:])]])  # (2, 2, 64)
    run = _run_dir(tmp_path, ctx, tiny_vit)
    out = str(tmp_path / "csc.json")
    assert main([run, "2", "--output", out]) == 0
    printed = capsys.readouterr().out
    assert "Class 0:\n1: ['photo</w>'" in printed and "Class 1:\n1: ['of</w>'" in printed
    res = json.load(open(out, encoding="utf-8"))
    assert res["class_specific"] is True and len(res["classes"]) == 2
    firsts = [[p["words"][0] for p in positions] for positions in res["classes"]]
    assert firsts == [WORDS[:2], WORDS[2:]]


def test_the_checkpoint_of_a_run_folder(tmp_path):
    folder = tmp_path / "run" / "prompt_learner"
    folder.mkdir(parents=True)
    for n in (2, 10):
        (folder / f"model.pth.tar-{n}").write_bytes(b"")
    run = str(tmp_path / "run")
    assert find_checkpoint(run).endswith("model.pth.tar-10")  # no pointer: the last epoch
    (folder / "checkpoint").write_text("model.pth.tar-2\n")
    assert find_checkpoint(run).endswith("model.pth.tar-2")
    assert find_checkpoint(run, load_epoch=10).endswith("model.pth.tar-10")
    with pytest.raises(FileNotFoundError, match=r"--load-epoch 3"):
        find_checkpoint(run, load_epoch=3)


def test_bad_input_is_one_clear_error(tiny_vit, tmp_path, capsys):
    missing = str(tmp_path / "nope")
    assert main([missing]) == 2
    assert "is neither a checkpoint file nor a run folder" in capsys.readouterr().err

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty)]) == 2
    assert "No prompt-learner checkpoint in" in capsys.readouterr().err

    no_ctx = str(tmp_path / "lp.pth")
    torch.save({"state_dict": {"weight": torch.zeros(3, 64), "bias": torch.zeros(3)}}, no_ctx)
    assert main([no_ctx, "--backbone", tiny_vit]) == 2
    err = capsys.readouterr().err
    assert "has no 'ctx'" in err and "['bias', 'weight']" in err

    narrow = str(tmp_path / "narrow.pth")
    torch.save({"state_dict": {"ctx": torch.zeros(4, 32)}}, narrow)
    assert main([narrow, "--backbone", tiny_vit, "--output", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert "are 32-wide, but the token embeddings of CLIP" in err and "64-wide" in err
    assert not os.path.exists(tmp_path / "x.json")
