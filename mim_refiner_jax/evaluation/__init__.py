"""Evaluation: feature extraction and the jitted k-NN classifier."""
