"""The training recipe of each data-set design: "classic" is the shipped model's recipe unchanged;
"one-detail" has the vision warm start mark where numbers are in the base view even where it cannot
read them. The commands take the design by name."""

from __future__ import annotations

import json

import torch

from sdrpn.cli import main
from sdrpn.data.synthetic import DESIGNS
from sdrpn.models import adapter_for
from sdrpn.testbed import batches, vision_warmup
from sdrpn.testbed.tiny_model import TinyLlavaSpec, build_model, build_processor
from sdrpn.testbed.train_model import DESIGN_RECIPES, TrainModelOptions

MICRO = TinyLlavaSpec(image_size=48, patch_size=8, vision_hidden=32, vision_layers=1, vision_heads=2,
                      vision_intermediate=64, text_hidden=32, text_layers=3, text_heads=2, text_intermediate=64)


def test_every_design_has_a_recipe_and_the_classic_one_is_the_shipped_recipe():
    assert set(DESIGN_RECIPES) == set(DESIGNS)
    assert DESIGN_RECIPES["classic"] == TrainModelOptions()
    # Recipes written before the option existed stay the same, so their checkpoints resume.
    assert "vision_marks_details" not in DESIGN_RECIPES["classic"].recipe()
    assert DESIGN_RECIPES["one-detail"].recipe()["vision_marks_details"] is True


def test_unreadable_glyphs_are_ignored_or_marked_as_details():
    identity = lambda x, y: (x, y)  # noqa: E731 - source pixels are view pixels here
    details = [("47", (16, 20, 48, 30))]  # glyph centres in cells (3, 3) and (3, 5)
    ignored = vision_warmup.token_targets(details, identity, 96, (12, 12), readable=False)
    marked = vision_warmup.token_targets(details, identity, 96, (12, 12), readable=False,
                                         unreadable=vision_warmup.DETAIL)
    assert ignored[3 * 12 + 3] == ignored[3 * 12 + 5] == vision_warmup.IGNORE
    assert marked[3 * 12 + 3] == marked[3 * 12 + 5] == vision_warmup.DETAIL == vision_warmup.NUM_CLASSES
    assert torch.equal(marked == 0, ignored == 0)


def test_a_warm_start_that_marks_details_trains_on_one_detail_data(tmp_path):
    torch.set_num_threads(1)
    assert main(["testbed", "generate", "--out", str(tmp_path), "--design", "one-detail", "--train", "6",
                 "--val", "2", "--test", "0", "--seed", "2", "--no-progress"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert all(len(row["details"]) == 1 for row in rows)
    processor = build_processor(MICRO)
    model = build_model(MICRO, seed=2).train()
    questions = batches.QuestionSet(tmp_path, "train", processor)
    options = TrainModelOptions(vision_steps=2, vision_batch_size=4, vision_marks_details=True)
    history = vision_warmup.warm_start_vision(model, adapter_for(model, processor), processor, questions,
                                              questions, options, progress=False, log=lambda line: None)
    assert [entry["step"] for entry in history] == [2] and history[0]["loss"] > 0


def test_the_model_card_names_the_design_and_its_recipe():
    from dataclasses import asdict

    from sdrpn.data.synthetic import manifest_config
    from sdrpn.testbed.model_card import model_card

    recipe = json.loads(json.dumps(DESIGN_RECIPES["one-detail"].recipe()))
    config = json.loads(json.dumps(manifest_config(DESIGNS["one-detail"])))
    summary = {"recipe": recipe, "spec": asdict(MICRO), "val_samples": 4, "train_seconds": 60,
               "data": {"seed": 3, "splits": {"train": 8, "val": 4, "test": 0}, "config": config},
               "environment": {"threads": 1, "machine": "x86_64", "torch": "2.13", "transformers": "5.17"},
               "history": []}
    card = model_card(summary)
    assert "`sdrpn testbed generate --seed 3 --design one-detail`" in card
    assert "train-model --data DIR --out DIR --design one-detail --seed 0`" in card and "differs" not in card
    assert "the one a question names holding" in card
