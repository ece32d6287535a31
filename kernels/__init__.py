"""Triton kernels (imported lazily as maskopt.kernels)."""
