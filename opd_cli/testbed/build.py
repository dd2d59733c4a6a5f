"""Build the testbed: tiny models trained from scratch, with this tool's own stages, in which the paper's
failure modes happen on a CPU in minutes.

    opd testbed build                    # into opd_cli/testbed/assets (or $OPD_TESTBED_DIR); skips built steps
    opd testbed build --force            # rebuild everything
    python -m opd_cli.testbed.build /tmp/testbed --seed 1

What gets built (3-digit addition with a scratchpad, `opd_cli.tasks.arith`; char-level tokenizer):

  student_base   2 layers x 64, pretrained by `sft_train` on raw text: generic strings of the task alphabet
                 and task-domain text (sums `347+285=632`, column facts `7+5+1=13`), never the response
                 format: it has latent skill (the paper's Base model) but its task rollouts are malformed.
  student_sft    2 x 64, SFT on verified student-style traces, stopped early (first dev evaluation at or
                 above `stop_at`) so it is well formed but only ~70% accurate: room for distillation.
                 Trained from scratch, not from student_base: on this task the generic-string pretraining
                 slowed SFT several-fold (dev accuracy after 500 steps at lr 1e-3: 12% from student_base vs
                 85% from scratch), a cost the build budget cannot pay; student_base stays the analogue of
                 the paper's Base model for the "OPD without SFT" cell.
  teacher_large  3 x 96, SFT to >= 95% on a different reasoning style (operands swapped) in which a
                 fraction of traces start with student-style steps, write the revision token `W;` and
                 restart: on student-style prefixes it pushes toward revising (mechanism 1).
  teacher_rlvr   student_sft trained by `grpo_train` (GRPO, verifier reward) to >= 95%: close to the student.
  opsd_base      2 x 64, SFT on a mixture in which some prompts carry privileged information in the OPSD
                 teacher formats of conf/teacher/self_*.yaml: a hint line (`{problem}\\nH:{answer}`; with a
                 hint it answers directly `A:<answer>` on 70% of its traces), a reference solution in any
                 valid style (`{problem}\\nR:{solution}`, written out as given), the system line
                 `S:concise` (concise scratchpad, also continued from full-style prefixes given as a
                 prefill) or a stated preference `P:msd|lsd|restate` (how the work and result are
                 presented). Without PI it writes the full scratchpad. It trains until the concise
                 scratchpad under `S:concise` and the lsd and restate presentations under `P:` are each
                 >= 90% accurate on the dev set (stronger than student_sft: at this size those are learned
                 much later than the plain scratchpad) and the hint teacher's mean probability of
                 answering directly reaches the recipe's `stop_at_direct_answer`.
  opsd_rlvr      opsd_base trained by `grpo_train` on plain prompts: the RLVR-adapted PI teacher
                 (conf/teacher/rlvr_answer.yaml), stronger without PI and still reading the hint line.

Determinism: every step seeds itself from (seed, step name), runs single-threaded (results do not depend
on the machine's core count), trains on data generated from the seed and runs in a worker process with
pinned kernels (`PINNED_KERNELS`: ATen's AVX2 kernels, MKL's COMPATIBLE branch), so the same seed gives the
same weights and figures on every CPU of one vendor with AVX2, whatever its own best kernels (measured on
Intel Xeons across sessions, and between two builds on an AMD EPYC). Not across vendors: a `--force`
build on an AMD EPYC (Zen 4) gave none of the six Intel-built shipped files, although MKL ran its
COMPATIBLE branch there (experiments/testbed.md, "Thirteenth session"; scripts/kernel_fingerprint.py
hashes each op to find the one that differs). Both pins are needed (measured,
experiments/testbed.md, "Testbed v4: kernels across CPU vendors"): unpinned, ATen picks AVX-512 kernels where the CPU
has them, and MKL's ISA branches (MKL_CBWR=AVX2 and the like) are Intel-only: on an AMD CPU MKL runs its
own dispatch whatever MKL_CBWR asks, so a build pinned to the AVX2 branch gave other weights on an Intel
Xeon than on an AMD EPYC (0 of 6 files equal). COMPATIBLE (SSE2 without the approximate rcpps/rsqrtps)
is the one branch MKL honours on both vendors (it is not enough for equal bits across them, above); it
costs ~1.5x the GEMM time. Build steps and the models' evaluations share one pool of two worker
processes: a step starts as soon as its parent is built, a model's evaluation as soon as it and
student_sft are built and no step is waiting for a worker. A step whose recipe hash matches the
`build_info.json` in its directory is skipped (`force=True` rebuilds).
`manifest.json` records versions, the recipe hash, weight hashes and each model's measured figures.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import copy
import json
import logging
import multiprocessing as mp
import os
import queue as queue_mod
import sys
import time
from pathlib import Path

import torch

import opd_cli
from opd_cli.data import write_rows
from opd_cli.io import atomic_write_json
from opd_cli.testbed.builders import char_tokenizer, make_rows, run_step
from opd_cli.testbed.measurements import evaluate_model, rounded
from opd_cli.testbed.paths import ASSETS_DIR, MANIFEST, MODEL_NAMES, PREFIX, missing_models, testbed_dir
from opd_cli.testbed.recipe import MANIFEST_FORMAT, PRIORITY, RECIPE, config_hash, file_sha256, parents_of

log = logging.getLogger("opd")

# The kernels every build step and evaluation runs with, in a spawned worker (the variables are read when
# torch and MKL load): ATen's AVX2 kernels (AVX-512 ones sum in another order) and MKL's COMPATIBLE branch
# of conditional numerical reproducibility, the only branch MKL honours on non-Intel CPUs (its AVX2 branch
# falls back to MKL's own dispatch there). CPUs of one vendor with AVX2 then compute the same bits; an AMD
# and an Intel CPU do not (measured, experiments/testbed.md, "Thirteenth session").
PINNED_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE"}
PINNED_CAPABILITY = "AVX2"  # torch.backends.cpu.get_cpu_capability() under PINNED_KERNELS
EVAL = "eval "  # the pool's name for a model's evaluation job: EVAL + model name


def kernels_pinned() -> bool:
    """Whether this process already runs with PINNED_KERNELS (then a one-worker build may run here)."""
    return torch.backends.cpu.get_cpu_capability() == PINNED_CAPABILITY and all(
        os.environ.get(k) == v for k, v in PINNED_KERNELS.items()
    )


def cpu_description() -> str:
    """This machine's CPU as `<vendor_id> <model name> (family F model M, <widest ISA>)` from
    /proc/cpuinfo: builds reproduce bit for bit within a CPU vendor, not across (experiments/testbed.md),
    so the manifest records where it was built."""
    import platform

    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine() or "unknown"
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("vendor_id", "model name", "cpu family", "model", "flags") and key not in fields:
            fields[key] = value.strip()
    flags = set(fields.get("flags", "").split())
    isa = "avx512f" if "avx512f" in flags else "avx2" if "avx2" in flags else "no avx2"
    return (
        f"{fields.get('vendor_id', '?')} {fields.get('model name', '?')} "
        f"(family {fields.get('cpu family', '?')} model {fields.get('model', '?')}, {isa})"
    )


def worker_kernels() -> dict:
    """The kernels this process computes with (what a build worker reports)."""
    return {"capability": torch.backends.cpu.get_cpu_capability(), "MKL_CBWR": os.environ.get("MKL_CBWR")}


@contextlib.contextmanager
def pinned_environment():
    """PINNED_KERNELS in os.environ while worker processes are spawned (they inherit it)."""
    saved = {k: os.environ.get(k) for k in PINNED_KERNELS}
    os.environ.update(PINNED_KERNELS)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ----------------------------------------------------------------------------------------------- build
def _versions() -> dict:
    import platform

    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "opd": opd_cli.__version__,
    }


def write_data(out: Path, recipe: dict, seed: int) -> dict:
    """data/<task>/{train,eval}.jsonl (readable by `opd_cli.data.load_rows` / `datasets`); train.jsonl holds
    the first recipe["data"]["shipped_train"] training rows."""
    entries = {}
    for task_name, splits in make_rows(recipe, seed).items():
        entries[task_name] = {}
        for split in ("train", "eval"):
            rows = splits[split][: recipe["data"]["shipped_train"]] if split == "train" else splits[split]
            path = write_rows(rows, out / "data" / task_name / f"{split}.jsonl")
            entries[task_name][split] = {
                "path": str(path.relative_to(out)),
                "rows": len(rows),
                "sha256": file_sha256(path),
            }
    return entries


def _params(path: Path) -> int:
    import math

    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def build_testbed(
    out_dir: str | os.PathLike | None = None,
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
    workers: int | None = None,
    recipe: dict | None = None,
) -> dict:
    """Build (or complete) the testbed in `out_dir` (default: the package's assets); returns the manifest."""
    out = Path(out_dir) if out_dir is not None else ASSETS_DIR
    recipe = copy.deepcopy(recipe or RECIPE)
    chash = config_hash(recipe)
    out.mkdir(parents=True, exist_ok=True)
    old = _read_manifest(out)
    if (
        not force
        and old is not None
        and old.get("config_hash") == chash
        and old.get("seed") == seed
        and _models_intact(out, old)
    ):
        log.info("testbed at %s is up to date (config %s)", out, chash[:12])
        return old
    workers = workers if workers is not None else min(2, os.cpu_count() or 1)
    t0 = time.perf_counter()
    data = write_data(out, recipe, seed)
    # One pool for the build steps and the evaluations: a model is evaluated as soon as it (and
    # student_sft, whose rollouts every evaluation scores) is built, on a worker no build step is ready
    # for, instead of after the last step. Steps come first in the dict, so a ready step goes first.
    jobs = {n: (run_step, (n, str(out), seed, recipe, force), parents_of(n, recipe), True) for n in PRIORITY}
    for n in MODEL_NAMES:
        jobs[EVAL + n] = (
            evaluate_model,
            (n, str(out), seed, recipe),
            (n,) if n == "student_sft" else (n, "student_sft"),
            False,
        )
    results, finished = _run_jobs(jobs, workers, progress)
    built = {n: results[n] for n in MODEL_NAMES}
    evals = {n: results[EVAL + n] for n in MODEL_NAMES}
    build_seconds = max(finished[n] for n in MODEL_NAMES) - t0
    capabilities = sorted({i.get("cpu_capability") or "?" for i in built.values() if not i.get("skipped")})
    if any(c != PINNED_CAPABILITY for c in capabilities if c != "?"):
        log.warning(
            "testbed steps ran with CPU capability %s, not %s (this CPU lacks AVX2?): the weights will "
            "not match the shipped ones",
            ",".join(capabilities),
            PINNED_CAPABILITY,
        )
    for message in unmet_stops(built, recipe):
        log.warning("%s", message)
    models = {}
    for name in MODEL_NAMES:
        info, figures = built[name], evals[name]
        path = out / name
        size = "teacher" if name == "teacher_large" else "student"
        models[name] = {
            "path": name,
            "architecture": {**recipe[size], "params": _params(path)},
            "recipe_hash": info["stage_hash"],
            "sha256": file_sha256(path / "model.safetensors"),
            "train": rounded({k: v for k, v in info["train"].items() if k != "dev_history"}),
            "eval": figures,
        }
    manifest = {
        "format": MANIFEST_FORMAT,
        "seed": seed,
        "config_hash": chash,
        "recipe": recipe,
        "versions": _versions(),
        "tokenizer": {"vocab_size": len(char_tokenizer())},
        "data": data,
        "models": models,
        "timing": {
            "build_seconds": round(build_seconds, 1),
            "total_seconds": round(time.perf_counter() - t0, 1),
            "steps": {n: built[n].get("seconds") for n in MODEL_NAMES},
            "skipped": sorted(n for n in MODEL_NAMES if built[n].get("skipped")),
            "workers": workers,
        },
        "kernels": {**PINNED_KERNELS, "capability": capabilities, "cpu": cpu_description()},
    }
    atomic_write_json(out / MANIFEST, manifest)
    log.info("testbed built at %s in %.0fs", out, manifest["timing"]["total_seconds"])
    return manifest


def unmet_stops(built: dict[str, dict], recipe: dict) -> list[str]:
    """One line per step built now that ran to its step cap: its stop condition (`stop_at` and the
    others in its recipe entry) did not end it earlier, so its figures may miss the targets the
    experiments rely on (tests/test_testbed.py::test_manifest_targets). Steps with no stop condition
    (student_base) and skipped steps are not checked."""
    lines = []
    for name, info in built.items():
        cfg = recipe.get(name, {})
        train = info.get("train") or {}
        if info.get("skipped") or "stop_at" not in cfg or train.get("steps") is None:
            continue
        if train["steps"] >= cfg["steps"]:
            dev = train.get("dev_accuracy")
            lines.append(
                f"testbed step {name} ran to its cap of {cfg['steps']} steps without meeting its stop "
                f"condition (stop_at {cfg['stop_at']}, last dev accuracy "
                f"{'n/a' if dev is None else f'{dev:.3f}'}): this build's figures may miss the manifest "
                "targets, and the grid's verdicts may differ from the shipped testbed's "
                "(experiments/testbed.md)"
            )
    return lines


def _read_manifest(out: Path) -> dict | None:
    try:
        return json.loads((out / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _models_intact(out: Path, manifest: dict) -> bool:
    for name in MODEL_NAMES:
        entry = manifest.get("models", {}).get(name)
        weights = out / name / "model.safetensors"
        if entry is None or not weights.is_file() or file_sha256(weights) != entry.get("sha256"):
            return False
    return True


def _run_jobs(jobs: dict[str, tuple], workers: int, progress: bool) -> tuple[dict, dict]:
    """Run jobs {name: (fn, args, names it depends on, wants_queue)}: whenever a worker is free, the first
    job in dict order whose dependencies have finished starts on it (never more jobs in the pool than
    workers, so dict order is the priority). Up to `workers` processes spawned with PINNED_KERNELS (one
    worker in a process that already runs with them: in this process); a job with wants_queue gets a
    progress queue as last argument. Returns ({name: result}, {name: time.perf_counter() at its end})."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(file=sys.stderr)
    bars = Progress(
        TextColumn("[bold]{task.description:<20}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        disable=not (progress and console.is_terminal),
        transient=False,
    )
    ids: dict[str, int] = {}

    def show(event) -> None:
        name, completed, total, info = event
        label = name if name.startswith(EVAL) else f"build {name}"
        if name not in ids:
            ids[name] = bars.add_task(label, total=total, info="")
        bars.update(ids[name], completed=completed, total=total, info=info)
        if progress and bars.disable and info and (completed == total or completed % 100 == 0):
            log.info("%s: %d/%d %s", label, completed, total, info)

    results: dict = {}
    finished: dict = {}

    def ready() -> list[str]:
        return [
            n for n, (_, _, deps, _) in jobs.items() if n not in results and all(d in results for d in deps)
        ]

    def finish(name: str, result, started: float) -> None:
        results[name], finished[name] = result, time.perf_counter()
        if not jobs[name][3]:
            show((name, 1, 1, f"done in {finished[name] - started:.0f}s"))

    with bars:
        if workers <= 1 and kernels_pinned():
            direct = type("DirectQueue", (), {"put": staticmethod(show)})()
            while len(results) < len(jobs):
                name = ready()[0]
                fn, args, _, wants_queue = jobs[name]
                started = time.perf_counter()
                finish(name, fn(*args, direct) if wants_queue else fn(*args), started)
            return results, finished
        ctx = mp.get_context("spawn")
        workers = max(workers, 1)
        with (
            pinned_environment(),
            ctx.Manager() as manager,
            cf.ProcessPoolExecutor(workers, mp_context=ctx) as pool,
        ):
            q = manager.Queue()
            running: dict = {}  # future -> (name, start time)
            while len(results) < len(jobs):
                started_names = {n for n, _ in running.values()}
                for name in ready():
                    if len(running) >= workers:
                        break
                    if name in started_names:
                        continue
                    fn, args, _, wants_queue = jobs[name]
                    future = pool.submit(fn, *args, q) if wants_queue else pool.submit(fn, *args)
                    running[future] = (name, time.perf_counter())
                    if not wants_queue:
                        show((name, 0, 1, "running"))
                if not running:
                    raise RuntimeError(
                        f"testbed jobs wait on dependencies that never run: {sorted(set(jobs) - set(results))}"
                    )
                done, _ = cf.wait(list(running), timeout=0.5, return_when=cf.FIRST_COMPLETED)
                for future in done:
                    name, started = running.pop(future)
                    finish(name, future.result(), started)
                while True:
                    try:
                        show(q.get_nowait())
                    except queue_mod.Empty:
                        break
    return results, finished


def ensure_testbed(directory: str | os.PathLike | None = None) -> Path:
    """The testbed directory, built first if its manifest or a model is missing."""
    root = testbed_dir(directory)
    if missing_models(root):
        log.warning(
            "testbed not found at %s: building it now (a few minutes on a CPU; `opd testbed build` "
            "does this ahead of time)",
            root,
        )
        build_testbed(root)
    return root


def ensure_for_config(cfg, *specs: str) -> None:
    """Build the testbed on first use: when the config's models (`model.path`, `teacher.path`,
    `teacher.pi_checkpoint`, `stabilization.trace_model`) or `specs` name a `testbed:` model and the
    testbed is incomplete."""
    named = [
        cfg.model.path,
        cfg.teacher.path,
        cfg.teacher.get("pi_checkpoint"),
        cfg.stabilization.get("trace_model"),
        *specs,
    ]
    if any(str(s).startswith(PREFIX) for s in named if s):
        ensure_testbed(cfg.get("testbed_dir"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the opd testbed.")
    parser.add_argument("out_dir", nargs="?", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    manifest = build_testbed(args.out_dir, seed=args.seed, force=args.force, workers=args.workers)
    print(json.dumps({n: m["eval"] for n, m in manifest["models"].items()}, indent=1))
    print(json.dumps(manifest["timing"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
