"""The numerical-equality tests (`pytest -m numerics`) under every CPU kernel dispatch this machine
supports and with 1 and 2 torch threads: `make test-numerics`.

    make test-numerics                         # all settings, then a table; exit 1 if any failed
    python scripts/numerics.py -- -k microbatch   # extra pytest arguments after --

A float tolerance that holds on one CPU by luck fails on another (an AVX-512 machine summed an SFT
gradient in another order and broke a 5e-6 weight tolerance after Adam). A machine can only dispatch
down: ATEN_CPU_CAPABILITY=default (no vector kernels), avx2, avx512 where the CPU has it, and unset (the
best it has). Each setting runs in a fresh pytest process; the capability torch really used is read back
from a child process with the same environment, so a setting the CPU cannot honour is reported, not
silently counted.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

LEVELS = ("default", "avx2", "avx512")  # torch's ATEN_CPU_CAPABILITY values, lowest first
THREADS = (1, 2)


def capability(env: dict[str, str]) -> str:
    """What torch dispatches to under `env` (e.g. AVX512, AVX2, DEFAULT)."""
    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()


def counts(output: str) -> dict[str, int]:
    """pytest's closing line -> {'passed': n, 'failed': n, ...}."""
    line = next((x for x in reversed(output.splitlines()) if re.search(r"\d+ (passed|failed|error)", x)), "")
    return {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", line)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args()
    base = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "OMP_NUM_THREADS")}
    best = capability(base)
    levels = [lvl for lvl in LEVELS if lvl != "avx512" or best == "AVX512"]
    settings = [(lvl, t) for lvl in [*levels, None] for t in THREADS]
    print(f"machine: torch dispatches {best} when unset; settings: {len(settings)}", flush=True)
    rows, failed = [], False
    for level, threads in settings:
        env = {**base, "OMP_NUM_THREADS": str(threads), "OPD_TEST_THREADS": str(threads)}
        if level is not None:
            env["ATEN_CPU_CAPABILITY"] = level
        used = capability(env)
        # vLLM-CPU builds some kernels with torch.compile, and inductor's C++ code for the scalar ISA does
        # not compile (torch 2.13: "'at::vec' has not been declared"): vLLM cannot run under
        # ATEN_CPU_CAPABILITY=default, so its parity tests run under the other settings only
        marker = "numerics and not vllm" if level == "default" else "numerics"
        name = f"ATEN_CPU_CAPABILITY={level or '(unset)'} threads={threads}"
        name += " (no vLLM)" if level == "default" else ""
        print(f"== {name} (torch uses {used})", flush=True)
        t0 = time.perf_counter()
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-m",
            marker,
            "-p",
            "no:cacheprovider",
            *args.pytest_args,
        ]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        c = counts(res.stdout)
        ok = res.returncode == 0 and c.get("passed", 0) > 0
        failed |= not ok
        if not ok:
            print(res.stdout[-6000:], res.stderr[-2000:], sep="\n")
        rows.append(
            (
                name,
                used,
                c.get("passed", 0),
                c.get("failed", 0) + c.get("error", 0) + c.get("errors", 0),
                c.get("skipped", 0),
                seconds,
                ok,
            )
        )
        print(f"   {'ok' if ok else 'FAILED'}: {c} in {seconds:.0f} s", flush=True)
    print("\n| setting | torch uses | passed | failed | skipped | seconds |\n|---|---|---|---|---|---|")
    for name, used, p, f, s, sec, _ in rows:
        print(f"| {name} | {used} | {p} | {f} | {s} | {sec:.0f} |")
    total_p, total_f = sum(r[2] for r in rows), sum(r[3] for r in rows)
    print(f"\nnumerics: {total_p} passed, {total_f} failed over {len(rows)} settings")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
