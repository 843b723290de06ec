"""The labelling pipeline behind ``sdrpn label``.

For each batch of records: open the images, let the model answer greedily, then one teacher-forced
pass over prompt + answer up to the last needed layer reads the grounding heads' rows and the sink
detector's input (:class:`.attention.AttentionReader`). The grounding map (mean over the selected
heads and the answer tokens) and the sink mask become labels (:func:`.labels.assign_labels`), and
every ``shard_size`` samples, and at least every ``flush_seconds``, are written as one atomic shard
(:mod:`.shards`).

The labelling view is the adapter's (:meth:`~sdrpn.models.base.ModelAdapter.labelling_view`): LLaVA's
images go to its processor as they are (its own pad or crop geometry); Qwen2.5-VL's are pasted on the
authors' grey square and encoded at their fixed pixel budget, and the square's padding cells are known
background under label rules that say so (``padding_is_background``; stored in the shards as
``padding``). Labels are stored on the family's ``image_grid``: a record whose view has another grid
(about 5% of image sizes give Qwen2.5-VL's square 23 x 23 or 25 x 25 tokens instead of 24 x 24) is
reported with that reason and skipped, before the model runs.

Robustness: a record that cannot be used is reported (file, line, reason) and skipped; the run
goes on and ends with a summary and ``issues.jsonl`` (the policy of :mod:`sdrpn.issues`). Killed at
any point, the run resumes where it stopped: records already in a shard are skipped, so no sample
is written twice. Ctrl-C first writes the samples labelled so far, then says how many are saved.

Under ``torchrun`` every process labels ``records[rank::world]`` into its own shards; rank 0 then
writes one ``index.jsonl`` over all shards, in input order.
"""

from __future__ import annotations

import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import InitVar, dataclass, field, fields, replace
from pathlib import Path
from typing import Sequence

import torch

from .. import distributed
from ..errors import Interrupted, UserError
from ..issues import RecordIssue, issues_summary, report_issue
from ..models.base import LabellingView, ModelAdapter
from ..prompts import PROCESSOR_TEMPLATE, PromptTemplate, template_named
from .attention import AttentionReader, Capture, CaptureRequest, grounding_map
from .heads import HeadSelection, check_sink_detector
from .labels import QUESTION_REWRITES, LabelRules, QuestionRewrite, assign_labels, is_valid
from .records import Record, open_record_image
from .shards import (
    atomic_write,
    completed_records,
    next_sequence,
    read_shard,
    remove_temporary_files,
    shard_name,
    write_index,
    write_shard,
)
from .sinks import SinkSpec

SETTINGS_NAME = "run.json"
ISSUES_NAME = "issues.jsonl"
SETTINGS_FORMAT = "sdrpn-label-run/1"
# Labels whose foreground holds the same cell this often do not follow the questions.
STUCK_SHARE, STUCK_MIN_VALID = 0.9, 20


