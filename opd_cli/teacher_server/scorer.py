"""The teacher's top-K log-probs from vLLM's `prompt_logprobs`, in this process or from a server pool.

    opd run teacher.backend=vllm loss=topk_rkl_stopgrad loss.support=intersection trainer.steps=20   # testbed, vLLM in process
    opd run experiment=qwen3_opd_8b_topk loss.support=intersection teacher.backend=vllm teacher.server=http://127.0.0.1:8000

Per student response the teacher is sent token ids, never text: its own prompt ids (its chat template,
rendered here from the teacher's tokenizer) + the student's response ids, with `prompt_logprobs=K` and
one generated token (vLLM needs max_tokens >= 1; that token is ignored). Position j of the reply scores
token j given tokens < j; the first entry is None (nothing predicts the first prompt token), so response
token t is scored at entry len(prompt) + t. Each entry holds the top-K ids with their log-probs and rank,
plus the actual token (K + 1 entries when it is not in the top-K): the actual token's entry is the
sampled-token log-prob, the K best ranks are the top-K. They fill `TeacherLogprobs(topk_ids,
topk_logprobs, sampled)` [B, T, K] / [B, T] on the learner's device, zero on padding.

Temperature 1 whatever the server's defaults: every request sets temperature=1, top_p=1, top_k=-1, and
the log-probs are vLLM's raw ones (`logprobs_mode=raw_logprobs`: log_softmax of the model's logits,
before any sampling processor; `opd teacher serve` starts the server with it and with
`--generation-config vllm`). Tested against the in-process HF teacher (tests/test_served_teacher.py).

Memory: a request carries at most `teacher.max_request_tokens` prompt + response tokens (at least one
sequence), so the server's prompt_logprobs tensors ([tokens, V] fp32 before the top-K) stay bounded
(vLLM issue #5907); the requests of a batch go to the pool's servers concurrently, one per server at a time.
A reply that is malformed or short (fewer entries than tokens, a missing actual token, fewer than K
entries) is an error naming the request, never a silently shorter batch.
"""

from __future__ import annotations

import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from opd_cli.errors import OpdError
from opd_cli.losses import TeacherLogprobs
from opd_cli.teacher_server.checks import logprobs_k, servers
from opd_cli.teacher_server.client import ServerPool, TeacherRequestError
from opd_cli.teachers import PromptBuilder, chat_prompt_ids, check_same_vocabulary

log = logging.getLogger("opd")

# one position: {token id: (log-prob, rank)}; None for the first prompt token
Position = dict[int, tuple[float, int]] | None


