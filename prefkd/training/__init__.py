"""Training stages: the engine and its stage kinds (SFT, preference, KD), signals, KD terms.

May import: prefkd.core, prefkd.io, prefkd.assets, prefkd.data, prefkd.errors.
"""
