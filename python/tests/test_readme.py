"""The README's Python example runs as written (its local demo: a master and two
workers), so that it stays true."""

import re
import subprocess
import sys
from pathlib import Path

from conftest import TIMEOUT

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_example():
    text = README.read_text()
    section = text.split("\n## From Python\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "no python block in README's 'From Python' section"
    return blocks[0]


def test_readme_python_example_runs(tmp_path):
    script = tmp_path / "diloco.py"
    script.write_text(readme_example())
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=2 * TIMEOUT)
    assert out.returncode == 0, out.stdout + out.stderr
    # "rank R/S round K: loss L state DIGEST": two workers, five rounds each. The two
    # processes share the pipe, so lines may run together: match, do not split.
    lines = re.findall(r"rank (\d+)/\d+ round (\d+): loss \S+ state ([0-9a-f]{16})", out.stdout)
    assert len(lines) == 10, out.stdout
    last = [(rank, digest) for rank, step, digest in lines if step == "4"]
    assert sorted(rank for rank, _ in last) == ["0", "1"], out.stdout
    assert last[0][1] == last[1][1], "workers ended with different weights"
