"""Trainers, one file per method. Importing this package registers every built-in trainer."""
