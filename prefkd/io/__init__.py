"""Files between stages: atomic writes, the token- and signal-shard contracts, the config.

May import: prefkd.core, prefkd.errors.
"""
