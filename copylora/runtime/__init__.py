"""How copylora's commands run: OpenMP and heap settings of the process, help formatting,
progress lines, and the record of how copylora._C was built (read by setup.py and doctor).

Imports nothing of copylora's but copylora.errors, so anything may import it.
"""
