"""Tensor parallelism: process groups, collectives as autograd functions, parallel layers, RNG streams."""
