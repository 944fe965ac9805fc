"""Measuring a model: the NIAH harness, pass-key diagnostics, real-model comparisons and analyses of its internals."""
