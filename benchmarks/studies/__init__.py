"""One-off studies: scripts that answer one question with runs over seeds, not speed.

Run each from the repository root as `python benchmarks/studies/<study>.py`
(or `python -m benchmarks.studies.<study>`); README.md here lists them.
Their committed results stay in `benchmarks/results/`.
"""
