"""The OPD / OPSD loop: rollout -> teacher scoring -> loss -> learner step -> weight sync, every step.

    opd run                                              # testbed OPD, CPU, vLLM rollouts
    opd run rollout=hf trainer.steps=50                  # transformers generate() instead of vLLM
    opd run task=arith_concise teacher=self_system model=opsd_base   # OPSD with a shared-rule PI
    opd run experiment=opd_naive_topk_k5                 # one cell of the failure/fix matrix
    opd run resume=outputs/<date>/<time>                 # continue a killed run from its last checkpoint
    opd run trainer.nproc=2 rollout=hf                   # 2 data-parallel learner ranks (opd_cli/distributed.py)
    torchrun --nproc_per_node=8 -m opd_cli.cli run trainer.device=cuda   # 8 GPUs, one rank per GPU

One step, as in the paper: the student samples responses to a batch of prompts (rollout engine, which
holds the learner's current weights); the teacher scores every response token under its own prompt;
the learner recomputes the student's logits with gradients and applies the selected divergence; the
new weights go back to the engine. Everything a step logs is computed from tensors it already has.
With `trainer.micro_batch_size=m` the teacher scoring, the loss and the backward run m sequences at a
time and the gradients accumulate into the step's one optimizer update, equal to the whole-batch one.
Rollouts of step s depend only on (seed, s, weights), so a resumed run regenerates the same batches,
and a data-parallel run (each rank rolls out its share of the step's prompts, seeded by their global
positions) produces the same batches as one process.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from opd_cli import distributed, losses, rundir
from opd_cli.batching import ResponseForward, pack
from opd_cli.checkpoint import latest_checkpoint, resume_point, save_checkpoint, set_rng_state
from opd_cli.diagnostics import CollapseDetector, loss_signals, rollout_signals
from opd_cli.errors import OpdError
from opd_cli.io import atomic_write_json
from opd_cli.learner import (
    Learner,
    NonFiniteError,
    autocast_dtype,
    load_model,
    load_tokenizer,
    pick_device,
    teacher_device,
    weights_dtype,
)
from opd_cli.losses_chunked import chunked_loss
from opd_cli.progress import StepProgress
from opd_cli.rollout import SamplingConfig, derive_seed
from opd_cli.stages.common import (
    load_task_and_data,
    resolve_path,
    rollout_engine,
    seed_everything,
    teacher_checkpoint,
    teacher_enable_thinking,
)
from opd_cli.stages.evaluate import evaluate, headline
from opd_cli.teacher_server.client import TeacherServerError
from opd_cli.teacher_server.scorer import build_vllm_teacher
from opd_cli.teachers import Teacher, check_same_vocabulary, student_prompt_ids, teacher_prompt_builder
from opd_cli.tracking import NullTracker, Tracker

log = logging.getLogger("opd")


def loss_kwargs(loss_cfg) -> dict:
    """The config's loss options that the selected loss accepts."""
    accepted = losses.loss_options(loss_cfg.name)
    return {k: loss_cfg[k] for k in accepted if k in loss_cfg and k not in ("diag_k", "diagnostics")}


def check_k_fits(loss_cfg, vocab_size: int) -> None:
    if "k" in losses.loss_options(loss_cfg.name) and loss_cfg.k > vocab_size:
        raise OpdError(
            f"loss.k={loss_cfg.k} is larger than the vocabulary ({vocab_size} tokens); "
            f"use loss.k <= {vocab_size}"
        )


