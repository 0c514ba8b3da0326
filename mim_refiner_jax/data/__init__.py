"""Input pipeline: sources, multi-crop augmentation, per-host Grain loading."""
