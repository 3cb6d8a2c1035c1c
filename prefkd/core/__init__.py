"""Pure computations: no file I/O and no Hugging Face imports (log-probs, the preference objective,
span weights, span alignment, the method registry, the pair layout, settings dataclasses).

May import: prefkd.errors and the standard library, numpy, torch.
"""
