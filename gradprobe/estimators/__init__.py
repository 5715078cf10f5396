"""Estimators built on the probe engine."""
