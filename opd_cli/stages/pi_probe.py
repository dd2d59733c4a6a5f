"""The PI-dependence probe (the paper's mechanism 3): how much does an OPSD teacher depend on privileged
information (PI) that the student cannot supply itself?

    opd probe-pi experiment=opsd_answer_pi -n 500 --samples 8     # PI = the answer (instance-specific)
    opd probe-pi experiment=opsd_solution_pi -n 500 --samples 8   # PI = the full reference solution
    opd probe-pi experiment=opsd_system_rule -n 500 --samples 8   # PI = the shared S:concise system rule
    opd probe-pi teacher=self_answer model=opsd_base rollout=hf --samples 8 --out pi_answer.json

The student never sees I, so OPSD's optimum is the normalized geometric mean of the PI-conditioned
teachers, p*(.|x) ∝ exp(E_I' log q(.|x, I')) (../../shared/PAPER.md, mechanism 3). For N of the student's
own T=1 rollouts y (the sequences the OPD loss trains on), at every response position t (the positions
`teachers.Teacher.score` scores and the loss averages over) this measures

    E KL( q(.|x, I, y<t) || q(.|x, I', y<t) )          and          E KL( q(.|x, I, y<t) || q_bar(.|x, y<t) )

where q is the frozen step-0 student under the teacher's prompt, I the row's reference PI, and I' what the
student would put in its place:
- student:  its own answer / solution, from `samples` further rollouts of the same prompt (the task's
            verifier extracts the answer; a solution is the whole response; a shared rule is the rule);
- direct:   (answer PI) the student's answer where the answer-conditioned teacher commits to its own:
            the student continues the teacher's greedy response cut before its answer (on the testbed
            right after `A:`, before any scratchpad: the shortcut), so it answers without the reasoning
            through which its own rollouts know the answer;
- valid:    the other valid PIs of the same problem the task knows (`Task.alternative_pis`: on the
            testbed, the other well-formed scratchpads; a final answer has none);
- marginal: the PI of `samples` other problems: the student's guess with no information at all (for a
            shared rule, the rule itself: the gap is 0 by construction);
- none:     no PI: the student's own prompt (what the student sees; at step 0 this is the student).
log q_bar = mean_j log q(.|x, I'_j) - logsumexp(...) over the I' of one source (`valid`: I and the
alternatives). Means are per response token (the loss's token_mean), with a 95% bootstrap interval and
the sd of the per-prompt means over prompts. `pi_dependence(cfg, n, seed)` is the function `opd preflight`
calls; `opd probe-pi` prints `format_pi_dependence` and writes the dict as JSON. Results on the testbed:
experiments/pi_dependence.md.

The path probe (`path_probe`, the dict's "path"): can the student, without the PI, finish what the PI
teacher starts? On PATH_PROMPTS prompts the PI teacher answers greedily with the PI; the student, on its
own prompt, is given the first PATH_PREFIX of that response (at least one token) and continues greedily.
OPSD pulls the student onto the teacher's path; where the student cannot finish that path without the PI
(the answer-conditioned teacher skips to the answer, the student cannot compute it unprompted) it is
trained onto a path it fails on, whatever the per-token gaps say. For a shared rule the path is the
rule's own, which the student can learn; it also reads the PI teacher's own accuracy (a rule teacher
weaker than the student trades accuracy for the rule).

The optimum probe (`optimum_probe`, the dict's "optimum"): what does the student's optimum write? On the
same PATH_PROMPTS prompts, q_bar over the PIs of `gap_to_student_optimum` (the student's own where it can
write the PI, else the reference and the problem's other valid PIs) is decoded greedily, one token at a
time (at each step every PI-conditioned prompt scores the same prefix; the next token is the argmax of
the mean of their log-probs), and graded by the task's verifier. Against the student's own greedy
accuracy this is what OPSD converges to at best: where the teachers commit to one style whatever the PI,
q_bar serves some users; where each keeps its own style on the others' prefixes, q_bar mixes them
position by position and is wrong for every user (a per-user profile: experiments/testbed.md). Whether
the student reaches q_bar is another matter: reverse KL moves a token in proportion to the student's own
probability of it.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import numpy as np
import torch

from opd_cli.errors import OpdError
from opd_cli.learner import autocast_dtype, load_model, load_tokenizer, pick_device, weights_dtype
from opd_cli.rollout import SamplingConfig, derive_seed
from opd_cli.stages.common import (
    load_task_and_data,
    resolve_path,
    rollout_engine,
    teacher_checkpoint,
    teacher_enable_thinking,
)
from opd_cli.tasks.base import Row, Task
from opd_cli.teachers import Teacher, student_prompt_builder, student_prompt_ids, teacher_prompt_builder

# statistic -> what replaces I (rows of the printed table, in this order)
STATS = {
    "student": "the student's own (each sample)",
    "student_differs": "the student's own, where I' != I",
    "student_bar": "q_bar over the student's own (its optimum)",
    "direct": "the student's answer where the teacher commits to it (each)",
    "direct_bar": "q_bar over those answers",
    "valid": "another valid PI of the problem (each)",
    "valid_bar": "q_bar over I and the other valid PIs",
    "marginal": "another problem's PI (each)",
    "marginal_bar": "q_bar over other problems' PIs",
    "none": "no PI (the student's own prompt)",
}
BOOTSTRAP = 1000
PATH_PROMPTS = 64  # prompts of the path probe
PATH_PREFIX = 0.25  # share of the PI teacher's greedy response the student continues from
DEFAULT_BATCH = 64  # sequences per teacher forward when trainer.micro_batch_size is 0 (all at once)


def check_request(cfg, n: int, samples: int) -> None:
    if n < 1:
        raise OpdError(f"-n {n}: the PI probe needs at least one prompt; pass -n 200 or another n >= 1")
    if samples < 1:
        raise OpdError(f"--samples {samples}: the PI probe needs at least one I' sample per prompt; pass 4")
    if cfg.teacher.kind != "self_pi":
        raise OpdError(
            f"teacher.kind={cfg.teacher.kind} is not an OPSD teacher: the PI probe measures the privileged "
            f"information of a self_pi teacher; use teacher=self_answer, self_solution or self_system"
        )
    if cfg.stabilization.kind == "sft":
        raise OpdError(
            "stabilization=sft: the OPSD teacher is the SFT'd student this run creates; probe that checkpoint "
            "instead: model.path=<run dir>/model stabilization=none"
        )


def pi_kind(field: str, shared: bool) -> str:
    if shared:
        return "shared rule"
    if field in ("answer", "hint"):
        return "answer"
    if field == "solution":
        return "solution"
    return "instance-specific"


def student_pi(task: Task, row: Row, text: str, field: str, kind: str) -> str | None:
    """What the student would write in place of the PI, from one of its responses (None: it cannot)."""
    if kind == "shared rule":
        return str(row[field])
    if kind == "answer":
        return task.verify(row, text).answer
    if kind == "solution":
        return text
    return None  # a per-example field (a profile) the student has no way to produce


@dataclass
class Variant:
    """One teacher prompt for prompt `index`'s rollout: the row with its PI field replaced."""

    index: int
    source: str  # reference | student | direct | valid | marginal | none
    row: Row
    same: bool  # the PI value equals the reference's


