"""coop-dassl: CoOp and sibling prompt-learning trainers for CLIP on a Dassl-compatible engine.

Importing ``coop`` does no work: no model, tokenizer or file is loaded at import time.
"""

__version__ = "0.1.0"
