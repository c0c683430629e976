"""Flax image towers, text towers and the dual encoder."""
