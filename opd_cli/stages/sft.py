"""Supervised fine-tuning: cross-entropy on response tokens only.

    from opd_cli.stages.sft import sft_train
    sft_train(model, tokenizer, [(task.messages(row), row["solution"]) for row in rows],
              steps=600, batch_size=64, lr=3e-3, warmup_ratio=0.05, schedule="constant", seed=0, device="cpu")

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

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from opd_cli.batching import micro_batches, pack, response_hidden_and_logits, token_logprobs
from opd_cli.learner import Learner

Example = tuple[list[dict], str]


def prompt_ids(tokenizer, messages: list[dict], enable_thinking: bool = False) -> list[int]:
    """Token ids of the chat prompt with the generation prompt appended, as the OPD student sees it
    (same template, same `enable_thinking`). An empty message list (generic pretraining text) gives the
    generation prompt alone, e.g. the single token `<|assistant|>`."""
    from opd_cli.teachers import chat_prompt_ids

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
    """(prompt ids, response ids + EOS) per example; prompts are cached per distinct message list."""
    cache: dict[str, list[int]] = {}
    out = []
    for messages, response in examples:
        key = repr(messages)
        if key not in cache:
            cache[key] = prompt_ids(tokenizer, messages, enable_thinking)
        ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        out.append((cache[key], ids))
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


def sft_train(
    model: torch.nn.Module,
    tokenizer,
    examples: list[Example],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    warmup_ratio: float = 0.0,
    schedule: str = "constant",
    seed: int = 0,
    device: str | torch.device = "cpu",
    weight_decay: float = 0.0,
    grad_clip: float = 1.0,
    progress: bool = True,
    description: str = "sft",
    log_fn: Callable[[int, dict], None] | None = None,
    log_every: int = 50,
    callback: Callable[[int, dict], bool | None] | None = None,
    eval_every: int = 0,
    enable_thinking: bool = False,
    micro_batch_size: int = 0,
    chunk_size: int = 0,
    amp_dtype: torch.dtype | None = None,
    save_every: int = 0,
    on_checkpoint: Callable[[int, dict], None] | None = None,
    start_state: dict | None = None,
) -> dict:
    """Train `model` in place on `examples`; returns the final metrics (loss is an EMA of the batch loss).

    `enable_thinking` is the student's chat-template setting (`model.enable_thinking`): SFT prompts must
    be the prompts the student later sees in OPD and evaluation.

    Memory: `micro_batch_size` > 0 runs forward/backward that many sequences at a time and accumulates one
    optimizer step equal to the whole batch's; `chunk_size` > 0 never materializes the batch's [tokens, V]
    logits; `amp_dtype` is the forward's autocast dtype (bf16 on CUDA).

    Checkpoints: every `save_every` steps before the last, `on_checkpoint(step, state)` receives the loop's
    state (optimizer and schedule, batch sampler, running loss); `start_state` (the weights already in
    `model`) continues after its step exactly as the uninterrupted run would."""
    if not examples:
        raise ValueError("sft_train: no examples")
    if steps < 1:
        raise ValueError(f"sft_train: steps must be >= 1, got {steps}")
    device = torch.device(device)
    model.to(device).train()
    data = tokenize_examples(tokenizer, examples, enable_thinking)
    batches = _Batches(len(data), batch_size, seed)
    learner = Learner(
        model,
        lr=lr,
        total_steps=steps,
        weight_decay=weight_decay,
        grad_clip=grad_clip,
        warmup_ratio=warmup_ratio,
        schedule=schedule,
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
    bar = _progress(progress, description, steps)
    if bar is not None and first > 1:
        bar[0].update(bar[1], completed=first - 1)
    try:
        for step in range(first, steps + 1):
            idx = batches.next()
            n = sum(len(data[i][1]) for i in idx)  # the batch's response tokens: every part's denominator
            value = 0.0
            for part in micro_batches(idx, micro_batch_size):
                batch = pack([data[i][0] for i in part], [data[i][1] for i in part], pad).to(device)
                with learner.autocast():
                    loss, _ = response_nll(model, batch, chunk_size, n_tokens=n)
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
            if log_fn is not None and (step % log_every == 0 or step == steps):
                log_fn(step, metrics)
            if callback is not None and eval_every and (step % eval_every == 0 or step == steps):
                if callback(step, metrics):
                    break
            if on_checkpoint is not None and save_every and step % save_every == 0 and step < steps:
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
