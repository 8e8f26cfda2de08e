"""Where a model's or adapter's files are: local paths and Hugging Face Hub ids.

A path or Hub id becomes a local directory (:mod:`.paths`), a listing by relative path
(:mod:`.file_tree`), or headers and small tensors read by HTTP range request (:mod:`.hub_base`,
:mod:`.hub_files`). Imports :mod:`adapterfmt.storage` and huggingface_hub; nothing above.
"""