def per_token_kl(ref: torch.Tensor, other: torch.Tensor, rows: int = 256) -> torch.Tensor:
    """KL(ref || other) per position from log-probs [T, V] -> [T], in float64, `rows` positions at a time
    (a 152k vocabulary x 4k positions in float64 would be 5 GB per operand)."""
    parts = [
        (r.double().exp() * (r.double() - o.double())).sum(-1)
        for r, o in zip(ref.split(rows), other.split(rows), strict=True)
    ]
    return torch.cat(parts) if parts else ref.new_zeros(0, dtype=torch.float64)


def normalized_mean(total: torch.Tensor, count: int) -> torch.Tensor:
    """log q_bar from the sum of `count` log-prob tensors [T, V]: their mean, renormalized over the
    vocabulary (mean - logsumexp), in the dtype of `total`."""
    return torch.log_softmax(total / count, dim=-1)


def geometric_mean(logprobs: torch.Tensor) -> torch.Tensor:
    """log q_bar [T, V] from log-probs [m, T, V]: the normalized geometric mean of the m distributions."""
    return normalized_mean(logprobs.sum(0), len(logprobs))


class PromptStats:
    """One prompt's statistics, fed one scored variant at a time (the reference first), so a prompt's
    variants never need to be held together: the reference and no-PI log-probs, one running sum of
    log-probs per source (for q_bar) and a per-position KL vector per variant."""

    SOURCES = ("student", "direct", "valid", "marginal")

    def __init__(self, length: int):
        self.length = length
        self.ref: torch.Tensor | None = None
        self.none: torch.Tensor | None = None
        self.kl: dict[str, list[torch.Tensor]] = {s: [] for s in (*self.SOURCES, "none", "student_differs")}
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, v: Variant, logprobs: torch.Tensor) -> None:
        logprobs = logprobs[: self.length]
        if v.source == "reference":
            self.ref = logprobs.clone()  # a copy: a view would keep the whole scored batch alive
            self._accumulate("valid", logprobs)  # q_bar over the valid PIs includes I itself
            return
        kl = per_token_kl(self.ref, logprobs)
        self.kl[v.source].append(kl)
        if v.source == "none":
            self.none = logprobs.clone()
            return
        if v.source == "student" and not v.same:
            self.kl["student_differs"].append(kl)
        self._accumulate(v.source, logprobs)

    def _accumulate(self, source: str, logprobs: torch.Tensor) -> None:
        if source in self.sums:
            self.sums[source] += logprobs
        else:
            self.sums[source] = logprobs.float().clone()
        self.counts[source] = self.counts.get(source, 0) + 1

    def finish(self, stats: dict[str, list[torch.Tensor]]) -> None:
        """Append this prompt's per-position KL vectors [length] to `stats` (a multi-sample source: the
        mean over its samples at each position)."""
        if self.length == 0:
            return
        for source, kls in self.kl.items():
            if kls:
                stats[source].append(torch.stack(kls).mean(0))
        for source in self.SOURCES:
            if not self.kl[source]:  # (valid: I alone is no alternative)
                continue
            bar = normalized_mean(self.sums[source], self.counts[source])
            stats[f"{source}_bar"].append(per_token_kl(self.ref, bar))
            if source == "student" and self.none is not None:
                stats["student_bar_vs_none"].append(per_token_kl(bar, self.none))


