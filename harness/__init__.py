"""Replays workload traces against serving backends and writes Parquet reports."""
