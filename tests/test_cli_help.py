"""`--help` of every copylora command shows every option's default."""

from __future__ import annotations

import importlib

import pytest

from copylora.cli import COMMANDS
from copylora.merge import main as merge_main
from copylora.runtime.cli_help import NAMES_A_DEFAULT, DefaultsHelpFormatter, takes_a_value

MODULES = sorted({module for module, _ in COMMANDS.values()})


@pytest.mark.parametrize("module_name", MODULES)
def test_every_option_that_takes_a_value_names_its_default(module_name):
    parser = importlib.import_module(module_name).build_parser()
    formatter = parser.formatter_class(prog=parser.prog)
    assert isinstance(formatter, DefaultsHelpFormatter)
    for action in parser._actions:
        if not takes_a_value(action):
            continue
        text = formatter._get_help_string(action)
        assert NAMES_A_DEFAULT.search(text) or "(required)" in text, (module_name, action.option_strings, text)
    assert "default: None" not in parser.format_help()


def test_merge_help_shows_kohya_defaults(capsys):
    with pytest.raises(SystemExit) as exit_:
        merge_main(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for shown in [
        "rank of the output LoRA (default: 4)",
        "(default: same as --new_rank)",
        "(default: same as --precision)",
        "cpu, cuda or cuda:N (default: cpu)",
        "(default: 0.99)",
        "(default: auto)",
    ]:
        assert shown in text, shown
    assert "(default: False)" not in text  # flags are off unless given
