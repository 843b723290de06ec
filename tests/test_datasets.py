"""Benchmark readers on small fixtures written in each benchmark's official format, on malformed
files that must be refused with a message naming the file and the problem, and on single bad
records, skipped and reported with their file, line and reason when the caller collects them."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from sdrpn.errors import UserError
from sdrpn.eval.datasets import (BENCHMARKS, OPTION_ANSWER, SHORT_ANSWER, DatasetError, EmbeddedImage,
                                 get_benchmark, load_benchmark, open_image)


def write_image(path: Path, size=(32, 24), color=(200, 30, 30), fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)
    return path


def write_json(path: Path, content) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))
    return path


def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


# ------------------------------------------------------------------------------------------------
# TextVQA
# ------------------------------------------------------------------------------------------------


def textvqa_fixture(root: Path) -> Path:
    write_image(root / "train_images" / "img_a.jpg", fmt="JPEG")
    write_image(root / "train_images" / "img_b.jpg", fmt="JPEG")
    records = [
        {"question": "what brand is this?", "image_id": "img_a", "question_id": 34602, "set_name": "val",
         "answers": ["nokia"] * 7 + ["Nokia", "nokia phone", "toshiba"], "image_classes": ["phone"],
         "image_width": 1024, "image_height": 768},
        {"question": "what number is on the shirt?", "image_id": "img_b", "question_id": 34603,
         "set_name": "val", "answers": ["7"] * 10},
    ]
    return write_json(root / "TextVQA_0.5.1_val.json",
                      {"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1",
                       "data": records})


def test_textvqa_reads_official_file(tmp_path):
    textvqa_fixture(tmp_path)
    samples = load_benchmark("textvqa", tmp_path)
    assert [s.question_id for s in samples] == ["34602", "34603"]
    assert samples[0].image == tmp_path / "train_images" / "img_a.jpg"
    assert samples[0].prompt == f"what brand is this?\n{SHORT_ANSWER}"
    assert len(samples[0].answers) == 10 and samples[0].options == ()
    # the file itself may be given instead of its folder
    assert load_benchmark("textvqa", tmp_path / "TextVQA_0.5.1_val.json") == samples


def test_textvqa_errors(tmp_path):
    with pytest.raises(DatasetError, match="TextVQA_0.5.1_val.json"):
        load_benchmark("textvqa", tmp_path)  # empty folder
    path = write_json(tmp_path / "TextVQA_0.5.1_val.json", [{"question": "q"}])
    with pytest.raises(DatasetError, match=r"TextVQA_0.5.1_val.json: expected the TextVQA annotation file"):
        load_benchmark("textvqa", path)
    textvqa_fixture(tmp_path)
    (tmp_path / "train_images" / "img_b.jpg").unlink()
    with pytest.raises(DatasetError, match=r"1 of the images it lists are missing, for example .*img_b.jpg"):
        load_benchmark("textvqa", tmp_path)
    content = json.loads(path.read_text())
    del content["data"][0]["answers"]
    write_json(path, content)
    with pytest.raises(DatasetError, match=r"data\[0\]: missing field 'answers'"):
        load_benchmark("textvqa", tmp_path)
    path.write_text('{"data": [')
    with pytest.raises(DatasetError, match=r"TextVQA_0.5.1_val.json: not valid JSON \(line 1"):
        load_benchmark("textvqa", tmp_path)


# ------------------------------------------------------------------------------------------------
# DocVQA, InfographicVQA
# ------------------------------------------------------------------------------------------------


def test_docvqa_reads_official_file(tmp_path):
    write_image(tmp_path / "val" / "documents" / "pybv0228_81.png")
    write_json(tmp_path / "val" / "val_v1.0.json", {
        "dataset_name": "docvqa", "dataset_split": "val", "dataset_version": "1.0",
        "data": [{"questionId": 49153, "question": "What is the ‘actual’ value per 1000, during the year 1975?",
                  "question_types": ["figure/diagram"], "image": "documents/pybv0228_81.png",
                  "docId": 14465, "ucsf_document_id": "pybv0228", "ucsf_document_page_no": "81",
                  "answers": ["0.28"], "data_split": "val"}],
    })
    (sample,) = load_benchmark("docvqa", tmp_path)  # finds val/val_v1.0.json
    assert sample.question_id == "49153"
    assert sample.image == tmp_path / "val" / "documents" / "pybv0228_81.png"
    assert sample.answers == ("0.28",)


def test_docvqa_refuses_test_split_without_answers(tmp_path):
    write_image(tmp_path / "documents" / "a.png")
    write_json(tmp_path / "val_v1.0.json", {"data": [{"questionId": 1, "question": "q", "image": "documents/a.png"}]})
    with pytest.raises(DatasetError, match=r"val_v1.0.json: data\[0\]: no 'answers'"):
        load_benchmark("docvqa", tmp_path)
    with pytest.raises(DatasetError, match="'val' split only"):
        load_benchmark("docvqa", tmp_path, split="test")


def test_infovqa_reads_official_file(tmp_path):
    write_image(tmp_path / "infographicsvqa_images" / "37313.jpeg", fmt="JPEG")
    write_json(tmp_path / "infographicsVQA_val_v1.0_withQT.json", {
        "dataset_name": "infographicVQA", "dataset_version": "1.0", "dataset_split": "val",
        "data": [{"questionId": 65718, "question": "What percentage of people are left-handed?",
                  "image_local_name": "37313.jpeg", "image_url": "https://example.org/37313.jpeg",
                  "ocr_output_file": "37313.json", "answers": ["10%", "10"], "data_split": "val"}],
    })
    (sample,) = load_benchmark("infovqa", tmp_path)
    assert sample.image == tmp_path / "infographicsvqa_images" / "37313.jpeg"
    assert sample.answers == ("10%", "10")


# ------------------------------------------------------------------------------------------------
# ChartQA
# ------------------------------------------------------------------------------------------------


def chartqa_fixture(root: Path) -> Path:
    test = root / "test"
    write_image(test / "png" / "two_col_1.png")
    write_image(test / "png" / "multi_col_2.png")
    write_json(test / "test_human.json", [{"imgname": "two_col_1.png", "query": "What is the peak value?",
                                           "label": "41.5"}])
    write_json(test / "test_augmented.json", [
        {"imgname": "multi_col_2.png", "query": "Which year is highest?", "label": "2019"},
        {"imgname": "two_col_1.png", "query": "How many bars?", "label": 4},
    ])
    return test


def test_chartqa_reads_both_subsets(tmp_path):
    chartqa_fixture(tmp_path)
    samples = load_benchmark("chartqa", tmp_path)  # the "ChartQA Dataset" root with test/ inside
    assert [(s.question_id, s.subset, s.answers) for s in samples] == [
        ("human/0", "human", ("41.5",)), ("augmented/0", "augmented", ("2019",)),
        ("augmented/1", "augmented", ("4",))]
    assert [s.subset for s in load_benchmark("chartqa", tmp_path / "test", split="human")] == ["human"]


def test_chartqa_errors(tmp_path):
    test = chartqa_fixture(tmp_path)
    with pytest.raises(DatasetError, match="must be one of human, augmented"):
        load_benchmark("chartqa", tmp_path, split="val")
    write_json(test / "test_human.json", {"imgname": "two_col_1.png"})
    with pytest.raises(DatasetError, match="test_human.json: expected a non-empty JSON list"):
        load_benchmark("chartqa", tmp_path)
    (test / "test_human.json").unlink()
    with pytest.raises(DatasetError, match="annotation file missing: .*test_human.json"):
        load_benchmark("chartqa", tmp_path)


# ------------------------------------------------------------------------------------------------
# OCRBench
# ------------------------------------------------------------------------------------------------


def test_ocrbench_reads_official_file(tmp_path):
    write_image(tmp_path / "OCRBench_Images" / "IIIT5K" / "1002_1.png")
    write_image(tmp_path / "OCRBench_Images" / "HME100k" / "train_1.jpg", fmt="JPEG")
    write_json(tmp_path / "OCRBench" / "OCRBench.json", [
        {"dataset_name": "IIIT5K", "id": 0, "image_path": "IIIT5K/1002_1.png",
         "question": "what is written in the image?", "answers": ["PRIVATE"], "type": "Regular Text Recognition"},
        {"dataset_name": "HME100k", "id": 1, "image_path": "HME100k/train_1.jpg",
         "question": "Please write out the expression of the formula in the image using LaTeX format.",
         "answers": "x ^ { 2 }", "type": "Handwritten Mathematical Expression Recognition"},
    ])
    samples = load_benchmark("ocrbench", tmp_path)
    assert samples[0].prompt == "what is written in the image?"  # asked as is
    assert samples[1].answers == ("x ^ { 2 }",) and samples[1].source == "HME100k"
    assert samples[1].subset == "Handwritten Mathematical Expression Recognition"


def test_ocrbench_errors(tmp_path):
    (tmp_path / "OCRBench_Images").mkdir()
    write_json(tmp_path / "OCRBench.json", [{"dataset_name": "x", "image_path": "a.png", "question": "q",
                                             "type": "t"}])
    with pytest.raises(DatasetError, match=r"OCRBench.json: item 0: missing field 'answers'"):
        load_benchmark("ocrbench", tmp_path)
    with pytest.raises(DatasetError, match="single test set"):
        load_benchmark("ocrbench", tmp_path, split="val")


# ------------------------------------------------------------------------------------------------
# V* Bench
# ------------------------------------------------------------------------------------------------


def vstar_fixture(root: Path) -> None:
    write_image(root / "direct_attributes" / "sa_4690.jpg", fmt="JPEG")
    write_json(root / "direct_attributes" / "sa_4690.json", {
        "target_object": ["glove"], "bbox": [[10, 10, 5, 5]],
        "question": "What is the material of the glove?",
        "options": ["rubber", "cotton", "leather", "wool"]})
    write_image(root / "relative_position" / "sa_100.jpg", fmt="JPEG")
    write_json(root / "relative_position" / "sa_100.json", {
        "target_object": ["cup", "dog"], "bbox": [[1, 1, 2, 2], [5, 5, 2, 2]],
        "question": "Is the cup on the left or right side of the dog?",
        "options": ["The cup is on the left of the dog.", "The cup is on the right of the dog."]})


def test_vstar_reads_folders(tmp_path):
    vstar_fixture(tmp_path)
    samples = load_benchmark("vstar", tmp_path)
    assert [s.question_id for s in samples] == ["direct_attributes/sa_4690", "relative_position/sa_100"]
    attribute = samples[0]
    # the first option of the file is the correct one; it keeps its identity after shuffling
    assert attribute.answers == ("rubber",)
    assert attribute.options[attribute.answer_index] == "rubber"
    assert sorted(attribute.options) == ["cotton", "leather", "rubber", "wool"]
    assert attribute.prompt.endswith(OPTION_ANSWER) and "\nA. " in attribute.prompt
    # the shuffle is deterministic
    assert load_benchmark("vstar", tmp_path)[0].options == attribute.options
    assert get_benchmark("vstar").choice_scoring == "likelihood"


def test_vstar_errors(tmp_path):
    with pytest.raises(DatasetError, match="no V\\* category folder"):
        load_benchmark("vstar", tmp_path)
    vstar_fixture(tmp_path)
    (tmp_path / "relative_position" / "sa_100.jpg").unlink()
    with pytest.raises(DatasetError, match=r"sa_100.json: no image beside it"):
        load_benchmark("vstar", tmp_path)
    write_json(tmp_path / "relative_position" / "sa_100.json", {"question": "q", "options": ["only"]})
    write_image(tmp_path / "relative_position" / "sa_100.jpg", fmt="JPEG")
    with pytest.raises(DatasetError, match="at least 2 options"):
        load_benchmark("vstar", tmp_path)


# ------------------------------------------------------------------------------------------------
# POPE
# ------------------------------------------------------------------------------------------------


def pope_fixture(root: Path) -> None:
    write_image(root / "val2014" / "COCO_val2014_000000310196.jpg", fmt="JPEG")
    for split in ("adversarial", "popular", "random"):
        write_jsonl(root / "coco" / f"coco_pope_{split}.json", [
            {"question_id": 1, "image": "COCO_val2014_000000310196.jpg",
             "text": "Is there a snowboard in the image?", "label": "yes"},
            {"question_id": 2, "image": "COCO_val2014_000000310196.jpg",
             "text": "Is there a dog in the image?", "label": "no"},
        ])


def test_pope_reads_all_splits(tmp_path):
    pope_fixture(tmp_path)
    samples = load_benchmark("pope", tmp_path)
    assert len(samples) == 6
    assert samples[0].question_id == "adversarial/1" and samples[-1].question_id == "random/2"
    assert samples[0].prompt == f"Is there a snowboard in the image?\n{SHORT_ANSWER}"
    assert [s.answers for s in load_benchmark("pope", tmp_path, split="popular")] == [("yes",), ("no",)]


def test_pope_errors(tmp_path):
    pope_fixture(tmp_path)
    path = tmp_path / "coco" / "coco_pope_random.json"
    path.write_text(path.read_text() + '{"question_id": 3, "image": "x.jpg", "text": "q", "label": "maybe"}\n')
    with pytest.raises(DatasetError, match=r"coco_pope_random.json: line 3: label must be 'yes' or 'no'"):
        load_benchmark("pope", tmp_path, split="random")
    path.write_text("not json\n")
    with pytest.raises(DatasetError, match=r"coco_pope_random.json: line 1: unreadable line: Expecting value"):
        load_benchmark("pope", tmp_path, split="random")
    with pytest.raises(DatasetError, match="expected a POPE question file named"):
        load_benchmark("pope", write_jsonl(tmp_path / "questions.jsonl", [{}]))


def test_pope_images_not_found(tmp_path):
    pope_fixture(tmp_path)
    (tmp_path / "val2014" / "COCO_val2014_000000310196.jpg").rename(tmp_path / "elsewhere.jpg")
    (tmp_path / "val2014").rmdir()
    with pytest.raises(DatasetError, match="COCO val2014 images for POPE not found .* pass --image-root"):
        load_benchmark("pope", tmp_path)
    (tmp_path / "coco2014").mkdir()
    (tmp_path / "elsewhere.jpg").rename(tmp_path / "coco2014" / "COCO_val2014_000000310196.jpg")
    assert len(load_benchmark("pope", tmp_path, image_root=tmp_path / "coco2014")) == 6


# ------------------------------------------------------------------------------------------------
# HR-Bench
# ------------------------------------------------------------------------------------------------


def encoded_image(color) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buffer, format="JPEG")
    return base64.b64encode(buffer.getvalue()).decode()


def write_hrbench(path: Path, rows, columns=("index", "question", "answer", "category", "A", "B", "C", "D",
                                             "image", "cycle_category")) -> Path:
    lines = ["\t".join(columns)] + ["\t".join(str(row.get(c, "")) for c in columns) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_hrbench_reads_tsv_with_embedded_and_referenced_images(tmp_path):
    red = encoded_image((255, 0, 0))
    write_hrbench(tmp_path / "hr_bench_4k.tsv", [
        {"index": 0, "question": "What is the number above the entrance?", "answer": "B", "category": "single",
         "A": "27B", "B": "37B", "C": "27D", "D": "27E", "image": red, "cycle_category": "cycle1"},
        {"index": 1, "question": "Which is further left?", "answer": "A", "category": "cross",
         "A": "the car", "B": "the bus", "image": "0", "cycle_category": "cycle1"},  # reuses row 0's image
    ])
    samples = load_benchmark("hrbench", tmp_path)
    assert [s.question_id for s in samples] == ["0", "1"]
    assert samples[0].options == ("27B", "37B", "27D", "27E") and samples[0].answer_index == 1
    assert samples[0].answers == ("37B",)
    assert samples[1].options == ("the car", "the bus") and samples[1].subset == "cross"
    assert isinstance(samples[1].image, EmbeddedImage)
    assert open_image(samples[1].image).getpixel((20, 15))[0] > 200  # red, decoded from row 0


def test_hrbench_errors(tmp_path):
    path = write_hrbench(tmp_path / "hr_bench_4k.tsv", [{"index": 0, "question": "q"}],
                         columns=("index", "question", "image"))
    with pytest.raises(DatasetError, match=r"hr_bench_4k.tsv: not an HR-Bench TSV, missing column\(s\) answer, A, B"):
        load_benchmark("hrbench", path)
    write_hrbench(path, [{"index": 0, "question": "q", "answer": "E", "A": "x", "B": "y",
                          "image": encoded_image((0, 0, 0))}])
    with pytest.raises(DatasetError, match=r"line 2: answer 'E' is not the letter of one of the 2 options"):
        load_benchmark("hrbench", path)
    write_hrbench(path, [{"index": 0, "question": "q", "answer": "A", "A": "x", "B": "y", "image": "7"}])
    with pytest.raises(DatasetError, match="neither base64 data nor the index of a row"):
        load_benchmark("hrbench", path)
    with pytest.raises(DatasetError, match="hr_bench_8k.tsv not found"):
        load_benchmark("hrbench", tmp_path, split="8k")


def test_open_image_reports_undecodable_embedded_image(tmp_path):
    with pytest.raises(UserError, match="line 5: not a readable image"):
        open_image(EmbeddedImage(data=base64.b64encode(b"not an image" * 10).decode(), origin="x.tsv: line 5"))


# ------------------------------------------------------------------------------------------------
# Generic JSONL
# ------------------------------------------------------------------------------------------------


def test_jsonl_reads_generic_format(tmp_path):
    write_image(tmp_path / "images" / "q1.png")
    write_image(tmp_path / "images" / "q2.png")
    write_jsonl(tmp_path / "test.jsonl", [
        {"question_id": "q1", "image": "images/q1.png", "question": "What digit is in the red square?",
         "answers": ["7"], "box": [4, 4, 12, 10], "subset": "shapes"},
        {"question_id": 2, "image": "images/q2.png", "text": f"Which colour?\n{SHORT_ANSWER}", "answer": "red"},
        {"question_id": "q3", "image": "images/q1.png", "question": "Which shape?",
         "options": ["circle", "square"], "answers": ["B"]},
    ])
    q1, q2, q3 = load_benchmark("jsonl", tmp_path)  # folder + default split "test"
    assert q1.box == (4.0, 4.0, 12.0, 10.0) and q1.subset == "shapes"
    assert q2.question_id == "2" and q2.answers == ("red",)
    assert q2.prompt.count(SHORT_ANSWER) == 1  # not repeated
    assert q3.answer_index == 1 and q3.answers == ("square",) and "B. square" in q3.prompt


@pytest.mark.parametrize(
    "line, message",
    [
        ({"image": "a.png", "question": "q", "answers": ["x"]}, "line 1: missing field 'question_id'"),
        ({"question_id": 1, "image": "a.png", "question": "", "answers": ["x"]}, "line 1: empty question"),
        ({"question_id": 1, "image": "a.png", "question": "q", "answers": []}, "should be a non-empty list"),
        ({"question_id": 1, "image": "a.png", "question": "q", "answers": ["x"], "box": [1, 2, 3]},
         r"'box' should be \[x0, y0, x1, y1\]"),
        ({"question_id": 1, "image": "a.png", "question": "q", "answers": ["x"], "box": [5, 2, 3, 4]},
         "is empty"),
        ({"question_id": 1, "image": "a.png", "question": "q", "options": ["a", "b"], "answers": ["c"]},
         "neither one of the options nor their letter"),
        ({"question_id": 1, "image": "missing.png", "question": "q", "answers": ["x"]},
         "images it lists are missing"),
    ],
)
def test_jsonl_errors(tmp_path, line, message):
    write_image(tmp_path / "a.png")
    path = write_jsonl(tmp_path / "bad.jsonl", [line])
    with pytest.raises(DatasetError, match=message) as error:
        load_benchmark("jsonl", path)
    assert str(path) in str(error.value)


def test_jsonl_duplicate_ids_and_missing_split(tmp_path):
    write_image(tmp_path / "a.png")
    record = {"question_id": 1, "image": "a.png", "question": "q", "answers": ["x"]}
    write_jsonl(tmp_path / "val.jsonl", [record, record])
    with pytest.raises(DatasetError, match="question id '1' appears twice"):
        load_benchmark("jsonl", tmp_path, split="val")
    with pytest.raises(DatasetError, match=r"no test.jsonl \(splits found: val\)"):
        load_benchmark("jsonl", tmp_path)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DatasetError, match="empty.jsonl: no records"):
        load_benchmark("jsonl", tmp_path / "empty.jsonl")


# ------------------------------------------------------------------------------------------------
# Bad records: skipped and reported when the caller collects them
# ------------------------------------------------------------------------------------------------


def test_bad_jsonl_records_are_skipped_with_file_line_and_reason(tmp_path):
    write_image(tmp_path / "a.png")
    good = {"question_id": "ok", "image": "a.png", "question": "q", "answers": ["x"]}
    path = tmp_path / "test.jsonl"
    path.write_text("\n".join([
        json.dumps(good),
        '{"question_id": "cut", "image": ',
        json.dumps({**good, "question_id": "gone", "image": "gone.png"}),
        json.dumps({**good, "question_id": "boxed", "box": [5, 2, 3, 4]}),
        json.dumps(good),
        "[1, 2]",
    ]) + "\n")
    issues = []
    (sample,) = load_benchmark("jsonl", path, issues=issues)
    assert (sample.question_id, sample.file, sample.line) == ("ok", str(path), 1)
    assert [(issue.file, issue.line, issue.question_id, issue.reason) for issue in issues] == [
        (str(path), 2, None, "unreadable line: Expecting value at column 33"),
        (str(path), 6, None, "expected a JSON object, got list"),
        (str(path), 4, "boxed", "box [5, 2, 3, 4] is empty (needs x0 < x1 and y0 < y1)"),
        (str(path), 3, "gone", f"image not found: {tmp_path / 'gone.png'}"),
        (str(path), 5, "ok", "question id 'ok' appears twice (first at " + f"{path}:1)"),
    ]
    assert str(issues[3]) == f"{path}:3 (question_id gone): skipped: image not found: {tmp_path / 'gone.png'}"


def test_bad_records_of_a_json_list_are_placed_by_item(tmp_path):
    textvqa_fixture(tmp_path)
    content = json.loads((tmp_path / "TextVQA_0.5.1_val.json").read_text())
    del content["data"][0]["answers"]
    write_json(tmp_path / "TextVQA_0.5.1_val.json", content)
    issues = []
    assert [s.question_id for s in load_benchmark("textvqa", tmp_path, issues=issues)] == ["34603"]
    (issue,) = issues
    assert str(issue).endswith("TextVQA_0.5.1_val.json data[0] (question_id 34602): skipped: missing field 'answers'")


def test_no_image_at_all_or_no_usable_question_is_still_an_error(tmp_path):
    textvqa_fixture(tmp_path)
    for name in ("img_a.jpg", "img_b.jpg"):
        (tmp_path / "train_images" / name).unlink()
    with pytest.raises(DatasetError, match="none of the 2 images it lists exists, for example .*img_a.jpg "
                                           r"\(--image-root selects another image folder\)"):
        load_benchmark("textvqa", tmp_path, issues=[])
    path = write_jsonl(tmp_path / "q.jsonl", [{"question_id": 1, "image": "a.png", "question": "q"}])
    with pytest.raises(DatasetError, match=r"q.jsonl: no usable question \(1 skipped; first: .*missing field"):
        load_benchmark("jsonl", path, issues=[])


# ------------------------------------------------------------------------------------------------
# Registry and images
# ------------------------------------------------------------------------------------------------


def test_unknown_benchmark_lists_known_ones():
    with pytest.raises(UserError, match="unknown benchmark 'textvq'; choose one of textvqa, docvqa"):
        get_benchmark("textvq")
    assert set(BENCHMARKS) == {"textvqa", "docvqa", "chartqa", "infovqa", "ocrbench", "vstar", "pope",
                               "hrbench", "jsonl"}


def test_missing_data_path(tmp_path):
    for name in BENCHMARKS:
        with pytest.raises(DatasetError, match="no such file or directory|expected the V"):
            load_benchmark(name, tmp_path / "nowhere")


def test_open_image_converts_to_rgb_and_rejects_non_images(tmp_path):
    gray = tmp_path / "gray.png"
    Image.new("L", (8, 8), 128).save(gray)
    assert open_image(gray).mode == "RGB"
    text = tmp_path / "notes.png"
    text.write_text("hello")
    with pytest.raises(UserError, match=r"notes.png: not a readable image"):
        open_image(text)
    with pytest.raises(UserError, match="no such image file"):
        open_image(tmp_path / "absent.png")
