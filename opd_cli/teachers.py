"""Teachers: build the teacher's own prompt for a row and score the student's response tokens under it.

Three kinds (`teacher=` group):
- external: a different checkpoint (larger or differently trained), full logits from a local forward;
- rlvr: a checkpoint produced by this tool's RLVR stage (`opd run stage=rlvr`); scored the same way;
- self_pi (OPSD): a frozen copy of the student's step-0 weights whose prompt carries privileged
  information (PI) the student never sees: `teacher.prompt_template` renders the teacher's user message
  from the row (e.g. "{problem}\\nH:{answer}"), or, with `system_prompt_from_pi`, the PI field becomes
  the system prompt (a shared rule).

Alignment: student and teacher prompts differ, the response tokens do not. Both sides are packed as
`prompt_ids + response_ids` from token ids (never by re-tokenizing text), and `batching.pack` gathers the
logits that predict each response token, so position t of the teacher's log-probs scores exactly the
student's token t. A teacher prompt that does not fit the teacher's context is an error, never truncated.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import torch

from opd_cli.batching import pack, response_hidden_and_logits
from opd_cli.errors import OpdError
from opd_cli.losses import TeacherHidden, TeacherLogprobs
from opd_cli.tasks.base import Row, Task


def chat_prompt_ids(
    tokenizer, messages: list[dict], enable_thinking: bool = False, add_generation_prompt: bool = True
) -> list[int]:
    """Token ids of `messages` under the tokenizer's chat template; `enable_thinking` reaches templates
    that read it (Qwen3: False appends an empty think block to the generation prompt)."""
    kwargs = (
        {"enable_thinking": enable_thinking} if "enable_thinking" in (tokenizer.chat_template or "") else {}
    )
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True, **kwargs
    )
    if hasattr(ids, "keys"):  # transformers may return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


@dataclass
class PromptBuilder:
    """How one side (student or teacher) turns a row into chat messages."""

    task: Task
    system_prompt: bool = True  # include the row's system prompt
    user_template: str | None = None  # None = the task's own user message
    system_from_field: str | None = None  # the system prompt comes from this row field (shared-rule PI)

    def messages(self, row: Row) -> list[dict]:
        if self.user_template is None and self.system_from_field is None:
            return self.task.messages(row, system_prompt=self.system_prompt)
        msgs = []
        if self.system_from_field is not None:
            system = self.task.system_text({**row, "system_prompt": row.get(self.system_from_field, "")})
            if system:
                msgs.append({"role": "system", "content": system})
        elif self.system_prompt and self.task.system_text(row):
            msgs.append({"role": "system", "content": self.task.system_text(row)})
        template = self.user_template or "{problem}"
        values = {**row, "problem": self.task.user_text(row)}
        msgs.append({"role": "user", "content": template.format(**values)})
        return msgs

    def check_fields(self, row: Row) -> None:
        needed = template_fields(self.user_template or "")
        if self.system_from_field:
            needed.append(self.system_from_field)
        missing = [f for f in needed if f not in row]
        if missing:
            raise OpdError(
                f"teacher prompt needs field(s) {missing} that the task's rows lack; available fields: "
                f"{sorted(row)}; fix teacher.prompt_template / teacher.pi_field"
            )


def student_prompt_builder(task: Task, teacher_cfg) -> PromptBuilder:
    """The student never sees the PI: with a shared-rule OPSD teacher it loses the system prompt."""
    hides_system = teacher_cfg.kind == "self_pi" and (
        teacher_cfg.system_prompt_from_pi or teacher_cfg.pi_field == "system_prompt"
    )
    return PromptBuilder(task, system_prompt=not hides_system)


@dataclass
class StudentPrompts:
    """The student's prompt ids of a row, as every stage builds them: `prompts(row)` with the student's
    own prompt (`default`), `prompts(row, system_prompt=True/False)` with / without the row's system
    prompt (evaluation's two sets); always the student's tokenizer and `model.enable_thinking`."""

    tokenizer: object
    task: Task
    enable_thinking: bool
    default: PromptBuilder

    def __call__(self, row: Row, system_prompt: bool | None = None) -> list[int]:
        builder = self.default if system_prompt is None else PromptBuilder(self.task, system_prompt)
        return chat_prompt_ids(self.tokenizer, builder.messages(row), self.enable_thinking)


def student_prompt_ids(tokenizer, task: Task, enable_thinking: bool, teacher_cfg=None) -> StudentPrompts:
    """The one builder of student prompt ids; with `teacher_cfg` the student's prompt hides what that
    teacher's privileged information replaces (`student_prompt_builder`)."""
    default = PromptBuilder(task) if teacher_cfg is None else student_prompt_builder(task, teacher_cfg)
    return StudentPrompts(tokenizer, task, enable_thinking, default)


def teacher_prompt_builder(task: Task, teacher_cfg) -> PromptBuilder:
    if teacher_cfg.kind != "self_pi":
        return PromptBuilder(task, system_prompt=True)
    if teacher_cfg.system_prompt_from_pi:
        return PromptBuilder(task, system_from_field=teacher_cfg.pi_field)
    return PromptBuilder(task, system_prompt=True, user_template=teacher_cfg.prompt_template)


def check_same_vocabulary(student_tok, teacher_tok, student_model=None, teacher_model=None) -> None:
    if student_tok.get_vocab() != teacher_tok.get_vocab():
        raise OpdError(
            f"teacher tokenizer ({len(teacher_tok)} tokens) differs from the student's "
            f"({len(student_tok)}): token-level distillation needs one vocabulary; pick a teacher "
            f"from the student's model family"
        )
    if student_model is not None and teacher_model is not None:
        vs, vt = student_model.config.vocab_size, teacher_model.config.vocab_size
        if vs != vt:
            raise OpdError(
                f"teacher logits have {vt} entries but the student's have {vs}: the vocabularies "
                f"must match; pick a teacher from the student's model family"
            )


class Teacher:
    """A frozen causal LM that scores response tokens under its own prompts."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        prompts: PromptBuilder,
        *,
        amp=None,
        enable_thinking: bool = False,
        output_device: torch.device | None = None,
    ):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.prompts = prompts
        self.amp = amp
        self.enable_thinking = enable_thinking
        self.max_len = getattr(model.config, "max_position_embeddings", None)
        self.device = next(model.parameters()).device  # where it runs (teacher.device)
        self.output_device = torch.device(output_device) if output_device is not None else self.device
        self._head: tuple | None = None  # the LM head on output_device (frozen: copied once)

    def prompt_ids(self, row: Row) -> list[int]:
        self.prompts.check_fields(row)
        return chat_prompt_ids(self.tokenizer, self.prompts.messages(row), self.enable_thinking)

    @torch.no_grad()
    def score(
        self, rows: list[Row], responses: list[list[int]], *, hidden: bool = False
    ) -> TeacherLogprobs | TeacherHidden:
        """Full-vocabulary log-probs [B, T, V] of the teacher at every response position, or with
        `hidden=True` only its final hidden states [B, T, Ht] and LM head (what the chunked loss needs:
        it computes the log-probs chunk by chunk, so [B, T, V] never exists)."""
        prompts = [self.prompt_ids(r) for r in rows]
        if self.max_len is not None:
            longest = max(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
            if longest > self.max_len:
                raise OpdError(
                    f"teacher prompt + response is {longest} tokens, over the teacher's context "
                    f"({self.max_len}); shorten teacher.prompt_template or rollout.max_new_tokens "
                    f"(the teacher prompt is never truncated)"
                )
        batch = pack(prompts, responses, self.tokenizer.pad_token_id).to(self.device)
        with self.amp() if self.amp else torch.autocast("cpu", enabled=False):
            states, logits = response_hidden_and_logits(self.model, batch, logits=not hidden)
        out = self.output_device
        if hidden:
            weight, bias = self.head_on_output_device()
            return TeacherHidden(states.to(out), weight, bias)
        del states
        return TeacherLogprobs(full=torch.log_softmax(logits.float(), dim=-1).to(out))

    def head_on_output_device(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The LM head's weight and bias where the loss runs (a teacher on its own device: a copy)."""
        if self._head is None:
            head = self.model.get_output_embeddings()
            bias = head.bias.to(self.output_device) if head.bias is not None else None
            self._head = (head.weight.to(self.output_device), bias)
        return self._head
