"""The diffusion ecosystem's adapter files: kohya / LyCORIS and diffusers LoRA (docs/FORMAT.md §10).

Grammars (:mod:`.kohya`, :mod:`.diffusers_lora`) read into :mod:`.records`; :mod:`.sgm_names` the
SGM / LDM names of a UNet; :mod:`.names` exact name resolution against a component's modules;
:mod:`.grammar_names` the dotted reading of a kohya name from the grammar alone (no base);
:mod:`.components` the component bases and checks; :mod:`.peft_view` one component as the
checkpoint model's records.
"""
