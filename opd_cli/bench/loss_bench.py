"""Loss benchmark: naive (materialized [N, V] fp32 logits) vs chunked losses, forward + backward.

Cases (student LM head weight and hidden states both require grad, all-ones mask, k = `k`):
  full_rkl                        teacher = TeacherHidden (naive: teacher logits materialized too)
  topk_rkl_stopgrad/student       student top-k support; needs log q on the student's top-k, so the
                                  teacher is TeacherHidden as well
  topk_rkl_stopgrad/intersection  teacher = precomputed top-k ids/log-probs + sampled log-prob (what a
                                  logprob server returns; computed before timing, not timed)

Memory: on CPU every measurement runs in a fresh `spawn` process; after the inputs are allocated the
process resets its RSS high-water mark (/proc/self/clear_refs) and reports peak RSS minus RSS at that
point. On CUDA: torch.cuda.max_memory_allocated minus the allocation after the inputs.

    python -m opd_cli.bench.loss_bench [--quick] [--vocab V --hidden H --tokens N --k K --chunk-size C]
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import re
import resource
import sys
import time

import torch

from opd_cli.losses import TeacherHidden, TeacherLogprobs, compute_loss, lm_head_logits
from opd_cli.losses_chunked import chunked_loss

CASES = (
    ("full_rkl", "full_rkl", {}, "hidden"),
    ("topk_rkl_stopgrad/student", "topk_rkl_stopgrad", {"support": "student"}, "hidden"),
    ("topk_rkl_stopgrad/intersection", "topk_rkl_stopgrad", {"support": "intersection"}, "topk"),
)
QUICK = {"vocab": 1000, "hidden": 64, "tokens": 256, "k": 20, "chunk_size": 64}  # as `opd bench loss --quick`
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
        return int(match.group(1)) if match else None
    except OSError:
        return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (Linux >= 4.0)
        return True
    except OSError:
        return False


def _make_inputs(spec: dict) -> dict:
    """Deterministic inputs; large tensors are built in row blocks so their temporaries stay small."""
    g = torch.Generator(device="cpu").manual_seed(spec["seed"])
    device, dtype = spec["device"], DTYPES[spec["dtype"]]
    vocab, hidden, n_tokens = spec["vocab"], spec["hidden"], spec["tokens"]
    batch = max(1, n_tokens // 1024)
    length = n_tokens // batch
    logit_std = 3.0  # peaked enough that top-20 holds most of the mass

    def randn(*shape, scale=1.0, like=None, noise=0.0):
        out = torch.empty(*shape, dtype=dtype, device=device)
        flat_out = out.view(shape[0], -1) if len(shape) > 1 else out.view(-1, 1)
        flat_like = None if like is None else like.view(flat_out.shape)
        for start in range(0, flat_out.shape[0], 4096):
            block = torch.randn(min(4096, flat_out.shape[0] - start), flat_out.shape[1], generator=g) * scale
            if flat_like is not None:
                block = flat_like[start : start + block.shape[0]].float().cpu() + noise * block
            flat_out[start : start + block.shape[0]] = block.to(device, dtype)
        return out

    weight = randn(vocab, hidden, scale=logit_std / math.sqrt(hidden))
    teacher_weight = randn(vocab, hidden, like=weight, noise=logit_std / math.sqrt(hidden) * 0.5)
    h = randn(batch, length, hidden)
    teacher_h = randn(batch, length, hidden, like=h, noise=0.3)
    tokens = torch.randint(0, vocab, (batch, length), generator=g).to(device)
    mask = torch.ones(batch, length, dtype=torch.bool, device=device)
    teacher_hidden = TeacherHidden(teacher_h, teacher_weight)
    teacher_topk = None
    if spec["teacher_kind"] == "topk":
        parts = []
        for row in range(batch):  # one sequence at a time: no [N, V] temporary
            logits = lm_head_logits(teacher_h[row : row + 1], teacher_weight)
            parts.append(
                TeacherLogprobs.from_logits(logits, tokens[row : row + 1], k=spec["k"], keep_full=False)
            )
        teacher_topk = TeacherLogprobs(
            topk_ids=torch.cat([p.topk_ids for p in parts]),
            topk_logprobs=torch.cat([p.topk_logprobs for p in parts]),
            sampled=torch.cat([p.sampled for p in parts]),
        )
    return {
        "hidden": h.requires_grad_(True),
        "weight": weight.requires_grad_(True),
        "tokens": tokens,
        "mask": mask,
        "teacher_hidden": teacher_hidden,
        "teacher_topk": teacher_topk,
    }


def _naive_loss(spec: dict, inputs: dict) -> torch.Tensor:
    """The straightforward path: full [B, T, V] fp32 logits (and teacher log-probs), then compute_loss."""
    logits = lm_head_logits(inputs["hidden"], inputs["weight"])
    if spec["teacher_kind"] == "hidden":
        th = inputs["teacher_hidden"]
        teacher = TeacherLogprobs.from_logits(lm_head_logits(th.hidden, th.lm_head_weight), inputs["tokens"])
    else:
        teacher = inputs["teacher_topk"]
    return compute_loss(
        spec["loss"], logits, teacher, inputs["tokens"], inputs["mask"], **spec["options"]
    ).loss


def _chunked_loss(spec: dict, inputs: dict) -> torch.Tensor:
    teacher = inputs["teacher_hidden"] if spec["teacher_kind"] == "hidden" else inputs["teacher_topk"]
    return chunked_loss(
        spec["loss"],
        inputs["hidden"],
        inputs["weight"],
        teacher,
        inputs["tokens"],
        inputs["mask"],
        chunk_size=spec["chunk_size"],
        **spec["options"],
    ).loss


def _measure(spec: dict) -> dict:
    """One path of one case: forward + backward time (min over repeats) and peak extra memory (max)."""
    torch.manual_seed(spec["seed"])
    inputs = _make_inputs(spec)
    on_cuda = spec["device"].startswith("cuda")
    run = _naive_loss if spec["path"] == "naive" else _chunked_loss
    times, peaks, loss_value = [], [], float("nan")
    for _ in range(spec["repeats"]):
        inputs["hidden"].grad = inputs["weight"].grad = None
        if on_cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = _status_kib("VmRSS") * 1024
            reset = _reset_peak_rss()
        start = time.perf_counter()
        loss = run(spec, inputs)
        loss.backward()
        if on_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        loss_value = float(loss.detach())
        del loss
        if on_cuda:
            peaks.append(torch.cuda.max_memory_allocated() - base)
        else:
            # without a resettable high-water mark, ru_maxrss also counts input construction (an overestimate)
            peak = (
                _status_kib("VmHWM") * 1024
                if reset
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            )
            peaks.append(peak - base)
    return {"time_s": min(times), "peak_bytes": max(peaks), "loss": loss_value}


def _child(spec: dict, conn) -> None:
    torch.set_num_threads(spec["threads"])
    try:
        conn.send(_measure(spec))
    except BaseException as exc:  # noqa: BLE001 - report anything (e.g. MemoryError) to the parent
        conn.send({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        conn.close()


def _measure_isolated(spec: dict) -> dict:
    """Run `_measure` in a fresh spawned process (CPU), so each peak RSS is its own."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(spec, child))
    proc.start()
    child.close()
    result = parent.recv() if parent.poll(timeout=None) else None
    proc.join()
    if result is None:
        result = {
            "error": f"measurement process died (exit code {proc.exitcode}; -9 usually means out of memory)"
        }
    if "error" in result:
        raise RuntimeError(f"{spec['case']} / {spec['path']}: {result['error']}")
    return result


