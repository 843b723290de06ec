"""Adapter for ``transformers.Qwen2_5_VLForConditionalGeneration`` (Qwen2.5-VL 3B/7B/32B/72B).

What differs from LLaVA, all of it kept in this file:

* the vision input is two processor outputs, ``pixel_values`` (patches of every image, packed) and
  ``image_grid_thw``; an image's token count follows its size (2 x 2 patches merge into a token);
* a prompt frames the image as ``<|vision_start|> <|image_pad|> x n <|vision_end|>``;
* positions are 3-D (M-RoPE): an image token at row r, column c of its grid sits at
  ``start + (0, r, c)``, and text after the image continues from ``start + max(rows, cols)``, so
  the rotary positions run ahead of (or behind) the layers' positions by a per-row delta.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import LanguageModelAdapter, ModelInputs, default_position_ids
from .qwen_geometry import QwenViewGeometry

__all__ = ["Qwen2_5_VLAdapter"]

VISION_INPUTS = ("pixel_values", "image_grid_thw")


class Qwen2_5_VLAdapter(LanguageModelAdapter):
    """Drives a Qwen2.5-VL model: windowed ViT with 2 x 2 merging, Qwen2 decoder with M-RoPE.

    One image per sample. The RPN head applies M-RoPE to its q/k, as the authors' Qwen2.5-VL RPN.
    """

    family = "qwen2_5_vl"
    rpn_uses_rope = True
    rpn_uses_final_norm = False  # the authors' Qwen2.5-VL head reads layer K+T-1's input norm only
    default_prompt_template = "processor"
    vision_input_names = VISION_INPUTS
    derived_input_names = ("mm_token_type_ids",)  # image tokens are read from input_ids

    def __init__(self, model: nn.Module, processor=None, roi_layout: str = "nested"):
        """``roi_layout``: where stage 2 puts the RoI block ``<|vision_start|> RoI <|vision_end|>``:
        "nested" (default) inside the original image's block, before its ``<|vision_end|>``, as the
        authors' release does (``insert_sub_feat``, ``Qwen2.5-VL/qwen_src/mm_utils.py`` ~1140-1199),
        so that their checkpoints reproduce their numbers; "separate" after it, two sibling image
        blocks as the processor lays out two images (what the model saw in training)."""
        super().__init__(model, processor)
        if roi_layout not in ("nested", "separate"):
            raise ValueError(f"roi_layout must be 'nested' or 'separate', got {roi_layout!r}")
        self.roi_layout = roi_layout
        self.prefix_tail = 1 if roi_layout == "separate" else 0
        config = model.config
        self.vision_start_token_id = config.vision_start_token_id
        self.vision_end_token_id = config.vision_end_token_id
        self.merge_size = config.vision_config.spatial_merge_size
        # One token covers merge x merge patches: 28 pixels a side for Qwen2.5-VL.
        self.cell_size = config.vision_config.patch_size * self.merge_size
        # The authors label and train on square 24 x 24-token views (576 * 28 * 28 pixels).
        self.image_grid = (24, 24)
        self.vision_input_size = (self.image_grid[0] * self.cell_size, self.image_grid[1] * self.cell_size)
        self.geometry = None
        self.view_geometry = QwenViewGeometry(cell=self.cell_size)  # the processor's aspect-keeping views

    @staticmethod
    def set_processor_geometry(processor, mode: str) -> bool:
        raise ValueError("Qwen2.5-VL views keep the image's aspect ratio (smart resize); there is no "
                         f"{mode!r} geometry to set")

    # -- vision ------------------------------------------------------------------------------------

    def encode_images(self, pixel_values) -> list[torch.Tensor]:
        """Per image, (n_i, hidden) tokens projected to the language model, from the vision input
        (a dict with ``pixel_values`` and ``image_grid_thw``)."""
        output = self.vision_tower_output(pixel_values)
        features = output.pooler_output if hasattr(output, "pooler_output") else output
        if isinstance(features, torch.Tensor):  # one tensor for all images: split by token counts
            grid = pixel_values["image_grid_thw"]
            features = features.split((grid.prod(dim=-1) // self.merge_size**2).tolist())
        return [feature.to(device=self.device, dtype=self.dtype) for feature in features]

    def vision_tower_output(self, vision_input):
        """What ``get_image_features`` returns for a vision input (a dict of :data:`VISION_INPUTS`),
        run where the vision tower's weights are."""
        if not isinstance(vision_input, dict) or set(vision_input) != set(VISION_INPUTS):
            raise ValueError(f"the {self.family} vision input is a dict of {VISION_INPUTS}, the processor's outputs")
        parameter = next(self.model.model.visual.parameters())
        return self.model.model.get_image_features(
            vision_input["pixel_values"].to(device=parameter.device, dtype=parameter.dtype),
            vision_input["image_grid_thw"].to(parameter.device))

    # -- language model ----------------------------------------------------------------------------

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values=None,
        attention_mask: torch.Tensor | None = None,
        image_features: list[torch.Tensor] | None = None,
        validate: bool = True,
    ) -> ModelInputs:
        input_ids, is_image, attention_mask = self.prompt_on_device(input_ids, attention_mask)
        batch, length = input_ids.shape
        if pixel_values is None:
            raise ValueError("embed needs the vision input (pixel_values and image_grid_thw) for the image positions")
        grid_thw = pixel_values["image_grid_thw"].to(self.device)
        if image_features is None:
            image_features = self.encode_images(pixel_values)
        image_lengths = is_image.sum(dim=1)
        if validate:
            self.check_image_tokens(is_image, grid_thw, image_features)
        embeds = self.embed_ids(input_ids)
        features = torch.cat(list(image_features)).to(embeds.dtype)
        embeds = embeds.masked_scatter(is_image[..., None], features)
        rope, delta = self.model.model.get_rope_index(
            input_ids, mm_token_type_ids=is_image.int(), image_grid_thw=grid_thw, attention_mask=attention_mask.long())
        positions = torch.arange(length, device=self.device)
        return ModelInputs(
            inputs_embeds=embeds,
            position_ids=default_position_ids(attention_mask),
            attention_mask=attention_mask,
            image_start=torch.where(is_image, positions, length).amin(dim=1),
            image_length=int(image_lengths.max()) if validate else 0,
            rope_position_ids=rope,
            rope_delta=delta.reshape(batch).to(self.device),
            image_lengths=image_lengths,
        )

    def check_image_tokens(self, is_image: torch.Tensor, grid_thw: torch.Tensor, features) -> None:
        """Raises ValueError unless row i holds one contiguous run of image i's token count."""
        counts = is_image.sum(dim=1).tolist()
        expected = [int(feature.shape[0]) for feature in features]
        if len(expected) != len(counts):
            raise ValueError(f"got {len(expected)} images for {len(counts)} prompts; one image per prompt")
        for row, (count, wanted) in enumerate(zip(counts, expected)):
            start = int(is_image[row].int().argmax())
            if count != wanted or not bool(is_image[row, start:start + count].all()):
                raise ValueError(f"prompt {row} must hold its image as {wanted} contiguous image tokens "
                                 f"(id {self.image_token_id}), found {count}; build prompts with the model's processor")

    # -- views of their own size ---------------------------------------------------------------------

    # The authors' Qwen2.5-VL inference: masked upscaling of the box around the whole mask,
    # threshold 0.25, edge sinks of large maps zeroed, original tokens no question token looks at
    # dropped above 1024 tokens (Qwen2.5-VL/qwen_src/mm_utils.py ~946-990, modeling_qwen2_5_vl.py
    # ~1095, ~1338-1376).
    roi_defaults = {"strategy": "masked", "edge_sink_above": 768, "prune_above": 1024, "prune_threshold": 0.01}
    default_threshold = 0.25
    roi_views_on_device = False  # the processor sizes each crop by its own pixel budget
    per_benchmark_thresholds = False  # their per-benchmark values never reach the model (0.25 is fixed)
    # Their heads differ by size (3B, 7B) and image kind (text, natural): --heads must say which.
    default_label_heads = None
    default_label_rules = "qwen2.5-vl"
    default_sink_preset = "qwen2.5-vl-7b-text"  # their text labels: no sink heads (natural: --sink-preset)
    rpn_depth_presets = {28: "qwen2.5-vl-7b", 36: "qwen2.5-vl-3b"}

    @property
    def roi_block_ids(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The RoI view is framed as its own ``<|vision_start|> ... <|vision_end|>`` block."""
        return (self.vision_start_token_id,), (self.vision_end_token_id,)

    def view_grids(self, vision_input) -> list[tuple[int, int]]:
        grid = vision_input["image_grid_thw"]
        return [(int(h) // self.merge_size, int(w) // self.merge_size) for _, h, w in grid.tolist()]

    def select_view(self, vision_input, index: int):
        grid = vision_input["image_grid_thw"]
        patches = grid.prod(dim=-1).tolist()
        start = sum(patches[:index])
        return {"pixel_values": vision_input["pixel_values"][start : start + patches[index]],
                "image_grid_thw": grid[index : index + 1]}

    def encode_views(self, vision_input) -> list[torch.Tensor]:
        return self.encode_images(vision_input)

    def image_rope_positions(self, base: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """An image token at (row, col) sits at ``base + (0, row, col)`` (one temporal step)."""
        base = base[:, None].expand_as(rows)
        return torch.stack([base, base + rows, base + cols])

    def image_rope_advance(self, grids: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """Text after a view continues from its start + max(rows, cols), whatever tokens were kept."""
        return grids.amax(dim=1)

    def sequence_rope_positions(self, input_ids: torch.Tensor, grids: list[tuple[int, int]],
                                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        input_ids = input_ids.to(self.device)
        grid_thw = torch.tensor([[1, rows * self.merge_size, cols * self.merge_size] for rows, cols in grids],
                                device=self.device)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(self.device).long()
        rope, _ = self.model.model.get_rope_index(
            input_ids, mm_token_type_ids=(input_ids == self.image_token_id).int(), image_grid_thw=grid_thw,
            attention_mask=mask)
        return rope

    def roi_source_rects(self, regions: torch.Tensor, grids: torch.Tensor, sources) -> torch.Tensor:
        """The authors' mapping of a grid box to the source pixels their crop receives (float32,
        clamped, truncated; :meth:`~sdrpn.models.qwen_geometry.QwenViewGeometry.grid_boxes_to_source`),
        kept at least a pixel wide where theirs would be empty."""
        sizes = sources.sizes.to(regions.device)
        boxes = self.view_geometry.grid_boxes_to_source(regions, sizes, grids.to(regions.device), validate=False)
        x0, y0 = torch.minimum(boxes[:, 0], sizes[:, 0] - 1), torch.minimum(boxes[:, 1], sizes[:, 1] - 1)
        x1, y1 = torch.maximum(boxes[:, 2], x0 + 1), torch.maximum(boxes[:, 3], y0 + 1)
        return torch.stack([x0, y0, x1 - x0, y1 - y0], dim=1)

    def roi_vision_input(self, crops, image_processor):
        """The crops as the processor encodes any image, at its own min/max pixels (the authors
        encode the RoI this way, ``mm_utils.py`` ~973-978)."""
        return dict(image_processor(images=list(crops), return_tensors="pt"))

    # -- the peer methods' views -------------------------------------------------------------------

    # ViCrop's layer for Qwen2.5-VL-7B (``ATT_LAYER = 22`` of 28 in its ``qwen2_5_methods.py``).
    vicrop_attention_layer = (22, 28)

    @property
    def vicrop_window(self) -> tuple[int, int]:
        """ViCrop's unit window: 16 cells a side, the square view of the 256-token budget that ViCrop
        runs Qwen2.5-VL at (``max_pixels = 256 * 28 * 28``); windows span 1 to 2 of it."""
        return (16 * self.cell_size, 16 * self.cell_size)

    def source_cell_sizes(self, grids: list[tuple[int, int]], images) -> list[tuple[float, float]]:
        """The processor's view is the whole image resized to the grid: a cell is its size over the grid."""
        return [(image.size[0] / cols, image.size[1] / rows) for (rows, cols), image in zip(grids, images)]

    def scaled_vision_input(self, sources, grids: list[tuple[int, int]], factor: int, image_processor):
        """Each image processed at ``factor``^2 times the pixels of its view in the prompt (``min_pixels
        = max_pixels``, so smart resize lands near ``factor`` times each side): a larger pixel budget,
        the way this family scales resolution."""
        views, processors = [], {}  # one processor copy per budget: rows of a batch often share a grid
        for image, (rows, cols) in zip(sources.images, grids):
            budget = factor**2 * rows * cols * self.cell_size**2
            if budget not in processors:
                processors[budget] = self.budgeted_image_processor(image_processor, budget, budget)
            views.append(processors[budget](images=[image], return_tensors="pt"))
        return {name: torch.cat([view[name] for view in views]) for name in VISION_INPUTS}

    def crop_vision_input(self, boxes: torch.Tensor, grids: list[tuple[int, int]], sources, image_processor):
        """The source rectangles of the grid boxes (the RoI view's mapping), cut from the PIL images and
        encoded by the processor at its own pixel budget, as the RoI view is."""
        rects = self.roi_source_rects(boxes, torch.tensor(grids, device=boxes.device), sources)
        pictures = [image.crop((x0, y0, x0 + width, y0 + height))
                    for image, (x0, y0, width, height) in zip(sources.images, rects.tolist())]
        return self.roi_vision_input(pictures, image_processor), rects

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor):
        if position_ids.ndim == 2:  # text only: the same position on every axis
            position_ids = position_ids[None].expand(3, *position_ids.shape)
        return self.rotary_emb(hidden, position_ids)

    def text_rope_positions(self, position_ids: torch.Tensor, rope_delta: torch.Tensor | None) -> torch.Tensor | None:
        shifted = position_ids if rope_delta is None else position_ids + rope_delta.to(position_ids.device)[:, None]
        return shifted[None].expand(3, *shifted.shape)

    # -- the labelling view (``sdrpn label``, ``sdrpn heads``, ``sdrpn train``) ---------------------
    #
    # The authors label (and train) on the image pasted on a grey (127) square, processed at
    # min_pixels = max_pixels = 576 * 28 * 28 (make_pseudo_label_{textual,natural}.py ~58-71,
    # qwenvl/data/data_qwen.py 244-251): a 24 x 24 grid for most sizes, 23 x 23 or 25 x 25 for about 5%
    # (smart_resize's float arithmetic; see sdrpn.models.qwen_geometry). Their padding cells
    # (get_foreground_mask) are known background under their label rules.

    @property
    def labelling_geometry(self) -> QwenViewGeometry:
        """The square labelling view's geometry: ``image_grid`` cells a side at the family's cell size."""
        rows, cols = self.image_grid
        if rows != cols:
            raise ValueError(f"the square labelling view needs a square image_grid, got {self.image_grid}")
        return QwenViewGeometry.authors_square(cell=self.cell_size, side_cells=rows)

    def labelling_view(self, image):
        """The image pasted on a grey square (``expand2square``: centred on the short axis), the grid the
        labelling processor makes of that square, and the authors' padding cells of it."""
        from PIL import Image

        from .base import LabellingView
        from .qwen_geometry import AUTHORS_PAD_COLOR

        geometry = self.labelling_geometry
        image = image if image.mode == "RGB" else image.convert("RGB")
        (side, _), offset = geometry.canvas(image.size)
        square = image
        if image.size != (side, side):
            square = Image.new("RGB", (side, side), AUTHORS_PAD_COLOR)
            square.paste(image, offset)
        return LabellingView(square, geometry.grid(image.size), geometry.padding_cells(image.size))

    def labelling_processor(self, processor):
        """A copy of ``processor`` whose image processor resizes to the labelling budget
        (``min_pixels = max_pixels``); ``processor`` itself is left as it is."""
        import copy

        if processor is None:
            return None
        geometry = self.labelling_geometry
        image_processor = getattr(processor, "image_processor", processor)
        budgeted = self.budgeted_image_processor(image_processor, geometry.min_pixels, geometry.max_pixels)
        if processor is not image_processor:  # a processor: a copy holding the budgeted image processor
            processor = copy.copy(processor)
            processor.image_processor = budgeted
            return processor
        return budgeted

    def budgeted_image_processor(self, image_processor, min_pixels: int, max_pixels: int):
        """A copy of ``image_processor`` that sizes views to ``min_pixels..max_pixels``."""
        import copy

        budgeted = copy.deepcopy(image_processor)
        size = getattr(budgeted, "size", None)
        entries = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
        if size is None or isinstance(size, dict):
            budgeted.size = {**(size or {}), **entries}
        else:  # transformers' SizeDict
            budgeted.size = type(size)(**{**{k: v for k, v in vars(size).items() if v is not None}, **entries})
        for name, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
            if getattr(budgeted, name, None) is not None:  # the attributes older processors read
                setattr(budgeted, name, value)
        found = QwenViewGeometry.from_image_processor(budgeted, cell=self.cell_size)
        if (found.min_pixels, found.max_pixels) != (min_pixels, max_pixels):
            raise ValueError(f"cannot set the pixel budget of {type(image_processor).__name__}: it reads "
                             f"{found.min_pixels}..{found.max_pixels} pixels")
        return budgeted

    def labelling_settings(self) -> dict:
        geometry = self.labelling_geometry
        from .qwen_geometry import AUTHORS_PAD_COLOR

        return {"view": "square", "pad_color": list(AUTHORS_PAD_COLOR), "min_pixels": geometry.min_pixels,
                "max_pixels": geometry.max_pixels, "grid": list(self.image_grid)}
