"""Workload traces: the trace format, its validation, and generators."""
