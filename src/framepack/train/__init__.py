"""Training utilities for the small FramePack demo model.

``framepack.train.world`` is a procedural, deterministic synthetic video world (pure numpy): one
coloured shape on a plain, gradient or striped background, moving in a way its caption names.
"""