@dataclass(frozen=True)
class LabelOptions:
    """Everything that decides the labels (and therefore must not change when a run resumes),
    plus how the work is batched.

    The label rules and their defaults are those of :func:`.labels.assign_labels` (the authors'
    LLaVA-1.5 rules), plus ``padding_is_background`` (the padding cells of the labelling view count as
    sinks before the peak and are background wherever they lie). ``rules`` sets all of them at once
    from a :class:`~.labels.LabelRules` or a preset name of :data:`~.labels.LABEL_RULE_PRESETS`
    (``"qwen2.5-vl"``); a rule field given beside it must be left at its default or agree with it.
    ``question_rewrite`` (a :class:`~.labels.QuestionRewrite` or a name of
    :data:`~.labels.QUESTION_REWRITES`) changes the question the teacher is asked, for labelling
    only: the record keeps its own question (the one the RPN is trained on). ``prompt`` is the
    conversation template of the questions (a :mod:`sdrpn.prompts` preset name or template; None:
    the model family's default, resolved by :class:`Labeller`). A shard is written every
    ``shard_size`` samples, and whenever samples have waited ``flush_seconds`` since the last one,
    so that a killed run loses at most that much work.
    """

    heads: HeadSelection
    sink: SinkSpec = field(default_factory=SinkSpec)
    tau_fg: float = 0.2
    tau_bg: float = 0.1
    max_box_frac: float = 0.5
    min_peak: float = 0.0
    blur_box: bool = False
    max_new_tokens: int = 128
    batch_size: int = 8
    shard_size: int = 256
    flush_seconds: float = 60.0
    prompt: str | PromptTemplate | None = None
    padding_is_background: bool = False
    question_rewrite: QuestionRewrite | str | None = None
    rules: InitVar[LabelRules | str | None] = None

    def __post_init__(self, rules):
        if isinstance(self.question_rewrite, str):
            try:
                object.__setattr__(self, "question_rewrite", QUESTION_REWRITES[self.question_rewrite])
            except KeyError:
                raise ValueError(f"unknown question rewrite {self.question_rewrite!r}; presets: "
                                 f"{', '.join(QUESTION_REWRITES)}") from None
        if rules is None:
            self.label_rules  # noqa: B018 - the checks of a rule set
            return
        rules = LabelRules.named(rules) if isinstance(rules, str) else rules
        defaults = {f.name: f.default for f in fields(self)}
        for name, value in rules.to_dict().items():
            given = getattr(self, name)
            if given != defaults[name] and given != value:
                raise ValueError(f"{name}={given!r} contradicts the label rules' {name}={value!r}; pass the rules "
                                 f"or the field, not both")
            object.__setattr__(self, name, value)

    @property
    def label_rules(self) -> LabelRules:
        """The rule set of these options."""
        return LabelRules(self.tau_fg, self.tau_bg, self.max_box_frac, self.min_peak, self.blur_box,
                          self.padding_is_background)

    def label_settings(self) -> dict:
        """The options that change the output (batching excluded). ``padding_is_background`` and
        ``question_rewrite`` appear only when set, so that the settings of runs without them read as
        before."""
        settings = {"heads": [list(pair) for pair in self.heads.pairs], "sink": self.sink.to_dict(),
                    "tau_fg": self.tau_fg, "tau_bg": self.tau_bg, "max_box_frac": self.max_box_frac,
                    "min_peak": self.min_peak, "blur_box": self.blur_box, "max_new_tokens": self.max_new_tokens}
        if self.padding_is_background:
            settings["padding_is_background"] = True
        if self.question_rewrite is not None:
            settings["question_rewrite"] = self.question_rewrite.to_dict()
        if self.prompt is not None:
            settings["prompt"] = template_named(self.prompt).to_dict()
        return settings


def label_geometry(settings: dict) -> str | None:
    """The base view geometry ("pad" or "crop") a label run's maps were made on; None when not
    recorded (the processor's)."""
    return settings.get("geometry")


def label_template(settings: dict) -> PromptTemplate:
    """The conversation template of a label run, from its settings (``run.json``: under ``options``
    for ``sdrpn label``, at the top for imported labels); runs that did not record one used the
    processor's chat template."""
    recorded = settings.get("options", {}).get("prompt") or settings.get("prompt")
    return template_named(recorded or PROCESSOR_TEMPLATE)


@dataclass
class LabelledSample:
    """The labelling result of one record. ``padding`` is the view's known-background cells where the
    view has them or the rules use them (else None); ``asked`` the question the teacher was asked
    where a rewrite changed it (else None)."""

    answer: str
    grounding: torch.Tensor  # (H, W) float32
    sink: torch.Tensor       # (H, W) bool
    labels: torch.Tensor     # (H, W) int64
    valid: bool
    padding: torch.Tensor | None = None  # (H, W) bool
    asked: str | None = None


