"""The plugin: this package's trainers and datasets inside a real Dassl.

In a Dassl ``train.py`` (where the official CoOp code has ``import trainers.coop``)::

    import coop.dassl_plugin      # or: from coop.dassl_bridge import register_into_dassl
                                  #     register_into_dassl()

Registration puts every trainer into Dassl's ``TRAINER_REGISTRY`` as a subclass of
``dassl.engine.TrainerX`` (the method on :class:`DasslHost`, see :mod:`coop.hosts`) and every
dataset into Dassl's ``DATASET_REGISTRY`` as a subclass of Dassl's ``DatasetBase``, so
``dassl.engine.build_trainer`` builds them by name and Dassl's own data manager, transforms,
samplers, evaluator, optimizer and scheduler builders and checkpoint functions run. It also
adds this package's config keys to Dassl's defaults (a config made afterwards by Dassl's
``get_cfg_default`` has them; ``extend_dassl_cfg(cfg)`` adds them to one made before), sends
this package's log lines to Dassl's log file, and applies the fixes Dassl needs on the
installed torch (each logged once).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import sys
from typing import Any, Dict, List, Optional, Tuple

from coop.config import CN, get_cfg_default
from coop.hosts import HostAdapter
from coop.registry import DATASET_REGISTRY, TRAINER_REGISTRY, RegistryError

logger = logging.getLogger(__name__)


class DasslNotInstalledError(ImportError):
    pass


def import_dassl() -> Any:
    """The ``dassl`` package with the modules the plugin uses imported, or one clear error."""
    try:
        for name in ("dassl.engine", "dassl.data.datasets", "dassl.optim", "dassl.utils"):
            importlib.import_module(name)
        return importlib.import_module("dassl")
    except ImportError as e:
        raise DasslNotInstalledError(
            f"Dassl is not installed (import dassl failed: {e}); coop runs on its own engine "
            "without it (coop-train's default --engine bundled)"
        ) from e


# ---------------------------------------------------------------------- the Dassl host
class DasslHost(HostAdapter):
    """What the trainer base needs of a real Dassl beyond its public ``TrainerX``: Dassl's
    optimizer and scheduler builders, evaluation inside the method's evaluation context, and
    ``load_model`` through the safe reader with the method's state-dict preparation (as the
    official CoOp trainer overrides it: Dassl's own formats ``val_result``, which is None in
    every checkpoint but the best one)."""

    host_name = "dassl"
    optim_module = "dassl.optim"

    def build_data_loader(self) -> None:
        for text in _FIXES.values():  # the log is set up by now
            logger.info(f"Dassl compatibility: {text}")
        super().build_data_loader()  # type: ignore[misc]

    def test(self, split: Optional[str] = None) -> Any:
        self.set_model_mode("eval")  # type: ignore[attr-defined] - before the scope computes
        with self.evaluation_context():
            return super().test(split)  # type: ignore[misc]

    def resume_model_if_exist(self, directory: str) -> int:
        """Dassl's, with the method's ``prepare_loaded_state_dict`` (e.g. the original's
        stored class-name buffers dropped) and the scheduler resumed as the bundled engine
        resumes it (its pickled successor is not loaded: the schedule is replayed)."""
        import os.path as osp

        names = self.get_model_names()  # type: ignore[attr-defined]
        if any(not osp.exists(osp.join(directory, name)) for name in names):
            print("No checkpoint found, train from scratch")
            return 0
        print(f"Found checkpoint at {directory} (will resume training)")
        start_epoch = 0
        for name in names:
            start_epoch = resume_from_checkpoint(
                osp.join(directory, name),
                self._models[name],  # type: ignore[attr-defined]
                self._optims[name],  # type: ignore[attr-defined]
                self._scheds[name],  # type: ignore[attr-defined]
                prepare=lambda sd, path, name=name: self.prepare_loaded_state_dict(name, sd, path),
            )
        return start_epoch

    def prepare_loaded_state_dict(self, name: str, state_dict: Dict, path: str) -> Dict:
        return state_dict

    def load_model(self, directory: str, epoch: Optional[int] = None) -> None:
        import os.path as osp

        from dassl.utils import load_checkpoint

        if not directory:
            print(
                "Note that load_model() is skipped as no pretrained model is given "
                "(ignore this if it's done on purpose)"
            )
            return
        model_file = "model-best.pth.tar" if epoch is None else f"model.pth.tar-{epoch}"
        for name in self.get_model_names():  # type: ignore[attr-defined]
            model_path = osp.join(directory, name, model_file)
            if not osp.exists(model_path):
                raise FileNotFoundError(f'No model at "{model_path}"')
            checkpoint = load_checkpoint(model_path)
            state_dict = self.prepare_loaded_state_dict(name, checkpoint["state_dict"], model_path)
            print(
                f'Loading weights to {name} from "{model_path}" (epoch = {checkpoint.get("epoch")})'
            )
            self._models[name].load_state_dict(state_dict, strict=False)  # type: ignore


def dassl_host() -> Tuple[type, type]:
    """The host ``(DasslHost, dassl.engine.TrainerX)`` for :func:`coop.hosts.on_host`."""
    import_dassl()
    from dassl.engine import TrainerX

    apply_torch_fixes()
    attach_logging()
    return DasslHost, TrainerX


def dassl_dataset(cls: type) -> type:
    """Our dataset class as a subclass of Dassl's ``DatasetBase`` (same name and module; our
    base's split, few-shot and subsampling code runs, which Dassl's data manager reads
    through the attributes of Dassl's)."""
    from dassl.data.datasets import DatasetBase

    if issubclass(cls, DatasetBase):
        return cls
    if cls not in _DATASETS:
        attrs = {"__module__": cls.__module__, "__qualname__": cls.__qualname__}
        _DATASETS[cls] = type(cls.__name__, (cls, DatasetBase), attrs)
    return _DATASETS[cls]


