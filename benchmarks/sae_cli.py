"""The `sae` commands a study runs, exactly as a user would type them (benchmarks/storage_study.py,
benchmarks/batchtopk_study.py): each in a process of its own, or, in their tiny modes, in this one,
where a child's start-up (≈3 s of imports on 2 cores) would be most of each command's time."""

import contextlib
import io
import subprocess
import sys
from unittest import mock


def sae(*args: str, in_process: bool = False, echo: bool = False) -> str:
    """Run `sae ARGS` (the command echoed first) and return what it printed on stdout, also printed here
    with echo; its stderr (progress bars) passes through. A failing command raises CalledProcessError
    either way."""
    print("+ sae", " ".join(args), flush=True)
    out = _run(args, in_process)
    if echo:
        print(out, end="")
    return out


def _run(args: tuple[str, ...], in_process: bool) -> str:
    if not in_process:
        return subprocess.run(
            [sys.executable, "-m", "sae", *args], check=True, stdout=subprocess.PIPE, text=True
        ).stdout
    from sae.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), mock.patch.object(sys, "argv", ["sae", *args]):
        try:
            main()  # what `python -m sae` runs; it exits only on an error
        except SystemExit as e:
            if e.code:
                raise subprocess.CalledProcessError(e.code, ["sae", *args], out.getvalue()) from e
    return out.getvalue()
