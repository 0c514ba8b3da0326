"""PyTorch <-> Flax weight conversion. The only place that knows PyTorch parameter names."""
