"""Benchmarks that map a machine: training validation, sweep, forward ladder, dimension scan; results."""
