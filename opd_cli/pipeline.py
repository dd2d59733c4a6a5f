"""One `opd run` job: pick the stage, run the stabilization first when configured, write the summary.

opd run                                        # stage=opd (stabilization=none): OPD from the SFT'd student
opd run model=student_base stabilization=sft   # SFT on verified teacher traces, then OPD
opd run stage=rlvr trainer.steps=100           # GRPO: builds an RLVR-adapted teacher (run_dir/model)
opd run stage=sft                              # only the SFT stage (run_dir/model)
opd run trainer.nproc=2                        # OPD with 2 data-parallel learner ranks (spawned here)
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from opd_cli import rundir
from opd_cli.errors import OpdError
from opd_cli.io import atomic_write_json, atomic_write_text

log = logging.getLogger("opd")


def check_run_dir(cfg: DictConfig, run_dir: Path) -> None:
    """A directory that already holds a run is never overwritten silently."""
    if rundir.holds_run(run_dir, own_status=True) and not cfg.resume and not cfg.overwrite:
        raise OpdError(
            f"{run_dir} already holds a run; pass resume={run_dir} to continue it, overwrite=true to "
            f"replace it, or choose another hydra.run.dir"
        )


def run_stage(cfg: DictConfig, run_dir: Path) -> dict:
    from opd_cli.distributed import is_main

    run_dir = Path(run_dir)
    if is_main():  # data-parallel ranks > 0 write nothing
        check_run_dir(cfg, run_dir)
        atomic_write_text(run_dir / rundir.CONFIG, OmegaConf.to_yaml(cfg, resolve=True))
    if cfg.stage == "opd":
        from opd_cli import distributed
        from opd_cli.stages import opd

        start = None
        if cfg.stabilization.kind == "sft":  # rank 0 trains the SFT student once; the others wait for it
            start = sft_stabilization(cfg, run_dir) if distributed.is_main() else None
            start = distributed.broadcast_object(start)
        summary = opd.run(cfg, run_dir, start)
        if not distributed.is_main():
            return summary
    elif cfg.stage == "sft":
        summary = {"model": sft_stabilization(cfg, run_dir, out_name="model")}
    elif cfg.stage == "rlvr":
        summary = run_rlvr_stage(cfg, run_dir)
    else:  # validate() already rejects it; kept for a clear message if called directly
        raise OpdError(f"stage={cfg.stage!r} is not allowed; choose one of: opd, sft, rlvr")
    atomic_write_json(run_dir / rundir.SUMMARY, summary)
    log.info("results: %s", run_dir)
    print(f"results: {run_dir}")
    return summary


def sft_stabilization(cfg: DictConfig, run_dir: Path, out_name: str = rundir.SFT_STUDENT) -> str:
    """SFT the student on verifier-filtered teacher traces (or reference solutions); returns the new
    model directory. A finished stage (DONE marker) is reused when a killed run resumes."""
    out = run_dir / out_name
    if (out / rundir.DONE).exists():
        log.info("stabilization: reusing %s", out)
        return str(out)
    run_sft_stage(cfg, out)
    atomic_write_text(out / rundir.DONE, "ok\n")
    shutil.rmtree(out / rundir.CHECKPOINTS, ignore_errors=True)  # the finished model is out/ itself
    return str(out)


def _sft_examples(cfg: DictConfig, task, rows: list[dict], device) -> tuple[list, dict]:
    """(examples, stats): verifier-filtered teacher traces, or the rows' reference solutions."""
    from opd_cli.learner import load_model
    from opd_cli.rollout.base import SamplingConfig, derive_seed, make_engine
    from opd_cli.stages.common import resolve_path
    from opd_cli.teachers import chat_prompt_ids

    st = cfg.stabilization
    rows = rows[: st.num_traces]
    if st.source == "reference":
        return [(task.messages(r), r["solution"]) for r in rows], {"traces": len(rows), "kept": len(rows)}
    from opd_cli.learner import load_tokenizer

    teacher_path = resolve_path(st.trace_model or cfg.teacher.path, cfg)
    tok = load_tokenizer(teacher_path)
    thinking = cfg.teacher.get("enable_thinking")
    thinking = cfg.model.enable_thinking if thinking is None else thinking  # the trace writer's template
    prompts = [chat_prompt_ids(tok, task.messages(r), thinking) for r in rows]
    # The traces come from the rollout engine: vLLM at scale (20k traces of thousands of tokens), HF on
    # the testbed. The engine is closed before the student is loaded for training.
    if cfg.rollout.engine == "vllm":
        engine = make_engine(
            "vllm",
            teacher_path,
            device=device.type,
            dtype="bfloat16" if device.type == "cuda" else "float32",
            seed=cfg.seed,
            max_model_len=cfg.rollout.max_model_len,
            gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
        )
    else:
        teacher = load_model(teacher_path, device, trainable=False)
        engine = make_engine("hf", teacher_path, device=device.type, model=teacher)
    try:
        groups = engine.generate(
            prompts,
            SamplingConfig(
                temperature=cfg.rollout.temperature,
                top_p=cfg.rollout.top_p,
                max_new_tokens=cfg.eval.max_new_tokens,
            ),
            derive_seed(cfg.seed, 424242),
        )
    finally:
        engine.close()
    examples = []
    for row, group in zip(rows, groups, strict=True):
        text = tok.decode(group[0].response_ids, skip_special_tokens=True)
        verdict = task.verify(row, text)
        if verdict.correct and verdict.well_formed and group[0].finish_reason == "stop":
            examples.append((task.messages(row), text))
    if not examples:
        raise OpdError(
            "stabilization=sft: no teacher trace passed the verifier; check the teacher "
            "(teacher.path) or use stabilization.source=reference"
        )
    return examples, {"traces": len(rows), "kept": len(examples)}


