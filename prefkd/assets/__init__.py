"""Wheels, tokenizers and models: what the pipeline loads and saves as Hugging Face directories.

May import: prefkd.core, prefkd.io, prefkd.errors.
"""
