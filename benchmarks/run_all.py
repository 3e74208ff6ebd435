"""Run every ``benchmarks/bench_*.py`` one after another and print their output.

    python benchmarks/run_all.py              # what `make bench` runs
    python benchmarks/run_all.py --quick      # flags other than --scaling/--timeout pass through
    python benchmarks/run_all.py --scaling    # also bench_scaling.py (made for a many-core box)

Exits non-zero when any benchmark script fails or runs past its time limit. Benchmarks print
figures and ratios; they never assert on timings, so "fails" means the script itself broke.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _group_flags(tokens: list[str]) -> list[list[str]]:
    """``["--quick", "--workers", "4"]`` -> ``[["--quick"], ["--workers", "4"]]``."""
    groups: list[list[str]] = []
    for tok in tokens:
        if tok.startswith("-") or not groups:
            groups.append([tok])
        else:
            groups[-1].append(tok)
    return groups


def _accepted(script: str, groups: list[list[str]]) -> tuple[list[str], list[str]]:
    """Split the pass-through flags into those ``script --help`` lists and those it lacks.

    The scripts are written by different people; one that has no ``--memory`` should still run
    (without it) rather than fail on an unknown argument.
    """
    try:
        helptext = subprocess.run(
            [sys.executable, script, "--help"], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError):
        helptext = ""
    flags = set(re.findall(r"--[A-Za-z0-9][A-Za-z0-9_-]*", helptext))
    ok: list[str] = []
    skipped: list[str] = []
    for group in groups:
        name = group[0].split("=", 1)[0]
        (ok if name in flags else skipped).extend(group)
    return ok, skipped


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scaling", action="store_true", help="include bench_scaling.py")
    ap.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds per script (default 900, or 300 with --quick)",
    )
    args, passthrough = ap.parse_known_args(argv)
    timeout = args.timeout or (300 if "--quick" in passthrough else 900)
    scripts = sorted(glob.glob(os.path.join(HERE, "bench_*.py")))
    if not args.scaling:
        scripts = [s for s in scripts if os.path.basename(s) != "bench_scaling.py"]
    failed: list[str] = []
    for script in scripts:
        name = os.path.basename(script)
        flags, skipped = _accepted(script, _group_flags(passthrough))
        cmd = [sys.executable, script, *flags]
        print(f"\n===== {name} {' '.join(flags)} =====\n", flush=True)
        if skipped:
            print(f"(not passed: {' '.join(skipped)} — {name} does not take it)\n", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = f"timeout after {timeout:.0f} s"
        except KeyboardInterrupt:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        took = time.perf_counter() - t0
        if rc != 0:
            failed.append(f"{name}: {rc if isinstance(rc, str) else f'exit code {rc}'}")
        print(f"\n===== {name}: {'ok' if rc == 0 else 'FAILED'} in {took:.0f} s =====", flush=True)
    if failed:
        print("\nFAILED: " + "; ".join(failed), flush=True)
        return 1
    print(f"\nall {len(scripts)} benchmark scripts ran", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