def alignment_error(logprobs: torch.Tensor, responses: list[list[int]], sampled: list[list[float]]) -> float:
    """The largest |log p(y_t) from a scorer's [B, T, V] - the rollout engine's own log-prob of y_t|: the
    student scoring its own rollouts must reproduce them at every position (an off-by-one shift or a
    re-tokenized prompt shows here)."""
    worst = 0.0
    for row, ids, ref in zip(logprobs, responses, sampled, strict=True):
        if ids:
            got = row[: len(ids)].gather(-1, torch.tensor(ids, device=row.device)[:, None])[:, 0]
            worst = max(
                worst, float((got.double().cpu() - torch.tensor(ref, dtype=torch.float64)).abs().max())
            )
    return worst


def summarize(per_prompt: list[torch.Tensor], rng: np.random.Generator) -> dict | None:
    """From one per-position KL vector [T] per prompt: the token-weighted mean (the loss's token_mean),
    its bootstrap 95% interval over prompts, the sd of the per-prompt means, and the mean KL at the first
    response token (where a shortcut such as answering at once shows); None when no prompt has it."""
    if not per_prompt:
        return None
    sums = np.array([float(k.sum()) for k in per_prompt])
    tokens = np.array([len(k) for k in per_prompt], dtype=float)
    draws = rng.integers(0, len(sums), size=(BOOTSTRAP, len(sums)))
    boot = sums[draws].sum(1) / tokens[draws].sum(1)
    return {
        "mean": float(sums.sum() / tokens.sum()),
        "ci95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
        "sd_over_prompts": float(np.std(sums / tokens, ddof=1)) if len(sums) > 1 else 0.0,
        "first_token_mean": float(np.mean([float(k[0]) for k in per_prompt])),
        "prompts": int(len(sums)),
        "tokens": int(tokens.sum()),
    }


def prefix_before(tok, ids: list[int], chars: int) -> int:
    """The largest j such that ids[:j] decodes to at most `chars` characters (binary search: the decoded
    length grows with j)."""
    lo, hi = 0, len(ids)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(tok.decode(ids[:mid], skip_special_tokens=True)) <= chars:
            lo = mid
        else:
            hi = mid - 1
    return lo


