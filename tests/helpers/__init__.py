"""Shared test helpers: model zoos, graph builders, geometry strategies, corpora."""
