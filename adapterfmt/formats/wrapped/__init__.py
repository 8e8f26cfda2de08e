"""Wrapped checkpoints: a whole ``PeftModel.state_dict()`` saved as it sits in memory (FORMAT §8).

:mod:`.files` says where its weights are, :mod:`.reading` reads it, :mod:`.config_rebuild` builds
the config its tensors imply, :mod:`.mapping` maps adapter + base keys to the wrapped names.
"""
