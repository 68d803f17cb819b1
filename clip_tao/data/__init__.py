"""Datasets, transforms and loaders built from the spec."""
