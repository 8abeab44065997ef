"""The README's "try it without AWS" command: `python -m tests.sandbox`, run as a newcomer would."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.sandbox import parse_args

ROOT = Path(__file__).resolve().parent.parent
COMMAND = [sys.executable, "-m", "tests.sandbox"]


def host_lines(output: str, host: str) -> list[str]:
    """What one host printed, without the knife-style prefix (nor the command echoed first)."""
    lines = [line.split("  ", 1)[1] for line in output.splitlines() if line.startswith(host + "  ")]
    return [line for line in lines if not line.startswith("$ ")]


def test_sandbox_rolls_every_instance_out_and_back_in() -> None:
    run = subprocess.run(
        [*COMMAND, "--fast", "--size", "3"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    assert "Traceback" not in output, output

    hosts = re.findall(r"EnterStandby (i-[0-9a-f]+) in web-asg", run.stdout)
    assert len(hosts) == 3 and len(set(hosts)) == 3, output
    for host in hosts:
        lines = host_lines(run.stdout, host)
        steps = [
            f"balanced: out: OK (0) {host} web-asg: Standby",
            f"deployed v2 on {host}",
            f"ExitStandby {host} in web-asg",
            f"balanced: in: OK (0) {host} web-asg: InService, healthy in 2 load balancers",
        ]
        found = [next((i for i, line in enumerate(lines) if step in line), -1) for step in steps]
        assert -1 not in found and found == sorted(found), "\n".join(lines)
    assert run.stdout.count("MinSize of web-asg 3 -> 1") == 3, output
    assert run.stdout.count("MinSize of web-asg restored 1 -> 3") == 3, output
    fleet = [line for line in run.stdout.splitlines() if line.startswith("fleet: ")]
    assert len(fleet) == 4 and fleet[-1].startswith("fleet: 3/3 serving, min 3 desired 3 max 5 |"), output
    assert run.stdout.splitlines()[-1].startswith(
        "sandbox: OK: rolled 3 instances out and back in; all InService and healthy in 2 load balancers, "
        "MinSize 3 restored ["
    ), output


def test_ctrl_c_interrupts_the_hosts_and_shuts_down_cleanly() -> None:
    proc = subprocess.Popen(
        [*COMMAND, "--size", "3"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # a terminal's Ctrl-C: SIGINT to the whole foreground group
    )
    assert proc.stdout is not None
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if re.search(r"EnterStandby i-[0-9a-f]+ in web-asg", line):
                os.killpg(proc.pid, signal.SIGINT)
                break
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    output = "".join(seen) + rest
    assert proc.returncode == 130, output
    assert "Traceback" not in output, output
    assert re.search(r"balanced: out: INTERRUPTED \(130\) i-[0-9a-f]+ web-asg", output), output
    assert output.splitlines()[-1].startswith("sandbox: INTERRUPTED ["), output


@pytest.mark.parametrize(
    "argv",
    [["--size", "1"], ["--size", "3", "--parallel", "4"], ["--size", "4", "--min-healthy-percent", "80"]],
)
def test_impossible_options_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
