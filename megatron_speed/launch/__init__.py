"""Launching a recipe: in this process, or through nemo-run on a local, Docker or SLURM executor.

`cli` is `launch.py`'s command line; `executors` builds nemo-run executors and the task; `job` is the
entry the executors run (`python -m megatron_speed.launch.job RECIPE [key=value ...]`). nemo-run is
imported only when a job is handed to it, so the in-process path needs nothing beyond the package.
"""
