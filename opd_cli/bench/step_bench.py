"""Step benchmark: one OPD step run by opd (vLLM and HF rollouts) and by TRL's GKDTrainer, same work.

    opd bench step                                   # testbed student_sft <- teacher_large, 64 prompts x 64 tokens
    opd bench step --quick                           # 8 prompts x 16 tokens, 1 round: a smoke run
    opd bench step --engines vllm,hf,trl --rounds 3 --steps 3 --out experiments/bench_step_table.md

The workload of one step, identical for every contender:
  - the same `batch` prompts of the arith task (the chat-templated prompt ids opd builds), 1 sample each,
    temperature 1, top-p 1, at most `max_new_tokens` new tokens (EOS ends a row early);
  - the teacher (testbed:teacher_large) scores every response token under the same prompt;
  - reverse KL on the full logits (opd: loss=full_rkl, chunk_size=0; TRL: GKD with beta=1.0, which TRL
    defines as the reverse KL, and lmbda=1.0, which makes every batch freshly sampled from the student);
  - one AdamW step (lr 1e-4, grad-norm clip 1.0), fp32, the same torch thread count (--threads).
opd's step also pushes the new weights into the engine (vLLM: `reload_weights`; HF: none, same module).

Contenders run alternately, `--steps` timed steps per turn and `--rounds` turns each, after one untimed
warm-up step each; start-up (model loading, vLLM engine creation, Trainer construction) is timed
separately and excluded from the step figures. steps/s = timed steps / their wall time; tokens/s = the
response tokens generated in those steps / the same wall time (so it also counts the teacher, loss and
optimizer time: it is training throughput, not generation throughput).
"""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import open_dict

from opd_cli.errors import OpdError
from opd_cli.launch import compose
from opd_cli.learner import load_tokenizer
from opd_cli.stages.common import load_task_and_data
from opd_cli.stages.opd import OPDRun
from opd_cli.teachers import student_prompt_ids
from opd_cli.testbed.build import ensure_testbed
from opd_cli.testbed.paths import resolve_model_path

ENGINES = ("vllm", "hf", "trl")
QUICK = {"batch": 8, "max_new_tokens": 16, "rounds": 1, "steps": 1}


@dataclass
class Contender:
    name: str
    startup_s: float
    step_s: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    split: dict[str, list[float]] = field(default_factory=dict)  # opd only: rollout/teacher/learner/sync

    @property
    def steps_per_s(self) -> float:
        return len(self.step_s) / sum(self.step_s)

    @property
    def tokens_per_s(self) -> float:
        return sum(self.tokens) / sum(self.step_s)


# ------------------------------------------------------------------------------------------------ opd
def _opd_run(engine: str, batch: int, max_new_tokens: int, run_dir: Path):
    """An OPDRun on the testbed whose training set is exactly the bench's `batch` prompts."""
    cfg = compose(
        [
            f"rollout={engine}",
            "loss=full_rkl",
            "loss.chunk_size=0",
            "model=student_sft",
            "teacher=large",
            "model.dtype=float32",
            "teacher.dtype=float32",
            "trainer.device=cpu",
            "trainer.lr=1e-4",
            "trainer.grad_clip=1.0",
            "trainer.steps=1000000",
            f"trainer.prompts_per_step={batch}",
            f"task.train_size={batch}",
            "task.eval_size=1",
            "rollout.n=1",
            "rollout.temperature=1.0",
            "rollout.top_p=1.0",
            f"rollout.max_new_tokens={max_new_tokens}",
            f"rollout.max_model_len={max(256, 2 * max_new_tokens + 64)}",
            "diagnostics.every=1000000",  # the gradient-cosine diagnostic is not part of the step
            "logger=none",
        ]
    )
    with open_dict(cfg):
        del cfg["hydra"]  # compose() keeps Hydra's node; its sweep interpolations only resolve in a job
    return OPDRun(cfg, run_dir)


def _opd_step(run, contender: Contender) -> None:
    m = run.train_step()
    run.step += 1
    contender.step_s.append(m["time/step"])
    contender.tokens.append(int(m["tokens"]))
    for key in ("rollout", "teacher", "learner", "sync"):
        contender.split.setdefault(key, []).append(m[f"time/{key}"])


# ------------------------------------------------------------------------------------------------ TRL
class _PromptCollator:
    """Left-padded prompt ids in the keys GKDTrainer reads; the completion comes from on-policy sampling."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["prompt_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            p = r["prompt_ids"]
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        return {
            "prompts": ids,
            "prompt_attention_mask": mask,
            "input_ids": ids.clone(),
            "attention_mask": mask.clone(),
            "labels": torch.full_like(ids, -100),
        }


def _trl_trainer(prompt_ids: list[list[int]], max_new_tokens: int, out_dir: Path, contender: Contender):
    """GKDTrainer (lmbda=1: always on-policy; beta=1: reverse KL) with a callback that times each step."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback

    try:
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError as exc:
        raise OpdError(
            f"TRL's GKDTrainer is not importable ({exc}); install the bench extra: pip install -e '.[bench]'"
        ) from exc

    class TimedGKD(GKDTrainer):
        @staticmethod
        def generate_on_policy_outputs(model, inputs, generation_config):
            out = GKDTrainer.generate_on_policy_outputs(model, inputs, generation_config)
            prompt_width = inputs["prompts"].shape[1]
            contender.tokens.append(int(out[1][:, prompt_width:].sum()))  # completion tokens up to EOS
            return out

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # Trainer counts `num_items_in_batch` from the collated labels, i.e. the dataset's completion
            # tokens, not the on-policy ones; a prompt-only dataset has none (0 -> inf loss). None makes
            # GKD average over the sampled tokens: the token mean opd's loss uses.
            return super().compute_loss(model, inputs, return_outputs, None)

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            contender.step_s.append(time.perf_counter() - self.t0)

    student = resolve_model_path("testbed:student_sft")
    teacher = resolve_model_path("testbed:teacher_large")
    tok = AutoTokenizer.from_pretrained(student)
    config = GKDConfig(
        output_dir=str(out_dir),
        per_device_train_batch_size=len(prompt_ids),
        gradient_accumulation_steps=1,
        max_steps=1,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.98,
        max_grad_norm=1.0,
        lmbda=1.0,
        beta=1.0,
        temperature=1.0,
        max_new_tokens=max_new_tokens,
        use_cpu=True,
        bf16=False,
        fp16=False,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = TimedGKD(
        model=AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32),
        teacher_model=AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32),
        args=config,
        data_collator=_PromptCollator(tok.pad_token_id),
        train_dataset=datasets.Dataset.from_list([{"prompt_ids": p} for p in prompt_ids]),
        processing_class=tok,
        callbacks=[StepTimer()],
    )
    trainer.remove_callback(PrinterCallback)  # the end-of-train() metrics line, once per turn
    return trainer


