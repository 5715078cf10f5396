"""Outputs: summary.json schemas, CSV tables, plots (plots read saved outputs only)."""
