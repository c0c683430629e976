"""Launch scripts: absl-flag entry points for ablations and runs."""
