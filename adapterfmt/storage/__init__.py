"""Bytes on disk: safetensors headers, tensors by byte offset, the streaming writer, and the write rule.

Everything that touches a file's bytes is decided here: how a safetensors header is parsed
(:mod:`.header`, no torch), how tensors are read by offset (:mod:`.tensor_source`, :mod:`.torch_io`),
how output is encoded and written (:mod:`.safetensors_stream`, :mod:`.parallel_write`), the one
staging rule for every output directory (:mod:`.staging`), every non-portable system call with its
fallback (:mod:`.os_calls`), crash-test pause points (:mod:`.pause`). Imports only
``adapterfmt.errors`` / ``adapterfmt.constants`` and the standard library (torch in the tensor modules).
"""
