"""Evaluation: splice SAE reconstructions into the LM on held-out text; metrics, plots, reports."""
