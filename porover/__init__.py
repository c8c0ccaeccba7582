"""porover: overgeneration and preference optimisation for safe, non-overrefusing language models."""
