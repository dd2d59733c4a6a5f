"""The SFT stage: supervised fine-tuning of the student on verifier-filtered teacher traces (or the rows'
reference solutions), alone or as OPD's stabilization.

    opd run stage=sft                                   # only the SFT stage: the student in <run dir>/model
    opd run model=student_base stabilization=sft        # SFT on verified teacher traces, then OPD
    opd run experiment=opd_base_sft_then_opd            # the matrix cell that does so
    opd run stage=sft resume=outputs/<date>/<time>      # continue a killed SFT stage

Setup -> train -> save:
1. traces: the teacher (`stabilization.trace_model`, else `teacher.path`) answers `stabilization.num_traces`
   training prompts through the rollout engine; the answers the task's verifier accepts (correct, well
   formed, finished) are the examples (`stabilization.source=reference`: the rows' own solutions). They
   are written once to `traces.json`, so a resumed stage never regenerates them;
2. train: `sft_train` below, cross-entropy on response tokens only, checkpoints every
   `trainer.save_every` steps (`checkpoints/`, removed once the stage is done);
3. save: the model and tokenizer, `sft_stats.json` (traces kept; the NLL before/after on the last eighth
   of the kept traces, at most 256, which SFT does not train on)
   and, as OPD's stabilization, a DONE marker so a resumed run reuses the finished student.

`sft_train` is also the testbed's trainer (its pretraining and its SFT student, opd_cli/testbed):

    from opd_cli.stages.sft import SFTOptions, sft_train
    sft_train(model, tokenizer, [(task.messages(row), row["solution"]) for row in rows],
              SFTOptions(steps=600, batch_size=64, lr=3e-3, warmup_ratio=0.05, seed=0), device="cpu")

An example is (chat messages without the assistant turn, response text). The prompt is the chat template
with the generation prompt (`<|assistant|>` for the testbed tokenizer, so an empty message list gives a
one-token prompt: that is how the testbed pretrains its base model on generic strings); the response is
the text followed by EOS. Only response tokens carry loss (token mean over the batch).

Batches are drawn without replacement from a seeded permutation of the examples (a new permutation each
epoch), so the same seed gives the same run. `callback(step, metrics)` runs every `eval_every` steps and
may return True to stop early (the testbed uses it to stop a deliberately under-trained model inside
its target accuracy band).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from opd_cli import rundir
from opd_cli.batching import micro_batches, pack, response_hidden_and_logits, token_logprobs
from opd_cli.checkpoint import resume_point, save_checkpoint, set_rng_state
from opd_cli.errors import OpdError
from opd_cli.io import atomic_write_json, atomic_write_text
from opd_cli.learner import Learner, autocast, autocast_dtype, load_model, load_tokenizer, pick_device
from opd_cli.rollout import SamplingConfig, derive_seed
from opd_cli.stages.common import (
    load_task_and_data,
    resolve_path,
    rollout_engine,
    seed_everything,
    teacher_enable_thinking,
)
from opd_cli.teachers import chat_prompt_ids

log = logging.getLogger("opd")


# ------------------------------------------------------------------------------------------ the stage
def stabilize(cfg: DictConfig, run_dir: Path, out_name: str = rundir.SFT_STUDENT) -> str:
    """SFT the student on verifier-filtered teacher traces (or reference solutions); returns the new
    model directory. A finished stage (DONE marker) is reused when a killed run resumes."""
    out = run_dir / out_name
    if (out / rundir.DONE).exists():
        log.info("stabilization: reusing %s", out)
        return str(out)
    run(cfg, out)
    atomic_write_text(out / rundir.DONE, "ok\n")
    shutil.rmtree(out / rundir.CHECKPOINTS, ignore_errors=True)  # the finished model is out/ itself
    return str(out)


def teacher_traces(cfg: DictConfig, task, rows: list[dict], device) -> tuple[list, dict]:
    """(examples, stats): verifier-filtered teacher traces, or the rows' reference solutions."""

    st = cfg.stabilization
    rows = rows[: st.num_traces]
    if st.source == "reference":
        return [(task.messages(r), r["solution"]) for r in rows], {"traces": len(rows), "kept": len(rows)}
    teacher_path = resolve_path(st.trace_model or cfg.teacher.path, cfg)
    tok = load_tokenizer(teacher_path)
    # the trace writer's own prompt (teacher.enable_thinking), not the student's
    prompts = [chat_prompt_ids(tok, task.messages(r), teacher_enable_thinking(cfg)) for r in rows]
    # The traces come from the rollout engine: vLLM at scale (20k traces of thousands of tokens), HF on
    # the testbed. The engine is closed before the student is loaded for training.
    engine = rollout_engine(
        cfg,
        teacher_path,
        device,
        dtype="bfloat16" if device.type == "cuda" else "float32",
        model=None if cfg.rollout.engine == "vllm" else load_model(teacher_path, device, trainable=False),
    )
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


