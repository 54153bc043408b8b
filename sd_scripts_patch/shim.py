# copylora shim v2
#
# This file was put here by `python -m copylora.patch install`, as networks/svd_merge_lora.py and
# as networks/resize_lora.py. It runs copylora's fast merge or resize (`python -m copylora.merge`
# or `copylora.resize`: same flags and output format, picked by this file's name) in place of
# kohya's script, which is kept unchanged beside it as NAME.copylora-original.py.
#
# If the Python running this file cannot import copylora, the kept original runs instead,
# after a one-line warning. Set COPYLORA_USE_ORIGINAL=1 to run the original on purpose. An option
# that copylora does not know but the original defines (a newer kohya flag) also runs the original,
# after one line naming it.
#
# Undo (restores the originals byte for byte):
#     python -m copylora.patch uninstall --sd-scripts <this sd-scripts folder>
import ast
import importlib
import os
import sys
import types

# kohya script name -> the copylora command that replaces it
COMMANDS = {"svd_merge_lora": "copylora.merge", "resize_lora": "copylora.resize"}


def _here():
    return os.path.dirname(os.path.abspath(__file__))


def _stem():
    return os.path.splitext(os.path.basename(__file__))[0]


def kept_original_name(stem):
    return stem + ".copylora-original.py"


def sidecar_name(stem):
    return stem + ".copylora.json"


def _install_hint():
    """The pip command that would make copylora importable by this Python."""
    source = None
    try:
        import json

        with open(os.path.join(_here(), sidecar_name(_stem())), encoding="utf-8") as f:
            source = json.load(f).get("copylora_source")
    except Exception:  # the hint is best-effort; never fail over it
        pass
    where = '"%s"' % source if source else "<copylora source folder or wheel>"
    return '"%s" -m pip install --no-build-isolation %s' % (sys.executable, where)


def _import_command(command):
    """COMMAND.main, imported (and later run) as `python -m COMMAND` would see it.

    `python networks/svd_merge_lora.py` puts networks/ first on sys.path; kohya's modules there
    must not shadow anything copylora imports, so that entry is dropped. If the import fails,
    sys.path is put back as it was, for the original.
    """
    saved = list(sys.path)
    here = os.path.normcase(_here())
    sys.path[:] = [p for p in sys.path if os.path.normcase(os.path.abspath(p or os.curdir)) != here]
    try:
        return importlib.import_module(command).main
    except BaseException:
        sys.path[:] = saved
        raise


def _option_only_the_original_knows(command, argv, original):
    """The first option in argv that copylora's parser does not know but the kept original defines
    (kohya added a flag after this copylora was made), or None: such a command line runs the original."""
    build_parser = getattr(sys.modules.get(command), "build_parser", None)
    if build_parser is None or not os.path.isfile(original) or "-h" in argv or "--help" in argv:
        return None
    parser = build_parser()
    parser.exit_on_error = False
    try:
        _, rest = parser.parse_known_args(argv)
        with open(original, "rb") as f:
            tree = ast.parse(f.read())
    except (Exception, SystemExit):  # a bad command line: copylora's own parse reports it
        return None
    known = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            known.update(a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str))
    for arg in rest:
        name = arg.split("=", 1)[0]
        if name.startswith("--") and name in known:
            return name
    return None


def _run_original(path):
    """Run the kept original as if it were this networks/ script run as a script.

    Its __name__ is "__main__" and its __file__ is this file's path (the same folder), sys.argv
    and sys.path are untouched, so `import lora` and `from library import ...` resolve exactly
    as they do for the stock script. Its exceptions and SystemExit propagate: same exit codes.
    """
    with open(path, "rb") as f:
        code = compile(f.read(), path, "exec")
    module = types.ModuleType("__main__")
    module.__file__ = os.path.abspath(__file__)
    module.__builtins__ = __builtins__
    saved_main = sys.modules.get("__main__")
    sys.modules["__main__"] = module
    try:
        exec(code, module.__dict__)
    finally:
        if saved_main is not None:
            sys.modules["__main__"] = saved_main
    return 0


def main():
    stem = _stem()
    if stem not in COMMANDS:
        raise SystemExit("copylora shim: %s is not one of the scripts copylora replaces (%s)"
                         % (os.path.abspath(__file__), ", ".join(name + ".py" for name in COMMANDS)))
    command = COMMANDS[stem]
    original = os.path.join(_here(), kept_original_name(stem))
    if os.environ.get("COPYLORA_USE_ORIGINAL", "") not in ("", "0"):
        return _run_original(original)
    try:
        command_main = _import_command(command)
        problem = None
    except ImportError as exc:
        command_main, problem = None, exc
    if command_main is not None:
        unknown = _option_only_the_original_knows(command, sys.argv[1:], original)
        if unknown is None:
            return command_main(sys.argv[1:])
        sys.stderr.write("copylora does not know %s; running the original script\n" % unknown)
        sys.stderr.flush()
        return _run_original(original)
    # outside the except block, so the original's own errors are not chained to the ImportError
    if not os.path.isfile(original):
        raise SystemExit(
            "copylora shim: cannot import copylora (%s) and the original %s is missing; "
            "install copylora with: %s" % (problem, original, _install_hint())
        )
    sys.stderr.write(
        "copylora: %s is not importable by %s (%s), running the original %s.py; "
        "for the fast version install it there: %s\n" % (command, sys.executable, problem, stem, _install_hint())
    )
    sys.stderr.flush()
    return _run_original(original)


if __name__ == "__main__":
    sys.exit(main())
