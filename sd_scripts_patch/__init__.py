"""The shim that `python -m copylora.patch install` puts at an sd-scripts checkout's
networks/svd_merge_lora.py and networks/resize_lora.py. Its canonical source is shim.py in this
folder; this `__init__.py` only makes the folder package data that an installed copylora can find.
Importing this package runs nothing."""
