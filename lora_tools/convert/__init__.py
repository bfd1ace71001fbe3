"""Lossless, verified conversion between PEFT, kohya and diffusers: name mapping (``names``) and the
convert-verify-publish driver (``run``)."""