def merge_micro_batches(
    per_token: list[dict[str, torch.Tensor]], masks: list[torch.Tensor]
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The micro-batches' [b, T_j] diagnostics and masks as one [B, T] batch (zero-padded to the widest):
    the tensors the whole-batch step would have produced."""
    if len(masks) == 1:
        return per_token[0], masks[0]
    width = max(m.shape[1] for m in masks)

    def pad(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]))

    merged = {k: torch.cat([pad(d[k]) for d in per_token]) for k in per_token[0]}
    return merged, torch.cat([pad(m) for m in masks])


def batch_rows(rows: list[dict], step: int, seed: int, size: int) -> list[dict]:
    """The prompts of step `step`: a fixed function of (seed, step), so resume replays them."""
    rng = random.Random(derive_seed(seed, step, 7))
    return rng.sample(rows, size) if size <= len(rows) else [rng.choice(rows) for _ in range(size)]


def explain_non_finite(exc: Exception, step: int, ckpt_root) -> str:
    """One line that blames the side that went bad (teacher output, student logits, gradient) and gives
    the advice that fits it: a NaN from the teacher is not cured by a lower learning rate."""
    last = f"the last good checkpoint is in {ckpt_root}"
    if isinstance(exc, losses.NonFiniteInputError) and exc.side == "teacher":
        return (
            f"step {step}: the teacher's output is broken: {exc}; check the teacher checkpoint "
            f"(teacher.path) or the teacher server, not the training settings (a lower trainer.lr will not "
            f"help); {last}"
        )
    if isinstance(exc, losses.NonFiniteInputError):
        return (
            f"step {step}: the student diverged: {exc}; lower trainer.lr or set trainer.grad_clip > 0 "
            f"(at step 1: check model.path, the checkpoint may be damaged); {last}"
        )
    return f"step {step}: {exc}: the update overflowed; lower trainer.lr or raise trainer.grad_clip; {last}"


class OPDRun:
    """Set up once, then `train()`; attributes are the run's live state."""

    def __init__(self, cfg: DictConfig, run_dir: Path, start_model_path: str | None = None):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        seed_everything(cfg.seed)
        self.device = pick_device(cfg.trainer.device)
        self.amp_dtype = autocast_dtype(self.device, cfg.model.dtype)
        self.task, self.train_rows, self.eval_rows = load_task_and_data(cfg.task)
        student_path = start_model_path or resolve_path(cfg.model.path, cfg)
        self.student_path = student_path
        self.tokenizer = load_tokenizer(student_path)
        self.model = load_model(student_path, self.device, trainable=True)
        self.vocab_size = self.model.config.vocab_size
        check_k_fits(cfg.loss, self.vocab_size)
        self.max_len = getattr(self.model.config, "max_position_embeddings", None)

        # The OPSD teacher is a frozen copy of the step-0 student (the same checkpoint, loaded again) unless
        # teacher.pi_checkpoint names a stronger PI teacher.
        teacher_path = teacher_checkpoint(cfg, student_path)
        # the student's prompts never show what the teacher's privileged information replaces
        self.prompt_ids = student_prompt_ids(
            self.tokenizer, self.task, cfg.model.enable_thinking, cfg.teacher
        )
        if cfg.teacher.backend == "vllm":  # top-K log-probs from vLLM (opd_cli/teacher_server)
            self.teacher = build_vllm_teacher(
                cfg, self.task, self.tokenizer, self.vocab_size, teacher_path, self.device, self.train_rows[0]
            )
        else:
            self.teacher = self.local_teacher(teacher_path)
        self.teacher.prompt_ids(self.train_rows[0])  # fail now, not at step 1, on a bad PI template

        tc = cfg.trainer
        if tc.activation_checkpointing:  # keep each layer's input only; recompute the rest in backward
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # DDP / FSDP wrap the forward that the loss differentiates; the learner optimizes the (possibly
        # sharded) parameters it leaves in self.model.
        self.forward = distributed.wrap(ResponseForward(self.model), tc.parallel, self.device)
        self.learner = Learner(
            self.model,
            lr=tc.lr,
            total_steps=tc.steps,
            weight_decay=tc.weight_decay,
            betas=tuple(tc.betas),
            eps=tc.adam_eps,
            grad_clip=tc.grad_clip,
            warmup_ratio=tc.warmup_ratio,
            schedule=tc.schedule,
            amp_dtype=self.amp_dtype,
        )
        self.detector = CollapseDetector(
            cfg.diagnostics.truncation_threshold,
            cfg.diagnostics.mass_threshold,
            cfg.diagnostics.repeat_threshold,
            cfg.diagnostics.patience,
        )
        self.sampling = SamplingConfig(
            temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p,
            max_new_tokens=cfg.rollout.max_new_tokens,
            n=cfg.rollout.n,
        )
        self.check_lengths()
        self.hedging = list(cfg.diagnostics.hedging_tokens or self.task.hedging_tokens)
        self.step = 0
        self.base_eval: dict | None = None
        self.final_eval: dict | None = None  # the last evaluation, once the run has finished
        self.skipped_batches = 0
        self.ckpt_root = self.run_dir / rundir.CHECKPOINTS
        resume_state = self.restore() if cfg.resume else None
        self.engine = rollout_engine(
            cfg,
            student_path,
            self.device,
            dtype="bfloat16" if self.amp_dtype == torch.bfloat16 else "float32",
            model=self.model,
            data_parallel=True,
        )
        if getattr(self.engine, "sync_fallback_reason", None):
            log.info("weight sync through reload_weights: %s", self.engine.sync_fallback_reason)
        self.tracker = (
            Tracker(
                self.run_dir,
                OmegaConf.to_container(cfg, resolve=True),
                cfg.logger,
                name=cfg.cell.name if cfg.cell.name != "default" else None,
                resume_step=resume_state,
            )
            if distributed.is_main()
            else NullTracker()
        )

    # ------------------------------------------------------------------------------------------ setup
    def local_teacher(self, teacher_path: str) -> Teacher:
        """The frozen teacher as a local HF model (teacher.backend=hf): full logits from its forward."""
        cfg = self.cfg
        teacher_tok = self.tokenizer if teacher_path == self.student_path else load_tokenizer(teacher_path)
        # frozen, so no fp32 master copy: bf16 weights on CUDA by default (teacher.dtype); on its own
        # device with teacher.device (its outputs come back to the learner's device for the loss)
        t_device = teacher_device(cfg.teacher.device, self.device)
        teacher_model = load_model(
            teacher_path, t_device, trainable=False, dtype=weights_dtype(t_device, cfg.teacher.dtype)
        )
        check_same_vocabulary(self.tokenizer, teacher_tok, self.model, teacher_model)
        return Teacher(
            teacher_model,
            teacher_tok,
            teacher_prompt_builder(self.task, cfg.teacher),
            amp=lambda: torch.autocast(
                t_device.type,
                dtype=self.amp_dtype,
                enabled=self.amp_dtype is not None and t_device.type == self.device.type,
            ),
            output_device=self.device,
            enable_thinking=teacher_enable_thinking(cfg),
        )

    def check_lengths(self) -> None:
        longest_prompt = max(len(self.prompt_ids(r)) for r in self.train_rows[:256])
        budget = longest_prompt + self.cfg.rollout.max_new_tokens
        if self.max_len is not None and budget > self.max_len:
            raise OpdError(
                f"prompt ({longest_prompt} tokens) + rollout.max_new_tokens "
                f"({self.cfg.rollout.max_new_tokens}) exceeds the model's context ({self.max_len}); "
                f"lower rollout.max_new_tokens"
            )
        if self.cfg.rollout.engine == "vllm" and budget > self.cfg.rollout.max_model_len:
            raise OpdError(
                f"prompt + rollout.max_new_tokens = {budget} tokens > rollout.max_model_len="
                f"{self.cfg.rollout.max_model_len}; raise rollout.max_model_len"
            )

    def restore(self) -> int:
        ckpt, state = resume_point(self.ckpt_root, "opd")
        from safetensors.torch import load_file

        weights = {}
        for shard in sorted(ckpt.glob("*.safetensors")):
            weights.update(load_file(str(shard), device=str(self.device)))
        missing, unexpected = distributed.load_full_state_dict(self.model, weights)
        if unexpected or [m for m in missing if "lm_head" not in m]:
            raise OpdError(
                f"checkpoint {ckpt} does not match the model (missing {missing[:3]}, unexpected "
                f"{unexpected[:3]}); resume with the run's own config"
            )
        self.learner.load_state_dict(state["learner"])
        self.detector.load_state_dict(state["detector"])
        self.base_eval = state.get("base_eval")
        self.final_eval = state.get("final_eval")  # set only in the checkpoint written after the last eval
        self.skipped_batches = state.get("skipped_batches", 0)
        set_rng_state(state["rng"])
        self.step = state["step"]
        log.info("resumed from %s at step %d", ckpt, self.step)
        return self.step

    def save(self) -> None:
        """Rank 0 writes the checkpoint (under FSDP every rank first takes part in the gather)."""
        sharded = distributed.world_size() > 1 and self.cfg.trainer.parallel == "fsdp"
        weights = distributed.full_state_dict(self.model) if sharded else None
        learner_state = self.learner.full_state_dict() if sharded else self.learner.state_dict()
        if distributed.is_main():
            save_checkpoint(
                self.ckpt_root,
                self.step,
                self.model,
                self.tokenizer,
                {
                    "learner": learner_state,
                    "detector": self.detector.state_dict(),
                    "base_eval": self.base_eval,
                    "final_eval": self.final_eval,
                    "skipped_batches": self.skipped_batches,
                },
                state_dict=weights,
            )
        distributed.barrier()

    # ------------------------------------------------------------------------------------------- step
    def rollout(self, rows: list[dict], indices: list[int]) -> list[list]:
        """This rank's samples for `rows` (global batch positions `indices`). Ranks that share one
        tensor-parallel vLLM engine submit the union of their prompts together and keep their own."""
        tp = self.cfg.rollout.tensor_parallel_size if self.cfg.rollout.engine == "vllm" else 1
        seed = derive_seed(self.cfg.seed, self.step)
        if tp == 1 or distributed.world_size() == 1:
            return self.engine.generate([self.prompt_ids(r) for r in rows], self.sampling, seed, keys=indices)
        group = distributed.rank() // tp
        everyone = distributed.all_gather_objects(indices)
        mine = [i for r in range(group * tp, (group + 1) * tp) for i in everyone[r]]
        full = batch_rows(self.train_rows, self.step, self.cfg.seed, self.cfg.trainer.prompts_per_step)
        groups = self.engine.generate(
            [self.prompt_ids(full[i]) for i in mine], self.sampling, seed, keys=mine
        )
        by_index = dict(zip(mine, groups, strict=True))
        return [by_index[i] for i in indices]

    def train_step(self) -> dict[str, float]:
        """One step: rollout -> grade -> teacher score -> loss -> optimizer step -> weight sync."""
        cfg = self.cfg
        rows = batch_rows(self.train_rows, self.step, cfg.seed, cfg.trainer.prompts_per_step)
        indices = distributed.local_indices(len(rows))  # this rank's share of the global batch
        rows = [rows[i] for i in indices]

        t0 = time.perf_counter()
        groups = self.rollout(rows, indices)
        samples = [s for g in groups for s in g]
        sample_rows = [r for r, g in zip(rows, groups, strict=True) for _ in g]
        responses = [s.response_ids for s in samples]
        correct, metrics, all_responses = self.grade(groups, sample_rows)
        t1 = time.perf_counter()
        if not any(all_responses):
            self.skipped_batches += 1
            log.warning(
                "step %d: every response is empty; batch skipped (%d so far)",
                self.step + 1,
                self.skipped_batches,
            )
            return {**metrics, "skipped_batches": self.skipped_batches}

        # the cosine to the full reverse KL needs full teacher log-probs (not a top-K vLLM teacher's)
        full_teacher = getattr(self.teacher, "full_vocabulary", True)
        diagnose = full_teacher and cfg.loss.chunk_size <= 0 and (self.step + 1) % cfg.diagnostics.every == 0
        # teacher scoring and the loss's forward/backward, interleaved per micro-batch
        loss_value, cosine, teacher_time, teacher_wait, per_token, masks = self.score_and_backward(
            samples, sample_rows, responses, diagnose
        )
        metrics.update(self.global_loss_signals(*merge_micro_batches(per_token, masks), correct))
        world = distributed.world_size()
        if diagnose:  # with several ranks: the mean of the ranks' cosines
            n_local = max(float(sum(len(r) for r in responses)), 1.0)
            metrics["grad_cosine_to_full_rkl"] = (
                distributed.all_reduce_sum(cosine / n_local, self.device) / world
            )
        metrics["loss"] = distributed.all_reduce_sum(loss_value, self.device) / world
        metrics.update(self.learner.step())
        t3 = time.perf_counter()
        t2 = t1 + teacher_time  # teacher scoring is interleaved with the learner's micro-batches
        sync = self.engine.sync_weights(self.model)
        t4 = time.perf_counter()
        metrics.update(
            {
                "time/rollout": t1 - t0,
                "time/teacher": t2 - t1,
                "time/learner": t3 - t2,
                "time/sync": t4 - t3,
                "time/step": t4 - t0,
                "time/sync_fraction": sync / (t4 - t0),
                **({} if full_teacher else {"time/teacher_requests": teacher_wait}),
                "tokens": sum(len(r) for r in all_responses),
            }
        )
        return metrics

    def grade(self, groups: list[list], sample_rows: list[dict]) -> tuple[list[bool], dict, list[list[int]]]:
        """(this rank's correctness per sample, the rollout signals of the global batch, the global
        batch's responses): every rank sees every rank's graded rollouts."""
        texts = [self.tokenizer.decode(s.response_ids, skip_special_tokens=True) for g in groups for s in g]
        verdicts = [self.task.verify(r, t) for r, t in zip(sample_rows, texts, strict=True)]
        graded = iter(zip(texts, verdicts, strict=True))
        mine = [[(s.response_ids, s.finish_reason, *next(graded)) for s in g] for g in groups]
        flat = [x for g in distributed.global_batch(mine) for x in g]
        all_responses = [x[0] for x in flat]
        metrics = rollout_signals(
            all_responses,
            [x[2] for x in flat],
            [x[1] for x in flat],
            self.hedging,
            [x[3].correct for x in flat],
        )
        metrics["rollout_well_formed"] = sum(x[3].well_formed for x in flat) / len(flat)
        return [v.correct for v in verdicts], metrics, all_responses

    def score_and_backward(self, samples, sample_rows, responses, diagnose: bool):
        """Per micro-batch: the teacher scores the responses, the student's loss is computed and
        back-propagated (gradients accumulate into the step's one update). Returns (the loss's share of
        this rank, the token-weighted gradient cosine to the full reverse KL, teacher seconds, of which
        waiting for a teacher server, the micro-batches' per-token diagnostics and masks)."""
        cfg = self.cfg
        kwargs = loss_kwargs(cfg.loss)
        chunked = cfg.loss.chunk_size > 0
        world = distributed.world_size()
        # The loss of each micro-batch is a mean over its own tokens (or sequences); rescaled by its count
        # x W / global count, the accumulated gradient (averaged over ranks by DDP) is the gradient of the
        # mean over the whole global batch, and the scaled values sum to that mean.
        total = max(distributed.all_reduce_sum(self.loss_count(responses), self.device), 1.0)
        loss_value = cosine = teacher_time = teacher_wait = 0.0
        per_token, masks = [], []
        micro = self.micro_batches(len(samples))
        for i, (part, real) in enumerate(micro):
            ta = time.perf_counter()
            # chunked: only the teacher's hidden states; the loss makes its log-probs chunk by chunk
            teacher_out = self.teacher.score(sample_rows[part], responses[part], hidden=chunked)
            teacher_time += time.perf_counter() - ta
            teacher_wait += getattr(self.teacher, "last_timing", {}).get("requests_s", 0.0)
            batch = pack(
                [s.prompt_ids for s in samples[part]], responses[part], self.tokenizer.pad_token_id
            ).to(self.device)
            mb_kwargs = dict(kwargs)
            if cfg.loss.name == "sampled_rkl":
                mb_kwargs["behavior_logprobs"] = self._behavior_logprobs(
                    samples[part], batch.response_mask.shape
                )
            count = self.loss_count(responses[part]) if real else 0.0
            with distributed.no_sync(self.forward, last=i == len(micro) - 1):
                with self.learner.autocast():
                    out, anchor, logits = self.micro_loss(batch, teacher_out, mb_kwargs)
                scaled = out.loss * (count * world / total)
                if count == 0 and world > 1:  # still touch every parameter so the gradient all-reduce runs
                    head = self.model.get_output_embeddings().weight
                    scaled = scaled + 0.0 * anchor.sum() + 0.0 * head.sum()
                self.learner.backward(scaled)
            loss_value += float(scaled.detach())
            if real:
                per_token.append(out.per_token)
                masks.append(batch.response_mask)
            if real and diagnose:  # token-weighted: the mean over this rank's tokens
                cosine += float(batch.response_mask.sum()) * float(
                    losses.grad_cosine_to_full_rkl(
                        cfg.loss.name,
                        logits.detach(),
                        teacher_out,
                        batch.response_ids,
                        batch.response_mask,
                        **mb_kwargs,
                    )
                )
            del teacher_out, batch, out, anchor, logits, scaled  # before the next micro-batch allocates
        return loss_value, cosine, teacher_time, teacher_wait, per_token, masks

    def micro_loss(self, batch, teacher_out, kwargs: dict):
        """The loss on one packed micro-batch, under autocast: (LossOutput, the forward output that
        anchors an empty micro-batch to the graph, logits [B, T, V] or None on the chunked path)."""
        cfg = self.cfg
        chunked = cfg.loss.chunk_size > 0
        hidden, logits = self.forward(
            batch.input_ids, batch.attention_mask, batch.response_index, logits=not chunked
        )
        if not chunked:
            out = losses.compute_loss(
                cfg.loss.name, logits, teacher_out, batch.response_ids, batch.response_mask, **kwargs
            )
            return out, logits, logits
        head = self.model.get_output_embeddings()
        out = chunked_loss(
            cfg.loss.name,
            hidden,
            head.weight,
            teacher_out,
            batch.response_ids,
            batch.response_mask,
            chunk_size=cfg.loss.chunk_size,
            lm_head_bias=head.bias,
            **kwargs,
        )
        return out, hidden, None

    def loss_count(self, responses: list[list[int]]) -> float:
        """What the loss averages over: response tokens (token_mean) or non-empty sequences (seq_mean)."""
        if self.cfg.loss.reduction == "seq_mean":
            return float(sum(len(r) > 0 for r in responses))
        return float(sum(len(r) for r in responses))

    def micro_batches(self, n: int) -> list[tuple[slice, bool]]:
        """(slice, real) per micro-batch of this rank's n samples (distributed.micro_batch_slices)."""
        return distributed.micro_batch_slices(n, self.cfg.trainer.micro_batch_size)

    def global_loss_signals(self, per_token: dict, mask: torch.Tensor, correct: list[bool]) -> dict:
        """loss_signals over the global batch (every rank's per-token diagnostics, padded to one width)."""
        if distributed.world_size() == 1:
            return loss_signals(per_token, mask, correct)
        return loss_signals(*distributed.gather_padded(per_token, mask, correct))

    def _behavior_logprobs(self, samples, shape) -> torch.Tensor:
        out = torch.zeros(shape, dtype=torch.float32)
        for i, s in enumerate(samples):
            out[i, : len(s.logprobs)] = torch.tensor(s.logprobs, dtype=torch.float32)
        return out.to(self.device)

    # ------------------------------------------------------------------------------------------- eval
    def run_eval(self) -> dict:
        e = self.cfg.eval
        rows = self.eval_rows[: e.size]
        result = evaluate(
            self.engine,
            self.tokenizer,
            self.task,
            rows,
            self.prompt_ids,
            max_new_tokens=e.max_new_tokens,
            samples=e.samples,
            temperature=e.temperature,
            seed=derive_seed(self.cfg.seed, 10**6),
            keep_samples=e.keep_samples,
            base=self.base_eval,
        )
        result["step"] = self.step
        if distributed.is_main():  # every rank evaluates (a shared vLLM engine needs all), rank 0 writes
            atomic_write_json(rundir.eval_path(self.run_dir, self.step), result)
        if self.base_eval is None:
            self.base_eval = result
        return result

    # ------------------------------------------------------------------------------------------ train
    def train(self) -> dict:
        cfg = self.cfg
        total = cfg.trainer.steps
        every = cfg.eval.every
        if self.step == 0:
            self.tracker.log(0, headline(self.run_eval()))
        last_eval = None
        with StepProgress(total, start=self.step, description=f"{cfg.stage} {cfg.loss.name}") as progress:
            while self.step < total:
                try:
                    metrics = self.train_step()
                except TeacherServerError as exc:  # after the retries: stop, keep the last good checkpoint
                    raise OpdError(
                        f"step {self.step + 1}: {exc}; the last good checkpoint is {self.last_checkpoint()}: "
                        f"restart the teacher server and continue with resume={self.run_dir}"
                    ) from exc
                except (NonFiniteError, losses.NonFiniteInputError) as exc:
                    self.tracker.log(self.step + 1, {"non_finite": 1.0})
                    raise OpdError(explain_non_finite(exc, self.step + 1, self.ckpt_root)) from exc
                self.step += 1
                if self.detector.update(self.step, metrics):
                    log.warning(
                        "collapse detected at step %d (%s)",
                        self.detector.collapsed_at,
                        ", ".join(self.detector.bad(metrics)),
                    )
                metrics["collapsed"] = float(self.detector.collapsed_at is not None)
                if every and self.step % every == 0 and self.step < total:
                    last_eval = self.run_eval()
                    metrics.update(headline(last_eval))
                self.tracker.log(self.step, metrics)
                progress.update(self.step, metrics)
                # the last step is saved after the final evaluation, with it (see below)
                if self.step % cfg.trainer.save_every == 0 and self.step < total:
                    self.save()
                if cfg.diagnostics.stop_on_collapse and self.detector.collapsed_at is not None:
                    log.warning("stopping: diagnostics.stop_on_collapse=true")
                    break
        if self.final_eval is not None:  # resumed from the final checkpoint: its evaluation is logged
            final = self.final_eval
        else:
            final = self.run_eval()
            self.tracker.log(self.step, headline(final))
            self.final_eval = final
            self.save()
        summary = self.summary(final)
        self.tracker.summary(summary)
        return summary

    def summary(self, final: dict) -> dict:
        main = final.get("main") or final.get("without_system")
        base = self.base_eval.get("main") or self.base_eval.get("without_system")
        out = {
            "steps": self.step,
            "final_accuracy": main["accuracy"],
            "start_accuracy": base["accuracy"],
            "accuracy_change": main["accuracy"] - base["accuracy"],
            "final_mean_length": main["mean_length"],
            "final_truncation_ratio": main["truncation_ratio"],
            "collapsed_at": self.detector.collapsed_at,
            "skipped_batches": self.skipped_batches,
            "run_dir": str(self.run_dir),
        }
        if "internalization" in final:
            out["internalization_score"] = final["internalization"]["score"]
            out["follow_without"] = final["internalization"]["follow_without"]
        return out

    def last_checkpoint(self) -> str:
        ckpt = latest_checkpoint(self.ckpt_root)
        return str(ckpt) if ckpt else "none yet (a resume starts from step 0)"

    def close(self) -> None:
        self.engine.close()
        if hasattr(self.teacher, "close"):
            self.teacher.close()
        self.tracker.finish()


def run(cfg: DictConfig, run_dir: Path, start_model_path: str | None = None) -> dict:
    opd = OPDRun(cfg, run_dir, start_model_path)
    try:
        return opd.train()
    finally:
        opd.close()