def _trl_steps(trainer, steps: int) -> None:
    """`steps` optimizer steps of TRL's own loop (Trainer.train); only the steps themselves are timed."""
    trainer.args.max_steps = steps
    trainer.train()


# ---------------------------------------------------------------------------------------------- bench
def run_step_bench(
    engines: tuple[str, ...] = ENGINES,
    batch: int = 64,
    max_new_tokens: int = 64,
    rounds: int = 3,
    steps: int = 3,
    threads: int = 1,
) -> dict:
    """Alternate the contenders `rounds` times, `steps` timed steps per turn; returns every figure."""
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.getLogger("opd").setLevel(logging.WARNING)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    ensure_testbed()  # the bench's models are the testbed's (built on first use)
    tmp = Path(tempfile.mkdtemp(prefix="opd-bench-step-"))
    contenders: dict[str, Contender] = {}
    runners = {}
    prompt_ids = None
    for name in engines:
        t0 = time.perf_counter()
        if name in ("vllm", "hf"):
            run = _opd_run(name, batch, max_new_tokens, tmp / name)
            prompt_ids = prompt_ids or [run.prompt_ids(r) for r in run.train_rows]
            c = Contender(f"opd ({name})", time.perf_counter() - t0)
            runners[name] = (run, c)
        else:
            if prompt_ids is None:  # the prompts opd would build, without starting an engine
                prompt_ids = _bench_prompts(batch, max_new_tokens, tmp / "prompts")
            c = Contender("TRL GKDTrainer", 0.0)
            runners[name] = (_trl_trainer(prompt_ids, max_new_tokens, tmp / "trl", c), c)
            c.startup_s = time.perf_counter() - t0
        contenders[name] = c
        torch.set_num_threads(threads)  # whatever a constructor changed, every contender runs the same
    # one untimed warm-up step each (first-call allocations, lazy imports)
    for name, (runner, c) in runners.items():
        _one_turn(name, runner, Contender(c.name, 0.0), 1)
    for _ in range(rounds):
        for name, (runner, c) in runners.items():
            torch.set_num_threads(threads)
            _one_turn(name, runner, c, steps)
    for name, (runner, _) in runners.items():
        if name in ("vllm", "hf"):
            runner.close()
    shutil.rmtree(tmp, ignore_errors=True)  # the runs' checkpoints and metrics are not results
    return {
        "contenders": contenders,
        "batch": batch,
        "max_new_tokens": max_new_tokens,
        "rounds": rounds,
        "steps": steps,
        "threads": threads,
        "machine": machine_description(),
    }


def _bench_prompts(batch: int, max_new_tokens: int, run_dir: Path) -> list[list[int]]:
    cfg = compose([f"task.train_size={batch}", "task.eval_size=1"])
    task, rows, _ = load_task_and_data(cfg.task)
    tok = load_tokenizer(resolve_model_path("testbed:student_sft"))
    prompt_ids = student_prompt_ids(tok, task, enable_thinking=False)
    return [prompt_ids(r) for r in rows]


def _one_turn(name: str, runner, contender: Contender, steps: int) -> None:
    if name == "trl":
        _trl_steps(runner, steps)
    else:
        for _ in range(steps):
            _opd_step(runner, contender)


def machine_description() -> str:
    load = os.getloadavg()
    return (
        f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), load average "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, torch {torch.__version__}, python {platform.python_version()}"
    )


def format_table(result: dict) -> str:
    cs: dict[str, Contender] = result["contenders"]
    trl = cs.get("trl")
    lines = [
        f"batch {result['batch']} prompts x 1 sample, <= {result['max_new_tokens']} new tokens, fp32, "
        f"{result['threads']} torch thread(s); {result['rounds']} rounds x {result['steps']} timed steps each",
        f"machine: {result['machine']}",
        "",
        "| runner | startup s | steps/s | tokens/s | step s (median) | vs TRL steps/s | rollout | teacher | learner | sync |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cs.values():
        ratio = f"{c.steps_per_s / trl.steps_per_s:.2f}x" if trl and trl.step_s and c is not trl else "-"
        total = sum(c.step_s)
        split = (
            [f"{100 * sum(c.split[k]) / total:.1f}%" for k in ("rollout", "teacher", "learner", "sync")]
            if c.split
            else ["-"] * 4
        )
        lines.append(
            f"| {c.name} | {c.startup_s:.1f} | {c.steps_per_s:.3f} | {c.tokens_per_s:.0f} | "
            f"{statistics.median(c.step_s):.2f} | {ratio} | " + " | ".join(split) + " |"
        )
    return "\n".join(lines)
