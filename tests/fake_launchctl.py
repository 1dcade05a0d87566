"""A fake `launchctl` on PATH that records its argv and keeps which labels are loaded, like launchd."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from fake_commands import command_on_path

UID = 501

# The fake keeps which labels are loaded in a JSON state file, so `print` answers like launchd.
FAKE_LAUNCHCTL = f"""#!{sys.executable}
import json, os, plistlib, sys
args = sys.argv[1:]
with open(os.environ["FAKE_LAUNCHCTL_LOG"], "a") as log:
    log.write(json.dumps(args) + "\\n")
state_path = os.environ["FAKE_LAUNCHCTL_STATE"]
state = json.load(open(state_path)) if os.path.exists(state_path) else {{"loaded": {{}}, "fail": {{}}}}
def save():
    json.dump(state, open(state_path, "w"))
verb = args[0]
label = args[-1].rsplit("/", 1)[-1]
if verb in state["fail"]:
    code, message = state["fail"].pop(verb)
    if verb == "bootout" and code == 36:  # launchd keeps unloading in the background
        state["unloading"] = {{label: 1}}
    save()
    sys.stderr.write(message + "\\n")
    sys.exit(code)
if verb == "print" and label in state.get("unloading", {{}}):
    if state["unloading"][label] == 0:
        del state["unloading"][label]
        state["loaded"].pop(label, None)
    else:
        state["unloading"][label] -= 1
    save()
if verb == "bootstrap":
    label = plistlib.load(open(args[2], "rb"))["Label"]
    if label in state["loaded"]:
        sys.stderr.write("Bootstrap failed: 5: Input/output error\\n"); sys.exit(5)
    state["loaded"][label] = 4242
elif verb == "bootout":
    if state["loaded"].pop(label, None) is None:
        sys.stderr.write("Boot-out failed: 3: No such process\\n"); sys.exit(3)
elif verb in ("kickstart", "print") and label not in state["loaded"]:
    sys.stderr.write(f"Could not find service {{label}} in domain for user gui: {UID}\\n")
    sys.exit(113)
elif verb == "print":
    pid = state["loaded"][label]
    print(f"gui/{UID}/{{label}} = {{{{")
    print("\\tactive count = 1")
    print("\\tstate = running")
    print("\\tendpoints = {{")
    print("\\t\\tstate = active")
    print("\\t\\tpid = 1")
    print("\\t}}")
    print(f"\\tpid = {{pid}}")
    print("\\tlast exit code = (never exited)")
    print("}}")
save()
"""


@pytest.fixture
def fake_launchctl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Put the fake `launchctl` first on PATH; returns the JSON-lines log of its calls."""
    command_on_path(monkeypatch, tmp_path / "bin", "launchctl", FAKE_LAUNCHCTL)
    log = tmp_path / "launchctl.log"
    monkeypatch.setenv("FAKE_LAUNCHCTL_LOG", str(log))
    monkeypatch.setenv("FAKE_LAUNCHCTL_STATE", str(tmp_path / "launchctl.state"))
    return log


def launchctl_calls(log: Path) -> list[list[str]]:
    """The argv of every call the fake received, in order."""
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def fail_next(tmp_path: Path, verb: str, code: int, message: str) -> None:
    """Make the fake's next `verb` call fail with this exit code and message."""
    state_path = tmp_path / "launchctl.state"
    state = json.loads(state_path.read_text()) if state_path.exists() else {"loaded": {}, "fail": {}}
    state["fail"][verb] = [code, message]
    state_path.write_text(json.dumps(state))
