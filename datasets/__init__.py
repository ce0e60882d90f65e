"""Datasets, one file per dataset. Importing this package registers every built-in dataset."""

from coop.datasets import caltech101  # noqa: F401
