"""Wrapped checkpoints: a whole ``PeftModel.state_dict()`` saved as it sits in memory (FORMAT §8).

:mod:`.files` says where its weights are, :mod:`.reading` reads it (the config its tensors imply:
:mod:`adapterfmt.checkpoint.config_rebuild`), :mod:`.mapping` maps adapter + base keys to the wrapped names.
"""
