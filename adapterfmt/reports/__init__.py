"""Reports built from the checkpoint model: inspect / check / targets rows, verify, value scans.

:mod:`.summary` the data behind ``inspect``, ``check`` and ``targets``; :mod:`.verify` checks a
directory from its headers; :mod:`.scan` looks for NaN / Inf in tensor values (imports torch).
Imports formats and below.
"""
