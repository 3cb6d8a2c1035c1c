"""Evaluation stages: held-out preference metrics, lm-eval suites, reward win rates, the report.

May import: everything below it (core, io, assets, data, training) and prefkd.errors.
"""
