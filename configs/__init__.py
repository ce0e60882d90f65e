"""The original CoOp YAML files (dataset and trainer configs), shipped as package data."""
