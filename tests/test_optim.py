"""Optimizers and LR schedules (protocol §(d) optimizer defaults, §(e) "LR scheduler").

Expected values come from the spec's closed forms and worked examples, and from torch's own
schedulers where the spec says the successor *is* torch's scheduler.
"""

from __future__ import annotations

import math

import pytest
import torch

from coop.config import get_cfg_default, merge_from_file
from coop.optim import build_lr_scheduler, build_optimizer

BASE = 0.002
CONS = 1e-5


def _optim_cfg(**overrides):
    cfg = get_cfg_default()
    for k, v in overrides.items():
        setattr(cfg.OPTIM, k, v)
    return cfg.OPTIM


def _coop_cfg(path: str = "configs/trainers/CoOp/rn50_ep50.yaml"):
    cfg = get_cfg_default()
    merge_from_file(cfg, path)
    return cfg.OPTIM


def _param() -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.zeros(4))


def _build(optim_cfg):
    optim = build_optimizer([_param()], optim_cfg)
    return optim, build_lr_scheduler(optim, optim_cfg)


def _epoch_lrs(optim, sched, n_epochs: int):
    """The LR used during each epoch: read before the end-of-epoch ``sched.step()``."""
    lrs = []
    for _ in range(n_epochs):
        lrs.append(optim.param_groups[0]["lr"])
        optim.step()
        sched.step()
    return lrs


def _cosine(e: int, n: int, w: int, base: float = BASE) -> float:
    """Spec §(e): epoch e >= W + 1 runs at base * 1/2 * (1 + cos(pi (e - W - 1) / N))."""
    return base * 0.5 * (1 + math.cos(math.pi * (e - w - 1) / n))


def _assert_rel(actual, expected, rel=1e-12):
    assert len(actual) == len(expected)
    for i, (a, b) in enumerate(zip(actual, expected)):
        assert a == pytest.approx(b, rel=rel, abs=0), f"epoch {i + 1}: {a!r} != {b!r}"


# --------------------------------------------------------------------------------------------
# CoOp's schedule: constant warmup (1 epoch at 1e-5) + cosine, from the shipped YAML


def test_coop_yaml_schedule_matches_closed_form_every_epoch():
    ocfg = _coop_cfg()
    assert ocfg.MAX_EPOCH == 50
    optim, sched = _build(ocfg)
    lrs = _epoch_lrs(optim, sched, 50)
    expected = [CONS] + [_cosine(e, 50, 1) for e in range(2, 51)]
    _assert_rel(lrs, expected, rel=1e-12)


def test_coop_yaml_schedule_worked_values_n50():
    optim, sched = _build(_coop_cfg())
    lrs = _epoch_lrs(optim, sched, 50)
    assert lrs[0] == CONS
    assert lrs[1] == pytest.approx(2.0e-3, rel=1e-12)
    # the spec's values are given to 7 significant digits
    assert lrs[3 - 1] == pytest.approx(1.998027e-3, rel=5e-7)
    assert lrs[27 - 1] == pytest.approx(1.0e-3, rel=5e-7)
    assert lrs[50 - 1] == pytest.approx(7.885299e-6, rel=5e-7)
    # the last epoch still runs at a positive rate: the cosine never reaches 0
    assert lrs[-1] > 0


def test_coop_schedule_worked_values_n10():
    ocfg = _coop_cfg()
    ocfg.MAX_EPOCH = 10
    optim, sched = _build(ocfg)
    lrs = _epoch_lrs(optim, sched, 10)
    spec = [
        1e-5,
        2.0e-3,
        1.951057e-3,
        1.809017e-3,
        1.587785e-3,
        1.309017e-3,
        1.0e-3,
        6.909830e-4,
        4.122147e-4,
        1.909830e-4,
    ]
    _assert_rel(lrs, spec, rel=5e-7)
    _assert_rel(lrs, [CONS] + [_cosine(e, 10, 1) for e in range(2, 11)])


