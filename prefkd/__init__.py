"""prefkd: Cross-Tokenizer Preference Distillation (CTPD) as a reproducible workflow."""

__version__ = "0.1.0"
