"""The RLVR stage: GRPO with the task's verifier as the reward (builds the RLVR-adapted teacher).

    opd run stage=rlvr trainer.steps=100               # GRPO on the testbed: the teacher in <run dir>/model
    opd run experiment=qwen3_rlvr_teacher              # the Qwen3 RLVR teacher of the scale recipes
    opd run stage=rlvr resume=outputs/<date>/<time>    # continue a killed stage from its last checkpoint

Setup -> train -> save: the policy (`model.path`) and its rollout engine; an evaluation at step 0;
`grpo_train` below; the final evaluation; the model in `<run dir>/model`, usable as `teacher.path`.

`grpo_train` is also the testbed's builder of its RLVR teacher (opd_cli/testbed):

    from opd_cli.stages.rlvr import GRPOOptions, grpo_train
    engine = make_engine("hf", model_dir, model=model)
    grpo_train(model, tokenizer, task, rows, GRPOOptions(steps=100, prompts_per_step=32,
               samples_per_prompt=8, lr=5e-4, clip_eps=0.2, max_new_tokens=64, seed=0), engine=engine)

One step:
1. rollout: `prompts_per_step` prompts, `samples_per_prompt` samples each, from the rollout engine,
   which reports each sampled token's log-prob under the behaviour policy (raw distribution, T=1);
2. reward: 1 if `task.verify` says correct, else 0;
3. advantage: group-normalized within each prompt's samples, (r - mean) / std, and exactly 0 when the
   group is uniform (all right or all wrong: no signal about which sample is better);
4. loss: the PPO clipped surrogate with the ratio against the rollout log-probs,
   -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A), averaged over all response tokens of the batch
   (token mean). Samples with zero advantage (uniform groups) carry no gradient and are left out of the
   batch, so the token mean runs over the informative samples' tokens; a step with no informative group
   is skipped and counted (`skipped_steps`). `updates_per_step` > 1 splits the rollouts into that many minibatches (each one
   optimizer step), so later minibatches are off-policy and the clip matters;
5. weight sync: the engine receives the new weights.

Memory at scale (`micro_batch_size`, `chunk_size`, activation checkpointing on the model): the same step,
computed a few sequences and a few thousand logit rows at a time (tests/test_microbatch.py).

No KL to a reference model: with a verifiable reward and a few hundred steps it is not needed here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from opd_cli import rundir
from opd_cli.batching import micro_batches, pack, response_hidden_and_logits, token_logprobs
from opd_cli.checkpoint import resume_point, save_checkpoint, set_rng_state
from opd_cli.errors import OpdError
from opd_cli.io import atomic_write_json
from opd_cli.learner import Learner, autocast_dtype, load_model, load_tokenizer, pick_device
from opd_cli.rollout import RolloutEngine, SamplingConfig, derive_seed
from opd_cli.stages.common import load_task_and_data, resolve_path, rollout_engine, seed_everything
from opd_cli.stages.evaluate import evaluate, headline
from opd_cli.stages.sft import _progress, prompt_ids
from opd_cli.tasks.base import Row, Task
from opd_cli.teachers import student_prompt_ids
from opd_cli.tracking import Tracker

log = logging.getLogger("opd")


# ------------------------------------------------------------------------------------------ the stage
def run(cfg: DictConfig, run_dir: Path) -> dict:
    """GRPO on the task's verifier reward; the result in `run_dir/model` is a `teacher.path` for OPD."""
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
    # the config's engine settings (rollout.max_model_len: the Qwen3 GRPO recipe's 10,240-token
    # sequences, gpu_memory_utilization, seed) and bf16 where the learner autocasts to it
    amp = autocast_dtype(device, cfg.model.dtype)
    engine = rollout_engine(
        cfg, path, device, dtype="bfloat16" if amp == torch.bfloat16 else "float32", model=model
    )
    tracker = Tracker(
        run_dir,
        OmegaConf.to_container(cfg, resolve=True),
        cfg.logger,
        resume_step=None if state is None else state["step"],
    )

    prompt_ids = student_prompt_ids(tokenizer, task, cfg.model.enable_thinking)

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
                GRPOOptions.from_config(cfg),
                engine=engine,
                amp_dtype=autocast_dtype(device, cfg.model.dtype),
                progress=False,
                log_fn=lambda step, m: tracker.log(step, {k: v for k, v in m.items() if k != "step"}),
                log_every=1,
                on_checkpoint=save,
                start_state=state,
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


