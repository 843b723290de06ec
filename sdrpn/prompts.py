"""Conversation templates: how a question about one image becomes the model's prompt.

An RPN learns to read the hidden state of the last prompt token at fixed layers, so it is tied to
the template it was labelled and trained with: the template is recorded in the label shards and in
the RPN's ``config.json``, and every command uses the recorded one by default.

Templates:

* ``vicuna_v1``: the conversation format the original LLaVA-1.5 was trained and evaluated with (the
  SD-RPN authors' ``conv_vicuna_v1`` in ``LLaVA/llava/conversation.py``, ``SeparatorStyle.TWO``,
  used by their ``lmms-eval/lmms_eval/models/llava.py`` with ``conv_template="vicuna_v1"``): the
  system sentence, a space, ``USER: <image>\\n{question}``, a space, ``ASSISTANT:``.
* ``plain``: ``USER: <image>\\n{question} ASSISTANT:``, the llava-hf model cards' format (no system
  sentence).
* ``processor``: the processor's own chat template (``apply_chat_template``); ``plain`` when it has
  none. RPNs saved before templates were recorded were trained this way.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["PromptTemplate", "TEMPLATES", "template_named", "template_for", "PROCESSOR_TEMPLATE"]

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
PROCESSOR_TEMPLATE = "processor"


@dataclass(frozen=True)
class PromptTemplate:
    """A single-turn, single-image conversation format.

    Attributes:
        name: the preset's name (recorded in configs).
        system: system sentence before the first turn ("" for none).
        user, assistant: role names, each followed by ``": "`` / ``":"``.
        separator: between the system sentence, the user turn and the assistant role.
    """

    name: str
    system: str = ""
    user: str = "USER"
    assistant: str = "ASSISTANT"
    separator: str = " "

    def render(self, question: str, processor=None) -> str:
        """The prompt for ``question`` about one image (the image placeholder from ``processor``)."""
        if self.name == PROCESSOR_TEMPLATE and getattr(processor, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            return processor.apply_chat_template(messages, add_generation_prompt=True)
        image_token = getattr(processor, "image_token", None) or "<image>"
        head = self.system + self.separator if self.system else ""
        return f"{head}{self.user}: {image_token}\n{question}{self.separator}{self.assistant}:"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PromptTemplate:
        """Reads a template recorded by :meth:`to_dict`; unknown keys are an error."""
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown or "name" not in data:
            raise ValueError(f"not a prompt template record: {data!r} (expected keys {sorted(cls.__dataclass_fields__)})")
        return cls(**data)


TEMPLATES = {
    "vicuna_v1": PromptTemplate("vicuna_v1", system=VICUNA_SYSTEM),
    "plain": PromptTemplate("plain"),
    PROCESSOR_TEMPLATE: PromptTemplate(PROCESSOR_TEMPLATE),
}


def template_named(name_or_template) -> PromptTemplate:
    """A preset by name, a recorded dict, or a template (returned unchanged)."""
    if isinstance(name_or_template, PromptTemplate):
        return name_or_template
    if isinstance(name_or_template, dict):
        return PromptTemplate.from_dict(name_or_template)
    if name_or_template not in TEMPLATES:
        raise ValueError(f"unknown prompt template {name_or_template!r}; the presets are {sorted(TEMPLATES)}")
    return TEMPLATES[name_or_template]


def template_for(prompt, adapter) -> PromptTemplate:
    """``prompt`` (a preset name, a recorded dict or a template), or the model family's default
    (``adapter.default_prompt_template``) when it is None."""
    return template_named(prompt if prompt is not None else adapter.default_prompt_template)
