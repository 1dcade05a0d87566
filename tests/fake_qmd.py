"""A fake `qmd` for tests: it logs its argv and does what the file `behaviour` beside it says."""

from __future__ import annotations

import sys
from pathlib import Path

# The --qmd-timeout to run the fake with: it answers within a second even on a loaded 2-core machine
# (a Python start, plus 0.3 s when slow), so a timeout only ever cuts the cases that hang.
TIMEOUT_S = 5.0

FAKE_QMD = f"""#!{sys.executable}
import json, os, pathlib, subprocess, sys, time
here = pathlib.Path(sys.argv[0]).parent
with open(here / "argv.jsonl", "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
behaviour = (here / "behaviour").read_text().strip()
if behaviour == "ok":
    print(json.dumps([{{"file": "qmd://notes/pets.md", "score": 0, "snippet": "@@ -1 @@\\nThe user has a cat."}}]))
elif behaviour == "slow":
    time.sleep(0.3)
    print(json.dumps([{{"snippet": "slow but fine"}}]))
elif behaviour == "hang":
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", str(here)])
    time.sleep(600)
elif behaviour == "crash":
    sys.stderr.write("progress\\n" * 5000 + "Error: index is corrupt\\n")
    sys.exit(3)
elif behaviour == "killed":
    os.kill(os.getpid(), 9)
elif behaviour == "garbage":
    print("Searching... \\x00\\xff found 2 results")
elif behaviour == "megabytes":
    sys.stdout.write("[" + ",".join(['"' + "x" * 1000 + '"'] * 5000) + "]")
elif behaviour == "surrogates":
    print('[{{"snippet": "\\\\ud800 half"}}, {{"snippet": "fine"}}]')
elif behaviour == "stdout-closed":
    os.close(1)
    time.sleep(600)
"""


def write_fake_qmd(bin_dir: Path) -> Path:
    """Install the fake as an executable `qmd` in `bin_dir` (created); returns its path."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    qmd = bin_dir / "qmd"
    qmd.write_text(FAKE_QMD)
    qmd.chmod(0o755)
    return qmd
