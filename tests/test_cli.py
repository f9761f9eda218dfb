import subprocess
import sys

import pytest

from rsna_infer import cli


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in cli.COMMANDS:
        assert cmd in out


def test_unknown_command_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["frobnicate"])
    assert e.value.code == 2


def test_help_does_not_import_torch():
    code = "import sys; from rsna_infer import cli\ntry:\n cli.main(['--help'])\nexcept SystemExit: pass\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("False")


def test_every_command_module_defines_the_hooks():
    import importlib

    for cmd, (module, _) in cli.COMMANDS.items():
        mod = importlib.import_module(module)
        assert callable(getattr(mod, "add_arguments", None)), cmd
        assert callable(getattr(mod, "run_cli", None)), cmd
