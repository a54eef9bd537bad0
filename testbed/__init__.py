"""Orchestration of edge-testbed runs: CLI, scenarios, broker, metrics, results and the wire format."""
