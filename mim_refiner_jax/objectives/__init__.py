"""Refinement objectives: the nearest-neighbour queue and the NNA loss (no model code here)."""