def direct_answers(engine, tok, task, teacher, rows, prompt_ids, sampling, samples, seed) -> list[list[str]]:
    """Answer PI: the answers the student gives at the point where the answer-conditioned teacher writes
    its answer. The teacher (reference I) responds greedily; its response is cut where its final answer
    starts (the verifier finds it; with the shortcut on the testbed right after `A:`, before any
    scratchpad); the student continues from its own prompt + that prefix (`samples` T=1 draws) and the
    verifier reads the answer. [] for a prompt whose teacher response has no answer."""
    greedy = SamplingConfig(max_new_tokens=sampling.max_new_tokens, greedy=True)
    own = engine.generate([teacher.prompt_ids(r) for r in rows], greedy, derive_seed(seed, 2))
    prefixes: dict[int, list[int]] = {}
    for i, (row, g) in enumerate(zip(rows, own, strict=True)):
        ids = [t for t in g[0].response_ids if t != tok.eos_token_id]
        text = tok.decode(ids, skip_special_tokens=True)
        answer = task.verify(row, text).answer  # the teacher's own final answer, right or wrong
        at = text.rfind(answer) if answer is not None else -1
        if at >= 0:
            prefixes[i] = ids[: prefix_before(tok, ids, at)]
    draws = SamplingConfig(
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        max_new_tokens=sampling.max_new_tokens,
        n=samples,
    )
    keys = sorted(prefixes)
    conts = (
        engine.generate(
            [prompt_ids(rows[i]) + prefixes[i] for i in keys], draws, derive_seed(seed, 3), keys=keys
        )
        if keys
        else []
    )
    out: list[list[str]] = [[] for _ in rows]
    for i, group in zip(keys, conts, strict=True):
        for s in group:
            answer = task.verify(
                rows[i], tok.decode(prefixes[i] + s.response_ids, skip_special_tokens=True)
            ).answer
            if answer is not None:
                out[i].append(answer)
    return out


def path_probe(engine, teacher_engine, tok, task, rows, teacher, prompt_ids, max_new_tokens, seed) -> dict:
    """The path probe (module doc) on `rows`: `teacher_engine` generates with the PI teacher's weights,
    `engine` with the student's; both greedy."""
    greedy = SamplingConfig(greedy=True, max_new_tokens=max_new_tokens)
    t_out = teacher_engine.generate([teacher.prompt_ids(r) for r in rows], greedy, derive_seed(seed, 31))
    stop = set(tok.all_special_ids)
    t_resp = [g[0].response_ids for g in t_out]
    prefixes = []
    for y in t_resp:
        body = y[:-1] if y and y[-1] in stop else y  # never hand the student the teacher's EOS
        prefixes.append(body[: max(1, int(len(body) * PATH_PREFIX))])
    student_prompts = [prompt_ids(r) for r in rows]
    own = engine.generate(student_prompts, greedy, derive_seed(seed, 32))
    cont = engine.generate(
        [p + x for p, x in zip(student_prompts, prefixes, strict=True)], greedy, derive_seed(seed, 33)
    )

    def correct(seqs: list[list[int]]) -> list[bool]:
        texts = [tok.decode(y, skip_special_tokens=True) for y in seqs]
        return [task.verify(r, t).correct for r, t in zip(rows, texts, strict=True)]

    def accuracy(seqs: list[list[int]]) -> float:
        return sum(correct(seqs)) / len(rows)

    own_resp = [g[0].response_ids for g in own]
    on_path = [x + g[0].response_ids for x, g in zip(prefixes, cont, strict=True)]
    student_correct = correct(own_resp)
    student_accuracy, path_accuracy = sum(student_correct) / len(rows), accuracy(on_path)
    return {
        "prompts": len(rows),
        "prefix_share": PATH_PREFIX,
        "teacher_prefix_example": tok.decode(prefixes[0]),
        "teacher_accuracy": accuracy(t_resp),
        "teacher_mean_length": sum(map(len, t_resp)) / len(rows),
        "student_accuracy": student_accuracy,
        "student_mean_length": sum(map(len, own_resp)) / len(rows),
        "student_on_teacher_path": path_accuracy,
        "drop": student_accuracy - path_accuracy,
        # per prompt, for the optimum probe (pi_dependence takes it out of the result)
        "student_correct": student_correct,
    }


