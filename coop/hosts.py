"""Putting a method on a host engine.

A method class (a :class:`~coop.clip_trainer.CLIPTrainer` subclass, registered in
``coop.registry.TRAINER_REGISTRY``) has no engine of its own. :func:`on_host` builds the
class that runs it: ``(method, host adapter, host TrainerX)``, named like the method, so its
``super()`` calls reach the host's ``TrainerX``. Two hosts exist: the bundled engine
(:class:`coop.engine.TrainerX`, :data:`BUNDLED`) and a real Dassl's ``dassl.engine.TrainerX``
(:mod:`coop.dassl_bridge`). An adapter gives the base what differs between hosts: which
optimizer and scheduler builders run.
"""

from __future__ import annotations

import importlib
from typing import Any, Dict, Tuple

from coop.engine import TrainerX


class HostAdapter:
    """What the trainer base asks of a host beyond Dassl's public ``TrainerX``: the
    optimizer and scheduler builders of the module ``optim_module`` (Dassl's
    ``build_optimizer(module, optim_cfg)`` and ``build_lr_scheduler(optimizer, optim_cfg)``)."""

    host_name = ""
    optim_module = ""

    def build_optimizer(self, module: Any, optim_cfg: Any) -> Any:
        return importlib.import_module(self.optim_module).build_optimizer(module, optim_cfg)

    def build_lr_scheduler(self, optimizer: Any, optim_cfg: Any) -> Any:
        builders = importlib.import_module(self.optim_module)
        return builders.build_lr_scheduler(optimizer, optim_cfg)


class BundledHost(HostAdapter):
    """The bundled engine's builders (Dassl's, written fresh)."""

    host_name = "bundled"
    optim_module = "coop.optim"


BUNDLED: Tuple[type, type] = (BundledHost, TrainerX)

_CLASSES: Dict[Tuple[type, type, type], type] = {}


def on_host(method: type, host: Tuple[type, type] = BUNDLED) -> type:
    """The trainer class of ``method`` on ``host`` = ``(adapter, TrainerX)``: a subclass of
    both with the method's name and module (one class per method and host)."""
    adapter, trainer_x = host
    if issubclass(method, trainer_x):  # a trainer written directly on the host
        return method
    key = (method, adapter, trainer_x)
    if key not in _CLASSES:
        attrs = {"__module__": method.__module__, "__qualname__": method.__qualname__}
        attrs["__doc__"] = method.__doc__
        _CLASSES[key] = type(method.__name__, (method, adapter, trainer_x), attrs)
    return _CLASSES[key]
