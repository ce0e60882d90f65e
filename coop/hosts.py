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

from typing import Any, Dict, Tuple

from coop.engine import TrainerX


class BundledHost:
    """The bundled engine's builders (Dassl's, written fresh)."""

    host_name = "bundled"

    @staticmethod
    def build_optimizer(module: Any, optim_cfg: Any) -> Any:
        from coop.optim import build_optimizer

        return build_optimizer(module, optim_cfg)

    @staticmethod
    def build_lr_scheduler(optimizer: Any, optim_cfg: Any) -> Any:
        from coop.optim import build_lr_scheduler

        return build_lr_scheduler(optimizer, optim_cfg)


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
