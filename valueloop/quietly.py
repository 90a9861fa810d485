"""Run a noisy command as one quiet line: a spinner and its time, the output in a log file.

Standard library only: the Makefile runs it with the system Python before the virtualenv
exists (``python3 -m valueloop.quietly --label install --log FILE -- pip install …``).
On failure it prints the log's tail and exits with the command's status.
"""

from __future__ import annotations

import argparse
import itertools
import subprocess
import sys
import time
from pathlib import Path

FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
TAIL_LINES = 40


def format_duration(seconds: float) -> str:
    """``4.2s``, ``1m05s``: what every stage line shows."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s"


def tail(path: Path, lines: int = TAIL_LINES) -> str:
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


def run_quietly(label: str, command: list[str], log_path: Path, verbose: bool = False) -> int:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    if verbose:
        returncode = subprocess.run(command, check=False).returncode
    else:
        live = sys.stdout.isatty()
        with log_path.open("w") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
            for frame in itertools.cycle(FRAMES):
                if process.poll() is not None:
                    break
                if live:
                    elapsed = format_duration(time.monotonic() - started)
                    print(f"\r{frame} {label:<14} {elapsed}", end="", flush=True)
                time.sleep(0.1)
        returncode = process.returncode
        if live:
            print("\r\033[K", end="")
    elapsed = format_duration(time.monotonic() - started)
    if returncode == 0:
        where = "" if verbose else f"   log: {log_path}"
        print(f"✓ {label:<14} {elapsed:>7}{where}", flush=True)
    else:
        print(f"✗ {label:<14} {elapsed:>7}   failed (exit {returncode})", flush=True)
        if not verbose:
            print(f"--- last {TAIL_LINES} lines of {log_path} ---\n{tail(log_path)}", flush=True)
    return returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True, help="what the line says, e.g. install")
    parser.add_argument("--log", type=Path, required=True, help="where the output goes")
    parser.add_argument("--verbose", action="store_true", help="show the output as it comes")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --")
    return run_quietly(args.label, command, args.log, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