# ------------------------------------------------------------------------------------------- the loop


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantages for rewards [groups, samples]: (r - group mean) / group std (population std);
    zero for a group whose rewards are all equal."""
    rewards = rewards.float()
    mean = rewards.mean(dim=-1, keepdim=True)
    std = rewards.std(dim=-1, keepdim=True, unbiased=False)
    adv = (rewards - mean) / (std + eps)
    return torch.where(std > eps, adv, torch.zeros_like(adv))


def clipped_pg_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    n_tokens: int | None = None,
) -> tuple[torch.Tensor, dict]:
    """Token-mean PPO clipped surrogate. logp/old_logp/mask [B, T], advantages [B] (one per sequence).

    `n_tokens`: the denominator when these rows are one micro-batch of a larger minibatch (its response
    tokens), so that the micro-batches' losses and gradients add up to the minibatch's token mean."""
    mask = mask.float()
    n = mask.sum().clamp_min(1.0) if n_tokens is None else torch.tensor(float(max(n_tokens, 1)))
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv)
    loss = -(surrogate * mask).sum() / n
    with torch.no_grad():
        clipped = ((ratio - 1.0).abs() > clip_eps).float()
        info = {"clip_frac": float((clipped * mask).sum() / n), "ratio_mean": float((ratio * mask).sum() / n)}
    return loss, info


@dataclass
class GRPOOptions:
    """The hyperparameters of one `grpo_train` run: the RLVR stage reads them from the config
    (`from_config`), the testbed from its recipe."""

    steps: int
    prompts_per_step: int
    samples_per_prompt: int  # >= 2: advantages are normalized within each prompt's group
    lr: float
    clip_eps: float = 0.2
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    seed: int = 0
    warmup_ratio: float = 0.0
    schedule: str = "constant"  # constant | cosine | linear
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.98)  # AdamW's
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    updates_per_step: int = 1  # minibatches (optimizer steps) per rollout batch
    system_prompt: bool = True  # the policy's prompts include the row's system prompt
    enable_thinking: bool = False  # the policy's chat-template setting (model.enable_thinking)
    save_every: int = 0  # checkpoint every this many steps (0: never)
    micro_batch_size: int = 0  # sequences per forward/backward (0: the whole minibatch)
    chunk_size: int = 0  # logit rows per chunk of the log-probs (0: full [tokens, V] logits)

    @classmethod
    def from_config(cls, cfg: DictConfig) -> GRPOOptions:
        tc = cfg.trainer
        return cls(
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
            betas=tuple(tc.betas),
            adam_eps=tc.adam_eps,
            grad_clip=tc.grad_clip,
            enable_thinking=cfg.model.enable_thinking,
            save_every=tc.save_every,
            micro_batch_size=tc.micro_batch_size,
            chunk_size=cfg.loss.chunk_size,
        )


def grpo_train(
    model: torch.nn.Module,
    tokenizer,
    task: Task,
    rows: list[Row],
    options: GRPOOptions,
    *,
    engine: RolloutEngine,
    amp_dtype: torch.dtype | None = None,
    progress: bool = True,
    description: str = "grpo",
    log_fn: Callable[[int, dict], None] | None = None,
    log_every: int = 10,
    callback: Callable[[int, dict], bool | None] | None = None,
    eval_every: int = 0,
    on_checkpoint: Callable[[int, dict], None] | None = None,
    start_state: dict | None = None,
) -> dict:
    """Train `model` in place by GRPO on `rows`; returns the last step's metrics. `options.enable_thinking`
    is the policy's chat-template setting (`model.enable_thinking`).

    Checkpoints: every `options.save_every` steps before the last, `on_checkpoint(step, state)` receives the
    loop's state (optimizer and schedule, prompt sampler, counters); the caller saves it with the model's
    weights. `start_state` (such a state, the weights already in `model`) continues after its step and
    gives the same steps as the uninterrupted run: the rollouts are seeded per step.

    Memory: `options.micro_batch_size` > 0 runs forward/backward that many sequences at a time and accumulates
    one optimizer step per minibatch (the same gradient: each micro-batch's loss is divided by the
    minibatch's token count); `options.chunk_size` > 0 never materializes the minibatch's [tokens, V] logits
    (`batching.token_logprobs`); `amp_dtype` is the forward's autocast dtype (bf16 on CUDA).
    """
    o = options
    if not rows:
        raise ValueError("grpo_train: no rows")
    if o.samples_per_prompt < 2:
        raise ValueError(
            "grpo_train: samples_per_prompt must be >= 2 (advantages are normalized within a group)"
        )
    device = next(model.parameters()).device
    learner = Learner(
        model,
        lr=o.lr,
        total_steps=o.steps * o.updates_per_step,
        weight_decay=o.weight_decay,
        betas=o.betas,
        eps=o.adam_eps,
        grad_clip=o.grad_clip,
        warmup_ratio=o.warmup_ratio,
        schedule=o.schedule,
        amp_dtype=amp_dtype,
    )
    sampling = SamplingConfig(
        temperature=o.temperature, top_p=o.top_p, max_new_tokens=o.max_new_tokens, n=o.samples_per_prompt
    )
    gen = torch.Generator().manual_seed(o.seed)
    prompts = [
        prompt_ids(tokenizer, task.messages(r, system_prompt=o.system_prompt), o.enable_thinking)
        for r in rows
    ]
    pad = tokenizer.pad_token_id
    metrics: dict = {}
    skipped = 0
    first = 1
    if start_state is not None:
        learner.load_state_dict(start_state["learner"])
        gen.set_state(start_state["prompt_sampler"])
        skipped, metrics = start_state["skipped"], dict(start_state["metrics"])
        first = start_state["step"] + 1
    t0 = time.perf_counter()
    bar = _progress(progress, description, o.steps)
    if bar is not None and first > 1:
        bar[0].update(bar[1], completed=first - 1)
    try:
        for step in range(first, o.steps + 1):
            pick = torch.randint(len(rows), (o.prompts_per_step,), generator=gen).tolist()
            engine.sync_weights(model)
            groups = engine.generate([prompts[i] for i in pick], sampling, derive_seed(o.seed, step))
            rewards = torch.tensor(
                [
                    [
                        task.reward(rows[i], tokenizer.decode(s.response_ids, skip_special_tokens=True))
                        for s in group
                    ]
                    for i, group in zip(pick, groups, strict=True)
                ]
            )
            adv = group_advantages(rewards).flatten()
            samples = [s for group in groups for s in group]
            lengths = [s.num_tokens for s in samples]
            metrics = {
                "step": step,
                "reward": float(rewards.mean()),
                "mean_length": sum(lengths) / len(lengths),
                "truncation_ratio": sum(s.finish_reason == "length" for s in samples) / len(samples),
                "informative_groups": float((rewards.std(-1) > 0).float().mean()),
            }
            keep = [j for j in range(len(samples)) if adv[j] != 0 and samples[j].num_tokens > 0]
            if not keep:  # every group uniform: no gradient signal this step
                skipped += 1
            else:
                model.train()
                for chunk in _split(keep, o.updates_per_step):
                    n_tokens = sum(samples[j].num_tokens for j in chunk)
                    sums = {"loss": 0.0, "clip_frac": 0.0, "ratio_mean": 0.0}
                    for micro in micro_batches(chunk, o.micro_batch_size):
                        batch = pack(
                            [samples[j].prompt_ids for j in micro],
                            [samples[j].response_ids for j in micro],
                            pad,
                        ).to(device)
                        old = torch.zeros(batch.response_ids.shape, dtype=torch.float32)
                        for r, j in enumerate(micro):
                            old[r, : samples[j].num_tokens] = torch.tensor(samples[j].logprobs)
                        with learner.autocast():
                            hidden, _ = response_hidden_and_logits(model, batch, logits=False)
                            logp = token_logprobs(
                                hidden, model.get_output_embeddings(), batch.response_ids, o.chunk_size
                            )
                        loss, info = clipped_pg_loss(
                            logp,
                            old.to(device),
                            adv[micro].to(device),
                            batch.response_mask,
                            o.clip_eps,
                            n_tokens=n_tokens,
                        )
                        learner.backward(loss)
                        sums["loss"] += float(loss.detach())
                        for key in ("clip_frac", "ratio_mean"):  # token means over the minibatch
                            sums[key] += info[key]
                    metrics.update(**sums, **learner.step())
                model.eval()
            metrics.update(skipped_steps=skipped, seconds=time.perf_counter() - t0)
            if bar is not None:
                bar[0].update(bar[1], advance=1, description=f"{description} reward {metrics['reward']:.2f}")
            if log_fn is not None and (step % log_every == 0 or step == o.steps):
                log_fn(step, metrics)
            if callback is not None and eval_every and (step % eval_every == 0 or step == o.steps):
                engine.sync_weights(model)
                if callback(step, metrics):
                    break
            if on_checkpoint is not None and o.save_every and step % o.save_every == 0 and step < o.steps:
                on_checkpoint(step, rlvr_state(step, learner, gen, skipped, metrics))
    finally:
        if bar is not None:
            bar[0].stop()
    engine.sync_weights(model)
    model.eval()
    return metrics


def rlvr_state(step: int, learner: Learner, gen: torch.Generator, skipped: int, metrics: dict) -> dict:
    """What `grpo_train(start_state=...)` needs besides the weights to continue after `step`."""
    return {
        "step": step,
        "learner": learner.state_dict(),
        "prompt_sampler": gen.get_state(),
        "skipped": skipped,
        "metrics": dict(metrics),
    }


def _split(items: list[int], parts: int) -> list[list[int]]:
    parts = max(1, min(parts, len(items)))
    size = -(-len(items) // parts)
    return [items[i : i + size] for i in range(0, len(items), size)]
