"""csps.engine: the engine on torch — one ``Engine`` for every SP × TP layout, the rank runtime, the
model, weights, tokenizer, sampler, and attention over the paged cache and across SP ranks.

Import the modules themselves (``from csps.engine.engine import Engine``): this package's import
pulls in nothing, so torch-free callers can use ``csps.device``."""
