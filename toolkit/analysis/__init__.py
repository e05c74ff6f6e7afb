"""Computations on the standard per-head tensors; each returns plain data for the renderers."""
