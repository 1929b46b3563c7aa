"""Tests of what the taskfleet package exports, and of the copy of it the worker bundles."""

import pathlib
import subprocess
import sys
import textwrap

import taskfleet
import taskfleet.client

PACKAGE_DIR = pathlib.Path(taskfleet.__file__).parent


def run_python(code: str) -> str:
    """Runs code in a fresh interpreter that imports taskfleet from this source tree."""
    completed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=PACKAGE_DIR.parent,
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout.strip()


def test_importing_the_package_does_not_import_the_client():
    code = """
        import sys
        import taskfleet
        before = "taskfleet.client" in sys.modules
        client_type = taskfleet.Client
        print(before, "taskfleet.client" in sys.modules, client_type.__module__)
    """
    assert run_python(code) == "False True taskfleet.client"


def test_client_names_are_the_client_modules():
    for name in taskfleet.__all__:
        if name in ("Context", "StepCancelled", "__version__"):
            continue
        assert getattr(taskfleet, name) is getattr(taskfleet.client, name), name


def test_all_names_what_the_package_has():
    assert {"Context", "Client", "ApiError", "Run", "RunFailed", "__version__"} <= set(
        taskfleet.__all__
    )
    local = {"Context", "StepCancelled", "__version__"}
    assert set(taskfleet.__all__) - local <= set(taskfleet.client.__all__)
    assert set(taskfleet.__all__) <= set(dir(taskfleet))
    namespace = {}
    exec("from taskfleet import *", namespace)
    assert namespace["Client"] is taskfleet.client.Client


def test_unknown_names_are_attribute_errors():
    try:
        taskfleet.NoSuchThing  # noqa: B018
    except AttributeError as error:
        assert "NoSuchThing" in str(error)
    else:
        raise AssertionError("taskfleet.NoSuchThing should not exist")


def test_bundled_copy_loads_without_the_client():
    # The worker executes context.py and __init__.py from its own copies, as modules named
    # taskfleet.context and taskfleet, and only then gives the package an empty __path__.
    code = f"""
        import sys, types

        def load(name, path):
            module = types.ModuleType(name)
            module.__file__ = path
            sys.modules[name] = module
            source = open({str(PACKAGE_DIR)!r} + "/" + path.split("/")[1]).read()
            exec(compile(source, path, "exec"), module.__dict__)
            return module

        context = load("taskfleet.context", "taskfleet/context.py")
        package = load("taskfleet", "taskfleet/__init__.py")
        package.context = context
        package.__path__ = []

        from taskfleet import Context
        print(Context is context.Context, package.__all__)
        namespace = {{}}
        exec("from taskfleet import *", namespace)
        print(sorted(name for name in namespace if not name.startswith("__")))
        try:
            package.Client
        except ImportError as error:
            print(type(error).__name__, error)
    """
    completed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd="/",
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.strip().splitlines()
    assert lines[0] == "True ['Context', 'StepCancelled', '__version__']"
    assert lines[1] == "['Context', 'StepCancelled']"
    assert lines[2].startswith("ImportError taskfleet.Client needs the taskfleet package installed")