def test_after_warmup_equals_torch_cosine_bitwise():
    """The successor is torch's own recursive CosineAnnealingLR(T_max=N): same bits."""
    optim, sched = _build(_coop_cfg())
    lrs = _epoch_lrs(optim, sched, 50)

    ref_opt = torch.optim.SGD([_param()], lr=BASE, momentum=0.9)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, T_max=50.0)
    ref_lrs = _epoch_lrs(ref_opt, ref, 49)
    assert lrs[1:] == ref_lrs  # exact float equality, epoch by epoch


def test_warmup_only_affects_first_epochs_then_full_base_rate():
    optim, sched = _build(_coop_cfg())
    lrs = _epoch_lrs(optim, sched, 3)
    assert lrs[0] == CONS
    assert lrs[1] == BASE  # epoch W + 1 runs at the full base rate


# --------------------------------------------------------------------------------------------
# Linear warmup, other warmup lengths, WARMUP_RECOUNT


@pytest.mark.parametrize("w", [1, 3, 4])
def test_linear_warmup(w):
    n = 12
    ocfg = _coop_cfg()
    ocfg.MAX_EPOCH = n
    ocfg.WARMUP_EPOCH = w
    ocfg.WARMUP_TYPE = "linear"
    ocfg.WARMUP_MIN_LR = 3e-6
    optim, sched = _build(ocfg)
    lrs = _epoch_lrs(optim, sched, n)
    expected = []
    for e in range(1, n + 1):
        if e == 1:
            expected.append(3e-6)
        elif e <= w:
            expected.append(BASE * (e - 1) / w)
        else:
            expected.append(_cosine(e, n, w))
    _assert_rel(lrs, expected)


@pytest.mark.parametrize("w", [2, 3])
def test_constant_warmup_longer(w):
    n = 10
    ocfg = _coop_cfg()
    ocfg.MAX_EPOCH = n
    ocfg.WARMUP_EPOCH = w
    optim, sched = _build(ocfg)
    lrs = _epoch_lrs(optim, sched, n)
    expected = [CONS] * w + [_cosine(e, n, w) for e in range(w + 1, n + 1)]
    _assert_rel(lrs, expected)


def test_no_warmup_is_plain_cosine():
    ocfg = _coop_cfg()
    ocfg.MAX_EPOCH = 10
    ocfg.WARMUP_EPOCH = -1
    optim, sched = _build(ocfg)
    assert isinstance(sched, torch.optim.lr_scheduler.CosineAnnealingLR)
    lrs = _epoch_lrs(optim, sched, 10)
    _assert_rel(lrs, [BASE * 0.5 * (1 + math.cos(math.pi * (e - 1) / 10)) for e in range(1, 11)])


def test_warmup_recount_false_sets_successor_last_epoch():
    """Spec: with WARMUP_RECOUNT False the successor's last_epoch is first set to W.

    The successor is then torch's recursive cosine stepped from last_epoch = W, so after the
    handover epoch (which runs at base) the rate follows
    base * (1 + cos(pi (e - 1) / N)) / (1 + cos(pi W / N)).
    """
    n, w = 10, 1
    ocfg = _coop_cfg()
    ocfg.MAX_EPOCH = n
    ocfg.WARMUP_RECOUNT = False
    optim, sched = _build(ocfg)
    lrs = _epoch_lrs(optim, sched, n)

    # reference: torch's own scheduler given the same treatment
    ref_opt = torch.optim.SGD([_param()], lr=BASE)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, T_max=float(n))
    ref.last_epoch = w
    ref_lrs = _epoch_lrs(ref_opt, ref, n - w)
    assert lrs[0] == CONS
    assert lrs[w:] == ref_lrs

    expected = [CONS, BASE] + [
        BASE * (1 + math.cos(math.pi * (e - 1) / n)) / (1 + math.cos(math.pi * w / n))
        for e in range(3, n + 1)
    ]
    _assert_rel(lrs, expected, rel=1e-12)
    # it differs from the recounted schedule
    ocfg.WARMUP_RECOUNT = True
    o2, s2 = _build(ocfg)
    assert _epoch_lrs(o2, s2, n)[2:] != lrs[2:]


# --------------------------------------------------------------------------------------------
# single_step / multi_step


