"""Single-file checkpoints (BFL / ComfyUI / A1111 names) as bases: which kind a file is, and where
a diffusers module's weight lies in it.

People keep diffusion models as one ``.safetensors`` file under the original code's names
(``flux1-dev.safetensors``: ``double_blocks.N.img_attn.qkv`` holds diffusers' ``to_q`` / ``to_k`` /
``to_v`` as three row blocks), optionally behind ComfyUI's ``model.diffusion_model.`` prefix.
:mod:`.kinds` decides the kind from the keys (or takes it from the user), :mod:`.checkpoint`
reads such a file as a :class:`~adapterfmt.base.reading.BaseModel` that also knows its kind and
places every diffusers module on a tensor and rows of the file, and every fused tensor's parts
on diffusers modules — from the table generated from diffusers' own converters
(:mod:`adapterfmt.tables.single_file_names`), never by guessing. :mod:`.peft` binds a PEFT
LoRA adapter of a diffusers component to the file (which component, which tensors and rows).

Decides: the kind, the prefix, placements, a PEFT adapter's component. Imports ``base``, ``checkpoint``, ``storage``,
``tables`` and ``errors``; never a format reader, the merge engine or torch (headers only).
"""
