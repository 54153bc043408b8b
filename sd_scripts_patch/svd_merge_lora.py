# copylora shim v1
#
# This file was put here by `python -m copylora.patch install`. It runs copylora's fast merge
# (`python -m copylora.merge`, same flags and output format) in place of kohya's
# networks/svd_merge_lora.py, which is kept unchanged beside it as
# svd_merge_lora.copylora-original.py.
#
# If the Python running this file cannot import copylora, the kept original runs instead,
# after a one-line warning. Set COPYLORA_USE_ORIGINAL=1 to run the original on purpose.
#
# Undo (restores the original byte for byte):
#     python -m copylora.patch uninstall --sd-scripts <this sd-scripts folder>
import os
import sys
import types

KEPT_ORIGINAL = "svd_merge_lora.copylora-original.py"
SIDECAR = "svd_merge_lora.copylora.json"


def _here():
    return os.path.dirname(os.path.abspath(__file__))


def _install_hint():
    """The pip command that would make copylora importable by this Python."""
    source = None
    try:
        import json

        with open(os.path.join(_here(), SIDECAR), encoding="utf-8") as f:
            source = json.load(f).get("copylora_source")
    except Exception:  # the hint is best-effort; never fail over it
        pass
    where = '"%s"' % source if source else "<copylora source folder or wheel>"
    return '"%s" -m pip install --no-build-isolation %s' % (sys.executable, where)


def _import_copylora_merge():
    """copylora.merge.main, imported (and later run) as `python -m copylora.merge` would see it.

    `python networks/svd_merge_lora.py` puts networks/ first on sys.path; kohya's modules there
    must not shadow anything copylora imports, so that entry is dropped. If the import fails,
    sys.path is put back as it was, for the original.
    """
    saved = list(sys.path)
    here = os.path.normcase(_here())
    sys.path[:] = [p for p in sys.path if os.path.normcase(os.path.abspath(p or os.curdir)) != here]
    try:
        from copylora.merge import main as merge_main
    except BaseException:
        sys.path[:] = saved
        raise
    return merge_main


def _run_original(path):
    """Run the kept original as if it were networks/svd_merge_lora.py run as a script.

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
    original = os.path.join(_here(), KEPT_ORIGINAL)
    if os.environ.get("COPYLORA_USE_ORIGINAL", "") not in ("", "0"):
        return _run_original(original)
    try:
        merge_main = _import_copylora_merge()
        problem = None
    except ImportError as exc:
        merge_main, problem = None, exc
    if merge_main is not None:
        return merge_main(sys.argv[1:])
    # outside the except block, so the original's own errors are not chained to the ImportError
    if not os.path.isfile(original):
        raise SystemExit(
            "copylora shim: cannot import copylora (%s) and the original %s is missing; "
            "install copylora with: %s" % (problem, original, _install_hint())
        )
    sys.stderr.write(
        "copylora: copylora.merge is not importable by %s (%s), running the original svd_merge_lora.py; "
        "for the fast merge install it there: %s\n" % (sys.executable, problem, _install_hint())
    )
    sys.stderr.flush()
    return _run_original(original)


if __name__ == "__main__":
    sys.exit(main())
