"""Repository contracts a fresh user relies on: the README's commands, exact pins, CI = README."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(name):
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def _bash_blocks(text):
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_ci_runs_exactly_the_readme_test_command():
    ci_lines = [l.strip() for l in _read(".ci/run").splitlines() if l.strip() and not l.startswith("#")]
    test_command = ci_lines[-1]
    assert "pytest" in test_command
    readme_commands = [line for block in _bash_blocks(_read("README.md")) for line in block.splitlines()]
    assert test_command in readme_commands


def test_readme_install_and_train_command_trains_on_cpu():
    first = _bash_blocks(_read("README.md"))[0]
    assert "pip install -r requirements.txt" in first and "crl_deep.py" in first


def test_every_requirement_is_pinned_exactly():
    for name in ("requirements.txt", "requirements-dev.txt"):
        for line in _read(name).splitlines():
            line = line.split("#")[0].strip()
            if not line or line.startswith("-r"):
                continue
            assert re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[0-9][A-Za-z0-9.]*", line), f"{name}: {line!r} is not an exact pin"


def test_pins_of_the_paper_stack():
    pins = dict(l.split("#")[0].strip().split("==") for l in _read("requirements.txt").splitlines()
                if "==" in l.split("#")[0])
    assert pins["brax"] == "0.10.1" and pins["mujoco"] == "3.2.6" and pins["mujoco-mjx"] == "3.2.6"


def test_run_outputs_are_ignored():
    ignored = _read(".gitignore").split()
    assert "runs/" in ignored and "wandb/" in ignored


def test_every_script_command_in_the_readme_parses_with_its_args():
    """Each documented `python <script>.py ...` line is accepted by that script's tyro Args."""
    import importlib.util
    import shlex
    import sys

    import tyro

    lines = [l for b in _bash_blocks(_read("README.md")) for cmd in b.splitlines() for l in cmd.split("&&")]
    checked = 0
    for line in lines:
        words = shlex.split(line.split("#")[0])
        scripts = [i for i, w in enumerate(words) if w.endswith(".py")]
        if not scripts or "<run>" in line or "*" in line:
            continue
        i = scripts[0]
        spec = importlib.util.spec_from_file_location("_readme_" + os.path.basename(words[i])[:-3], os.path.join(ROOT, words[i]))
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses resolve string annotations through it
        spec.loader.exec_module(module)
        if not hasattr(module, "Args"):  # tools with their own parsers (grid.py) are tested elsewhere
            continue
        tyro.cli(module.Args, args=words[i + 1:])
        checked += 1
    assert checked >= 8
