"""Data sources (all yield the same example dict), task splitting, text and batching."""
