"""Trainers, one file per method. Importing this package registers every built-in trainer:
each module here is imported, so a new method needs no edit outside its own file."""

import importlib
import pkgutil

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
