"""Experiments: one module per table this framework reproduces (run by ``defend experiment``)."""
