"""Orchestration of edge-testbed on top of the contract in testbed.core: CLI, run assembly, reports, metrics, comparison."""
