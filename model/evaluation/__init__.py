"""Retrieval evaluation: protocols, precision@k metrics, the runner and its report.

Submodules are imported where used; importing this package loads nothing heavy.
"""
