"""Thalex-compatible paper exchange: see docs/paper.md."""