_DATASETS: Dict[type, type] = {}


# ---------------------------------------------------------------------- registration
def _describe(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', obj)}"


def _ours(obj: Any) -> bool:
    from coop.hosts import _CLASSES

    return obj in _CLASSES.values() or obj in _DATASETS.values()


def register_into_dassl(replace: bool = False) -> List[str]:
    """Register every trainer and dataset of this package into Dassl's registries, add the
    config keys to Dassl's defaults, attach the log and apply the torch fixes. Idempotent;
    returns the names registered by this call.

    A name Dassl already has from elsewhere (e.g. the official CoOp repository's ``CoOp``
    or ``Caltech101``) is a :class:`~coop.registry.RegistryError` naming both classes,
    unless ``replace=True``, which puts ours in its place (logged)."""
    host = dassl_host()  # imports Dassl, attaches the log, applies the torch fixes
    from dassl.data.datasets import DATASET_REGISTRY as DASSL_DATASETS
    from dassl.engine import TRAINER_REGISTRY as DASSL_TRAINERS

    from coop.hosts import on_host

    wanted = [
        *((DASSL_TRAINERS, on_host(cls, host)) for _, cls in TRAINER_REGISTRY.items()),
        *((DASSL_DATASETS, dassl_dataset(cls)) for _, cls in DATASET_REGISTRY.items()),
    ]
    clashes = []
    for registry, cls in wanted:
        existing = registry._obj_map.get(cls.__name__)
        if existing is not None and existing is not cls and not _ours(existing):
            clashes.append((cls, existing))
    if clashes and not replace:
        listed = "; ".join(
            f"{_describe(theirs)} (ours: {_describe(ours)})" for ours, theirs in clashes
        )
        raise RegistryError(
            f"Dassl already has {len(clashes)} name(s) that coop registers: {listed}. Drop "
            "the other registration (e.g. the official repository's `import trainers.coop` "
            "and `import datasets.*`), or replace them with "
            "coop.dassl_bridge.register_into_dassl(replace=True)"
        )
    added = []
    for registry, cls in wanted:
        existing = registry._obj_map.get(cls.__name__)
        if existing is cls:
            continue
        if existing is not None and not _ours(existing):
            logger.warning(f"Replacing Dassl's {_describe(existing)} with {_describe(cls)}")
        registry.register(cls, force=True)
        added.append(cls.__name__)
    extend_dassl_cfg(importlib.import_module("dassl.config").cfg_default)
    return added


def extend_dassl_cfg(cfg: CN) -> CN:
    """Add to a Dassl config every key of ours it lacks (with our defaults); keys Dassl has
    keep Dassl's values."""

    def merge(dst: CN, src: CN) -> None:
        for key, value in src.items():
            if key not in dst:
                dst[key] = value.clone() if isinstance(value, CN) else value
            elif isinstance(value, CN) and isinstance(dst[key], CN):
                merge(dst[key], value)

    merge(cfg, get_cfg_default())
    return cfg


# ---------------------------------------------------------------------- logging
class _CurrentStdout(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is at the time (Dassl's ``setup_logger`` replaces
    it with its tee into ``log.txt`` after the plugin is registered)."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stdout

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def attach_logging() -> None:
    """This package's log lines and warnings go where Dassl's prints go (stdout, which
    Dassl's ``setup_logger`` copies into ``log.txt``), and the ``logging.disable(WARNING)``
    that importing ``dassl.data`` runs (its WILDS module) is undone for the process: it
    silenced every warning of every library."""
    if logging.root.manager.disable >= logging.WARNING:
        logging.disable(logging.NOTSET)
        logger.info("Undid the logging.disable(WARNING) that importing dassl.data runs")
    log = logging.getLogger("coop")
    if not any(isinstance(h, _CurrentStdout) for h in log.handlers):
        handler = _CurrentStdout()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


# ---------------------------------------------------------------------- torch fixes
_FIXES: Dict[str, str] = {}  # name -> what it does, for the fixes in effect


def apply_torch_fixes() -> List[str]:
    """Make Dassl run on the installed torch (each fix applied once per process; every
    trainer logs the fixes in effect when it starts, so each run's log records them);
    returns their names."""
    _fix_scheduler_verbose()
    _refuse_scheduler_state_without_successor()
    _route_checkpoint_loading()
    return list(_FIXES)


def _fix_scheduler_verbose() -> bool:
    """Dassl's warm-up schedulers pass ``verbose`` to torch's ``_LRScheduler``, whose
    ``__init__`` no longer takes it: they are given an ``__init__`` that leaves it out."""
    from dassl.optim import lr_scheduler as dls
    from torch.optim.lr_scheduler import _LRScheduler

    base = dls._BaseWarmupScheduler
    if getattr(base.__init__, "_coop_fixed", False):
        return False
    if "verbose" in inspect.signature(_LRScheduler.__init__).parameters:
        return False  # an older torch still takes it

    def __init__(self, optimizer, successor, warmup_epoch, last_epoch=-1, verbose=False):
        self.successor = successor
        self.warmup_epoch = warmup_epoch
        _LRScheduler.__init__(self, optimizer, last_epoch)

    __init__._coop_fixed = True  # type: ignore[attr-defined]
    base.__init__ = __init__
    _FIXES["scheduler-verbose"] = (
        "its warm-up LR schedulers do not pass `verbose`, which this torch's _LRScheduler "
        "no longer takes"
    )
    return True


def _refuse_scheduler_state_without_successor() -> bool:
    """The restricted reader gives a Dassl warm-up scheduler's pickled successor back as
    None; loading such a state would leave the live successor at its first epoch, or
    replace it by None (torch's ``load_state_dict`` updates ``__dict__``): the warm-up
    schedulers refuse it, and the resume replays the schedule instead."""
    from dassl.optim import lr_scheduler as dls

    base = dls._BaseWarmupScheduler
    if getattr(base.load_state_dict, "_coop_fixed", False):
        return False

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        state = dict(state_dict)
        successor = state.pop("successor", None)
        if isinstance(successor, dict):  # a state saved as plain values
            successor.pop("optimizer", None)
            self.successor.load_state_dict(successor)
        elif successor is None or not hasattr(successor, "step"):
            raise ValueError("the scheduler state holds no state of its successor scheduler")
        else:  # a live scheduler object (a state dict taken in this process)
            state["successor"] = successor
        state.pop("optimizer", None)
        self.__dict__.update(state)

    load_state_dict._coop_fixed = True  # type: ignore[attr-defined]
    base.load_state_dict = load_state_dict
    _FIXES["scheduler-state"] = (
        "a warm-up LR scheduler's state whose successor scheduler was not loaded (the "
        "restricted reader does not rebuild pickled objects) is refused, and a resume "
        "replays the schedule instead"
    )
    return True


def resume_from_checkpoint(
    fdir: str, model: Any, optimizer: Any = None, scheduler: Any = None, prepare: Any = None
) -> int:
    """Dassl's ``resume_from_checkpoint`` through the restricted reader, with the scheduler
    resumed as the bundled engine resumes it (its pickled successor is not loaded, so the
    deterministic schedule is replayed) and ``prepare(state_dict, path)`` applied to the
    weights first (a method's ``prepare_loaded_state_dict``)."""
    import os.path as osp

    from coop.io import read_checkpoint
    from coop.optim import resume_scheduler

    with open(osp.join(fdir, "checkpoint")) as f:
        fpath = osp.join(fdir, f.readline().strip("\n"))
    print(f'Loading checkpoint from "{fpath}"')
    checkpoint = read_checkpoint(fpath)
    state_dict = checkpoint["state_dict"]
    model.load_state_dict(prepare(state_dict, fpath) if prepare else state_dict)
    print("Loaded model weights")
    fresh_lrs = [g["lr"] for g in optimizer.param_groups] if optimizer is not None else []
    if optimizer is not None and checkpoint.get("optimizer") is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        print("Loaded optimizer")
    if scheduler is not None:
        resume_scheduler(scheduler, checkpoint.get("scheduler"), checkpoint["epoch"], fresh_lrs)
    print(f"Previous epoch: {checkpoint['epoch']}")
    return checkpoint["epoch"]


def _route_checkpoint_loading() -> bool:
    """Dassl's ``load_checkpoint`` unpickles whatever the file holds (and fails on this
    torch, whose ``torch.load`` is ``weights_only`` by default): it is routed through the
    restricted reader, which builds tensors and plain containers only."""
    import dassl.utils as dassl_utils
    from dassl.engine import trainer as dassl_trainer
    from dassl.utils import torchtools

    from coop.io import read_checkpoint

    if getattr(torchtools.load_checkpoint, "_coop_safe", False):
        return False

    def load_checkpoint(fpath: str) -> Any:
        if fpath is None:
            raise ValueError("File path is None")
        return read_checkpoint(fpath)

    load_checkpoint._coop_safe = True  # type: ignore[attr-defined]
    load_checkpoint.__doc__ = torchtools.load_checkpoint.__doc__
    for module in (torchtools, dassl_utils, dassl_trainer):
        module.load_checkpoint = load_checkpoint
        module.resume_from_checkpoint = resume_from_checkpoint
    _FIXES["safe-load-checkpoint"] = (
        "load_checkpoint reads through coop's restricted reader (tensors and plain "
        "containers only, no arbitrary unpickling; this torch's default weights_only load "
        "refuses Dassl's own checkpoints), and a resume replays the LR schedule whose "
        "pickled successor scheduler that reader does not load"
    )
    return True


@contextlib.contextmanager
def dassl_log(output_dir: str) -> Any:
    """Dassl's ``setup_logger(output_dir)`` for the ``with`` block, stdout restored after."""
    from dassl.utils import setup_logger

    stdout = sys.stdout
    setup_logger(output_dir)
    try:
        yield
    finally:
        tee = sys.stdout
        sys.stdout = stdout
        if tee is not stdout and hasattr(tee, "console"):
            # Dassl's tee closes its console (the real stdout) when it is collected
            import io

            tee.console = io.StringIO()
            tee.close()
