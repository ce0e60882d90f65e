"""Packaging for coop-dassl: one distribution, one import namespace ``coop``.

The top-level folders ``trainers/``, ``datasets/`` and ``configs/`` are installed as
``coop.trainers``, ``coop.datasets`` and ``coop.configs`` so nothing called ``datasets``,
``trainers`` or ``clip`` is ever installed at top level.
"""

from setuptools import setup

setup(
    packages=[
        "coop",
        "coop.fast",
        "coop.testing",
        "coop.trainers",
        "coop.datasets",
        "coop.configs",
    ],
    package_dir={
        "coop": "coop",
        "coop.fast": "coop/fast",
        "coop.testing": "coop/testing",
        "coop.trainers": "trainers",
        "coop.datasets": "datasets",
        "coop.configs": "configs",
    },
    package_data={"coop.configs": ["datasets/*.yaml", "trainers/*/*.yaml"]},
    include_package_data=False,
)