@torch.no_grad()
def decode_geometric_means(
    model,
    groups: list[list[list[int]]],
    max_new_tokens: int,
    stop: set[int],
    pad_id: int,
    amp,
    batch: int = DEFAULT_BATCH,
    scores: list | None = None,
) -> list[list[int]]:
    """For each group of prompts, greedy decoding of the normalized geometric mean of `model`'s
    next-token distributions under the group's prompts: at every step the token with the largest mean
    log-probability, fed to every prompt of the group. A group stops after a token in `stop` (kept) or
    `max_new_tokens`. Groups run together, left-padded into batches of at most `batch` sequences (a larger
    group alone), each with one KV cache. `scores`, a list, receives per group the list of its steps' mean
    log-probabilities [V]."""
    device = next(model.parameters()).device
    out: list[list[int]] = [[] for _ in groups]
    chunks: list[list[int]] = []
    size = 0
    for g, prompts in enumerate(groups):
        if not chunks or size + len(prompts) > batch:
            chunks.append([])
            size = 0
        chunks[-1].append(g)
        size += len(prompts)
    if scores is not None:
        scores.extend([] for _ in groups)
    for members in chunks:
        prompts = [p for g in members for p in groups[g]]
        owner = torch.tensor([k for k, g in enumerate(members) for _ in groups[g]], device=device)
        counts = torch.bincount(owner, minlength=len(members)).unsqueeze(-1).float()
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p, device=device)
            mask[i, width - len(p) :] = 1
        done = [False] * len(members)
        past, step_ids = None, ids
        for _ in range(max_new_tokens):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -step_ids.shape[1] :]
            with amp():
                res = model(
                    input_ids=step_ids,
                    attention_mask=mask,
                    position_ids=positions,
                    past_key_values=past,
                    use_cache=True,
                )
            past = res.past_key_values
            logp = res.logits[:, -1].float().log_softmax(-1)
            mean = (
                torch.zeros(len(members), logp.shape[-1], device=device).index_add_(0, owner, logp) / counts
            )
            tokens = mean.argmax(-1).tolist()
            for k, g in enumerate(members):
                if not done[k]:
                    out[g].append(tokens[k])
                    if scores is not None:
                        scores[g].append(mean[k].cpu())
                    done[k] = tokens[k] in stop
            if all(done):
                break
            # a finished group is fed pad tokens that nothing attends to (mask 0)
            live = torch.tensor([not done[k] for k in owner.tolist()], device=device)
            step_ids = torch.where(live, torch.tensor(tokens, device=device)[owner], pad_id).unsqueeze(-1)
            mask = torch.cat([mask, live.long().unsqueeze(-1)], dim=1)
    return out


@torch.no_grad()
def least_likely_token(model, prompt: list[int], response: list[int], amp) -> float:
    """The smallest log-prob `model` gives a token of `response` after `prompt` (0.0 for no tokens)."""
    if not response:
        return 0.0
    device = next(model.parameters()).device
    with amp():
        logits = model(torch.tensor([prompt + response], device=device)).logits[0]
    logp = logits[len(prompt) - 1 : len(prompt) + len(response) - 1].float().log_softmax(-1)
    return float(logp.gather(-1, torch.tensor(response, device=device)[:, None]).min())