def _sft_traces(cfg: DictConfig, out: Path, task, rows: list[dict], device) -> tuple[list, dict]:
    """The SFT examples, written once to `out/traces.json` (hours of generation at scale) and read back
    when a killed run resumes."""
    saved = out / rundir.TRACES
    if cfg.resume and saved.is_file():
        data = json.loads(saved.read_text())
        log.info("stabilization: reusing %d traces from %s", len(data["examples"]), saved)
        return [(m, r) for m, r in data["examples"]], data["stats"]
    examples, stats = _sft_examples(cfg, task, rows, device)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(saved, {"examples": [[m, r] for m, r in examples], "stats": stats})
    return examples, stats


def run_sft_stage(cfg: DictConfig, out: Path) -> dict:
    """SFT the configured student (`model.path`) and save it, with its tokenizer, to `out`.

    Checkpoints go to `out/checkpoints` every `trainer.save_every` steps; with `resume=` a killed stage
    continues from the last one, on the traces it wrote before (`out/traces.json`)."""
    import torch

    from opd_cli.batching import micro_batches, pack
    from opd_cli.checkpoint import resume_point, save_checkpoint, set_rng_state
    from opd_cli.learner import autocast, autocast_dtype, load_model, load_tokenizer, pick_device
    from opd_cli.stages.common import load_task_and_data, resolve_path, seed_everything
    from opd_cli.stages.sft import response_nll, sft_train, tokenize_examples

    seed_everything(cfg.seed)
    device = pick_device(cfg.trainer.device)
    task, train_rows, _ = load_task_and_data(cfg.task)
    path = resolve_path(cfg.model.path, cfg)
    tokenizer = load_tokenizer(path)
    examples, stats = _sft_traces(cfg, out, task, train_rows, device)  # before the student takes the device
    ckpt_root = out / rundir.CHECKPOINTS
    # killed before its first checkpoint: the stage starts over (on the saved traces)
    ckpt, state = resume_point(ckpt_root, "sft", required=False) if cfg.resume else (None, None)
    if state is not None:
        set_rng_state(state["rng"])
        stats["nll_before"] = state["nll_before"]
        log.info("stabilization: resumed from %s at step %d", ckpt, state["step"])
    model = load_model(ckpt or path, device, trainable=True)
    if cfg.trainer.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    amp_dtype = autocast_dtype(device, cfg.model.dtype)
    micro, chunk = cfg.trainer.micro_batch_size, cfg.loss.chunk_size
    held_out = tokenize_examples(
        tokenizer, examples[-min(256, max(1, len(examples) // 8)) :], cfg.model.enable_thinking
    )

    def nll() -> float:
        """Mean NLL of the held-out traces, `trainer.micro_batch_size` sequences at a time."""
        n = sum(len(r) for _, r in held_out)
        total = 0.0
        with torch.no_grad(), autocast(device, amp_dtype):
            for part in micro_batches(held_out, micro):
                batch = pack([p for p, _ in part], [r for _, r in part], tokenizer.pad_token_id).to(device)
                total += float(response_nll(model, batch, chunk, n_tokens=n)[0])
        return total

    if state is None:
        stats["nll_before"] = nll()
    st = cfg.stabilization

    def save(step: int, loop_state: dict) -> None:
        extra = {"stage": "sft", "nll_before": stats["nll_before"]}
        save_checkpoint(ckpt_root, step, model, tokenizer, {**loop_state, **extra})

    final = sft_train(
        model,
        tokenizer,
        examples,
        steps=st.steps,
        batch_size=st.batch_size,
        lr=st.lr,
        warmup_ratio=st.warmup_ratio,
        schedule=st.schedule,
        seed=cfg.seed,
        device=device,
        progress=False,
        log_fn=lambda step, m: log.info("sft step %d loss %.4f", step, m["loss"]),
        enable_thinking=cfg.model.enable_thinking,
        micro_batch_size=micro,
        chunk_size=chunk,
        amp_dtype=amp_dtype,
        save_every=cfg.trainer.save_every,
        on_checkpoint=save,
        start_state=state,
    )
    stats["nll_after"] = nll()
    stats["final_loss"] = final.get("loss")
    log.info(
        "stabilization sft: %d/%d traces kept; student NLL on teacher traces %.3f -> %.3f",
        stats["kept"],
        stats["traces"],
        stats["nll_before"],
        stats["nll_after"],
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    atomic_write_json(out / rundir.SFT_STATS, stats)
    return stats


def run_rlvr_stage(cfg: DictConfig, run_dir: Path) -> dict:
    """GRPO on the task's verifier reward; the result in `run_dir/model` is a `teacher.path` for OPD."""
    from opd_cli.checkpoint import resume_point, save_checkpoint, set_rng_state
    from opd_cli.learner import autocast_dtype, load_model, load_tokenizer, pick_device
    from opd_cli.rollout.base import make_engine
    from opd_cli.stages.common import load_task_and_data, resolve_path, seed_everything
    from opd_cli.stages.evaluate import evaluate, headline
    from opd_cli.stages.rlvr import grpo_train
    from opd_cli.teachers import PromptBuilder, chat_prompt_ids
    from opd_cli.tracking import Tracker

    if cfg.rollout.n < 2:
        raise OpdError(
            f"stage=rlvr needs rollout.n >= 2 samples per prompt (GRPO normalizes rewards within a "
            f"group), got rollout.n={cfg.rollout.n}"
        )
    seed_everything(cfg.seed)
    device = pick_device(cfg.trainer.device)
    task, train_rows, eval_rows = load_task_and_data(cfg.task)
    path = resolve_path(cfg.model.path, cfg)
    tokenizer = load_tokenizer(path)
    ckpt_root = run_dir / rundir.CHECKPOINTS
    ckpt, state = resume_point(ckpt_root, "rlvr") if cfg.resume else (None, None)
    model = load_model(ckpt or path, device, trainable=True)  # a checkpoint holds the weights so far
    if cfg.trainer.activation_checkpointing:  # recompute each layer in backward (generation is unaffected)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if state is not None:
        set_rng_state(state["rng"])
        log.info("resumed from %s at step %d", ckpt, state["step"])
    engine = make_engine(cfg.rollout.engine, path, device=device.type, model=model)
    tracker = Tracker(
        run_dir,
        OmegaConf.to_container(cfg, resolve=True),
        cfg.logger,
        resume_step=None if state is None else state["step"],
    )

    def prompt_ids(row, system_prompt):
        return chat_prompt_ids(
            tokenizer, PromptBuilder(task, system_prompt).messages(row), cfg.model.enable_thinking
        )

    def run_eval(step: int) -> dict:
        e = cfg.eval
        result = evaluate(
            engine, tokenizer, task, eval_rows[: e.size], prompt_ids, max_new_tokens=e.max_new_tokens
        )
        atomic_write_json(rundir.eval_path(run_dir, step), {**result, "step": step})
        tracker.log(step, headline(result))
        return result

    tc = cfg.trainer

    def save(step: int, loop_state: dict, **extra) -> None:
        trainer_state = {"stage": "rlvr", "start_eval": start, **loop_state, **extra}
        save_checkpoint(ckpt_root, step, model, tokenizer, trainer_state)

    try:
        start = run_eval(0) if state is None else state["start_eval"]
        if state is not None and "final_eval" in state:  # killed after its last checkpoint
            final = state["final_eval"]
        else:
            grpo_train(
                model,
                tokenizer,
                task,
                train_rows,
                engine=engine,
                steps=tc.steps,
                prompts_per_step=tc.prompts_per_step,
                samples_per_prompt=cfg.rollout.n,
                lr=tc.lr,
                clip_eps=tc.clip_eps,
                temperature=cfg.rollout.temperature,
                top_p=cfg.rollout.top_p,
                max_new_tokens=cfg.rollout.max_new_tokens,
                seed=cfg.seed,
                warmup_ratio=tc.warmup_ratio,
                schedule=tc.schedule,
                weight_decay=tc.weight_decay,
                grad_clip=tc.grad_clip,
                progress=False,
                log_fn=lambda step, m: tracker.log(step, {k: v for k, v in m.items() if k != "step"}),
                log_every=1,
                enable_thinking=cfg.model.enable_thinking,
                save_every=tc.save_every,
                on_checkpoint=save,
                start_state=state,
                micro_batch_size=tc.micro_batch_size,
                chunk_size=cfg.loss.chunk_size,
                amp_dtype=autocast_dtype(device, cfg.model.dtype),
            )
            final = run_eval(tc.steps)
            # the last checkpoint follows the final evaluation row, so a resume logs nothing twice
            save(tc.steps, {"step": tc.steps}, final_eval=final)
        out = run_dir / rundir.MODEL
        model.save_pretrained(str(out), safe_serialization=True)
        tokenizer.save_pretrained(str(out))
        summary = {
            "model": str(out),
            "start_accuracy": start["main"]["accuracy"],
            "final_accuracy": final["main"]["accuracy"],
            "steps": tc.steps,
        }
        tracker.summary(summary)
        log.info(
            "rlvr: accuracy %.3f -> %.3f; use teacher=rlvr teacher.path=%s",
            summary["start_accuracy"],
            summary["final_accuracy"],
            out,
        )
        return summary
    finally:
        engine.close()
        tracker.finish()


def run_data_parallel(cfg: DictConfig, run_dir: Path) -> dict:
    """`trainer.nproc=N` without torchrun: start N ranks on this machine (one process group, gloo on CPU,
    nccl on GPUs), each running the stage; rank 0 writes the run directory. Returns rank 0's summary."""
    from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

    from opd_cli import distributed

    container = OmegaConf.to_container(cfg, resolve=True)
    try:
        distributed.spawn(cfg.trainer.nproc, _rank_main, container, str(run_dir))
    except ProcessRaisedException as exc:
        last = str(exc).strip().splitlines()[-1]
        kind, _, message = last.partition(": ")
        if kind.rsplit(".", 1)[-1] in ("OpdError", "UsageError", "ConfigError", "DataError", "PlanError"):
            raise OpdError(message) from exc
        raise RuntimeError(f"a data-parallel rank failed: {last}") from exc
    except ProcessExitedException as exc:
        raise OpdError(
            f"a data-parallel rank exited ({exc}); see {run_dir}/{rundir.LOG} (out of memory? lower "
            f"trainer.prompts_per_step or trainer.nproc)"
        ) from exc
    return json.loads((Path(run_dir) / rundir.SUMMARY).read_text())


def _rank_main(container: dict, run_dir: str) -> None:
    """One rank started by run_data_parallel: join the group, run the stage, leave the group."""
    from opd_cli import distributed

    cfg = OmegaConf.create(container)
    if distributed.rank() == 0:  # the parent's Hydra log file receives rank 0's log
        handler = logging.FileHandler(Path(run_dir) / rundir.LOG)
        handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        logging.getLogger().addHandler(handler)
        logging.getLogger().setLevel(logging.INFO)
    import torch

    wants_cuda = cfg.trainer.device == "cuda" or (cfg.trainer.device == "auto" and torch.cuda.is_available())
    distributed.init_from_env("cuda" if wants_cuda else "cpu")
    try:
        run_stage(cfg, Path(run_dir))
    finally:
        distributed.shutdown()
