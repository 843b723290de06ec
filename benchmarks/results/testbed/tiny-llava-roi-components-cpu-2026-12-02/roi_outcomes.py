"""Accuracy of an `sdrpn eval` predictions file by RoI outcome, against the testbed's ground truth.

    python roi_outcomes.py TEST_JSONL PREDICTIONS_JSONL [PREDICTIONS_JSONL ...]

Per file: accuracy by the number of RoI boxes and by whether one of them holds the centre of the
question's ground-truth box; and, for the boxes that hold it, accuracy by the box's longer side
relative to the ground-truth box's (the zoom). Prints one JSON object per file.
"""
import json
import sys

SIDE_BINS = ((0, 1.5), (1.5, 2.5), (2.5, 4.0), (4.0, float("inf")))


def outcomes(truth_path, predictions_path):
    truths = {r["question_id"]: r["box"] for r in map(json.loads, open(truth_path))}
    records = [json.loads(line) for line in open(predictions_path)][1:]  # the first line holds the settings
    by_count, by_side = {}, {f"{lo}-{hi}": [0, 0.0] for lo, hi in SIDE_BINS}
    for record in records:
        x0, y0, x1, y1 = truths[record["question_id"]]
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        boxes = record.get("boxes") or []
        holding = [b for b in boxes if b[0] <= cx <= b[2] and b[1] <= cy <= b[3]]
        key = f"{min(len(boxes), 3)}{'+' if len(boxes) >= 3 else ''} boxes, {'on' if holding else 'off'} target"
        entry = by_count.setdefault(key, [0, 0.0])
        entry[0] += 1
        entry[1] += record["score"]
        if len(boxes) == 1 and holding:
            side = max(holding[0][2] - holding[0][0], holding[0][3] - holding[0][1]) / max(x1 - x0, y1 - y0)
            for lo, hi in SIDE_BINS:
                if lo <= side < hi:
                    by_side[f"{lo}-{hi}"][0] += 1
                    by_side[f"{lo}-{hi}"][1] += record["score"]

    def table(counts):
        return {k: {"questions": n, "accuracy": round(s / n, 3)} for k, (n, s) in sorted(counts.items()) if n}

    return {"predictions": predictions_path, "questions": len(records),
            "accuracy": round(sum(r["score"] for r in records) / len(records), 3),
            "by_boxes": table(by_count), "single_box_on_target_by_side_over_truth": table(by_side)}


if __name__ == "__main__":
    for path in sys.argv[2:]:
        print(json.dumps(outcomes(sys.argv[1], path)))
