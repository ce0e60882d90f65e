"""Trainers, one file per method. Importing this package registers every built-in trainer."""

from coop.trainers import coop, zsclip  # noqa: F401
