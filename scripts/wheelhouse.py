"""Offline wheelhouse: every wheel opd needs for another Python/platform, minus what the target image has.

    make wheelhouse PY=3.12                                   # -> wheelhouse/ (CPython 3.12, manylinux x86_64)
    make wheelhouse PY=3.12 WITH_VLLM=1                       # also vllm (hundreds of MB)
    python3 scripts/wheelhouse.py --python-version 3.12 --out wheelhouse --skip scripts/gpu_image_has.txt
    make install-offline WHEELHOUSE=wheelhouse PYTHON=python3 # on the offline node: pip --no-index

Steps: (1) opd's own wheel (`pip wheel --no-deps .`); (2) pure-Python dependencies that PyPI publishes only
as sdists (antlr4-python3-runtime 4.9.3, which omegaconf pins) are built into wheels here; (3) opd's
dependencies that the image lacks are resolved for the target (`pip install --dry-run --report` with
--platform/--python-version/--implementation cp/--only-binary=:all:, the image's pinned versions as
constraints), and (4) every resolved distribution that is not on the skip list is downloaded with
`pip download --no-deps`. Nothing is installed anywhere: the resolution installs into a throwaway
--target directory in dry-run mode, so the pip running this script can be any environment's.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# PyPI has no wheel of these (sdist only); they are pure Python, so a wheel built here installs anywhere.
SDIST_ONLY = ("antlr4-python3-runtime==4.9.3",)


def normalize(name: str) -> str:
    """PEP 503 name normalization (Foo_Bar.baz -> foo-bar-baz)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(req: str) -> str:
    return normalize(re.split(r"[\s<>=!~;\[(]", req.strip(), maxsplit=1)[0])


def read_skip(path: Path | None) -> tuple[set[str], list[str]]:
    """(names to leave out, `name==version` pins to resolve against) from a skip file."""
    names, pins = set(), []
    if path is None:
        return names, pins
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        names.add(requirement_name(line))
        if "==" in line:
            pins.append(line)
    return names, pins


def platform_args(python_version: str, max_glibc_minor: int) -> list[str]:
    tags = [f"manylinux_2_{n}_x86_64" for n in range(max_glibc_minor, 4, -1)]
    tags += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64"]
    args = ["--python-version", python_version, "--implementation", "cp", "--only-binary=:all:"]
    for tag in tags:
        args += ["--platform", tag]
    return args


def pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    print("+", " ".join(cmd[:8]), "..." if len(cmd) > 8 else "", flush=True)
    subprocess.run(cmd, check=True)


def build(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    skip, pins = read_skip(Path(args.skip) if args.skip else None)
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    if args.with_vllm:
        deps = [*deps, "vllm"]
    wanted = [d for d in deps if requirement_name(d) not in skip]
    print(f"opd's requirements the target lacks: {', '.join(wanted)}")
    print(f"left out (the target has them): {', '.join(sorted(skip)) or 'nothing'}")

    pip("wheel", "--quiet", "--no-deps", "-w", str(out), str(ROOT))
    for req in SDIST_ONLY:
        pip("wheel", "--quiet", "--no-deps", "-w", str(out), req)

    plat = platform_args(args.python_version, args.max_glibc)
    with tempfile.TemporaryDirectory(prefix="opd-wheelhouse-") as tmp:
        constraints = Path(tmp) / "constraints.txt"
        constraints.write_text("".join(f"{p}\n" for p in pins))
        report = Path(tmp) / "report.json"
        pip(
            "install", "--quiet", "--dry-run", "--ignore-installed", "--report", str(report),
            "--target", str(Path(tmp) / "target"), "--find-links", str(out), "-c", str(constraints),
            *plat, *wanted,
        )  # fmt: skip
        resolved = json.loads(report.read_text())["install"]
    keep = sorted(
        {
            f"{normalize(i['metadata']['name'])}=={i['metadata']['version']}"
            for i in resolved
            if normalize(i["metadata"]["name"]) not in skip
        }
    )
    built_here = {requirement_name(r) for r in SDIST_ONLY}
    download = [r for r in keep if requirement_name(r) not in built_here]
    pip("download", "--quiet", "--no-deps", "-d", str(out), *plat, *download)

    stale = {normalize(p.name.split("-")[0]) for p in out.glob("*.whl")} - {requirement_name(r) for r in keep}
    stale -= {"opd"}
    wheels = sorted(out.glob("*.whl"))
    size = sum(p.stat().st_size for p in wheels)
    (out / "wheelhouse.json").write_text(
        json.dumps(
            {
                "python_version": args.python_version,
                "max_glibc": f"2.{args.max_glibc}",
                "with_vllm": args.with_vllm,
                "skipped": sorted(skip),
                "pinned_to_target": pins,
                "wheels": [p.name for p in wheels],
                "bytes": size,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wheelhouse {out}: {len(wheels)} wheels, {size / 2**20:.1f} MiB")
    if stale:
        print(f"note: {out} also holds wheels of {', '.join(sorted(stale))} from an earlier build")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python-version", default="3.12", help="target CPython, e.g. 3.12")
    parser.add_argument("--out", default=str(ROOT / "wheelhouse"))
    parser.add_argument("--skip", default=None, help="file of distributions the target already has")
    parser.add_argument("--with-vllm", action="store_true", help="also vllm (CUDA; hundreds of MB)")
    parser.add_argument(
        "--max-glibc", type=int, default=28, help="newest manylinux_2_N the target's glibc runs (N)"
    )
    args = parser.parse_args(argv)
    import pip  # the resolver of pip < 24 backtracks for many minutes on this cross-platform resolve

    if int(pip.__version__.split(".")[0]) < 24:
        print(
            f"error: {sys.executable} has pip {pip.__version__}; the wheelhouse needs pip >= 24 (run it with "
            f"WHEEL_PYTHON=.venv/bin/python, or upgrade: {sys.executable} -m pip install -U pip)",
            file=sys.stderr,
        )
        return 2
    return build(args)


if __name__ == "__main__":
    sys.exit(main())
