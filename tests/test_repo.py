"""The README's test command is what CI runs."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ci_runs_the_readme_test_command():
    readme = open(os.path.join(ROOT, "README.md")).read()
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    test_cmd = [b for b in blocks if "pytest" in b]
    assert len(test_cmd) == 1
    assert test_cmd[0].strip() in ci.splitlines()


def test_nothing_shadows_the_kernels_package_name():
    # diffusers probes for HF's `kernels` package by name; scripts put bench/ first on sys.path.
    for folder in ("bench", "tests"):
        assert not os.path.exists(os.path.join(ROOT, folder, "kernels.py"))
        assert not os.path.exists(os.path.join(ROOT, folder, "kernels"))
