"""Exact kernel algebra on affine convolutions (y = W * x + b with a ConvSpec)."""