def split_requests(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Consecutive sequence indices grouped so that a group's tokens stay <= max_tokens (a longer
    sequence is a group of its own)."""
    groups: list[list[int]] = []
    used = 0
    for i, n in enumerate(lengths):
        if groups and used + n <= max_tokens:
            groups[-1].append(i)
            used += n
        else:
            groups.append([i])
            used = n
    return groups


# ------------------------------------------------------------------------------------------ backends
class HttpBackend:
    """vLLM OpenAI-compatible servers: /v1/models, /tokenize, /v1/completions with token-id prompts."""

    def __init__(self, pool: ServerPool):
        self.pool = pool
        self.model = None
        self.max_model_len: int | None = None

    def where(self) -> str:
        return ", ".join(self.pool.urls)

    def describe(self) -> None:
        """Every server of the pool answers and serves the same model; remember its name and context."""
        names = set()
        for i, url in enumerate(self.pool.urls):
            reply, _ = self.pool.call("/v1/models", label=f"teacher server {url}", start=i)
            data = reply.get("data") or []
            if not data:
                raise TeacherRequestError(f"teacher server {url} lists no model at /v1/models")
            names.add(data[0]["id"])
            length = data[0].get("max_model_len")
            if length:
                self.max_model_len = min(self.max_model_len or length, int(length))
        if len(names) > 1:
            raise OpdError(
                f"teacher.server lists servers that serve different models ({sorted(names)}); every URL "
                f"must serve the same teacher"
            )
        self.model = names.pop()

    def chat_ids(self, messages: list[dict], template_kwargs: dict) -> list[int]:
        body = {"model": self.model, "messages": messages, "add_generation_prompt": True}
        if template_kwargs:
            body["chat_template_kwargs"] = template_kwargs
        reply, _ = self.pool.call("/tokenize", body, label="teacher chat-template check")
        return [int(t) for t in reply["tokens"]]

    def request(self, sequences: list[list[int]], k: int, label: str, index: int) -> list[list[Position]]:
        body = {
            "model": self.model,
            "prompt": sequences,
            "max_tokens": 1,
            "temperature": 1.0,
            "top_p": 1.0,
            "top_k": -1,
            "prompt_logprobs": k,
        }
        reply, url = self.pool.call("/v1/completions", body, label=label, start=index)
        choices = reply.get("choices")
        if not isinstance(choices, list) or len(choices) != len(sequences):
            got = len(choices) if isinstance(choices, list) else "no"
            raise TeacherRequestError(f"{label}: {url} returned {got} choices for {len(sequences)} sequences")
        out = []
        for choice in sorted(choices, key=lambda c: c.get("index", 0)):
            positions = choice.get("prompt_logprobs")
            if not isinstance(positions, list):
                raise TeacherRequestError(f"{label}: {url} returned no prompt_logprobs for a sequence")
            try:
                out.append(
                    [
                        None
                        if p is None
                        else {int(t): (float(v["logprob"]), int(v["rank"])) for t, v in p.items()}
                        for p in positions
                    ]
                )
            except (AttributeError, KeyError, TypeError, ValueError) as exc:
                raise TeacherRequestError(
                    f"{label}: {url} returned a malformed prompt_logprobs entry ({exc!r})"
                ) from exc
        return out

    def close(self) -> None:
        pass


class LocalBackend:
    """`vllm.LLM` in this process (the rollout engine's setup: raw log-probs, no generation config)."""

    def __init__(self, model_path: str, *, device: str, dtype: str, seed: int, k: int, options: dict):
        from opd_cli.rollout.vllm_engine import VLLMEngine

        self.engine = VLLMEngine(model_path, device=device, dtype=dtype, seed=seed, max_logprobs=k, **options)
        self.max_model_len = self.engine.llm.llm_engine.model_config.max_model_len

    def where(self) -> str:
        return "the in-process vLLM teacher"

    def request(self, sequences: list[list[int]], k: int, label: str, index: int) -> list[list[Position]]:
        from vllm.inputs import TokensPrompt

        from opd_cli.rollout.base import torch_threads
        from opd_cli.rollout.vllm_engine import _preserve_global_rng

        params = self.engine._vllm.SamplingParams(
            max_tokens=1, temperature=1.0, top_p=1.0, top_k=0, prompt_logprobs=k, detokenize=False
        )
        prompts = [TokensPrompt(prompt_token_ids=list(s)) for s in sequences]
        with _preserve_global_rng(self.engine.device), torch_threads(self.engine.num_threads):
            outputs = self.engine.llm.generate(prompts, params, use_tqdm=False)
        return [
            [
                None if p is None else {int(t): (float(v.logprob), int(v.rank)) for t, v in p.items()}
                for p in o.prompt_logprobs
            ]
            for o in outputs
        ]

    def close(self) -> None:
        self.engine.close()


# ------------------------------------------------------------------------------------------- teacher
class VLLMTeacher:
    """A frozen teacher scored by vLLM; `score` has the signature of `teachers.Teacher.score`."""

    full_vocabulary = False  # top-K + sampled-token log-probs only

    def __init__(
        self,
        backend,
        tokenizer,
        prompts: PromptBuilder,
        *,
        k: int,
        enable_thinking: bool = False,
        output_device: torch.device | str = "cpu",
        max_request_tokens: int = 8192,
    ):
        self.backend, self.tokenizer, self.prompts = backend, tokenizer, prompts
        self.k, self.enable_thinking = k, enable_thinking
        self.output_device = torch.device(output_device)
        self.max_request_tokens = max_request_tokens
        self.requests_sent = 0
        self.last_timing: dict[str, float] = {}
        workers = len(backend.pool.urls) if isinstance(backend, HttpBackend) else 1
        self._executor = ThreadPoolExecutor(max_workers=workers) if workers > 1 else None

    def prompt_ids(self, row) -> list[int]:
        self.prompts.check_fields(row)
        return chat_prompt_ids(self.tokenizer, self.prompts.messages(row), self.enable_thinking)

    def template_kwargs(self) -> dict:
        return (
            {"enable_thinking": self.enable_thinking}
            if "enable_thinking" in (self.tokenizer.chat_template or "")
            else {}
        )

    @torch.no_grad()
    def score(self, rows, responses: list[list[int]], *, hidden: bool = False) -> TeacherLogprobs:
        """Top-K ids/log-probs [B, T, K] and the sampled token's log-prob [B, T] at every response
        position (`hidden` is ignored: there are no teacher hidden states to hand out)."""
        t0 = time.perf_counter()
        prompts = [self.prompt_ids(r) for r in rows]
        limit = self.backend.max_model_len
        if limit is not None:
            longest = max(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
            if longest > limit:
                raise OpdError(
                    f"teacher prompt + response is {longest} tokens, over the vLLM teacher's max_model_len "
                    f"({limit}); shorten teacher.prompt_template or rollout.max_new_tokens, or serve the "
                    f"teacher with a longer --max-model-len"
                )
        scored = [i for i, r in enumerate(responses) if r]  # an empty response has nothing to score
        sequences = [prompts[i] + list(responses[i]) for i in scored]
        groups = split_requests([len(s) for s in sequences], self.max_request_tokens)
        labels = [
            f"teacher request {g + 1}/{len(groups)} (sequences {scored[idx[0]]}-{scored[idx[-1]]}, "
            f"{sum(len(sequences[i]) for i in idx)} tokens) to {self.backend.where()}"
            for g, idx in enumerate(groups)
        ]

        def send(g: int) -> list[list[Position]]:
            return self.backend.request([sequences[i] for i in groups[g]], self.k, labels[g], g)

        t1 = time.perf_counter()
        if self._executor is None:
            replies = [send(g) for g in range(len(groups))]
        else:
            replies = list(self._executor.map(send, range(len(groups))))
        t2 = time.perf_counter()
        self.requests_sent += len(groups)
        width = max(max((len(r) for r in responses), default=0), 1)
        ids = torch.zeros(len(responses), width, self.k, dtype=torch.long)
        logprobs = torch.zeros(len(responses), width, self.k, dtype=torch.float32)
        sampled = torch.zeros(len(responses), width, dtype=torch.float32)
        for g, idx in enumerate(groups):
            for i, positions in zip(idx, replies[g], strict=True):
                b = scored[i]
                top, lps, own = parse_positions(
                    positions, prompts[b], responses[b], self.k, f"{labels[g]}, sequence {b}"
                )
                ids[b, : len(own)] = torch.tensor(top, dtype=torch.long)
                logprobs[b, : len(own)] = torch.tensor(lps, dtype=torch.float32)
                sampled[b, : len(own)] = torch.tensor(own, dtype=torch.float32)
        out = self.output_device
        self.last_timing = {
            "prompts_s": t1 - t0,
            "requests_s": t2 - t1,
            "parse_s": time.perf_counter() - t2,
            "requests": float(len(groups)),
        }
        return TeacherLogprobs(topk_ids=ids.to(out), topk_logprobs=logprobs.to(out), sampled=sampled.to(out))

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown()
        self.backend.close()


def parse_positions(
    positions: list[Position], prompt: list[int], response: list[int], k: int, label: str
) -> tuple[list[list[int]], list[list[float]], list[float]]:
    """(top-K ids [T][K], their log-probs [T][K], the actual token's log-prob [T]) of one sequence."""
    if len(positions) != len(prompt) + len(response):
        raise TeacherRequestError(
            f"{label}: {len(positions)} prompt log-probs for {len(prompt) + len(response)} tokens (a short reply)"
        )
    ids, lps, own = [], [], []
    for t, token in enumerate(response):
        entry = positions[len(prompt) + t]
        if not entry or token not in entry:
            raise TeacherRequestError(
                f"{label}: response position {t} lacks the log-prob of its token {token}"
            )
        best = sorted(entry.items(), key=lambda kv: (kv[1][1], -kv[1][0]))[:k]
        if len(best) < k:
            raise TeacherRequestError(
                f"{label}: response position {t} lists {len(best)} of the K={k} top tokens"
            )
        ids.append([t_id for t_id, _ in best])
        lps.append([lp for _, (lp, _) in best])
        own.append(entry[token][0])
    return ids, lps, own


# --------------------------------------------------------------------------------------------- build
def teacher_thinking(cfg) -> bool:
    """The teacher's chat-template thinking switch: teacher.enable_thinking, else the student's."""
    own = cfg.teacher.get("enable_thinking")
    return cfg.model.enable_thinking if own is None else own


def vllm_dtype(teacher_dtype: str, device: torch.device) -> str:
    if teacher_dtype != "auto":
        return teacher_dtype
    return "bfloat16" if device.type == "cuda" else "float32"


def build_vllm_teacher(
    cfg, task, student_tokenizer, student_vocab: int, teacher_path: str, device: torch.device, first_row
) -> VLLMTeacher:
    """The OPD stage's teacher for teacher.backend=vllm, checked before the first step: the server pool
    answers, serves one model with the teacher's chat template and tokenizer, and allows K log-probs."""
    from opd_cli import distributed
    from opd_cli.learner import load_tokenizer
    from opd_cli.teachers import teacher_prompt_builder

    t = cfg.teacher
    k = logprobs_k(cfg.loss)
    tokenizer = load_tokenizer(teacher_path)
    check_same_vocabulary(student_tokenizer, tokenizer)
    urls = servers(t.server)
    if urls:
        backend = HttpBackend(
            ServerPool(urls, timeout_s=t.timeout_s, retries=t.retries, retry_backoff_s=t.retry_backoff_s)
        )
        backend.describe()
    else:
        if distributed.world_size() > 1:
            raise OpdError(
                "teacher.backend=vllm in process with several learner ranks would start one teacher engine "
                "per rank; serve it once (`opd teacher serve`) and pass teacher.server=<its URL>"
            )
        options = {
            "max_model_len": t.max_model_len,
            "gpu_memory_utilization": t.gpu_memory_utilization,
            "tensor_parallel_size": t.tensor_parallel_size,
        }
        backend = LocalBackend(
            teacher_path,
            device=device.type,
            dtype=vllm_dtype(t.dtype, device),
            seed=cfg.seed,
            k=k,
            options=options,
        )
    teacher = VLLMTeacher(
        backend,
        tokenizer,
        teacher_prompt_builder(task, t),
        k=k,
        enable_thinking=teacher_thinking(cfg),
        output_device=device,
        max_request_tokens=t.max_request_tokens,
    )
    try:
        preflight(teacher, first_row, student_vocab)
    except BaseException:
        teacher.close()
        raise
    return teacher


def preflight(teacher: VLLMTeacher, row, student_vocab: int) -> None:
    """One request before the run: the served chat template gives the local prompt ids, K is allowed
    (else the fix: --max-logprobs), the top-K ids lie in the student's vocabulary."""
    prompt = teacher.prompt_ids(row)
    backend = teacher.backend
    if isinstance(backend, HttpBackend):
        served = backend.chat_ids(teacher.prompts.messages(row), teacher.template_kwargs())
        if served != prompt:
            raise OpdError(
                f"the teacher server ({backend.model} at {backend.where()}) renders the teacher prompt as "
                f"{len(served)} tokens {served[:12]}..., the local teacher tokenizer (teacher.path) as "
                f"{len(prompt)} tokens {prompt[:12]}...: serve the teacher.path checkpoint (its tokenizer and "
                f"chat template)"
            )
    try:
        (positions,) = backend.request([prompt + prompt[-1:]], teacher.k, "teacher check request", 0)
    except TeacherRequestError as exc:
        allowed = re.search(r"max allowed: (\d+)", str(exc))
        if allowed:
            raise OpdError(
                f"loss.k={teacher.k} asks the teacher server for {teacher.k} log-probs per position but it "
                f"allows {allowed.group(1)} (its max_logprobs); restart it with --max-logprobs {teacher.k} "
                f"(`opd teacher serve loss.k={teacher.k}` sets it)"
            ) from exc
        raise
    ids, _, _ = parse_positions(positions, prompt, prompt[-1:], teacher.k, "teacher check request")
    if max(ids[0]) >= student_vocab:
        raise OpdError(
            f"the teacher returns token id {max(ids[0])}, outside the student's vocabulary ({student_vocab}): "
            f"token-level distillation needs one vocabulary; serve a teacher from the student's model family"
        )
