"""The shared science blocks (residual tower, tanh-Gaussian actor, energies and losses, the ring buffer) are
byte-identical in every script that carries them, so a fork still edits one self-contained file while the
copies cannot drift. (Host code is not copied: the scripts import it from runkit.)

A block starts at `# --- shared block: <name> (identical in every script; tests/test_copies.py) ---`
(indented inside a class body, e.g. shared flags of an Args) and ends at `# --- end shared block: <name> ---`.
Any top-level script with such a marker is checked.
"""

import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START = re.compile(r"^ *# --- shared block: (\w+) \(identical in every script; tests/test_copies\.py\) ---$", re.M)
# Which scripts must carry which block (a new script joins by carrying the markers).
REQUIRED = {
    "tower": ("crl_deep.py", "sac_her.py", "td3_her.py", "gcbc.py", "offline_crl.py", "qrl.py"),
    "energies": ("crl_deep.py", "offline_crl.py"),
    "tanh_gaussian": ("crl_deep.py", "sac_her.py", "qrl.py"),
    "ring_buffer": ("crl_deep.py", "qrl.py"),
    "her": ("sac_her.py", "td3_her.py"),
    "her_args": ("sac_her.py", "td3_her.py"),  # the flags both HER baselines share, inside their Args
    "ddpg_bc": ("offline_crl.py", "qrl.py"),
    "offline_goals": ("offline_crl.py", "qrl.py"),
}


def blocks_of(text: str) -> dict:
    """{name: text from the start marker to the end marker, both included}; ValueError if malformed."""
    out = {}
    for match in START.finditer(text):
        name = match.group(1)
        end_marker = f"# --- end shared block: {name} ---"
        end = text.find(end_marker, match.end())
        if end < 0:
            raise ValueError(f"block {name!r} has no end marker")
        if name in out:
            raise ValueError(f"block {name!r} appears twice")
        out[name] = text[match.start() : end + len(end_marker)]
    return out


def drifted(folder: str) -> list:
    """One line per block whose copies differ, naming the first differing line of each odd copy."""
    copies = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.py"))):
        with open(path) as f:
            for name, text in blocks_of(f.read()).items():
                copies.setdefault(name, {})[os.path.basename(path)] = text
    problems = []
    for name, scripts in REQUIRED.items():
        missing = [s for s in scripts if s not in copies.get(name, {})]
        if missing:
            problems.append(f"block {name!r} missing from {', '.join(missing)}")
    for name, by_script in copies.items():
        reference_script = REQUIRED.get(name, sorted(by_script))[0]
        reference = by_script.get(reference_script)
        if reference is None:
            continue
        for script, text in by_script.items():
            if text != reference:
                lines = zip(reference.splitlines(), text.splitlines())
                line = next((i for i, (a, b) in enumerate(lines, 1) if a != b), None)
                problems.append(f"block {name!r} in {script} differs from {reference_script} (block line {line})")
    return problems


def test_every_shared_block_is_identical_in_every_script():
    assert drifted(ROOT) == []


def test_each_script_carries_its_blocks_once():
    for scripts in REQUIRED.values():
        for script in scripts:
            with open(os.path.join(ROOT, script)) as f:
                text = f.read()
            assert blocks_of(text), script  # raises on a duplicate or an unterminated block


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_a_one_character_drift_is_caught(tmp_path, name):
    for script in {s for scripts in REQUIRED.values() for s in scripts}:
        with open(os.path.join(ROOT, script)) as f:
            (tmp_path / script).write_text(f.read())
    target = tmp_path / REQUIRED[name][-1]
    text = target.read_text()
    block = blocks_of(text)[name]
    middle = len(block) // 2
    mutated = block[:middle] + ("x" if block[middle] != "x" else "y") + block[middle + 1 :]
    target.write_text(text.replace(block, mutated))
    problems = drifted(str(tmp_path))
    assert len(problems) == 1 and f"block {name!r} in {REQUIRED[name][-1]} differs" in problems[0]


def test_a_missing_end_marker_or_block_is_caught(tmp_path):
    for script in REQUIRED["tower"]:
        with open(os.path.join(ROOT, script)) as f:
            (tmp_path / script).write_text(f.read())
    gcbc = tmp_path / "gcbc.py"
    gcbc.write_text(gcbc.read_text().replace("# --- end shared block: tower ---", ""))
    with pytest.raises(ValueError, match="no end marker"):
        drifted(str(tmp_path))
    sac = tmp_path / "sac_her.py"
    sac.write_text(sac.read_text().replace("# --- shared block: tower", "# --- block: tower"))
    gcbc.unlink()
    assert any("'tower' missing from sac_her.py" in p for p in drifted(str(tmp_path)))