def run_loss_bench(
    vocab: int = 151936,
    hidden: int = 2048,
    tokens: int = 4096,
    k: int = 20,
    chunk_size: int = 256,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    repeats: int = 1,
    seed: int = 0,
    cases: tuple = CASES,
    isolate: bool | None = None,
    verbose: bool = False,
) -> list[dict]:
    """Measure naive vs chunked forward + backward for each case; one row per case.

    isolate: run each CPU measurement in a fresh spawned process (default on CPU; False measures in
    this process: faster, for smoke tests, but memory freed earlier may be reused and hide a peak).
    Memory columns: peak extra bytes during forward + backward, including the gradients both paths
    produce (W.grad [V, H] and hidden.grad); `memory_ratio_excl_grads` subtracts those from both."""
    isolate = not device.startswith("cuda") if isolate is None else isolate
    dtype_name = next(name for name, value in DTYPES.items() if value == dtype)
    rows = []
    for label, loss, options, teacher_kind in cases:
        row = {
            "case": label,
            "loss": loss,
            "teacher": teacher_kind,
            "vocab": vocab,
            "hidden": hidden,
            "tokens": tokens,
            "chunk_size": chunk_size,
        }
        for path in ("naive", "chunked"):
            spec = {
                "case": label,
                "loss": loss,
                "options": {**options, "k": k} if "topk" in loss else dict(options),
                "teacher_kind": teacher_kind,
                "path": path,
                "vocab": vocab,
                "hidden": hidden,
                "tokens": tokens,
                "k": k,
                "chunk_size": chunk_size,
                "device": device,
                "dtype": dtype_name,
                "repeats": repeats,
                "seed": seed,
                "threads": torch.get_num_threads(),
            }
            result = _measure_isolated(spec) if isolate else _measure(spec)
            if verbose:
                print(
                    f"{label} {path}: {result['time_s']:.2f} s, {result['peak_bytes'] / 2**20:.0f} MiB",
                    file=sys.stderr,
                    flush=True,
                )
            row[f"{path}_time_s"] = result["time_s"]
            row[f"{path}_peak_mib"] = result["peak_bytes"] / 2**20
            row[f"{path}_loss"] = result["loss"]
        row["time_ratio"] = row["chunked_time_s"] / row["naive_time_s"]
        row["memory_ratio"] = row["chunked_peak_mib"] / max(row["naive_peak_mib"], 1e-9)
        grads_mib = (vocab * hidden + tokens * hidden) * torch.empty((), dtype=dtype).element_size() / 2**20
        row["grads_mib"] = grads_mib
        row["memory_ratio_excl_grads"] = max(row["chunked_peak_mib"] - grads_mib, 0.0) / max(
            row["naive_peak_mib"] - grads_mib, 1e-9
        )
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    """Markdown table of run_loss_bench rows."""
    lines = [
        "| case | teacher | naive time (s) | chunked time (s) | time ratio | naive peak (MiB) | "
        "chunked peak (MiB) | memory ratio | memory ratio excl. grads | naive loss | chunked loss |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['teacher']} | {r['naive_time_s']:.2f} | {r['chunked_time_s']:.2f} | "
            f"{r['time_ratio']:.2f} | {r['naive_peak_mib']:.0f} | {r['chunked_peak_mib']:.0f} | "
            f"{r['memory_ratio']:.3f} | {r['memory_ratio_excl_grads']:.3f} | {r['naive_loss']:.6g} | "
            f"{r['chunked_loss']:.6g} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"small smoke-test sizes: {QUICK}")
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--in-process", action="store_true", help="no subprocess per measurement (less exact memory)"
    )
    args = parser.parse_args(argv)
    sizes = (
        dict(QUICK)
        if args.quick
        else {
            "vocab": args.vocab,
            "hidden": args.hidden,
            "tokens": args.tokens,
            "k": args.k,
            "chunk_size": args.chunk_size,
        }
    )
    rows = run_loss_bench(
        **sizes,
        device=args.device,
        dtype=DTYPES[args.dtype],
        repeats=args.repeats,
        isolate=False if args.in_process else None,
        verbose=True,
    )
    print(
        f"torch {torch.__version__}, device {args.device}, dtype {args.dtype}, threads {torch.get_num_threads()}, "
        f"sizes {sizes}"
    )
    print(format_table(rows))


if __name__ == "__main__":
    main()
