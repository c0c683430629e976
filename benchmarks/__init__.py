"""Speed and memory benchmarks: run as `python -m benchmarks.<script>` from the repo root."""
