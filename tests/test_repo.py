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
    ci_lines = [line.strip() for line in _read(".ci/run").splitlines() if line.strip() and not line.startswith("#")]
    test_command = ci_lines[-1]
    assert "pytest" in test_command
    readme_commands = [line for block in _bash_blocks(_read("README.md")) for line in block.splitlines()]
    assert test_command in readme_commands


def test_readme_install_and_train_command_trains_on_cpu():
    first = _bash_blocks(_read("README.md"))[0]
    assert "pip install -r requirements.txt" in first and "crl_deep.py" in first


def test_every_requirement_is_pinned_exactly():
    for name in ("requirements.txt", "requirements-dev.txt", "requirements-gpu.txt"):
        for line in _read(name).splitlines():
            line = line.split("#")[0].strip()
            if not line or line.startswith("-r"):
                continue
            assert re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[0-9][A-Za-z0-9.]*", line), (
                f"{name}: {line!r} is not an exact pin"
            )


def test_pins_of_the_paper_stack():
    pins = dict(
        line.split("#")[0].strip().split("==")
        for line in _read("requirements.txt").splitlines()
        if "==" in line.split("#")[0]
    )
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

    lines = [part for b in _bash_blocks(_read("README.md")) for cmd in b.splitlines() for part in cmd.split("&&")]
    checked = 0
    for line in lines:
        words = shlex.split(line.split("#")[0])
        scripts = [i for i, w in enumerate(words) if w.endswith(".py")]
        if not scripts or "<run>" in line or "*" in line:
            continue
        i = scripts[0]
        spec = importlib.util.spec_from_file_location(
            "_readme_" + os.path.basename(words[i])[:-3], os.path.join(ROOT, words[i])
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses resolve string annotations through it
        spec.loader.exec_module(module)
        if not hasattr(module, "Args"):  # tools with their own parsers (grid.py) are tested elsewhere
            continue
        tyro.cli(module.Args, args=words[i + 1 :])
        checked += 1
    assert checked >= 8


DOCS = [
    "README.md",
    "bench/RESULTS.md",
    *sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md")),
]
PATH_LIKE = re.compile(
    r"(?<![\w./<{}*-])((?:docs|tests|tools|bench|envs|sweeps|\.ci)/[\w./-]*\w|[\w-]+\.(?:py|md|toml|txt))\b(?![*{<])"
)


def test_every_path_a_doc_names_exists_in_the_repo():
    """Docs name files of this repo only (`docs/x.md`, `tools/grid.py`, [links](x.md), ...), and they exist."""
    missing = []
    for doc in DOCS:
        text = _read(doc)
        links = [
            os.path.normpath(os.path.join(os.path.dirname(doc), target))
            for target in re.findall(r"\]\(([^)#:]+)\)", text)
        ]
        named = [p for p in PATH_LIKE.findall(text) if "*" not in p and "<" not in p]
        for path in links + named:
            candidates = [
                path,
                os.path.join(os.path.dirname(doc), path),
                os.path.join("tools", path),
                os.path.join("tests", path),
                os.path.join("bench", path),
                os.path.join("envs", path),
            ]
            if not any(os.path.exists(os.path.join(ROOT, c)) for c in candidates):
                missing.append(f"{doc}: {path}")
    # names of files a run or a user creates, and of other projects' files, are not repo paths
    created = (
        "config.json",
        "metrics.jsonl",
        "summary.json",
        "checkpoint.msgpack",
        "checkpoint.pkl",
        "buffer.npz",
        "buffer_previous.npz",
        "_table.md",
        "rollout.mp4",
        "rollout.gif",
        "rollout.html",
        "r.gif",
        "r.mp4",
        "X.npz",
        "pm.npz",
    )
    missing = [m for m in missing if not m.endswith(created) and "/data/" not in m and "figures/" not in m]
    assert missing == []


def test_docs_name_no_document_outside_the_repo():
    for doc in DOCS:
        for line in _read(doc).splitlines():
            assert not re.search(r"\bspec\b|/work/|shared/spec", line, flags=re.I), f"{doc}: {line.strip()}"
