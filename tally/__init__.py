"""Tally: the CLI, settings and the embedded dev stack."""
