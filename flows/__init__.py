"""Prefect flows: wiring only. The top flow loops over iterations; each iteration is a subflow."""
