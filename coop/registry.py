"""Registries with Dassl's names and semantics (``TRAINER_REGISTRY``, ``DATASET_REGISTRY``).

Built-in trainers and datasets register themselves when ``coop.trainers`` and
``coop.datasets`` are imported; :func:`register_builtins` is the one place that does it, and
every lookup calls it first, so scripts never need side-effect imports.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any, Dict, List


class RegistryError(KeyError):
    """An unknown or duplicate registry name."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0]) if self.args else ""


class Registry:
    """A name -> class mapping; class name = registry key (Dassl's convention)."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._obj_map: Dict[str, Any] = {}

    def _do_register(self, name: str, obj: Any, force: bool = False) -> None:
        if name in self._obj_map and not force and self._obj_map[name] is not obj:
            raise RegistryError(
                f'An object named "{name}" was already registered in the {self._name} registry'
            )
        self._obj_map[name] = obj

    def register(self, obj: Any = None, force: bool = False) -> Any:
        """Register ``obj`` under its ``__name__``; usable as ``@REG.register()``."""
        if obj is None:

            def wrapper(fn_or_class: Any) -> Any:
                self._do_register(fn_or_class.__name__, fn_or_class, force=force)
                return fn_or_class

            return wrapper
        self._do_register(obj.__name__, obj, force=force)
        return obj

    def get(self, name: str) -> Any:
        register_builtins()
        if name not in self._obj_map:
            close = difflib.get_close_matches(name, list(self._obj_map), n=3, cutoff=0.5)
            lowered = [k for k in self._obj_map if k.lower() == str(name).lower()]
            hint = lowered or close
            msg = f'"{name}" is not a registered {self._name.lower()}'
            if hint:
                msg += f"; did you mean {' or '.join(repr(h) for h in hint)}?"
            msg += f" Registered: {', '.join(sorted(self._obj_map)) or '(none)'}"
            raise RegistryError(msg)
        return self._obj_map[name]

    def registered_names(self) -> List[str]:
        register_builtins()
        return list(self._obj_map.keys())

    def __contains__(self, name: str) -> bool:
        register_builtins()
        return name in self._obj_map

    def items(self):
        register_builtins()
        return self._obj_map.items()


TRAINER_REGISTRY = Registry("TRAINER")
DATASET_REGISTRY = Registry("DATASET")
EVALUATOR_REGISTRY = Registry("EVALUATOR")

_BUILTINS_LOADED = False


def register_builtins() -> None:
    """Import the built-in trainer, dataset and evaluator modules (once)."""
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    for mod in ("coop.evaluation", "coop.datasets", "coop.trainers"):
        importlib.import_module(mod)


def build_trainer(cfg: Any, checkpoints: Any = ()) -> Any:
    """Build the trainer named ``cfg.TRAINER.NAME`` on the bundled engine (Dassl's
    ``build_trainer``); ``checkpoints``: files it will load, checked against the model
    before the model is built (for trainers that can check them)."""
    import logging

    from coop.hosts import on_host

    logging.getLogger(__name__).info("Loading trainer: %s", cfg.TRAINER.NAME)
    cls = on_host(TRAINER_REGISTRY.get(cfg.TRAINER.NAME))
    if checkpoints and hasattr(cls, "for_checkpoints"):
        return cls.for_checkpoints(cfg, checkpoints)
    return cls(cfg)


def build_dataset(cfg: Any) -> Any:
    """Build the dataset named ``cfg.DATASET.NAME`` (Dassl's ``build_dataset``)."""
    import logging

    logging.getLogger(__name__).info("Loading dataset: %s", cfg.DATASET.NAME)
    return DATASET_REGISTRY.get(cfg.DATASET.NAME)(cfg)


def build_evaluator(cfg: Any, **kwargs: Any) -> Any:
    import logging

    logging.getLogger(__name__).info("Loading evaluator: %s", cfg.TEST.EVALUATOR)
    return EVALUATOR_REGISTRY.get(cfg.TEST.EVALUATOR)(cfg, **kwargs)
