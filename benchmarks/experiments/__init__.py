"""The experiments of `benchmarks/run.py`: each has `add_arguments`, `run` and `default_out`."""
