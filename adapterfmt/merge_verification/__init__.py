"""Checking a merged model against its base and adapter, tensor by tensor (``verify-merge``, BEHAVIOUR §11).

:mod:`.verify` streams the three inputs: every tensor the merge plan of
:mod:`adapterfmt.merging.plan` leaves untouched must be byte-equal to the base, every replaced one
equal to its full copy, every merged one equal to one of PEFT's merge paths, rebuilt from the
deltas of :mod:`adapterfmt.merging.compute` (never re-derived); :mod:`.verdicts` names the likely
cause of a tensor that fails (not applied, applied twice, scale off by a named factor, transposed,
wrong module, full copy not applied, tied head not untied). Imports merging and below (torch).
"""
