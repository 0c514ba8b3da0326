"""Flax models: the ViT encoder (pre-norm and post-norm), ID heads, the refiner."""
