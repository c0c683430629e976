"""The continual experiment, one module per stage; `loop` only orders them.

Imports go one way: loop -> training, indices, results -> setup -> workdir,
config; evaluate (the --mode=evaluate driver) -> results, indices, setup and
the pure `ccr_jax.analysis`. Naming: tasks and snapshots are 1-based on disk
and in JSON keys (`snapshots/task_1`, `indices/snap_2/task_1/texts`); arrays
are 0-based, so matrix entry [t][j] is task j+1's queries after task t+1.
"""
