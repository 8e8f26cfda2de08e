"""PEFT's in-memory modules, without PEFT: same names, same forward, same merge.

:mod:`.types` says which base modules can be wrapped and how; :mod:`.lora`, :mod:`.adalora`,
:mod:`.lycoris`, :mod:`.params`, :mod:`.tokens` and :mod:`.full_copy` are the wrappers, on the
common :mod:`.base_layer`. Imports :mod:`adapterfmt.deltas`; nothing that reads files.
"""
