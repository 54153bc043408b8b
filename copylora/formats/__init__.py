"""The LoRA file format and kohya's conventions: safetensors/checkpoint reading and atomic
writing, kohya's module naming and block mapping, its metadata and hashes, synthetic files.

Imports nothing of copylora's but copylora.errors: everything else builds on it.
"""
