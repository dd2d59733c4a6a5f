"""Shared pytest fixtures and the `opd` subprocess runner of the end-to-end tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def threads_for_tests() -> int:
    """Torch threads for the tests' runs: 1 (the 2 shared cores of a dev box are ~10x slower with 2), or
    $OPD_TEST_THREADS (`make test-numerics` runs the numerical-equality tests with 1 and 2)."""
    return int(os.environ.get("OPD_TEST_THREADS", "1"))


def run_opd(*args: str, cwd: Path | None = None, timeout: int = 600, env: dict | None = None):
    """`opd <args>` as a user runs it, in a subprocess: offline wandb, `threads_for_tests()` torch threads,
    in-process vLLM engine, no debug tracebacks. Returns the CompletedProcess (text stdout/stderr)."""
    full_env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "OMP_NUM_THREADS": str(threads_for_tests()),
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        **(env or {}),
    }
    full_env.pop("HYDRA_FULL_ERROR", None)
    full_env.pop("OPD_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "opd_cli.cli", *args],
        cwd=cwd or REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# Tiny budgets for `opd run` on tiny random models: these runs check wiring, files and exactness (resume,
# alignment, weight sync), not learning; learning is the testbed's and the matrix's business.
TINY = [
    "trainer.prompts_per_step=4",
    "eval.size=4",
    "eval.max_new_tokens=24",
    "rollout.max_new_tokens=24",
    "logger=none",
    "task.train_size=64",
]


def opd(*args: str, cwd: Path | None = None, timeout: int = 600):
    return run_opd(*args, cwd=cwd, timeout=timeout)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def base_args(models, *extra: str) -> list[str]:
    return [f"model.path={models['student']}", f"teacher.path={models['teacher']}", *TINY, *extra]


def build_tiny_model_dir(directory: str | Path, *, seed: int = 0, **config_overrides) -> Path:
    """Save a tiny random testbed model (Qwen2, char tokenizer) + its tokenizer into ``directory``."""
    import torch
    from transformers import Qwen2ForCausalLM

    from opd_cli.testbed.models import tiny_qwen2_config
    from opd_cli.testbed.tokenizer import save_char_tokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = save_char_tokenizer(directory)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(tiny_qwen2_config(len(tok), **config_overrides))
    model.save_pretrained(str(directory), safe_serialization=True)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random testbed model + tokenizer (vocab 102, hidden 64, 2 layers; loads in HF and vLLM).

    Session-scoped and shared: tests must not write into it (load the model and change the copy).
    """
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny_model"), seed=0)


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    """A tiny random student and a larger tiny random teacher with the same tokenizer (shared, read-only)."""
    root = tmp_path_factory.mktemp("models")
    return {
        "student": build_tiny_model_dir(root / "student", seed=0),
        "teacher": build_tiny_model_dir(root / "teacher", seed=1, hidden_size=96, num_layers=3),
    }


# ------------------------------------------------------------------------- numerical-equality helpers
# fp32 gradients of one loss computed by two code paths (micro-batches vs the whole batch, chunked vs
# full logits, 1 vs 2 ranks) differ only by the order of their sums. Each entry is a sum over the batch's
# response tokens (a few hundred here) of products accumulated over the hidden size (64-96): reordering
# such a sum moves it by a few units of fp32 round-off (u = 6e-8) times the size of its terms, so the
# whole gradient vector agrees to ~1e-7 relative (measured 1.6e-7 to 3e-7 under ATEN_CPU_CAPABILITY
# default / avx2 / avx512 and 1 or 2 threads). GRAD_RTOL = 1e-5 leaves ~30x room for other kernels
# (other BLAS blocking, AVX-512 on other vendors) yet fails on any real difference (a wrong micro-batch
# weight moves the gradient by >= 1e-2). Entries that are ~0 in exact arithmetic (an attention key
# bias: softmax ignores a shift) are pure round-off, so no entry is compared relative to itself: each
# tensor's error is measured against the gradient's global scale.
GRAD_RTOL = 1e-5


