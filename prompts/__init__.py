"""Prompt texts of the Megrez protocol."""
