"""Everything learned: inputs, towers, data, training, evaluation and the encoder bundle.

No web and no database here: ``app`` imports ``model``, never the reverse.
"""
