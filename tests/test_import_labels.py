"""``sdrpn import-labels``: the authors' pseudo-label pickle becomes label shards whose labels are
those their training derives (YuHengsss/SD-RPN commit 00876ac), without running code from the pickle."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from sdrpn.authors.safe_pickle import RefusedPickle, load_data_pickle
from sdrpn.cli import main
from sdrpn.distill.shards import TEMPORARY_MARK, read_index, read_shard, shard_paths

from helpers.authors_release import authors_record, write_authors_pickle


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def authors_labels(sink_attn, grounding_attn_o2i, side=24, sink_thresh=1e-3, binary_coff=0.2, max_ratio_limit=0.5,
                   bg_coff=0.1):
    """Transcription of their label rule: ``create_pseudo_labels`` (LLaVA/llava/mm_utils.py:350-457)
    with ``get_foreground_bbox`` (:252-277), as ``ROITrainingDataset.__getitem__`` calls it
    (LLaVA/llava/train/train.py:827-842, thresholds :785-786). Their grid side 24 is a parameter."""
    cells = side * side
    sink_attn = sink_attn.flatten()
    grounding_attn_o2i = grounding_attn_o2i.flatten()
    grounding_attn = grounding_attn_o2i * (sink_attn < sink_thresh).astype(float)
    binary_mask = (grounding_attn > grounding_attn.max() * binary_coff).astype(float)
    grounding_attn *= binary_mask
    fg_mask = grounding_attn > 0
    rows, cols = np.where(grounding_attn.reshape(side, side) > 0)
    if len(rows) == 0:
        min_row, min_col, max_row, max_col = 0, 0, side - 1, side - 1
    else:
        min_row, min_col, max_row, max_col = rows.min(), cols.min(), rows.max(), cols.max()
    row_indices, col_indices = np.divmod(np.arange(cells), side)
    in_box = ((row_indices >= min_row) & (row_indices <= max_row) & (col_indices >= min_col) & (col_indices <= max_col))
    grounding_attn_o2i = grounding_attn_o2i * (sink_attn < sink_thresh).astype(float)
    bg_mask = np.zeros(cells, dtype=bool)
    candidates = np.where(~in_box)[0]
    if len(candidates):
        bg_mask[candidates[grounding_attn_o2i[candidates] < grounding_attn.max() * bg_coff]] = True
    labels = np.full(cells, -100, dtype=int)
    if (max_col - min_col + 1) * (max_row - min_row + 1) < max_ratio_limit * cells:
        labels[bg_mask] = 0
        labels[fg_mask] = 1
    return labels


def adversarial_records(start: int) -> list[dict]:
    """Maps at the edges of their rule: sinks at the float16 rounding of the threshold, a peak
    that is a sink, a box of half the grid, no foreground at all, 13B-style float64 maps whose
    grounding still holds the sinks, 2-D maps, an integer question id."""
    rng = np.random.default_rng(7)
    base = [authors_record(start + i, rng) for i in range(7)]
    threshold16 = np.float16(1e-3)
    below16 = np.nextafter(threshold16, np.float16(0))
    base[0]["sink_attn"][:4] = [threshold16, below16, threshold16, below16]
    base[0]["grounding_attn_o2i"][:4] = np.float16(0.9)
    base[1]["sink_attn"][100] = np.float16(0.5)
    base[1]["grounding_attn_o2i"][100] = np.float16(1.0)
    wide = np.zeros(576, np.float16)
    wide[[0, 575]] = np.float16(0.5)  # a box over the whole grid: ignored
    base[2]["grounding_attn_o2i"] = wide
    base[3]["grounding_attn_o2i"] = np.zeros(576, np.float16)
    sink64, grounding64 = rng.random(576) * 9e-4, rng.random(576) * 1e-3
    grounding64[200:203] = [0.3, 0.2, 0.25]
    sink64[300], grounding64[300] = 0.01, 0.9  # a sink the map still holds, as their 13B script leaves it
    base[4]["sink_attn"], base[4]["grounding_attn_o2i"] = sink64, grounding64
    base[5]["sink_attn"] = base[5]["sink_attn"].reshape(24, 24)
    base[5]["grounding_attn_o2i"] = base[5]["grounding_attn_o2i"].reshape(24, 24)
    base[6]["question_id"] = start + 6
    ties = np.zeros(576, np.float16)
    ties[[30, 31, 32]] = [np.float16(0.5), np.float16(0.1), np.float16(0.05)]  # at 0.2 and 0.1 of the peak
    base[6]["grounding_attn_o2i"] = ties
    return base


@pytest.fixture
def release(tmp_path):
    rng = np.random.default_rng(0)
    records = [authors_record(i, rng) for i in range(40)] + adversarial_records(40)
    return records, write_authors_pickle(tmp_path / "pseudo.pkl", records)


def read_output(directory):
    index = read_index(directory)
    shards = {path.name: read_shard(path)[0] for path in shard_paths(directory)}
    return index, {row["record"]: {name: tensor[row["row"]] for name, tensor in shards[row["shard"]].items()}
                   for row in index}


def test_imported_labels_are_their_labels(tmp_path, capsys, release):
    records, path = release
    status, out, err = run_cli(capsys, "import-labels", "--pickle", path, "--out", tmp_path / "labels",
                               "--shard-size", "16", "--no-progress")
    assert status == 0, err
    index, tensors = read_output(tmp_path / "labels")
    assert [row["record"] for row in index] == list(range(len(records)))
    assert len(shard_paths(tmp_path / "labels")) == 3
    for row, record in zip(index, records):
        assert set(row) == {"record", "question_id", "image", "question", "answer", "valid", "shard", "row"}
        assert (row["question_id"], row["image"], row["question"], row["answer"]) == (
            str(record["question_id"]), record["image"], record["prompt"], record["text"])
        sample = tensors[row["record"]]
        expected = authors_labels(np.asarray(record["sink_attn"]), np.asarray(record["grounding_attn_o2i"]))
        assert sample["labels"].flatten().tolist() == expected.tolist(), row["record"]
        assert sample["labels"].dtype == torch.int8 and sample["labels"].shape == (24, 24)
        assert sample["sink"].flatten().tolist() == (np.asarray(record["sink_attn"]).flatten() >= 1e-3).tolist()
        stored = np.asarray(record["grounding_attn_o2i"], np.float16).flatten()
        assert np.array_equal(sample["grounding"].flatten().numpy(), stored)
        assert row["valid"] == bool((expected != -100).any())
    # the edge cases did exercise the rule
    assert tensors[40]["sink"].flatten()[:4].tolist() == [True, False, True, False]
    assert not index[42]["valid"] and not index[43]["valid"]
    assert sum(row["valid"] for row in index) == len(records) - 2
    assert f"imported {len(records)} samples in this run ({len(records) - 2} with valid labels)" in out

    settings = json.loads((tmp_path / "labels" / "run.json").read_text())
    assert settings["options"] == {"tau_fg": 0.2, "tau_bg": 0.1, "max_box_frac": 0.5, "min_peak": 0.0,
                                   "blur_box": False, "sink_threshold": 1e-3, "source": "sd-rpn-authors-pickle"}
    assert settings["prompt"]["name"] == "vicuna_v1" and settings["geometry"] == "pad"
    assert settings["source"]["pickle"] == str(path.resolve()) and settings["source"]["records"] == len(records)
    assert "image_root" not in settings


def test_bad_records_are_reported_counted_and_skipped(tmp_path, capsys):
    rng = np.random.default_rng(1)
    records = [authors_record(i, rng) for i in range(12)]
    records[1] = ["not", "a", "dict"]
    del records[2]["grounding_attn_o2i"], records[2]["prompt"]
    records[3]["sink_attn"] = np.zeros((32, 576), np.float16)  # per head, not their mean
    records[4]["grounding_attn_o2i"][5] = np.nan
    records[5]["sink_attn"] = -records[5]["sink_attn"] - 1
    records[6]["grounding_attn_o2i"] = "a/path.npy"
    records[7]["image"] = ""
    records[8]["sink_attn"] = list(records[8]["sink_attn"].astype(float))  # plain numbers are fine
    path = write_authors_pickle(tmp_path / "pseudo.pkl", records)
    status, out, err = run_cli(capsys, "import-labels", "--pickle", path, "--out", tmp_path / "labels", "--no-progress")
    assert status == 0, err
    assert "skipped 7 records: " in out
    for fragment in ("1 not a record", "1 missing keys", "1 wrong shape", "1 NaN or infinite values",
                     "1 values outside [0, 1]", "1 not numbers", "1 bad text"):
        assert fragment in out, out
    assert "record 2 (question_id 2): skipped: missing keys: prompt, grounding_attn_o2i" in err
    assert "record 3 (question_id 3): skipped: wrong shape: sink_attn has shape (32, 576), expected (576,)" in err
    issues = [json.loads(line) for line in (tmp_path / "labels" / "issues.jsonl").read_text().splitlines()]
    assert [issue["record"] for issue in issues] == [1, 2, 3, 4, 5, 6, 7]
    assert issues[0] == {"record": 1, "question_id": None, "reason": "not a record: expected a dict, got list"}
    assert [row["record"] for row in read_index(tmp_path / "labels")] == [0, 8, 9, 10, 11]


def test_missing_images_are_skipped_and_the_root_is_recorded(tmp_path, capsys, release):
    records, path = release
    root = tmp_path / "data"
    for record in records[:-3]:
        (root / record["image"]).parent.mkdir(parents=True, exist_ok=True)
        (root / record["image"]).write_bytes(b"")
    status, out, err = run_cli(capsys, "import-labels", "--pickle", path, "--out", tmp_path / "labels",
                               "--image-root", root, "--no-progress")
    assert status == 0, err
    assert "skipped 3 records: 3 image not found" in out
    assert json.loads((tmp_path / "labels" / "run.json").read_text())["image_root"] == str(root.resolve())


class Exploit:
    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("payload", ["os.system", "eval", "torch tensor"])
def test_pickles_that_name_code_are_refused_without_running_it(tmp_path, capsys, payload):
    marker = tmp_path / "ran"
    rng = np.random.default_rng(2)
    record = authors_record(0, rng)
    if payload == "os.system":
        Exploit.marker = marker
        record["text"], expected = Exploit(), "refused to load posix.system"
    elif payload == "eval":
        class Evaluated:
            def __reduce__(self):
                return eval, (f"open({str(marker)!r}, 'w')",)
        record["text"], expected = Evaluated(), "refused to load builtins.eval"
    else:
        record["sink_attn"], expected = torch.zeros(576), "refused to load torch._utils._rebuild_tensor_v2"
    path = write_authors_pickle(tmp_path / "evil.pkl", [record])
    status, _, err = run_cli(capsys, "import-labels", "--pickle", path, "--out", tmp_path / "labels")
    assert status == 2 and len(err.strip().splitlines()) == 1 and expected in err, err
    assert not marker.exists()
    assert not (tmp_path / "labels").exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_numpy_pickles_of_any_protocol_and_numpy_1_names_load(tmp_path, protocol):
    value = [{"x": np.arange(6, dtype=np.float16).reshape(2, 3), "n": np.float64(0.25), "i": np.int64(3), "s": "t"}]
    data = pickle.dumps(value, protocol=protocol)
    if protocol == 2:  # what numpy 1.x writes: numpy.core instead of numpy._core
        data = data.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
        assert b"numpy.core.multiarray" in data
    (tmp_path / "p.pkl").write_bytes(data)
    loaded = load_data_pickle(tmp_path / "p.pkl")
    assert np.array_equal(loaded[0]["x"], value[0]["x"]) and loaded[0]["x"].dtype == np.float16
    assert loaded[0]["n"] == 0.25 and loaded[0]["i"] == 3 and loaded[0]["s"] == "t"


def test_unreadable_or_unexpected_pickles_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "truncated.pkl").write_bytes(pickle.dumps([1, 2, 3])[:-3])
    write_authors_pickle(tmp_path / "dict.pkl", {"records": []})
    for name, fragment in (("truncated.pkl", "not a readable pickle"), ("dict.pkl", "holds dict, expected a list")):
        status, _, err = run_cli(capsys, "import-labels", "--pickle", tmp_path / name, "--out", tmp_path / "labels")
        assert status == 2 and len(err.strip().splitlines()) == 1 and fragment in err, err
    with pytest.raises(RefusedPickle):
        load_data_pickle(tmp_path / "truncated.pkl")


def test_rerun_resumes_and_another_source_is_refused(tmp_path, capsys, release):
    records, path = release
    out = tmp_path / "labels"
    argv = ["import-labels", "--pickle", path, "--out", out, "--shard-size", "16", "--no-progress"]
    assert run_cli(capsys, *argv)[0] == 0
    first_index, first = read_output(out)

    status, printed, _ = run_cli(capsys, *argv)  # nothing left to do
    assert status == 0
    assert f"imported 0 samples in this run (0 with valid labels); {len(records)} were already done" in printed

    # killed after two shards: the last shard and the index never appeared, a temporary file did
    shard_paths(out)[-1].unlink()
    (out / "index.jsonl").unlink()
    (out / f"index.jsonl{TEMPORARY_MARK}123").write_bytes(b"partial")
    status, printed, _ = run_cli(capsys, *argv)
    assert status == 0 and "imported 15 samples in this run" in printed and "32 were already done" in printed
    index, resumed = read_output(out)
    assert index == first_index
    assert all(torch.equal(resumed[r][name], first[r][name]) for r in first for name in first[r])
    assert not any(TEMPORARY_MARK in p.name for p in out.iterdir())

    write_authors_pickle(path, records[:-1])  # another pickle under the same name
    status, _, err = run_cli(capsys, *argv)
    assert status == 2 and "holds labels made from another source or with other settings (changed: source)" in err
    status, _, err = run_cli(capsys, *argv[:-1], "--grid", "12")
    assert status == 2 and "changed: grid, source" in err


def test_train_runs_on_imported_labels(tmp_path, capsys):
    from helpers.tiny_models import TINY_GRID, save_tiny_llava

    rng = np.random.default_rng(3)
    records = [authors_record(i, rng, grid=TINY_GRID[0]) for i in range(24)]
    root = tmp_path / "data"
    for record in records:
        (root / record["image"]).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (120, 90), (30, 160, 90)).save(root / record["image"])
    path = write_authors_pickle(tmp_path / "pseudo.pkl", records)
    model = save_tiny_llava(tmp_path / "model")
    status, _, err = run_cli(capsys, "import-labels", "--pickle", path, "--out", tmp_path / "labels", "--image-root",
                             root, "--grid", TINY_GRID[0], "--no-progress")
    assert status == 0, err
    status, _, err = run_cli(capsys, "train", "--model", model, "--labels", tmp_path / "labels", "--out",
                             tmp_path / "rpn", "--K", "1", "--T", "2", "--batch-size", "4", "--max-steps", "2",
                             "--eval-samples", "4", "--no-progress", "--device", "cpu")
    assert status == 0, err
    config = json.loads((tmp_path / "rpn" / "config.json").read_text())
    assert config["labels"]["source"] == "sd-rpn-authors-pickle" and config["labels"]["sink_threshold"] == 1e-3
