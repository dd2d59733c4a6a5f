"""`model.enable_thinking` reaches every stage's prompts (Qwen3-style templates).

Qwen3's chat template appends an empty think block to the generation prompt when `enable_thinking` is
false. The student must see the same prompt in SFT, RLVR, OPD and evaluation, or it is trained on one
template and run on another. The tiny testbed tokenizer gets a template of the same shape here.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from opd_cli.testbed.tokenizer import CHAT_TEMPLATE

THINK_OFF = "<think></think>"
QWEN3_STYLE = CHAT_TEMPLATE.replace(
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}",
    "{%- if add_generation_prompt -%}<|assistant|>"
    "{%- if enable_thinking is defined and enable_thinking is false -%}" + THINK_OFF + "{%- endif -%}"
    "{%- endif -%}",
)
MESSAGES = [{"role": "user", "content": "3+4="}]


@pytest.fixture(scope="module")
def thinking_model(models, tmp_path_factory) -> Path:
    """The tiny student with a chat template that reads `enable_thinking`."""
    from transformers import AutoTokenizer

    assert QWEN3_STYLE != CHAT_TEMPLATE
    path = tmp_path_factory.mktemp("thinking") / "student"
    shutil.copytree(models["student"], path)
    tok = AutoTokenizer.from_pretrained(str(path))
    tok.chat_template = QWEN3_STYLE
    tok.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def tok(thinking_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(thinking_model))


def test_chat_prompt_ids_passes_enable_thinking_to_templates_that_read_it(tok):
    from opd_cli.teachers import chat_prompt_ids

    off = tok.decode(chat_prompt_ids(tok, MESSAGES, enable_thinking=False))
    on = tok.decode(chat_prompt_ids(tok, MESSAGES, enable_thinking=True))
    assert off.endswith(THINK_OFF) and not on.endswith(THINK_OFF)
    assert off == on + THINK_OFF


@pytest.mark.parametrize("thinking", [False, True])
def test_sft_prompts_are_the_students_opd_prompts(tok, thinking):
    from opd_cli.stages.sft import prompt_ids, tokenize_examples
    from opd_cli.teachers import chat_prompt_ids

    ((prompt, response),) = tokenize_examples(tok, [(MESSAGES, "7")], enable_thinking=thinking)
    assert prompt == chat_prompt_ids(tok, MESSAGES, thinking)
    assert response[-1] == tok.eos_token_id
    # generic pretraining text: the generation prompt alone, think block included when it is off
    alone = tok.decode(prompt_ids(tok, [], enable_thinking=thinking))
    assert alone == ("<|assistant|>" + THINK_OFF if not thinking else "<|assistant|>")


def _compose(model: Path, *extra: str):
    """A job config as `opd run` hands it to the stages (Hydra's own node removed, as in a job)."""
    from omegaconf import open_dict

    from opd_cli.launch import compose

    cfg = compose(
        [
            f"model.path={model}",
            f"teacher.path={model}",
            "rollout=hf",
            "logger=none",
            "task.train_size=16",
            "eval.size=2",
            "eval.max_new_tokens=8",
            "rollout.max_new_tokens=8",
            *extra,
        ]
    )
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


@pytest.mark.parametrize("thinking", [False, True])
def test_sft_and_rlvr_stages_build_prompts_with_the_students_setting(
    thinking_model, tmp_path, monkeypatch, thinking
):
    """The stages' own wiring: every prompt they tokenize uses `model.enable_thinking`."""
    import opd_cli.teachers as teachers
    from opd_cli.errors import OpdError
    from opd_cli.stages import rlvr, sft

    seen: list[bool] = []
    real = teachers.chat_prompt_ids

    def recording(tokenizer, messages, enable_thinking=False, add_generation_prompt=True):
        seen.append(enable_thinking)
        return real(tokenizer, messages, enable_thinking, add_generation_prompt)

    # every module that imported the function (the stages import it at module level) calls the recorder
    for module in [m for name, m in sys.modules.items() if name.startswith("opd_cli")]:
        if getattr(module, "chat_prompt_ids", None) is real:
            monkeypatch.setattr(module, "chat_prompt_ids", recording)
    monkeypatch.chdir(tmp_path)
    flag = f"model.enable_thinking={str(thinking).lower()}"

    sft_args = ["stage=sft", "stabilization=sft", "stabilization.num_traces=4", "stabilization.batch_size=2"]
    # teacher traces: the prompts the trace writer answers (a random tiny teacher may get none right)
    cfg = _compose(thinking_model, flag, *sft_args, "stabilization.source=teacher", "stabilization.steps=1")
    try:
        sft.run(cfg, tmp_path / "sft_traces")
    except OpdError as exc:
        assert "no teacher trace passed the verifier" in str(exc)
    assert seen and set(seen) == {thinking}, "SFT trace prompts"
    seen.clear()
    # training and held-out NLL on reference solutions
    cfg = _compose(thinking_model, flag, *sft_args, "stabilization.source=reference", "stabilization.steps=1")
    sft.run(cfg, tmp_path / "sft")
    assert seen and set(seen) == {thinking}, "SFT training prompts"

    seen.clear()
    cfg = _compose(
        thinking_model, flag, "stage=rlvr", "trainer.steps=1", "trainer.prompts_per_step=2", "rollout.n=2"
    )
    rlvr.run(cfg, tmp_path / "rlvr")
    assert seen and set(seen) == {thinking}, "RLVR (policy prompts and evaluation)"
