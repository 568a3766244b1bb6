"""Workload modules; each defines functions decorated with ``@workload``."""
