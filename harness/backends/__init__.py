"""Backends a trace is replayed against. Each one owns its request loop and returns raw rows."""
