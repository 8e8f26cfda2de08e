"""The streaming merge: adapters folded into a base, tensor by tensor, atomic, PEFT's bits.

:mod:`.plan` decides from headers what every output tensor is, :mod:`.checks` why a merge is
refused, :mod:`.output` what the output directory looks like, :mod:`.compute` and :mod:`.kernel`
what is computed (a block of rows at a time), :mod:`.engine` runs it; :mod:`.foreign` merges
kohya / diffusers files into diffusers components. Imports reports, formats and below.
"""
