"""Adapters on a live ``nn.Module``: load, wrap, save, and manage them, as PEFT does (BEHAVIOUR §5).

:mod:`.loader` (``load``) checks everything first in :mod:`.plan`, then puts the wrappers of
:mod:`adapterfmt.layers` in place (per method: :mod:`.adalora`, :mod:`.lycoris`, :mod:`.params`,
:mod:`.tokens`, :mod:`.foreign`); :mod:`.wrapping` adds fresh adapters, :mod:`.saving` writes them
back, :mod:`.adapters` is the handle and merge / unload / set_adapter; :mod:`.module_tree` finds
modules by path. May import everything below it except the CLI.
"""
