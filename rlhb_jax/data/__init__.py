"""Behavior-log ingestion."""
