"""One lmms-eval ``generate_until`` request in the engine's terms, and what it cannot ask for.

A request carries ``(context, gen_kwargs, doc_to_visual, doc_id, task, split)``: the question text
the task built, its generation options (``until`` stop strings, ``max_new_tokens``, sampling and
beam options) and the function that gives the document's images. SD-RPN answers greedily about
one image per question, like ``sdrpn eval``; anything else is refused with a :class:`ValueError`
that says which task asked for it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from PIL import Image

__all__ = ["GenerationOptions", "single_image", "question_text", "DEFAULT_MAX_NEW_TOKENS"]

# ``sdrpn eval``'s answer length limit, for tasks that set none.
DEFAULT_MAX_NEW_TOKENS = 128
# LLaVA's image placeholder, which some tasks write into the question; the prompt template adds its own.
IMAGE_PLACEHOLDER = re.compile(r"<image>\s*")


@dataclass(frozen=True)
class GenerationOptions:
    """What a task's ``generation_kwargs`` ask of the decoder: greedy answers up to ``max_new_tokens``,
    cut at the first of the ``until`` strings."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    until: tuple[str, ...] = ()

    @classmethod
    def from_gen_kwargs(cls, gen_kwargs: dict, task: str) -> GenerationOptions:
        """Reads ``until`` and ``max_new_tokens``; refuses beam search and sampling. Other keys (``top_p``
        and ``temperature`` of a greedy task, model-specific ones) do not change a greedy answer."""
        beams = int(gen_kwargs.get("num_beams") or 1)
        if beams > 1:
            raise ValueError(f"task {task} asks for beam search (num_beams={beams}); sdrpn decodes greedily, "
                             f"one beam, as sdrpn eval does")
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        # As lmms-eval's own models read it: a positive temperature samples unless do_sample says no.
        if gen_kwargs.get("do_sample", temperature > 0):
            raise ValueError(f"task {task} asks for sampling (do_sample={gen_kwargs.get('do_sample')}, "
                             f"temperature={temperature}); sdrpn answers greedily, as sdrpn eval does")
        until = gen_kwargs.get("until") or ()
        if isinstance(until, str):
            until = (until,)
        if not all(isinstance(stop, str) for stop in until):
            raise ValueError(f"task {task}: generation_kwargs until must be a string or a list of strings, "
                             f"got {until!r}")
        return cls(max_new_tokens=int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS),
                   until=tuple(stop for stop in until if stop))

    def cut(self, answer: str) -> str:
        """The answer up to the first stop string, stripped again as ``sdrpn eval`` strips answers."""
        for stop in self.until:
            answer = answer.split(stop, 1)[0]
        return answer.strip()


def single_image(visuals, task: str, doc_id) -> Image.Image:
    """The one PIL image of a document (as RGB), or a :class:`ValueError` saying what the task gave."""
    visuals = list(visuals or [])
    if len(visuals) != 1:
        raise ValueError(f"task {task} gives {len(visuals)} images for document {doc_id}; sdrpn answers "
                         f"questions about exactly one image")
    image = visuals[0]
    if not isinstance(image, Image.Image):
        raise ValueError(f"task {task} gives a {type(image).__name__} ({str(image)[:80]!r}) as the image of "
                         f"document {doc_id}; sdrpn needs a PIL image (a doc_to_visual that opens the file)")
    return image.convert("RGB")


def question_text(context: str) -> str:
    """The task's question without LLaVA's ``<image>`` placeholder: the prompt template places the image."""
    return IMAGE_PLACEHOLDER.sub("", context).strip() if IMAGE_PLACEHOLDER.search(context) else context
