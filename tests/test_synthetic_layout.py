"""The synthetic SD1.5 layout equals the module list dumped from kohya's networks/lora.py."""

import json

from copylora.formats.synthetic import sd15_layout
from tests.conftest import kohya_file


def test_sd15_layout_matches_kohya_manifest():
    manifest = json.loads(kohya_file("manifests/sd15.json").read_text())
    expected = [(m["name"], tuple(m["down"]), tuple(m["up"])) for m in manifest["modules"]]
    ours = [(m.name, *m.factor_shapes(8)) for m in sd15_layout()]
    assert ours == expected