def assert_gradients_match(reference: dict, other: dict, rtol: float = GRAD_RTOL) -> float:
    """`other` equals `reference` ({name: grad tensor}) up to reordered fp32 sums: the relative L2 error
    of the whole gradient and, per tensor, max |difference| / max |reference entry over all tensors| are
    below rtol. Returns the worst of the two. Compare gradients before the optimizer step: Adam divides
    each entry by its own scale, turning round-off in a ~0 entry into a move of up to lr."""
    import torch

    assert reference.keys() == other.keys(), sorted(set(reference) ^ set(other))
    names = sorted(reference)
    a = torch.cat([reference[n].detach().double().flatten() for n in names])
    b = torch.cat([other[n].detach().double().flatten() for n in names])
    assert float(a.norm()) > 0, "an all-zero reference gradient: a vacuous comparison"
    scale = float(a.abs().max())
    global_rel = float((a - b).norm() / a.norm())
    per_tensor = {n: float((reference[n].double() - other[n].double()).abs().max()) / scale for n in names}
    worst_name = max(per_tensor, key=per_tensor.get)
    assert global_rel < rtol and per_tensor[worst_name] < rtol, (
        global_rel,
        worst_name,
        per_tensor[worst_name],
    )
    return max(global_rel, per_tensor[worst_name])


class GradientRecorder:
    """Records every optimizer step's accumulated gradients ({name: clone}) before the update, by
    wrapping `Learner.step` (every stage's optimizer step goes through it)."""

    def __init__(self, monkeypatch):
        from opd_cli.learner import Learner

        self.steps: list[dict] = []
        real = Learner.step

        def step(learner, loss=None):
            if loss is not None:
                learner.backward(loss)
            self.steps.append(
                {n: p.grad.clone() for n, p in learner.model.named_parameters() if p.grad is not None}
            )
            return real(learner)

        monkeypatch.setattr(Learner, "step", step)

    def take(self) -> list[dict]:
        steps, self.steps = self.steps, []
        return steps


@pytest.fixture
def torch_threads_for_tests():
    """`threads_for_tests()` torch threads in this process for the test (training results depend on the
    thread count; the testbed builds single-threaded); the previous count is restored after."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(threads_for_tests())
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def char_tokenizer():
    """The testbed's character tokenizer (built in memory)."""
    from opd_cli.testbed.tokenizer import build_char_tokenizer

    return build_char_tokenizer()


# A tiny OPD run on HF rollouts: the shape the 1-rank vs 2-rank / 2-node curve tests share.
DP_TINY = [
    "trainer.prompts_per_step=4",
    "eval.size=4",
    "eval.every=0",
    "eval.max_new_tokens=8",
    "rollout.max_new_tokens=16",
    "rollout=hf",
    "logger=none",
    "task.train_size=64",
]
# Runs of several steps go through AdamW, whose update g / (sqrt(v) + eps) moves a weight whose gradient
# is ~0 up to round-off by up to lr with the default eps=1e-8. With eps=1e-2 a weight moves by at most
# lr * |g| / eps, so two paths whose gradients agree to 1e-7 * |g|max (round-off; 1e-5 for two teacher
# implementations) keep weights within ~1e-8 (1e-7) of each other, step-2 logits within ~1e-7 and
# sampled tokens identical (a flip needs a uniform draw within 1e-7 of a CDF boundary); the later steps'
# metrics then agree like step 1's.
STABLE_ADAM = "trainer.adam_eps=1e-2"
# Loss curves of two code paths (metrics.jsonl): step means of fp32 sums in another order, ~1e-6 apart
CURVE_RTOL = 1e-4


def train_rows(run_dir: Path) -> list[dict]:
    """The training steps' rows of a run's metrics.jsonl (evaluation rows left out)."""
    from opd_cli.rundir import read_metrics

    return [r for r in read_metrics(run_dir) if "loss" in r]