def split_held_out(examples: list) -> tuple[list, list]:
    """(train, held_out): the last eighth of the traces (at most 256, at least 1 once there are two) is
    held out of training, so the NLL before/after measures the student on traces it never saw."""
    n = max(1, min(256, len(examples) // 8)) if len(examples) >= 2 else 0
    return examples[: len(examples) - n], examples[len(examples) - n :]


def saved_traces(cfg: DictConfig, out: Path, task, rows: list[dict], device) -> tuple[list, dict]:
    """The SFT examples, written once to `out/traces.json` (hours of generation at scale) and read back
    when a killed run resumes."""
    saved = out / rundir.TRACES
    if cfg.resume and saved.is_file():
        data = json.loads(saved.read_text())
        log.info("stabilization: reusing %d traces from %s", len(data["examples"]), saved)
        return [(m, r) for m, r in data["examples"]], data["stats"]
    examples, stats = teacher_traces(cfg, task, rows, device)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(saved, {"examples": [[m, r] for m, r in examples], "stats": stats})
    return examples, stats


def run(cfg: DictConfig, out: Path) -> dict:
    """SFT the configured student (`model.path`) and save it, with its tokenizer, to `out`.

    Checkpoints go to `out/checkpoints` every `trainer.save_every` steps; with `resume=` a killed stage
    continues from the last one, on the traces it wrote before (`out/traces.json`)."""
    seed_everything(cfg.seed)
    device = pick_device(cfg.trainer.device)
    task, train_rows, _ = load_task_and_data(cfg.task)
    path = resolve_path(cfg.model.path, cfg)
    tokenizer = load_tokenizer(path)
    examples, stats = saved_traces(cfg, out, task, train_rows, device)  # before the student takes the device
    ckpt_root = out / rundir.CHECKPOINTS
    # killed before its first checkpoint: the stage starts over (on the saved traces)
    ckpt, state = resume_point(ckpt_root, "sft", required=False) if cfg.resume else (None, None)
    if state is not None:
        set_rng_state(state["rng"])
        stats["nll_before"] = state["nll_before"]
        stats["nll_history"] = [list(h) for h in state.get("nll_history", [])]
        log.info("stabilization: resumed from %s at step %d", ckpt, state["step"])
    model = load_model(ckpt or path, device, trainable=True)
    if cfg.trainer.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    amp_dtype = autocast_dtype(device, cfg.model.dtype)
    micro, chunk = cfg.trainer.micro_batch_size, cfg.loss.chunk_size
    examples, held_out_examples = split_held_out(examples)
    stats["train_traces"], stats["held_out_traces"] = len(examples), len(held_out_examples)
    if not held_out_examples:
        log.warning("stabilization: only %d trace kept, none held out: the NLL is on it", len(examples))
    held_out = tokenize_examples(tokenizer, held_out_examples or examples, cfg.model.enable_thinking)

    def nll() -> float:
        """Mean NLL of the held-out traces, `trainer.micro_batch_size` sequences at a time."""
        n = sum(len(r) for _, r in held_out)
        total, was_training = 0.0, model.training
        model.eval()
        with torch.no_grad(), autocast(device, amp_dtype):
            for part in micro_batches(held_out, micro):
                batch = pack([p for p, _ in part], [r for _, r in part], tokenizer.pad_token_id).to(device)
                total += float(response_nll(model, batch, chunk, n_tokens=n)[0])
        model.train(was_training)
        return total

    if state is None:
        stats["nll_before"] = nll()

    until = cfg.stabilization.until_nll
    stats.setdefault("nll_history", [])

    def until_well_formed(step: int, metrics: dict) -> bool:
        """stabilization.until_nll: stop at the first evaluation with held-out NLL <= until_nll."""
        value = nll()
        stats["nll_history"].append([step, round(value, 4)])
        log.info("sft step %d held-out NLL %.4f (stops at <= %g)", step, value, until)
        return value <= until

    def save(step: int, loop_state: dict) -> None:
        extra = {"stage": "sft", "nll_before": stats["nll_before"], "nll_history": stats["nll_history"]}
        save_checkpoint(ckpt_root, step, model, tokenizer, {**loop_state, **extra})

    final = sft_train(
        model,
        tokenizer,
        examples,
        SFTOptions.from_config(cfg),
        device=device,
        amp_dtype=amp_dtype,
        progress=False,
        log_fn=lambda step, m: log.info("sft step %d loss %.4f", step, m["loss"]),
        on_checkpoint=save,
        start_state=state,
        callback=until_well_formed if until is not None else None,
        eval_every=cfg.stabilization.eval_every if until is not None else 0,
    )
    stats["steps"] = final.get("step")
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


# ------------------------------------------------------------------------------------------- the loop
Example = tuple[list[dict], str] | tuple[list[dict], str, str]  # (messages, response[, prefill])


def prompt_ids(tokenizer, messages: list[dict], enable_thinking: bool = False) -> list[int]:
    """Token ids of the chat prompt with the generation prompt appended, as the OPD student sees it
    (same template, same `enable_thinking`). An empty message list (generic pretraining text) gives the
    generation prompt alone, e.g. the single token `<|assistant|>`."""
    if messages:
        return chat_prompt_ids(tokenizer, messages, enable_thinking)
    # transformers refuses an empty conversation: take the generation prompt as the suffix it adds
    probe = [{"role": "user", "content": "x"}]
    with_gen = chat_prompt_ids(tokenizer, probe, enable_thinking)
    without = chat_prompt_ids(tokenizer, probe, enable_thinking, add_generation_prompt=False)
    if len(with_gen) > len(without) and with_gen[: len(without)] == without:
        return with_gen[len(without) :]
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return [start]


def tokenize_examples(
    tokenizer, examples: list[Example], enable_thinking: bool = False
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids + EOS) per example; prompts are cached per distinct message list. An
    example may carry a third element, a prefill: text the assistant turn starts with that is part of the
    prompt (no loss on it), so the model learns how to continue it, not to write it."""
    cache: dict[str, list[int]] = {}
    out = []
    for messages, response, *prefill in examples:
        key = repr(messages)
        if key not in cache:
            cache[key] = prompt_ids(tokenizer, messages, enable_thinking)
        prompt = cache[key]
        if prefill and prefill[0]:
            prompt = prompt + tokenizer(prefill[0], add_special_tokens=False)["input_ids"]
        ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        out.append((prompt, ids))
    return out


def response_nll(model, batch, chunk_size: int = 0, n_tokens: int | None = None) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over the response tokens of a packed batch, and the token count.

    `n_tokens`: the denominator when the batch is one micro-batch of a larger one (that one's response
    tokens), so micro-batch losses add up to the batch's mean. `chunk_size` > 0 computes the log-probs
    from hidden states a chunk of rows at a time (`batching.token_logprobs`): no [tokens, V] logits.
    """
    mask = batch.response_mask
    n = int(mask.sum())
    denominator = max(n if n_tokens is None else n_tokens, 1)
    if chunk_size <= 0:
        _, logits = response_hidden_and_logits(model, batch)
        loss = F.cross_entropy(logits[mask].float(), batch.response_ids[mask], reduction="sum") / denominator
        return loss, n
    hidden, _ = response_hidden_and_logits(model, batch, logits=False)
    logp = token_logprobs(hidden, model.get_output_embeddings(), batch.response_ids, chunk_size)
    return -(logp * mask).sum() / denominator, n


class _Batches:
    """Seeded sampling without replacement; a fresh permutation every epoch."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size = n, min(batch_size, n)
        self.gen = torch.Generator().manual_seed(seed)
        self.order: list[int] = []

    def next(self) -> list[int]:
        if len(self.order) < self.batch_size:
            self.order += torch.randperm(self.n, generator=self.gen).tolist()
        idx, self.order = self.order[: self.batch_size], self.order[self.batch_size :]
        return idx

    def state(self) -> dict:
        return {"gen": self.gen.get_state(), "order": list(self.order)}

    def load(self, state: dict) -> None:
        self.gen.set_state(state["gen"])
        self.order = list(state["order"])


@dataclass
class SFTOptions:
    """The hyperparameters of one `sft_train` run: the SFT stage reads them from the config
    (`from_config`), the testbed from its recipe."""

    steps: int
    batch_size: int
    lr: float
    warmup_ratio: float = 0.0
    schedule: str = "constant"  # constant | cosine | linear
    seed: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    enable_thinking: bool = False  # the student's chat-template setting (model.enable_thinking)
    micro_batch_size: int = 0  # sequences per forward/backward (0: the whole batch)
    chunk_size: int = 0  # logit rows per chunk of the loss (0: full [tokens, V] logits)
    save_every: int = 0  # checkpoint every this many steps (0: never)

    @classmethod
    def from_config(cls, cfg: DictConfig) -> SFTOptions:
        st = cfg.stabilization
        return cls(
            steps=st.steps,
            batch_size=st.batch_size,
            lr=st.lr,
            warmup_ratio=st.warmup_ratio,
            schedule=st.schedule,
            seed=cfg.seed,
            enable_thinking=cfg.model.enable_thinking,
            micro_batch_size=cfg.trainer.micro_batch_size,
            chunk_size=cfg.loss.chunk_size,
            save_every=cfg.trainer.save_every,
        )


def sft_train(
    model: torch.nn.Module,
    tokenizer,
    examples: list[Example],
    options: SFTOptions,
    *,
    device: str | torch.device = "cpu",
    amp_dtype: torch.dtype | None = None,
    progress: bool = True,
    description: str = "sft",
    log_fn: Callable[[int, dict], None] | None = None,
    log_every: int = 50,
    callback: Callable[[int, dict], bool | None] | None = None,
    eval_every: int = 0,
    on_checkpoint: Callable[[int, dict], None] | None = None,
    start_state: dict | None = None,
) -> dict:
    """Train `model` in place on `examples`; returns the final metrics (loss is an EMA of the batch loss).

    `options.enable_thinking` is the student's chat-template setting (`model.enable_thinking`): SFT
    prompts must be the prompts the student later sees in OPD and evaluation.

    Memory: `options.micro_batch_size` > 0 runs forward/backward that many sequences at a time and
    accumulates one optimizer step equal to the whole batch's; `options.chunk_size` > 0 never
    materializes the batch's [tokens, V] logits; `amp_dtype` is the forward's autocast dtype (bf16 on CUDA).

    Checkpoints: every `options.save_every` steps before the last, `on_checkpoint(step, state)` receives
    the loop's state (optimizer and schedule, batch sampler, running loss); `start_state` (the weights
    already in `model`) continues after its step exactly as the uninterrupted run would."""
    o = options
    if not examples:
        raise ValueError("sft_train: no examples")
    if o.steps < 1:
        raise ValueError(f"sft_train: steps must be >= 1, got {o.steps}")
    device = torch.device(device)
    model.to(device).train()
    data = tokenize_examples(tokenizer, examples, o.enable_thinking)
    batches = _Batches(len(data), o.batch_size, o.seed)
    learner = Learner(
        model,
        lr=o.lr,
        total_steps=o.steps,
        weight_decay=o.weight_decay,
        grad_clip=o.grad_clip,
        warmup_ratio=o.warmup_ratio,
        schedule=o.schedule,
        amp_dtype=amp_dtype,
    )
    pad = tokenizer.pad_token_id
    ema, tokens, t0 = None, 0, time.perf_counter()
    metrics: dict = {}
    first = 1
    if start_state is not None:
        learner.load_state_dict(start_state["learner"])
        batches.load(start_state["batches"])
        ema, tokens, metrics = start_state["ema"], start_state["tokens"], dict(start_state["metrics"])
        first = start_state["step"] + 1
    bar = _progress(progress, description, o.steps)
    if bar is not None and first > 1:
        bar[0].update(bar[1], completed=first - 1)
    try:
        for step in range(first, o.steps + 1):
            idx = batches.next()
            n = sum(len(data[i][1]) for i in idx)  # the batch's response tokens: every part's denominator
            value = 0.0
            for part in micro_batches(idx, o.micro_batch_size):
                batch = pack([data[i][0] for i in part], [data[i][1] for i in part], pad).to(device)
                with learner.autocast():
                    loss, _ = response_nll(model, batch, o.chunk_size, n_tokens=n)
                learner.backward(loss)
                value += float(loss.detach())
            info = learner.step()
            ema = value if ema is None else 0.95 * ema + 0.05 * value
            tokens += n
            metrics = {
                "step": step,
                "loss": ema,
                "batch_loss": value,
                "tokens": tokens,
                "seconds": time.perf_counter() - t0,
                **info,
            }
            if bar is not None:
                bar[0].update(bar[1], advance=1, description=f"{description} loss {ema:.3f}")
            if log_fn is not None and (step % log_every == 0 or step == o.steps):
                log_fn(step, metrics)
            if callback is not None and eval_every and (step % eval_every == 0 or step == o.steps):
                if callback(step, metrics):
                    break
            if on_checkpoint is not None and o.save_every and step % o.save_every == 0 and step < o.steps:
                state = {"learner": learner.state_dict(), "batches": batches.state(), "ema": ema}
                on_checkpoint(step, {**state, "step": step, "tokens": tokens, "metrics": dict(metrics)})
    finally:
        if bar is not None:
            bar[0].stop()
    model.eval()
    return metrics


def _progress(enabled: bool, description: str, total: int):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    prog = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=True,
    )
    prog.start()
    return prog, prog.add_task(description, total=total)
