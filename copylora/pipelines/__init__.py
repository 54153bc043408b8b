"""The merge and resize pipelines (stock svd_merge_lora.py / resize_lora.py, exact where stock
clamps) and the maths beyond stock: dynamic rank, one shared alpha, conditioning, fidelity,
inspection.

Imports copylora.formats and copylora.engine; never a command module.
"""
