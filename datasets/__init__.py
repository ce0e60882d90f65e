"""Datasets, one file per dataset. Importing this package registers every built-in dataset."""