class Labeller:
    """Turns a batch of (image, question) pairs into answers and labels with one model.

    Images are shown in the adapter's labelling view (:meth:`view`), encoded by its labelling
    processor; labels are made on the family's ``image_grid`` (:attr:`grid`).
    """

    def __init__(self, model, processor, options: LabelOptions, adapter: ModelAdapter | None = None):
        from ..models import adapter_for

        adapter = adapter or adapter_for(model, processor)
        self.reader = AttentionReader(model, adapter.labelling_processor(processor), options.max_new_tokens, adapter,
                                      options.prompt)
        self.adapter = adapter
        self.options = options = replace(options, prompt=self.reader.template)  # recorded in the settings
        self.rules = options.label_rules
        self.grid = tuple(int(size) for size in adapter.image_grid)
        try:
            options.heads.check(adapter.num_layers, adapter.num_heads)
        except ValueError as exc:
            raise UserError(f"--heads {options.heads}: {exc}") from None
        self.grounding_layer = min(options.heads.by_layer)
        check_sink_detector(options.sink, self.grounding_layer, adapter.num_layers, adapter.num_heads)
        self.request = CaptureRequest(options.heads.by_layer).merge(
            options.sink.request(self.grounding_layer, adapter.num_heads))

    def view(self, image) -> LabellingView:
        """The labelling view of a source image."""
        return self.adapter.labelling_view(image)

    def unusable(self, view: LabellingView, image_size=None) -> str | None:
        """Why a view cannot be labelled (its grid is not :attr:`grid`), or None."""
        if tuple(view.grid) == self.grid:
            return None
        size = f" of this {image_size[0]}x{image_size[1]} image" if image_size is not None else ""
        return (f"its labelling view{size} is {view.grid[0]}x{view.grid[1]} tokens, not the "
                f"{self.grid[0]}x{self.grid[1]} grid the labels are made on (the processor's resize at the "
                f"labelling budget)")

    def labels_from(self, captured: Capture, padding: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(grounding (B, N), sink (B, N), labels (B, H, W), valid (B,))`` of a capture of
        :attr:`request`; ``padding`` is the ``(B, H, W)`` known-background cells of the views (None:
        none), used under rules with ``padding_is_background``."""
        options, rules = self.options, self.rules
        grounding = grounding_map(captured.select(options.heads.by_layer), captured.query_mask)
        sink = options.sink.detect(captured, self.grounding_layer, grounding.shape[-1])
        known = None
        if rules.padding_is_background:
            batch = grounding.shape[0]
            known = (padding if padding is not None else torch.zeros(batch, *self.grid, dtype=torch.bool))
            known = known.to(grounding.device)
        labels = assign_labels(grounding, sink, self.grid, **rules.options(), known_background=known)
        return grounding, sink, labels, is_valid(labels) & captured.query_mask.any(dim=1)

    def label(self, images: Sequence, questions: Sequence[str]) -> list[LabelledSample]:
        """Answer and label one batch: source images, or their :meth:`view` (what the job passes)."""
        views = [image if isinstance(image, LabellingView) else self.view(image) for image in images]
        for view in views:
            reason = self.unusable(view)
            if reason is not None:
                raise ValueError(f"cannot label this image: {reason}")
        rewrite = self.options.question_rewrite
        asked = [rewrite.apply(question) for question in questions] if rewrite is not None else list(questions)
        reading = self.reader.read([view.image for view in views], asked, self.request)
        lengths = reading.capture.image_lengths
        if lengths is not None and bool((lengths.cpu() != self.grid[0] * self.grid[1]).any()):
            raise RuntimeError(f"the labelling processor made {lengths.tolist()} image tokens, the views' grid "
                               f"{self.grid} holds {self.grid[0] * self.grid[1]}")
        has_padding = self.rules.padding_is_background or any(view.padding is not None for view in views)
        padding = None
        if has_padding:
            padding = torch.stack([view.padding if view.padding is not None
                                   else torch.zeros(self.grid, dtype=torch.bool) for view in views])
        grounding, sink, labels, valid = self.labels_from(reading.capture, padding)
        height, width = self.grid
        return [LabelledSample(reading.texts[i], grounding[i].reshape(height, width).cpu(),
                               sink[i].reshape(height, width).cpu(), labels[i].cpu(), bool(valid[i]),
                               None if padding is None else padding[i].cpu(),
                               asked[i] if rewrite is not None else None)
                for i in range(len(reading.answers))]


# ------------------------------------------------------------------------------------------------
# The job: records -> shards, resumable and shardable across processes
# ------------------------------------------------------------------------------------------------


@dataclass
class LabelSummary:
    """What one run did (on this process, except ``total_*`` which rank 0 fills from all shards)."""

    labelled: int = 0
    valid: int = 0
    already_done: int = 0
    total_samples: int = 0
    total_valid: int = 0
    issues: list[RecordIssue] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def report(self) -> str:
        lines = [f"labelled {self.labelled} samples in this run ({self.valid} with valid labels); "
                 f"{self.already_done} were already done"]
        if self.total_samples:
            lines.append(f"output: {self.total_samples} samples, {self.total_valid} with valid labels")
        skipped = issues_summary(self.issues)
        converted = [issue for issue in self.issues if issue.action == "converted"]
        if skipped:
            lines.append(f"{skipped} (each reported above, all listed in {ISSUES_NAME})")
        if converted:
            lines.append(f"converted {len(converted)} non-RGB image{'s' if len(converted) != 1 else ''} to RGB "
                         f"(listed in {ISSUES_NAME})")
        lines.extend(f"warning: {warning}" for warning in self.warnings)
        return "\n".join(lines)


def stuck_foreground_warning(out_dir: Path, rows: Sequence[dict]) -> str | None:
    """A warning when one grid cell is foreground in at least :data:`STUCK_SHARE` of the valid
    labels: the grounding heads then look at the same place whatever the question, usually an
    attention sink the detector missed, and an RPN trained on them learns that place."""
    valid = [row for row in rows if row["valid"]]
    if len(valid) < STUCK_MIN_VALID:
        return None
    counts = None
    for shard in sorted({row["shard"] for row in valid}):
        labels = read_shard(out_dir / shard)[0]["labels"]
        picked = labels[[row["row"] for row in valid if row["shard"] == shard]] == 1
        counts = picked.sum(dim=0) if counts is None else counts + picked.sum(dim=0)
    share = counts.max().item() / len(valid)
    if share < STUCK_SHARE:
        return None
    cell_row, cell_col = divmod(int(counts.argmax()), counts.shape[1])
    return (f"grid cell (row {cell_row}, column {cell_col}) is foreground in {100 * share:.0f}% of the "
            f"{len(valid)} valid labels: the labels do not follow the questions. The heads may be reading an "
            f"attention sink; rank them with `sdrpn heads`, or detect sinks elsewhere (--sink, --sink-layer).")


def records_fingerprint(records: Sequence[Record]) -> str:
    digest = hashlib.sha256()
    for record in records:
        digest.update(json.dumps([record.question_id, record.image, record.question]).encode())
    return digest.hexdigest()


def _check_settings(out_dir: Path, settings: dict) -> None:
    """Record the run's settings, or refuse to mix them with another run's shards."""
    path = out_dir / SETTINGS_NAME
    if path.exists():
        found = _with_unrecorded_defaults(json.loads(path.read_text()), settings)
        if found != settings:
            changed = sorted(_changed_keys(found, settings))
            raise UserError(f"{out_dir} holds labels made with other settings (changed: {', '.join(changed)}); "
                            f"pass another --out, or delete it to start over")
        return
    atomic_write(path, (json.dumps(settings, indent=1) + "\n").encode())


def _with_unrecorded_defaults(settings: dict, expected: dict) -> dict:
    """Settings of a run that did not record its template or geometry, with the ones it used: the
    processor's chat template, and the processor's geometry (taken to be today's)."""
    options = settings.get("options")
    if isinstance(options, dict) and "prompt" not in options:
        settings = {**settings, "options": {**options, "prompt": label_template(settings).to_dict()}}
    if "geometry" not in settings and "geometry" in expected:
        settings = {**settings, "geometry": expected["geometry"]}
    return settings


def _changed_keys(found: dict, expected: dict) -> list[str]:
    """The settings that differ, naming the label options one by one (``options.prompt``)."""
    changed = []
    for key in set(found) | set(expected):
        before, after = found.get(key), expected.get(key)
        if before == after:
            continue
        if key == "options" and isinstance(before, dict) and isinstance(after, dict):
            changed += [f"options.{name}" for name in set(before) | set(after) if before.get(name) != after.get(name)]
        else:
            changed.append(key)
    return changed


def run_label_job(
    labeller: Labeller,
    records: Sequence[Record],
    image_root: str | Path,
    out_dir: str | Path,
    run_settings: dict,
    parse_issues: Sequence[RecordIssue] = (),
    progress: bool = True,
) -> LabelSummary:
    """Label ``records`` into ``out_dir`` with ``labeller``; see the module docstring.

    Args:
        run_settings: what identifies the model and data (the options' own settings are added);
            a resumed run must match it exactly.
        parse_issues: records the reader already rejected; reported in the summary and
            ``issues.jsonl``.

    Must run inside :func:`sdrpn.distributed.process_group` when launched by ``torchrun``.
    """
    out_dir = Path(out_dir)
    image_root = Path(image_root)
    options = labeller.options
    context = distributed.launch_context()
    settings = {"format": SETTINGS_FORMAT, **run_settings, "records": records_fingerprint(records),
                "options": options.label_settings()}
    view = labeller.adapter.labelling_settings()
    if view is not None:  # a view of the family's own (LLaVA's is the processor's: its geometry)
        settings["labelling_view"] = view
    if context.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_temporary_files(out_dir)
        _check_settings(out_dir, settings)
    distributed.barrier()
    if not context.is_main:
        _check_settings(out_dir, settings)

    done = completed_records(out_dir)
    mine = [record for record in distributed.shard(records, context) if record.index not in done]
    summary = LabelSummary(already_done=len(distributed.shard(records, context)) - len(mine))
    skipped_here = _label_records(labeller, mine, image_root, out_dir, options, context, summary, progress)

    distributed.barrier()
    skipped = [issue for part in distributed.gather_objects(skipped_here) for issue in part]
    if context.is_main:
        rows = completed_records(out_dir)
        write_index(out_dir, rows.values())
        converted = [RecordIssue(row["file"], row["line"], f"{row['image_mode']} image converted to RGB",
                                 row["question_id"], action="converted")
                     for row in sorted(rows.values(), key=lambda row: row["record"]) if row["image_mode"] != "RGB"]
        summary.issues = sorted([*parse_issues, *skipped, *converted], key=lambda issue: (issue.file, issue.line))
        atomic_write(out_dir / ISSUES_NAME,
                     "".join(json.dumps(issue.to_dict()) + "\n" for issue in summary.issues).encode())
        summary.total_samples = len(rows)
        summary.total_valid = sum(row["valid"] for row in rows.values())
        stuck = stuck_foreground_warning(out_dir, list(rows.values()))
        summary.warnings = [stuck] if stuck else []
    return summary


class _ShardWriter:
    """This process's labelled samples, written as a shard every ``shard_size`` samples and whenever
    some have waited ``flush_seconds`` since the last shard."""

    def __init__(self, out_dir: Path, rank: int, options: LabelOptions):
        self.out_dir, self.rank, self.options = out_dir, rank, options
        self.sequence = next_sequence(out_dir, rank)
        self.samples: list[LabelledSample] = []
        self.rows: list[dict] = []
        self.written_at = time.monotonic()

    def add(self, sample: LabelledSample, row: dict) -> None:
        self.samples.append(sample)
        self.rows.append(row)
        while len(self.samples) >= self.options.shard_size:
            self.flush(self.options.shard_size)

    def flush_if_due(self) -> None:
        """Write the waiting samples if the last shard is ``flush_seconds`` old (checked per batch)."""
        if time.monotonic() - self.written_at >= self.options.flush_seconds:
            self.flush()

    def flush(self, count: int | None = None) -> None:
        """Write the first ``count`` waiting samples (all by default) as one shard."""
        samples, rows = self.samples[:count], self.rows[:count]
        if not samples:
            return
        tensors = {"grounding": torch.stack([s.grounding for s in samples]),
                   "sink": torch.stack([s.sink for s in samples]),
                   "labels": torch.stack([s.labels for s in samples])}
        if any(s.padding is not None for s in samples):
            tensors["padding"] = torch.stack([s.padding if s.padding is not None else torch.zeros_like(s.sink)
                                              for s in samples])
        write_shard(self.out_dir / shard_name(self.rank, self.sequence), tensors, rows)
        self.sequence += 1
        self.samples, self.rows = self.samples[len(samples):], self.rows[len(samples):]
        self.written_at = time.monotonic()


def _label_records(labeller: Labeller, records: Sequence[Record], image_root: Path, out_dir: Path,
                   options: LabelOptions, context: distributed.Context, summary: LabelSummary,
                   progress: bool) -> list[RecordIssue]:
    """Label this process's records into shards; on Ctrl-C, write what is labelled, then stop with
    :class:`~sdrpn.errors.Interrupted` saying how many samples are saved."""
    from tqdm import tqdm

    bar = tqdm(total=len(records), unit="sample", disable=not progress, dynamic_ncols=True,
               desc="label" if not context.distributed else f"label[rank {context.rank}]",
               position=context.rank if context.distributed else None)
    writer = _ShardWriter(out_dir, context.rank, options)
    skipped: list[RecordIssue] = []
    try:
        _label_batches(labeller, records, image_root, options, summary, writer, skipped, bar)
    except KeyboardInterrupt:
        writer.flush()
        bar.close()
        saved = len(completed_records(out_dir))
        raise Interrupted(f"{saved} labelled samples are saved in {out_dir} ({summary.labelled} of them in this "
                          f"run); rerun the same command to resume") from None
    writer.flush()
    bar.close()
    return skipped


def _label_batches(labeller: Labeller, records: Sequence[Record], image_root: Path, options: LabelOptions,
                   summary: LabelSummary, writer: _ShardWriter, skipped: list[RecordIssue], bar) -> None:
    """Label ``records`` batch by batch into ``writer``, opening each batch's images while the one
    before runs; the records whose image cannot be used are reported and added to ``skipped``."""
    batches = [records[i:i + options.batch_size] for i in range(0, len(records), options.batch_size)]

    def open_view(record):
        image, mode_or_issue = open_record_image(image_root, record)
        if image is None:
            return None, mode_or_issue
        view = labeller.view(image)
        reason = labeller.unusable(view, image.size)
        if reason is not None:
            return None, RecordIssue(record.file, record.line, reason, record.question_id)
        return view, mode_or_issue

    def open_images(batch):
        return [open_view(record) for record in batch]

    with ThreadPoolExecutor(max_workers=4) as pool:
        loading = [pool.submit(open_images, batch) for batch in batches[:1]]
        for number, batch in enumerate(batches):
            loaded = loading.pop(0).result()
            if number + 1 < len(batches):
                loading.append(pool.submit(open_images, batches[number + 1]))
            usable = []
            for record, (image, mode_or_issue) in zip(batch, loaded):
                if image is None:
                    skipped.append(mode_or_issue)
                    report_issue("label", mode_or_issue, bar.write)
                else:
                    usable.append((record, image, mode_or_issue))
            if usable:
                results = labeller.label([view for _, view, _ in usable], [r.question for r, _, _ in usable])
                for (record, _, mode), result in zip(usable, results):
                    row = {"record": record.index, "question_id": record.question_id, "image": record.image,
                           "question": record.question, "answer": result.answer, "valid": result.valid,
                           "file": record.file, "line": record.line, "image_mode": mode}
                    if result.asked is not None:
                        row["asked"] = result.asked  # the question the teacher answered (a rewrite)
                    writer.add(result, row)
                    summary.labelled += 1
                    summary.valid += int(result.valid)
            writer.flush_if_due()
            bar.update(len(batch))
            bar.set_postfix(valid=summary.valid, skipped=len(skipped), refresh=False)


def run_settings_for(model_path: str | Path, adapter: ModelAdapter, data_path: str | Path,
                     image_root: str | Path, max_samples: int | None) -> dict:
    """The model and data facts a resumed run must share with the first one (``sdrpn train``
    reads the image root from them)."""
    return {"model": str(Path(model_path).resolve()), "model_config": adapter.config_fingerprint(),
            "data": str(Path(data_path).resolve()), "image_root": str(Path(image_root).resolve()),
            "max_samples": max_samples, "geometry": adapter.geometry.mode if adapter.geometry is not None else None}
