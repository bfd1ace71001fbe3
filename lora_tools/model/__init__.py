"""Everything that finds and loads a base model: references (folders, ``.gguf`` files, cached Hub ids), the
bundled SmolLM2 GGUF, and the GGUF header reader. Nothing here downloads; nothing heavy is imported at the top.
"""
