"""Fingerprint the kernels a testbed build computes with: the sha256 of each op's output on fixed inputs,
in a worker spawned with the build's PINNED_KERNELS, so two machines' outputs can be compared op by op.

    python scripts/kernel_fingerprint.py                       # prints a JSON object
    python scripts/kernel_fingerprint.py --out experiments/kernels/<machine>.json
    python scripts/kernel_fingerprint.py --compare A.json B.json   # which ops differ
    python scripts/kernel_fingerprint.py --in-process          # this process's kernels, unpinned

Why: `opd testbed build --force` reproduces the shipped weights bit for bit on the CPU vendor that built
them, but a build on an AMD EPYC gave none of the six Intel-built files (experiments/testbed.md,
"Thirteenth session"), although MKL reports CNR:COMPATIBLE for every SGEMM. The first op whose hash
differs between an Intel and an AMD run is where the build stops being vendor-neutral. Inputs are seeded
integers divided by a constant (the same bits on any IEEE-754 CPU), so only the kernels differ.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path


def _sha(t) -> str:
    return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()[:16]


def _state_sha(model) -> str:
    return hashlib.sha256(
        b"".join(t.detach().numpy().tobytes() for t in model.state_dict().values())
    ).hexdigest()[:16]


def fingerprint() -> dict:
    """{op: sha256 prefix} for the ops a testbed SFT step runs, then for whole SFT steps of the student."""
    import os

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True, warn_only=True)
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=1.0):
        # integers divided by 7*64: full mantissas, so sums round and the summation order shows, yet one
        # correctly rounded division, so the inputs are the same bits on every IEEE-754 CPU
        return torch.randint(-256, 256, shape, generator=g).float() / (7 * 64) * scale

    out: dict = {}
    x, w, b = rnd(1280, 64), rnd(256, 64, scale=0.125), rnd(256, scale=0.125)
    out["linear (sgemm)"] = _sha(F.linear(x, w, b))
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    F.linear(xs, ws).pow(2).sum().backward()
    out["linear backward: grad input"] = _sha(xs.grad)
    out["linear backward: grad weight"] = _sha(ws.grad)
    out["bmm"] = _sha(torch.bmm(rnd(32, 40, 32), rnd(32, 32, 40)))
    q, k, v = (rnd(32, 2, 40, 32, scale=0.25).requires_grad_() for _ in range(3))
    att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    out["sdpa causal"] = _sha(att)
    att.sum().backward()
    out["sdpa backward: grad q"] = _sha(q.grad)
    logits = rnd(1280, 40)
    out["softmax"] = _sha(logits.softmax(-1))
    out["log_softmax"] = _sha(logits.log_softmax(-1))
    lg = logits.clone().requires_grad_()
    ce = F.cross_entropy(lg, torch.randint(0, 40, (1280,), generator=g))
    ce.backward()
    out["cross_entropy"] = _sha(ce)
    out["cross_entropy backward"] = _sha(lg.grad)
    h = rnd(1280, 64)
    out["rms norm (pow, mean, rsqrt)"] = _sha(h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))
    out["silu"] = _sha(F.silu(h))
    out["exp"] = _sha(h.exp())
    pos = torch.arange(40).float()[:, None] * (10000 ** (-torch.arange(16).float() / 16))[None]
    out["sin/cos (rope)"] = _sha(torch.cat([pos.sin(), pos.cos()]))
    out["sum"] = _sha(h.sum(0))
    p = rnd(256, 64).requires_grad_()
    opt = torch.optim.AdamW([p], lr=1e-3)
    for _ in range(3):
        p.grad = rnd(256, 64)
        opt.step()
    out["adamw (3 steps)"] = _sha(p)

    from opd_cli.testbed.build import cpu_description
    from opd_cli.testbed.builders import char_tokenizer, new_model
    from opd_cli.testbed.recipe import RECIPE

    tok = char_tokenizer()
    model = new_model(RECIPE, "student", len(tok), 0)
    out["student init"] = _state_sha(model)
    ids = torch.randint(3, len(tok), (32, 40), generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(1, 11):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in (1, 2, 10):
            out[f"student after {step} SFT steps"] = _state_sha(model)
    return {
        "cpu": cpu_description(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "MKL_CBWR": os.environ.get("MKL_CBWR"),
        "torch": torch.__version__,
        "ops": out,
    }


def compare(a: dict, b: dict) -> list[str]:
    lines = [f"A: {a['cpu']} ({a['capability']}, MKL_CBWR={a['MKL_CBWR']}, torch {a['torch']})"]
    lines.append(f"B: {b['cpu']} ({b['capability']}, MKL_CBWR={b['MKL_CBWR']}, torch {b['torch']})")
    for op in a["ops"]:
        same = a["ops"][op] == b["ops"].get(op)
        lines.append(f"  {'same   ' if same else 'DIFFERS'}  {op}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"))
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run under this process's kernels, not the build's pin (to see what the pin changes)",
    )
    args = parser.parse_args(argv)
    if args.compare:
        a, b = (json.loads(p.read_text()) for p in args.compare)
        print("\n".join(compare(a, b)))
        return 0 if a["ops"] == b["ops"] else 1
    from opd_cli.testbed.build import _run_jobs

    # two workers: the job runs in a spawned process under PINNED_KERNELS, as a build step does
    if args.in_process:
        result = fingerprint()
    else:
        result = _run_jobs({"fingerprint": (fingerprint, (), (), False)}, 2, False)[0]["fingerprint"]
    text = json.dumps(result, indent=1)
    if args.out:
        from opd_cli.io import atomic_write_text

        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