def optimum_probe(
    teacher_model,
    model,
    tok,
    task,
    teacher,
    prompt_ids,
    variants,
    rows,
    student_correct: list[bool],
    field: str,
    max_new_tokens: int,
    amp,
    batch: int = DEFAULT_BATCH,
) -> dict | None:
    """The optimum probe (module doc) on `rows` and their variants: q_bar decoded with the PI teacher's
    weights, against `student_correct` (the path probe's grades of the student's own greedy responses to
    the same rows); `model` is the student, for its log-prob of q_bar's response. q_bar's response is
    graded for the row (its reference PI) and for each PI it averages (`field` set to that PI's value):
    right for none of them means q_bar mixes what the PIs ask for, wrong for every user; right for one
    means it commits to one PI's behaviour. A prompt with neither a PI of the student's own nor two valid
    ones is skipped (its optimum is the PI teacher itself: the path probe); None when every prompt is."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    kept, groups, over = [], [], set()
    for row, vs, own_correct in zip(rows, variants, student_correct, strict=True):
        own = [v.row for v in vs if v.source == "student"]
        pis = own or [v.row for v in vs if v.source in ("reference", "valid")]
        if own or len(pis) >= 2:
            kept.append((row, pis, own_correct))
            groups.append([teacher.prompt_ids(r) for r in pis])
            over.add("the student's own" if own else "the valid PIs")
    q_bar = decode_geometric_means(
        teacher_model, groups, max_new_tokens, set(tok.all_special_ids), pad, amp, batch
    )
    right = own_right = some_pi = 0
    lengths, least, example = [], [], None
    for (row, pis, own_correct), ids in zip(kept, q_bar, strict=True):
        text = tok.decode(ids, skip_special_tokens=True)
        right += task.verify(row, text).correct
        some_pi += any(task.verify({**row, field: r[field]}, text).correct for r in pis)
        least.append(least_likely_token(model, prompt_ids(row), ids, amp))
        own_right += own_correct
        lengths.append(len(ids))
        example = example or text
    if not lengths:
        return None
    n = len(lengths)
    return {
        "prompts": n,
        "over": " / ".join(sorted(over)),
        "example": example,
        "accuracy": right / n,
        # right under at least one of the PIs q_bar averages: 1 when it commits to one of them
        "right_for_some_pi": some_pi / n,
        "mean_length": sum(lengths) / n,
        # can the student get there: its own log-prob of q_bar's least likely token (for it) per prompt,
        # the median over prompts. Reverse KL moves a token in proportion to the student's probability of
        # it, so log-probs of -5 and below (p < 0.007) are out of reach in a short run
        "student_least_logprob_median": float(np.median(least)),
        "student_accuracy": own_right / n,
        # what the student loses (> 0) or gains (< 0) at its own optimum, on these prompts
        "drop": (own_right - right) / n,
    }


def pi_dependence(cfg, n: int, seed: int, samples: int = 4) -> dict:
    """The PI-dependence measurement of an OPSD recipe on `n` of the student's rollouts (module doc)."""
    check_request(cfg, n, samples)
    start = time.perf_counter()
    device = pick_device(cfg.trainer.device)
    amp = autocast_dtype(device, cfg.model.dtype)
    task, train_rows, _ = load_task_and_data(cfg.task)
    rng = random.Random(derive_seed(seed, 17))
    rows = rng.sample(train_rows, n) if n <= len(train_rows) else [rng.choice(train_rows) for _ in range(n)]
    field = cfg.teacher.pi_field
    # The OPSD teacher is the frozen step-0 student: one frozen model rolls out and scores every prompt
    # (with teacher.pi_checkpoint, those weights score the PI-conditioned prompts).
    path = resolve_path(cfg.model.path, cfg)
    tok = load_tokenizer(path)
    model = load_model(path, device, trainable=False, dtype=weights_dtype(device, cfg.teacher.dtype))
    teacher_path = teacher_checkpoint(cfg, path)
    teacher_model = (
        model
        if teacher_path == path
        else load_model(teacher_path, device, trainable=False, dtype=weights_dtype(device, cfg.teacher.dtype))
    )

    def autocast():
        return torch.autocast(device.type, dtype=amp, enabled=amp is not None)

    teacher = Teacher(
        teacher_model,
        tok,
        teacher_prompt_builder(task, cfg.teacher),
        amp=autocast,
        enable_thinking=teacher_enable_thinking(cfg),
    )
    student_view = Teacher(
        model,
        tok,
        student_prompt_builder(task, cfg.teacher),
        amp=autocast,
        enable_thinking=cfg.model.enable_thinking,
    )
    teacher.prompt_ids(rows[0])  # a PI field the rows lack: one line now, not after the rollouts
    shared = len({str(r.get(field)) for r in train_rows}) == 1
    kind = pi_kind(field, shared)

    prompt_ids = student_prompt_ids(tok, task, cfg.model.enable_thinking, cfg.teacher)
    sampling = SamplingConfig(
        temperature=cfg.rollout.temperature,
        top_p=cfg.rollout.top_p,
        max_new_tokens=cfg.rollout.max_new_tokens,
        n=samples + 1,  # sample 0 is the scored rollout y; 1.. are the student's independent I' draws
    )
    dtype = "bfloat16" if amp == torch.bfloat16 else "float32"
    engine = rollout_engine(cfg, path, device, dtype=dtype, model=model)
    try:
        groups = engine.generate([prompt_ids(r) for r in rows], sampling, derive_seed(seed, 1))
        direct = (
            direct_answers(engine, tok, task, teacher, rows, prompt_ids, sampling, samples, seed)
            if kind == "answer"
            else None
        )
        teacher_engine = (
            engine
            if teacher_model is model
            else rollout_engine(cfg, teacher_path, device, dtype=dtype, model=teacher_model)
        )
        try:
            path = path_probe(
                engine,
                teacher_engine,
                tok,
                task,
                rows[:PATH_PROMPTS],
                teacher,
                prompt_ids,
                cfg.rollout.max_new_tokens,
                seed,
            )
        finally:
            if teacher_engine is not engine:
                teacher_engine.close()
    finally:
        engine.close()
    responses = [g[0].response_ids for g in groups]
    correct = [
        task.verify(r, tok.decode(y, skip_special_tokens=True)).correct
        for r, y in zip(rows, responses, strict=True)
    ]

    variants: list[list[Variant]] = []
    asked = available = same_student = same_marginal = same_direct = alternatives = 0
    for i, (row, group) in enumerate(zip(rows, groups, strict=True)):
        ref = str(row[field])
        vs = [Variant(i, "reference", row, True)]
        for s in group[1:]:
            asked += 1
            value = student_pi(task, row, tok.decode(s.response_ids, skip_special_tokens=True), field, kind)
            if value is not None:
                available += 1
                same_student += value == ref
                vs.append(Variant(i, "student", {**row, field: value}, value == ref))
        for value in direct[i] if direct else []:
            same_direct += value == ref
            vs.append(Variant(i, "direct", {**row, field: value}, value == ref))
        for value in task.alternative_pis(row, field):
            alternatives += 1
            vs.append(Variant(i, "valid", {**row, field: value}, value == ref))
        for other in rng.sample(train_rows, min(samples, len(train_rows))):
            value = str(other[field])
            same_marginal += value == ref
            vs.append(Variant(i, "marginal", {**row, field: value}, value == ref))
        vs.append(Variant(i, "none", row, False))
        variants.append(vs)

    # sequences per teacher forward; each prompt's statistics are accumulated as its variants come back
    batch = cfg.trainer.micro_batch_size if cfg.trainer.micro_batch_size > 0 else DEFAULT_BATCH
    optimum = optimum_probe(
        teacher_model,
        model,
        tok,
        task,
        teacher,
        prompt_ids,
        variants[:PATH_PROMPTS],
        rows[:PATH_PROMPTS],
        path.pop("student_correct"),
        field,
        cfg.rollout.max_new_tokens,
        autocast,
        batch,
    )
    stats: dict[str, list[torch.Tensor]] = {k: [] for k in [*STATS, "student_bar_vs_none"]}
    flat = [v for vs in variants for v in vs]  # prompt-major, each prompt's reference first
    pending = {i: PromptStats(len(responses[i])) for i in range(n)}
    alignment = 0.0
    for lo in range(0, len(flat), batch):
        part = flat[lo : lo + batch]
        with_pi = [v for v in part if v.source != "none"]
        plain = [v for v in part if v.source == "none"]
        scored = {}
        if with_pi:
            out = teacher.score([v.row for v in with_pi], [responses[v.index] for v in with_pi]).full
            scored.update(zip(map(id, with_pi), out, strict=True))
        if plain:
            own = student_view.score([v.row for v in plain], [responses[v.index] for v in plain]).full
            scored.update(zip(map(id, plain), own, strict=True))
            alignment = max(
                alignment,
                alignment_error(
                    own, [responses[v.index] for v in plain], [groups[v.index][0].logprobs for v in plain]
                ),
            )
        for v in part:
            pending[v.index].add(v, scored[id(v)])
            if v.source == "none":  # a prompt's last variant
                pending.pop(v.index).finish(stats)
        del scored

    boot = np.random.default_rng(derive_seed(seed, 23))
    summary = {k: summarize(v, boot) for k, v in stats.items()}
    return {
        "n": n,
        "samples": samples,
        "seed": seed,
        "model": str(cfg.model.path),
        "task": str(cfg.task.name),
        "pi_field": field,
        "pi_kind": kind,
        "shared": shared,
        "teacher_prompt_example": tok.decode(teacher.prompt_ids(rows[0])),
        "student_prompt_example": tok.decode(prompt_ids(rows[0])),
        "response_tokens": int(sum(len(y) for y in responses)),
        "rollout_accuracy": sum(correct) / n,
        "student_pi_available": available / asked,
        "student_pi_same_as_reference": same_student / available if available else None,
        "direct_available": None if direct is None else sum(bool(d) for d in direct) / n,
        "direct_same_as_reference": (
            same_direct / sum(len(d) for d in direct) if direct and any(direct) else None
        ),
        "marginal_same_as_reference": same_marginal
        / sum(1 for vs in variants for v in vs if v.source == "marginal"),
        "valid_alternatives_per_prompt": alternatives / n,
        "kl": summary,
        # the headline for preflight: what the student cannot close even at its own optimum, the geometric
        # mean over the PIs it could be given. Over its own samples where it can write the PI; where it
        # cannot (a per-user profile), over the problem's valid PIs, which is then the whole PI distribution
        "gap_to_student_optimum": (
            summary["student_bar"]["mean"]
            if summary["student_bar"]
            else summary["valid_bar"]["mean"]
            if summary["valid_bar"]
            else None
        ),
        "gap_to_student_optimum_over": (
            "the student's own"
            if summary["student_bar"]
            else "the valid PIs"
            if summary["valid_bar"]
            else None
        ),
        # answer PI: the same where the teacher commits to its answer (before the student's scratchpad)
        "gap_where_teacher_commits": summary["direct_bar"]["mean"] if summary["direct_bar"] else None,
        # can the student finish, without the PI, what the PI teacher starts (module doc)
        "path": path,
        # what the student's optimum q_bar writes, decoded greedily and graded (module doc)
        "optimum": optimum,
        # the student's prompt scored like a teacher's vs the engine's own log-probs of its rollouts
        "alignment_max_abs_logprob_diff": alignment,
        "wall_s": time.perf_counter() - start,
    }


