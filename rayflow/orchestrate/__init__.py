"""Builds Ray Train / Tune / evaluation jobs from a JobConfig (driver side)."""
