"""The checkpoint model: what an adapter is, from its headers, whatever file it came from.

Key grammar and the mapping between saved, wrapped and base names (:mod:`.keys`), the config and
its types (:mod:`.config`, :mod:`.config_types`; :mod:`.config_rebuild` the config a tensor set
implies), matching rules (:mod:`.matching`,
:mod:`.patterns`), the typed records every reader produces (:mod:`.records`), which keys are
full copies (:mod:`.copy_keys`), factor shapes (:mod:`.factors`), and every warning rule
(:mod:`.finding`, :mod:`.findings`). Headers only, never torch. Imports :mod:`adapterfmt.storage`,
:mod:`adapterfmt.tables`; nothing above (readers of each file format live in :mod:`adapterfmt.formats`).
"""
