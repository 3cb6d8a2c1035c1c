"""Data stages: demo data, prepare, tokenize + align, batches of pairs, the span checker.

May import: prefkd.core, prefkd.io, prefkd.assets, prefkd.errors.
"""
