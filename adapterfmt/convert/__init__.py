"""Writing one adapter format as another (docs/FORMAT.md §8, §10).

:mod:`.wrapped` turns a wrapped ``PeftModel.state_dict()`` into PEFT's saved layout;
:mod:`.foreign` converts between PEFT directories and kohya / diffusers files (:mod:`.lokr_peft`:
a LyCORIS LoKr file as PEFT's ``LOKR``). Imports merging and below.
"""
