"""lmms-eval's command line with ``--model sdrpn`` answers 20 synthetic questions exactly as
``sdrpn eval --benchmark jsonl`` does: the same predictions, scores, visual tokens and RoI boxes.

Runs where lmms-eval is installed (``make lmms-eval-test``), on the shipped tiny model, offline.
lmms-eval exits with status 0 even when the evaluation failed, so every check reads its results
files, never its exit status.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (make lmms-eval-test installs it)")

from sdrpn.testbed.shipped import SHIPPED_MODEL, SHIPPED_RPN  # noqa: E402

QUESTIONS = 20
TASK = "sdrpn_synthetic"
# (method, model_args beyond pretrained): the baseline runs without an RPN, in the RPN's template.
RUNS = {
    "baseline": "method=baseline,prompt=processor",
    "sdrpn": f"rpn={SHIPPED_RPN},method=sdrpn",
}


def run(command: list[str], cwd, log) -> None:
    """Run from ``cwd``, outside the checkout, so that the installed sdrpn is the one imported."""
    env = {**os.environ, "HF_HOME": str(cwd / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    with open(log, "w") as out:
        subprocess.run(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, check=True, timeout=900)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from sdrpn.data.synthetic import DESIGNS, generate_dataset
    from sdrpn.integrations.lmms_task import write_jsonl_task

    work = tmp_path_factory.mktemp("harness")
    generate_dataset(work / "data", 0, 0, QUESTIONS, seed=0, config=DESIGNS["one-detail"], progress=False)
    write_jsonl_task(work / "data", work / "tasks", task=TASK)
    return work


@pytest.fixture(scope="module")
def sdrpn_eval(work) -> dict[str, list[dict]]:
    """``sdrpn eval``'s records of both methods, in question order."""
    out = work / "sdrpn-eval"
    run([sys.executable, "-m", "sdrpn", "eval", "--model", str(SHIPPED_MODEL), "--rpn", str(SHIPPED_RPN),
         "--benchmark", "jsonl", "--data", str(work / "data" / "test.jsonl"), "--method", *RUNS,
         "--batch-size", "4", "--out", str(out / "results.json"), "--no-progress"],
        work, work / "sdrpn-eval.log")
    return {method: [json.loads(line) for line in (out / f"results.{method}.jsonl").read_text().splitlines()[1:]]
            for method in RUNS}


def lmms_eval(work, method: str) -> tuple[dict, list[dict], list[dict]]:
    """lmms-eval's results, per-sample log and RoI log of one method."""
    out, roi_log = work / f"lmms-{method}", work / f"rois-{method}.jsonl"
    run([sys.executable, "-m", "lmms_eval", "--model", "sdrpn",
         "--model_args", f"pretrained={SHIPPED_MODEL},{RUNS[method]},roi_log={roi_log}",
         "--tasks", TASK, "--include_path", str(work / "tasks"), "--batch_size", "4",
         "--output_path", str(out), "--log_samples"], work, work / f"lmms-{method}.log")
    results = sorted(out.rglob("*_results.json"))
    samples = sorted(out.rglob(f"*_samples_{TASK}.jsonl"))
    log = (work / f"lmms-{method}.log").read_text()[-3000:]
    assert len(results) == 1 and len(samples) == 1, f"lmms-eval wrote no results; its log ends with:\n{log}"
    return (json.loads(results[0].read_text()), [json.loads(line) for line in samples[0].read_text().splitlines()],
            [json.loads(line) for line in roi_log.read_text().splitlines()])


@pytest.mark.parametrize("method", list(RUNS))
def test_lmms_eval_answers_as_sdrpn_eval(work, sdrpn_eval, method):
    results, samples, rois = lmms_eval(work, method)
    expected = sdrpn_eval[method]
    assert len(expected) == QUESTIONS
    samples = sorted(samples, key=lambda sample: sample["doc_id"])  # doc_id: the line of the question file
    assert [s["filtered_resps"] for s in samples] == [r["prediction"] for r in expected]
    assert [s["exact_match"] for s in samples] == [r["score"] for r in expected]
    score = sum(r["score"] for r in expected) / QUESTIONS
    assert results["results"][TASK]["exact_match,none"] == pytest.approx(score)
    rois = sorted(rois, key=lambda record: record["doc_id"])
    assert [(r["method"], r["prediction"]) for r in rois] == [(method, r["prediction"]) for r in expected]
    assert [(r["visual_tokens"], r["boxes"]) for r in rois] == [(r["visual_tokens"], r["boxes"]) for r in expected]
    if method == "sdrpn":  # the check means something only if SD-RPN zoomed in somewhere
        assert any(r["boxes"] for r in rois)