def format_pi_dependence(result: dict) -> str:
    def cell(s: dict | None) -> str:
        if s is None:
            return "| n/a | | | | |"
        lo, hi = s["ci95"]
        return (
            f"| {s['mean']:.4f} | [{lo:.4f}, {hi:.4f}] | {s['sd_over_prompts']:.4f} | "
            f"{s['first_token_mean']:.4f} | {s['prompts']} |"
        )

    same = result["student_pi_same_as_reference"]
    path = result["path"]
    direct = result["direct_same_as_reference"]
    lines = [
        f"PI probe: teacher.pi_field={result['pi_field']} ({result['pi_kind']}), model {result['model']}, "
        f"{result['n']} rollouts x {result['samples']} I' samples, {result['response_tokens']} response tokens, "
        f"rollout accuracy {result['rollout_accuracy']:.3f}",
        "| I' (in place of the reference PI I) | E KL(q(.|x,I,y<t) || q(.|x,I',y<t)) per token | 95% CI | "
        "sd over prompts | first token | prompts |",
        "|---|---|---|---|---|---|",
        *[f"| {label} {cell(result['kl'][k])}" for k, label in STATS.items()],
        f"| KL(q_bar(student) || no PI): how far the optimum is from the student now "
        f"{cell(result['kl']['student_bar_vs_none'])}",
        f"I' == I: the student's own {'n/a' if same is None else f'{same:.3f}'} (the student could supply one in "
        f"{result['student_pi_available']:.3f} of its samples), another problem's "
        f"{result['marginal_same_as_reference']:.3f}, the student's answer where the teacher commits "
        f"{'n/a' if direct is None else f'{direct:.3f}'}; other valid PIs per problem: "
        f"{result['valid_alternatives_per_prompt']:.1f}",
        "path: on {prompts} prompts the PI teacher is right {teacher_accuracy:.3f} (length {teacher_mean_length:.1f}), "
        "the student {student_accuracy:.3f} (length {student_mean_length:.1f}); the student, without the PI, "
        "continuing the first {share:.0%} of the teacher's response ({example!r}): {student_on_teacher_path:.3f} "
        "(drop {drop:+.3f})".format(
            share=path["prefix_share"], example=path["teacher_prefix_example"], **path
        ),
        (
            "optimum: q_bar over {over} decoded greedily on {prompts} prompts is right {accuracy:.3f}, right "
            "for one of the PIs it averages {right_for_some_pi:.3f} (length {mean_length:.1f}; {example!r}); "
            "the student {student_accuracy:.3f} (drop {drop:+.3f}); the student's log-prob of q_bar's least "
            "likely token, median {student_least_logprob_median:.2f}".format(**result["optimum"])
            if result.get("optimum")
            else "optimum: no prompt has two PIs to average (the student's optimum is the PI teacher: path)"
        ),
        f"alignment: the student's prompt scored as a teacher reproduces its rollouts' log-probs within "
        f"{result['alignment_max_abs_logprob_diff']:.1e}; wall time {result['wall_s']:.1f} s",
    ]
    return "\n".join(lines)
