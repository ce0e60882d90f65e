"""Helpers that build tiny CLIP checkpoints and miniature datasets in the real formats.

Used by the tests, the demo and the benchmarks; nothing here downloads anything.
"""
