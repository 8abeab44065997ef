"""Running balanced.py the way knife runs it: a subprocess against the local AWS and a fake IMDS."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve().parent.parent / "balanced.py"
MUTATING = frozenset(
    {"EnterStandby", "ExitStandby", "UpdateAutoScalingGroup", "CreateOrUpdateTags", "DeleteTags"}
)
# Compressed AWS: drains and health checks of about a second, so poll fast.
FAST = ("--poll", "0.1")


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str

    @property
    def summary(self) -> str:
        """The last stderr line: the one an operator greps for."""
        lines = self.stderr.strip().splitlines()
        return lines[-1] if lines else ""

    @property
    def json(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.stdout)
        return result

    def __str__(self) -> str:  # shown by pytest when an assertion fails
        return f"exit {self.code}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"


def balanced(
    *args: str, env: dict[str, str], timeout: float = 90, fast: bool = True, stdin: str | None = None
) -> Run:
    argv = [sys.executable, str(SCRIPT), *args]
    if fast and len(args) > 0 and args[0] in ("out", "in", "status", "run"):
        argv[3:3] = FAST  # right after the command, before any "-- CMD"
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, input=stdin)
    return Run(proc.returncode, proc.stdout, proc.stderr)


def mutations(aws: Any) -> list[str]:
    """The changes AWS accepted, in order."""
    return [c.action for c in aws.calls if c.action in MUTATING and c.ok]
