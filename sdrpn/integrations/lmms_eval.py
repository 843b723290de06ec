"""``--model sdrpn`` for lmms-eval: a method of the SD-RPN engine on a local checkpoint, answering a
task's questions the way ``sdrpn eval`` answers its own.

    python -m lmms_eval --model sdrpn \\
        --model_args pretrained=ckpt/llava-1.5-7b-hf,rpn=rpn,threshold=0.15,roi_log=out/rois.jsonl \\
        --tasks textvqa_val --batch_size 8 --output_path out --log_samples

The model arguments are listed in :data:`sdrpn.integrations.lmms_model_args.MODEL_ARGS`. Each answer
is the engine's greedy answer to the task's question in the RPN's prompt template, cut at the task's
stop strings. lmms-eval's per-sample log has no place for visual tokens or RoI boxes, so
``roi_log=FILE`` appends one JSON line per answer with both (task, split, doc_id, method,
prediction, visual_tokens, boxes), in the order of lmms-eval's requests.
"""

from __future__ import annotations

import json
import os

from lmms_eval.api.model import lmms
from lmms_eval.utils import Collator

from .answerers import load_answerer
from .lmms_model_args import parse_model_args
from .lmms_requests import GenerationOptions, question_text, single_image

__all__ = ["SDRPNLmms"]


def _longest_first(args: tuple) -> tuple:
    # Long questions first: a batch's questions have similar lengths, so less padding.
    return -len(args[0]), args[0]


class SDRPNLmms(lmms):
    """lmms-eval's simple model interface over :func:`sdrpn.integrations.answerers.load_answerer`."""

    is_simple = True

    def __init__(self, **model_args) -> None:
        super().__init__()
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("sdrpn runs in one process; launch lmms-eval without accelerate or torchrun "
                             "processes (use sdrpn eval under torchrun to shard questions over GPUs)")
        args = parse_model_args(**model_args)
        self.batch_size = args.batch_size
        self.roi_log = args.roi_log
        self.answerer = load_answerer(args.answer)

    def generate_until(self, requests) -> list[str]:
        """Answers grouped by generation options and batched by :class:`lmms_eval.utils.Collator`,
        returned (and logged) in the order of ``requests``."""
        arguments = [request.args for request in requests]
        collator = Collator(arguments, _longest_first, grouping=True)
        predictions = []
        for chunk in collator.get_batched(n=self.batch_size):
            predictions.extend(self._answer(chunk))
        predictions = collator.get_original(predictions)
        if self.roi_log is not None:
            self._log(arguments, predictions)
        return [prediction.text for prediction in predictions]

    def _answer(self, chunk: list[tuple]) -> list:
        options = GenerationOptions.from_gen_kwargs(chunk[0][1], chunk[0][4])  # a chunk shares its options
        images = [single_image(doc_to_visual(self.task_dict[task][split][doc_id]), task, doc_id)
                  for _, _, doc_to_visual, doc_id, task, split in chunk]
        questions = [question_text(context) for context, *_ in chunk]
        predictions = self.answerer.answer(images, questions, options.max_new_tokens)
        for prediction in predictions:
            prediction.text = options.cut(prediction.text)
        return predictions

    def _log(self, arguments: list[tuple], predictions: list) -> None:
        self.roi_log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.roi_log, "a", encoding="utf-8") as out:
            for (_, _, _, doc_id, task, split), prediction in zip(arguments, predictions):
                out.write(json.dumps({"task": task, "split": split, "doc_id": doc_id, "method": self.answerer.method,
                                      "prediction": prediction.text, "visual_tokens": prediction.visual_tokens,
                                      "boxes": prediction.boxes}) + "\n")

    def loglikelihood(self, requests):
        tasks = ", ".join(sorted({str(request.task_name) for request in requests}))
        raise NotImplementedError(f"sdrpn answers by generation only; task {tasks} scores log-likelihoods "
                                  f"(multiple choice by likelihood): pick a generate_until task")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("sdrpn answers one question per image in one round; multi-round tasks "
                                  "are not supported")
