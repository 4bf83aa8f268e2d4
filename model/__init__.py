"""Everything learned: decoding, reports, datasets, towers, loss, trainer, bundle, metrics.

No web and no database here (see DESIGN.md): ``app`` imports ``model``, never the reverse.
"""
