"""mim_refiner_jax: MIM-Refiner (arXiv 2402.10093) in JAX/Flax."""

__version__ = "0.1.0"
