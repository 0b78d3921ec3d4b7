"""Activation-memory policies applied to the model from outside (never baked into layers)."""
