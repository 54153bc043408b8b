"""Everything that talks to a kohya sd-scripts checkout.

- checkout: finding a checkout (or Kohya's GUI folder) and patching its scripts, reversibly
- options: presets, kohya's option lists (probed from its own parser) and the TOML handed to it
- job: one kohya training run, planned, launched and verified
- dataset: the training images laid out the way kohya's train_data_dir wants them
- bake: A baked into the base with kohya's merge_lora.py (copy-machine's merged-base method)
- generate: pictures with kohya's gen_img.py (the preview)
- base_model: what kohya loads as a base model, checked before it loads for minutes
- _probe: run by kohya's own Python to dump a script's options

The file format (copylora.formats.lora_file, copylora.formats.kohya_metadata) and the merge engine
(copylora.engine) know nothing about a checkout; the CLI modules (copylora.train, .patch,
.copy_machine, .preview) only parse arguments and call into here. Imports copylora.formats and
copylora.runtime; never a command module.
"""
