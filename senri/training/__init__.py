"""Training: run configuration, the one loop (transformers' Trainer) and the recipes it runs."""
