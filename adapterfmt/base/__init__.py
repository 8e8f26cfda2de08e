"""The base side: which files hold a base model's weights, and an adapter resolved against them.

:mod:`.layouts` decides which files of any layout hold the weights (transformers' and diffusers'
precedence), :mod:`.reading` reads a base from headers, :mod:`.quantized` refuses quantized bases,
and :mod:`.resolution` binds every adapter module to exactly one base tensor. Headers only. Imports
the checkpoint model and below; no file-format reader.
"""