def test_single_step_default_stepsize_is_max_epoch():
    """STEPSIZE (-1,) -> step = MAX_EPOCH: no decay happens within the run."""
    ocfg = _optim_cfg(NAME="sgd", LR=0.01, MAX_EPOCH=6)
    assert tuple(ocfg.STEPSIZE) == (-1,)
    assert ocfg.LR_SCHEDULER == "single_step"
    optim, sched = _build(ocfg)
    assert isinstance(sched, torch.optim.lr_scheduler.StepLR)
    assert _epoch_lrs(optim, sched, 6) == [0.01] * 6
    # the decay is applied by the step after the last epoch
    assert optim.param_groups[0]["lr"] == pytest.approx(0.001, rel=1e-12)


def test_single_step_uses_last_stepsize_entry():
    ocfg = _optim_cfg(NAME="sgd", LR=0.01, MAX_EPOCH=8, STEPSIZE=(99, 3), GAMMA=0.5)
    optim, sched = _build(ocfg)
    lrs = _epoch_lrs(optim, sched, 8)
    _assert_rel(lrs, [0.01 * 0.5 ** ((e - 1) // 3) for e in range(1, 9)])


def test_multi_step():
    ocfg = _optim_cfg(
        NAME="sgd", LR=0.01, MAX_EPOCH=8, LR_SCHEDULER="multi_step", STEPSIZE=(2, 5), GAMMA=0.1
    )
    optim, sched = _build(ocfg)
    assert isinstance(sched, torch.optim.lr_scheduler.MultiStepLR)
    lrs = _epoch_lrs(optim, sched, 8)
    expected = [0.01 * 0.1 ** sum(e - 1 >= m for m in (2, 5)) for e in range(1, 9)]
    _assert_rel(lrs, expected)


def test_single_step_after_linear_warmup():
    ocfg = _optim_cfg(
        NAME="sgd",
        LR=0.01,
        MAX_EPOCH=10,
        STEPSIZE=(3,),
        GAMMA=0.1,
        WARMUP_EPOCH=2,
        WARMUP_TYPE="linear",
        WARMUP_MIN_LR=1e-4,
    )
    optim, sched = _build(ocfg)
    lrs = _epoch_lrs(optim, sched, 10)
    expected = [1e-4, 0.01 * 1 / 2] + [0.01 * 0.1 ** ((e - 3) // 3) for e in range(3, 11)]
    _assert_rel(lrs, expected)


# --------------------------------------------------------------------------------------------
# Bad names


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("LR_SCHEDULER", "cosin", ["single_step", "multi_step", "cosine"]),
        ("NAME", "sgdd", ["adam", "sgd", "adamw"]),
    ],
)
def test_bad_names_raise_value_error_listing_allowed(field, value, allowed):
    ocfg = _coop_cfg()
    setattr(ocfg, field, value)
    with pytest.raises(ValueError) as ei:
        optim = build_optimizer([_param()], ocfg)
        build_lr_scheduler(optim, ocfg)
    msg = str(ei.value)
    assert value in msg
    for name in allowed:
        assert name in msg


def test_bad_warmup_type_raises():
    ocfg = _coop_cfg()
    ocfg.WARMUP_TYPE = "exponential"
    optim = build_optimizer([_param()], ocfg)
    with pytest.raises(ValueError) as ei:
        build_lr_scheduler(optim, ocfg)
    msg = str(ei.value)
    assert "exponential" in msg and "constant" in msg and "linear" in msg


# --------------------------------------------------------------------------------------------
# Optimizer kinds with Dassl's defaults


def test_sgd_uses_dassl_defaults():
    ocfg = _coop_cfg()
    p = _param()
    optim = build_optimizer([p], ocfg)
    assert type(optim) is torch.optim.SGD
    assert len(optim.param_groups) == 1
    g = optim.param_groups[0]
    assert g["params"] == [p]
    assert g["lr"] == 0.002
    assert g["momentum"] == 0.9
    assert g["dampening"] == 0
    assert g["nesterov"] is False
    assert g["weight_decay"] == 5e-4


def test_sgd_takes_a_module():
    module = torch.nn.Linear(3, 2)
    optim = build_optimizer(module, _coop_cfg())
    assert len(optim.param_groups) == 1
    assert [id(p) for p in optim.param_groups[0]["params"]] == [id(p) for p in module.parameters()]


def test_adam_is_the_default_with_betas():
    ocfg = _optim_cfg()
    assert ocfg.NAME == "adam"
    optim = build_optimizer([_param()], ocfg)
    assert type(optim) is torch.optim.Adam
    g = optim.param_groups[0]
    assert g["lr"] == 0.0003
    assert tuple(g["betas"]) == (0.9, 0.999)
    assert g["weight_decay"] == 5e-4
    assert g["amsgrad"] is False


def test_adam_custom_betas():
    optim = build_optimizer([_param()], _optim_cfg(ADAM_BETA1=0.8, ADAM_BETA2=0.95))
    assert tuple(optim.param_groups[0]["betas"]) == (0.8, 0.95)


def test_adamw():
    optim = build_optimizer([_param()], _optim_cfg(NAME="adamw", LR=0.01))
    assert type(optim) is torch.optim.AdamW
    g = optim.param_groups[0]
    assert g["lr"] == 0.01
    assert tuple(g["betas"]) == (0.9, 0.999)
    assert g["weight_decay"] == 5e-4


@pytest.mark.parametrize(
    "name, cls", [("amsgrad", torch.optim.Adam), ("rmsprop", torch.optim.RMSprop)]
)
def test_other_optimizers(name, cls):
    optim = build_optimizer([_param()], _optim_cfg(NAME=name))
    assert type(optim) is cls
    if name == "amsgrad":
        assert optim.param_groups[0]["amsgrad"] is True
    else:
        assert optim.param_groups[0]["momentum"] == 0.9
        assert optim.param_groups[0]["alpha"] == 0.99


# --------------------------------------------------------------------------------------------
# State dicts: weights_only round trip and exact continuation on resume


def _save_load(obj, path):
    torch.save(obj, path)
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize(
    "overrides, stop_after",
    [
        ({}, 1),  # right after the warmup epoch
        ({}, 2),
        ({}, 7),
        ({"WARMUP_TYPE": "linear", "WARMUP_EPOCH": 3}, 2),  # inside the warmup
        ({"WARMUP_TYPE": "linear", "WARMUP_EPOCH": 3}, 3),
        ({"WARMUP_TYPE": "linear", "WARMUP_EPOCH": 3}, 6),
        ({"WARMUP_EPOCH": -1}, 4),  # plain torch cosine
        ({"LR_SCHEDULER": "multi_step", "STEPSIZE": (3, 6), "WARMUP_EPOCH": 2}, 4),
    ],
)
def test_resume_continues_the_schedule_exactly(tmp_path, overrides, stop_after):
    n = 12
    ocfg = _coop_cfg()
    ocfg.MAX_EPOCH = n
    for k, v in overrides.items():
        setattr(ocfg, k, v)

    optim, sched = _build(ocfg)
    full = _epoch_lrs(optim, sched, n)

    optim1, sched1 = _build(ocfg)
    first = _epoch_lrs(optim1, sched1, stop_after)
    opt_state = _save_load(optim1.state_dict(), tmp_path / "optim.pt")
    sched_state = _save_load(sched1.state_dict(), tmp_path / "sched.pt")

    optim2, sched2 = _build(ocfg)  # a fresh process would build these from the config
    optim2.load_state_dict(opt_state)
    sched2.load_state_dict(sched_state)
    assert sched2.get_last_lr() == sched1.get_last_lr()
    rest = _epoch_lrs(optim2, sched2, n - stop_after)

    assert first + rest == full  # bitwise, every epoch
    # the schedule did not freeze: the rate keeps changing after the resume
    assert len(set(rest)) > 1


def test_state_dict_holds_only_plain_values(tmp_path):
    optim, sched = _build(_coop_cfg())
    _epoch_lrs(optim, sched, 3)
    state = sched.state_dict()
    loaded = _save_load(state, tmp_path / "s.pt")  # would raise on pickled objects
    assert loaded == state

    def _plain(x):
        if isinstance(x, dict):
            return all(isinstance(k, str) and _plain(v) for k, v in x.items())
        if isinstance(x, (list, tuple)):
            return all(_plain(v) for v in x)
        return x is None or isinstance(x, (bool, int, float, str))

    assert _plain(state)
