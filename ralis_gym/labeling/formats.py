"""Annotation tools' file formats: Label Studio JSON, CVAT for images 1.1 XML and plain PNG masks.

Pure functions on numpy arrays (no database, no network). Two directions:

* out, for the annotators: :func:`label_studio_tasks` / :func:`label_studio_config` and
  :func:`cvat_xml` turn the requested regions (axis-aligned boxes ``[x, y, w, h]`` in pixels) into
  tasks whose pre-annotation shows each region as a ``region-to-label`` rectangle and, optionally,
  the model's predicted classes inside the regions (brush masks / CVAT masks) to correct;
* in, from the annotators: :func:`parse_label_studio_export`, :func:`parse_cvat_xml` and
  :func:`read_png_masks` return one ``uint8`` label map ``[H, W]`` per image with the class ids that
  were painted and ``ignore_index`` everywhere else. Keeping only the requested regions is the
  caller's job (``LabelingProject.import_annotations``).

Conventions. Shapes are rasterized with pixel ``(row i, col j)`` covering ``[j, j+1) x [i, i+1)`` of the
tools' continuous image coordinates; a pixel belongs to a polygon when its centre ``(j + 0.5, i + 0.5)``
is inside or on it. Overlaps: the later shape wins (Label Studio: later annotations by ``updated_at``,
then ``id``, and later results within an annotation; CVAT: higher ``z_order``, then document order).
Brush masks count a pixel as painted when its alpha is at least 128.

Every malformed input raises :class:`AnnotationFormatError` (a :class:`~ralis_gym.errors.DatasetError`)
naming the task / image and the problem.
"""

from __future__ import annotations

import math
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse
from xml.sax.saxutils import escape, quoteattr

import cv2
import numpy as np

from ralis_gym.errors import ConfigError, DatasetError

__all__ = [
    "AnnotationFormatError",
    "BRUSH_NAME",
    "IMAGE_NAME",
    "POLYGON_NAME",
    "REGION_LABEL",
    "REGION_NAME",
    "brush_decode",
    "brush_encode",
    "brush_mask_rle",
    "class_colors",
    "cvat_rle_decode",
    "cvat_rle_encode",
    "cvat_xml",
    "label_studio_config",
    "label_studio_tasks",
    "parse_cvat_xml",
    "parse_label_studio_export",
    "read_png_masks",
]

#: names of the Label Studio control tags in :func:`label_studio_config`
IMAGE_NAME = "image"
BRUSH_NAME = "label"
POLYGON_NAME = "polygon"
REGION_NAME = "region"
#: the label of the hint rectangles (Label Studio) and boxes (CVAT) that mark a requested region
REGION_LABEL = "region-to-label"
REGION_COLOR = "#ffd700"
MODEL_VERSION = "ralis-gym"
#: Label Studio result types that carry no pixels (skipped on import)
_LS_NON_PIXEL_TYPES = {
    "choices",
    "textarea",
    "rating",
    "relation",
    "taxonomy",
    "number",
    "datetime",
    "pairwise",
}
_CVAT_OTHER_SHAPES = ("polyline", "points", "ellipse", "cuboid", "skeleton")
#: colours for the classes (cycled), hex RGB; the region hint uses REGION_COLOR
_PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94",
    "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5",
)  # fmt: skip

# Label Studio brush RLE parameters (label_studio_converter.brush.encode_rle defaults)
_LS_WORD = 8
_LS_RLE_SIZES = (3, 4, 8, 16)


class AnnotationFormatError(DatasetError):
    """An annotation file is malformed or does not fit the project (message names where and what)."""


# --------------------------------------------------------------------------------------------------
# Label Studio brush RLE (the bit-packed RLE of @thi.ng/rle-pack that Label Studio's brush uses)
# --------------------------------------------------------------------------------------------------


def brush_encode(values: np.ndarray) -> list[int]:
    """Label Studio brush RLE of a flat uint8 array (an ``[H, W, 4]`` RGBA mask, flattened).

    Byte for byte what ``label_studio_converter.brush.encode_rle`` produces: a 32-bit value count,
    5 bits word size - 1 (7), four 4-bit run-size classes - 1 (3, 4, 8, 16 bits), then one token per
    run of equal values: runs of 1 as a literal (``0 00 000 value``), longer runs as a repeat
    (``1 class length-1 value``), runs over 65536 split into 65536-value pieces; zero-padded to whole
    bytes (a whole zero byte when already aligned). Returns the bytes as a list of ints.
    """
    arr = np.asarray(values)
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise ValueError("brush RLE encodes 8-bit values (0..255)")
    arr = arr.astype(np.uint8, copy=False)
    n = int(arr.size)
    header = [(n, 32), (_LS_WORD - 1, 5)] + [(s - 1, 4) for s in _LS_RLE_SIZES]
    head_codes = np.array([c for c, _ in header], dtype=np.uint64)
    head_bits = np.array([b for _, b in header], dtype=np.int64)
    if n:
        starts = np.flatnonzero(np.r_[True, arr[1:] != arr[:-1]])
        lengths = np.diff(np.r_[starts, n]).astype(np.int64)
        vals = arr[starts].astype(np.uint64)
        long = lengths > 256
        # runs longer than 256 use the 16-bit class; over 65536 they are split into 65536-pieces
        pieces = np.where(long, (lengths - 1) // 65536 + 1, 1)
        tok_run = np.repeat(np.arange(len(lengths)), pieces)
        first = np.cumsum(pieces) - pieces  # index of each run's first token
        k = np.arange(len(tok_run)) - first[tok_run]  # piece number within its run
        is_last = k == pieces[tok_run] - 1
        tok_len = np.where(is_last, lengths[tok_run] - 65536 * k, 65536)
        tok_long = long[tok_run]
        cls = np.select([tok_long, tok_len <= 8, tok_len <= 16], [3, 0, 1], default=2)
        size = np.asarray(_LS_RLE_SIZES, dtype=np.int64)[cls]
        # a run of one is a literal of one value (but a long run's last piece is always a repeat)
        flag = ((tok_len > 1) | tok_long).astype(np.uint64)
        width = 3 + size + _LS_WORD
        code = (
            (flag << (width - 1).astype(np.uint64))
            | (cls.astype(np.uint64) << (size + _LS_WORD).astype(np.uint64))
            | ((tok_len - 1).astype(np.uint64) << np.uint64(_LS_WORD))
            | vals[tok_run]
        )
        codes = np.r_[head_codes, code]
        widths = np.r_[head_bits, width]
    else:
        codes, widths = head_codes, head_bits
    bits = _bits_of(codes, widths)
    pad = 8 - len(bits) % 8  # the converter always pads, a whole byte when aligned
    bits = np.r_[bits, np.zeros(pad, dtype=np.uint8)]
    return np.packbits(bits).tolist()


def _bits_of(codes: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Concatenate the ``widths[i]`` low bits of ``codes[i]``, most significant first."""
    tok = np.repeat(np.arange(len(codes)), widths)
    offsets = np.cumsum(widths) - widths
    pos = np.arange(int(widths.sum())) - offsets[tok]
    shift = (widths[tok] - 1 - pos).astype(np.uint64)
    return ((codes[tok] >> shift) & np.uint64(1)).astype(np.uint8)


def brush_decode(rle: Sequence[int]) -> np.ndarray:
    """Decode a Label Studio brush RLE into the flat uint8 array it encodes (``decode_rle``).

    Raises ``ValueError`` when the data is not a valid RLE (not bytes, truncated, word size other
    than 8 bits, runs past the declared length).
    """
    try:
        data = np.asarray(rle)
        if data.ndim != 1 or data.size < 7 or not np.issubdtype(data.dtype, np.integer):
            raise ValueError("not a list of at least 7 byte values")
        if data.min() < 0 or data.max() > 255:
            raise ValueError("byte values outside 0..255")
    except (TypeError, OverflowError) as exc:
        raise ValueError(f"not a list of byte values ({exc})") from None
    bits = (np.unpackbits(data.astype(np.uint8)) + 48).tobytes().decode("ascii")
    total = len(bits)
    pos = 0

    def read(k: int) -> int:
        nonlocal pos
        if pos + k > total:
            raise ValueError(f"truncated: needs {pos + k} bits, has {total}")
        v = int(bits[pos : pos + k], 2)
        pos += k
        return v

    num = read(32)
    word = read(5) + 1
    sizes = [read(4) + 1 for _ in range(4)]
    if word != 8:
        raise ValueError(f"word size {word} bits; Label Studio brushes use 8")
    values: list[int] = []
    counts: list[int] = []
    i = 0
    while i < num:
        flag = read(1)
        n = 1 + read(sizes[read(2)])
        if i + n > num:
            raise ValueError(f"a run of {n} values at {i} passes the declared length {num}")
        if flag:
            values.append(read(word))
            counts.append(n)
        else:
            for _ in range(n):
                values.append(read(word))
                counts.append(1)
        i += n
    return np.repeat(np.asarray(values, dtype=np.uint8), np.asarray(counts, dtype=np.int64))


def brush_mask_rle(mask: np.ndarray) -> list[int]:
    """The brush RLE of a boolean ``[H, W]`` mask as Label Studio stores it (RGBA, 255 where painted)."""
    gray = np.asarray(mask, dtype=bool).astype(np.uint8) * np.uint8(255)
    return brush_encode(np.repeat(gray.reshape(-1), 4))


# --------------------------------------------------------------------------------------------------
# CVAT mask RLE (row-major over the mask's box, counts alternating 0-runs and 1-runs, 0-run first)
# --------------------------------------------------------------------------------------------------


def cvat_rle_encode(mask: np.ndarray) -> list[int]:
    """CVAT's mask RLE of a boolean ``[h, w]`` mask (cvat-core ``mask2Rle``): run lengths of the
    row-major flattened mask, alternating 0 and 1 and starting with the (possibly empty) 0-run."""
    flat = np.asarray(mask, dtype=bool).reshape(-1)
    if flat.size == 0:
        return []
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.r_[0, change, flat.size])
    if flat[0]:
        counts = np.r_[0, counts]
    return counts.astype(np.int64).tolist()


def cvat_rle_decode(counts: Sequence[int], width: int, height: int) -> np.ndarray:
    """Boolean ``[height, width]`` mask of a CVAT RLE (cvat-core ``rle2Mask``; missing tail = 0)."""
    c = np.asarray(counts, dtype=np.int64).reshape(-1)
    if c.size and c.min() < 0:
        raise ValueError("negative run length")
    if int(c.sum()) > width * height:
        raise ValueError(f"runs cover {int(c.sum())} pixels, the mask box has {width}x{height}")
    flat = np.repeat((np.arange(c.size) % 2).astype(bool), c)
    out = np.zeros(width * height, dtype=bool)
    out[: flat.size] = flat
    return out.reshape(height, width)


# --------------------------------------------------------------------------------------------------
# Out: Label Studio tasks and config, CVAT XML
# --------------------------------------------------------------------------------------------------


def class_colors(class_names: Sequence[str]) -> list[str]:
    """The ``#rrggbb`` colour of each class in the tools' label lists (a fixed palette, cycled)."""
    return [_PALETTE[i % len(_PALETTE)] for i in range(len(class_names))]


def _check_classes(class_names: Sequence[str]) -> list[str]:
    names = [str(c) for c in class_names]
    if not names:
        raise ConfigError("class_names is empty")
    if len(set(names)) != len(names):
        raise ConfigError(f"class_names has duplicates: {names}")
    if REGION_LABEL in names:
        raise ConfigError(f"{REGION_LABEL!r} is reserved for the region hint and cannot be a class name")
    return names


def label_studio_config(class_names: Sequence[str], colors: Sequence[str] | None = None) -> str:
    """Labeling config XML: the image, a brush and a polygon tool with one label per class, and the
    ``region-to-label`` rectangles that show which regions to paint."""
    names = _check_classes(class_names)
    colors = list(colors) if colors is not None else class_colors(names)
    labels = "\n".join(
        f"    <Label value={quoteattr(n)} background={quoteattr(c)}/>" for n, c in zip(names, colors)
    )
    return (
        "<View>\n"
        f'  <Header value="Paint every pixel inside the {REGION_LABEL} boxes; pixels outside them are ignored"/>\n'
        f'  <Image name="{IMAGE_NAME}" value="${IMAGE_NAME}" zoom="true" zoomControl="true"/>\n'
        f'  <BrushLabels name="{BRUSH_NAME}" toName="{IMAGE_NAME}">\n{labels}\n  </BrushLabels>\n'
        f'  <PolygonLabels name="{POLYGON_NAME}" toName="{IMAGE_NAME}" opacity="0.5" strokeWidth="2">\n'
        f"{labels}\n  </PolygonLabels>\n"
        f'  <RectangleLabels name="{REGION_NAME}" toName="{IMAGE_NAME}" opacity="0.1" strokeWidth="3">\n'
        f"    <Label value={quoteattr(REGION_LABEL)} background={quoteattr(REGION_COLOR)}/>\n"
        "  </RectangleLabels>\n"
        "</View>\n"
    )


def _check_request(req: Mapping[str, Any], k: int) -> tuple[str, int, int, list[dict[str, Any]]]:
    try:
        name = str(req["image"])
        w, h = int(req["width"]), int(req["height"])
        regions = [{"id": str(r["id"]), "box": [int(v) for v in r["box"]]} for r in req["regions"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(
            f"request #{k}: needs image, width, height and regions [{{id, box: [x, y, w, h]}}] ({exc!r})"
        ) from None
    for r in regions:
        x, y, bw, bh = r["box"] if len(r["box"]) == 4 else (0, 0, 0, 0)
        if bw <= 0 or bh <= 0 or x < 0 or y < 0 or x + bw > w or y + bh > h:
            raise ValueError(f"request {name!r}: region {r['id']} box {r['box']} is not inside {w}x{h}")
    return name, w, h, regions


def _region_mask(regions: list[dict[str, Any]], w: int, h: int) -> np.ndarray:
    inside = np.zeros((h, w), dtype=bool)
    for r in regions:
        x, y, bw, bh = r["box"]
        inside[y : y + bh, x : x + bw] = True
    return inside


def _prediction_for(predictions: Mapping[str, np.ndarray], name: str, w: int, h: int) -> np.ndarray:
    if name not in predictions:
        raise ValueError(f"predictions has no class map for image {name!r}")
    pred = np.asarray(predictions[name])
    if pred.shape != (h, w):
        raise ValueError(f"prediction for {name!r} has shape {pred.shape}, the image is {h}x{w} (HxW)")
    return pred


def label_studio_tasks(
    requests: Sequence[Mapping[str, Any]],
    class_names: Sequence[str],
    image_url: Callable[[str], str],
    predictions: Mapping[str, np.ndarray] | None = None,
) -> list[dict[str, Any]]:
    """One Label Studio task per image with requested regions (JSON-ready dicts).

    ``requests``: ``[{"image": name, "width": W, "height": H, "regions": [{"id", "box": [x, y, w, h]}]}]``.
    A task's ``data`` holds ``image`` (``image_url(name)``), ``name`` and ``regions`` (ids and boxes,
    so an export can be matched back); its one prediction holds a ``region-to-label`` rectangle per
    region and, with ``predictions`` (name -> ``uint8 [H, W]`` class map), one brush result per class
    predicted inside the regions (pixels outside them are not pre-annotated).
    """
    names = _check_classes(class_names)
    tasks = []
    for k, req in enumerate(requests):
        name, w, h, regions = _check_request(req, k)
        if not regions:
            continue
        common = {"to_name": IMAGE_NAME, "original_width": w, "original_height": h, "image_rotation": 0}
        result: list[dict[str, Any]] = []
        for j, r in enumerate(regions):
            x, y, bw, bh = r["box"]
            result.append({
                "id": f"region-{j}", "type": "rectanglelabels", "from_name": REGION_NAME, **common,
                "value": {
                    "x": 100.0 * x / w, "y": 100.0 * y / h, "width": 100.0 * bw / w,
                    "height": 100.0 * bh / h, "rotation": 0, "rectanglelabels": [REGION_LABEL],
                },
            })  # fmt: skip
        if predictions is not None:
            pred = _prediction_for(predictions, name, w, h)
            inside = _region_mask(regions, w, h)
            present = np.unique(pred[inside])
            for c in present.tolist():
                if not 0 <= c < len(names):
                    continue  # an ignore / void prediction is not pre-annotated
                mask = inside & (pred == c)
                result.append({
                    "id": f"pred-{c}", "type": "brushlabels", "from_name": BRUSH_NAME, **common,
                    "value": {"format": "rle", "rle": brush_mask_rle(mask), "brushlabels": [names[c]]},
                })  # fmt: skip
        tasks.append({
            "data": {IMAGE_NAME: image_url(name), "name": name, "regions": regions},
            "predictions": [{"model_version": MODEL_VERSION, "result": result}],
        })  # fmt: skip
    return tasks


def cvat_xml(
    requests: Sequence[Mapping[str, Any]],
    class_names: Sequence[str],
    predictions: Mapping[str, np.ndarray] | None = None,
    task_name: str = "ralis-gym",
) -> str:
    """CVAT for images 1.1 XML (to upload as annotations of a task holding the images).

    ``<meta>`` lists the classes and the ``region-to-label`` label (a ``region_id`` text attribute);
    each image gets one ``<box label="region-to-label">`` per requested region and, with
    ``predictions``, one ``<mask>`` per class predicted inside the regions (CVAT's RLE over the
    mask's tight box, ``left``/``top``/``width``/``height`` in pixels).
    """
    names = _check_classes(class_names)
    colors = class_colors(names)
    items = [_check_request(req, k) for k, req in enumerate(requests)]
    items = [it for it in items if it[3]]
    out = ['<?xml version="1.0" encoding="utf-8"?>', "<annotations>", "  <version>1.1</version>", "  <meta>"]
    out += ["    <task>", f"      <name>{escape(task_name)}</name>", f"      <size>{len(items)}</size>"]
    out += ["      <mode>annotation</mode>", "      <overlap>0</overlap>", "      <flipped>False</flipped>"]
    out.append("      <labels>")
    for n, c in zip(names, colors):
        out.append(
            f"        <label><name>{escape(n)}</name><color>{c}</color><type>any</type><attributes/></label>"
        )
    out.append(
        f"        <label><name>{REGION_LABEL}</name><color>{REGION_COLOR}</color><type>rectangle</type>"
        "<attributes><attribute><name>region_id</name><mutable>False</mutable><input_type>text</input_type>"
        "<default_value></default_value><values></values></attribute></attributes></label>"
    )
    out += ["      </labels>", "    </task>", "  </meta>"]
    for k, (name, w, h, regions) in enumerate(items):
        out.append(f'  <image id="{k}" name={quoteattr(name)} width="{w}" height="{h}">')
        for r in regions:
            x, y, bw, bh = r["box"]
            out.append(
                f'    <box label="{REGION_LABEL}" source="auto" occluded="0" xtl="{x:.2f}" ytl="{y:.2f}" '
                f'xbr="{x + bw:.2f}" ybr="{y + bh:.2f}" z_order="0">'
                f'<attribute name="region_id">{escape(r["id"])}</attribute></box>'
            )
        if predictions is not None:
            pred = _prediction_for(predictions, name, w, h)
            inside = _region_mask(regions, w, h)
            for c in np.unique(pred[inside]).tolist():
                if not 0 <= c < len(names):
                    continue
                mask = inside & (pred == c)
                ys, xs = np.nonzero(mask)
                top, left = int(ys.min()), int(xs.min())
                crop = mask[top : int(ys.max()) + 1, left : int(xs.max()) + 1]
                rle = ", ".join(map(str, cvat_rle_encode(crop)))
                out.append(
                    f'    <mask label={quoteattr(names[c])} source="auto" occluded="0" rle="{rle}" '
                    f'left="{left}" top="{top}" width="{crop.shape[1]}" height="{crop.shape[0]}" z_order="0">'
                    "</mask>"
                )
        out.append("  </image>")
    out.append("</annotations>")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------------
# In: shared helpers
# --------------------------------------------------------------------------------------------------


def _check_sizes(sizes: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, int]]:
    return {str(n): (int(s[0]), int(s[1])) for n, s in sizes.items()}


def _class_index(class_names: Sequence[str]) -> dict[str, int]:
    return {str(n): i for i, n in enumerate(class_names)}


def _check_ignore(class_names: Sequence[str], ignore_index: int) -> int:
    ignore = int(ignore_index)
    if 0 <= ignore < len(class_names) or not 0 <= ignore <= 255:
        raise ConfigError(
            f"ignore_index {ignore} must be a uint8 value outside the class ids 0..{len(class_names) - 1}"
        )
    return ignore


def _resolve_name(candidates: Sequence[str], sizes: Mapping[str, Any]) -> str | None:
    """The first candidate that names an image in ``sizes`` exactly, else by its file name."""
    by_base: dict[str, list[str]] = {}
    for n in sizes:
        by_base.setdefault(os.path.basename(n), []).append(n)
    for cand in candidates:
        if cand in sizes:
            return cand
    for cand in candidates:
        hits = by_base.get(os.path.basename(cand), [])
        if len(hits) == 1:
            return hits[0]
    return None


def _fill_polygon(points_px: np.ndarray, w: int, h: int) -> np.ndarray:
    """Pixels whose centres are inside or on the polygon (``[N, 2]`` x, y in continuous coordinates).

    An exact scanline fill at the pixel centres (even-odd rule), vectorized over rows and edges.
    ``cv2.fillPoly`` is not used: with sub-pixel vertices it rounds every edge outwards by up to half
    a pixel, so a polygon along pixel edges (a region box, say) would cover one more row and column.
    Centres exactly on an edge count as inside, so a polygon through the centres of a blob's
    boundary pixels (``cv2.findContours``) gives the blob back.
    """
    eps = 1e-6
    p = np.asarray(points_px, dtype=np.float64) - 0.5  # pixel centres at integer coordinates
    x0, y0 = p[:, 0], p[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    out = np.zeros((h, w), dtype=bool)
    r0 = max(0, math.ceil(float(p[:, 1].min()) - eps))
    r1 = min(h - 1, math.floor(float(p[:, 1].max()) + eps))
    if r1 < r0 or float(p[:, 0].max()) < -eps or float(p[:, 0].min()) > w - 1 + eps:
        return out
    rows = np.arange(r0, r1 + 1, dtype=np.float64)[:, None]  # [R, 1]
    diff = np.zeros((r1 - r0 + 1, w + 1), dtype=np.int32)

    def add_spans(r: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> None:
        a = np.clip(np.ceil(lo - eps), 0, w).astype(np.int64)
        b = np.clip(np.floor(hi + eps) + 1, 0, w).astype(np.int64)
        keep = a < b
        np.add.at(diff, (r[keep], a[keep]), 1)
        np.add.at(diff, (r[keep], b[keep]), -1)

    slanted = y0 != y1
    with np.errstate(divide="ignore", invalid="ignore"):
        xs = x0 + (rows - y0) * (x1 - x0) / (y1 - y0)  # [R, E]: where each edge meets each row
    xs = np.where(slanted, xs, 0.0)
    lo_y, hi_y = np.minimum(y0, y1), np.maximum(y0, y1)
    # interior: crossings with the half-open rule (ylo <= y < yhi), sorted, paired, filled closed
    cross = slanted & (lo_y <= rows) & (rows < hi_y)
    xc = np.where(cross, xs, np.inf)
    xc.sort(axis=1)
    n = cross.sum(axis=1)
    pairs = int(n.max()) // 2 if n.size else 0
    if pairs:
        left, right = xc[:, 0 : 2 * pairs : 2], xc[:, 1 : 2 * pairs : 2]
        ok = np.isfinite(right)
        r_idx = np.broadcast_to(np.arange(len(rows))[:, None], left.shape)
        add_spans(r_idx[ok], left[ok], right[ok])
    # boundary: centres lying on a slanted edge (closed range of rows) ...
    on = slanted & (lo_y - eps <= rows) & (rows <= hi_y + eps) & (np.abs(xs - np.round(xs)) < eps)
    r_on, e_on = np.nonzero(on)
    xr = np.round(xs[r_on, e_on])
    add_spans(r_on, xr, xr)
    # ... and on horizontal edges through a row of centres
    flat = ~slanted & (np.abs(y0 - np.round(y0)) < eps)
    fr = np.round(y0[flat]).astype(np.int64) - r0
    okr = (fr >= 0) & (fr < len(rows))
    add_spans(fr[okr], np.minimum(x0, x1)[flat][okr], np.maximum(x0, x1)[flat][okr])
    out[r0 : r1 + 1] = np.cumsum(diff, axis=1)[:, :w] > 0
    return out


def _parse_time(value: Any) -> float:
    if not value:
        return -math.inf
    try:
        text = str(value).strip().replace("Z", "+00:00")
        t = datetime.fromisoformat(text)
        if t.tzinfo is None:
            t = t.replace(tzinfo=timezone.utc)
        return t.timestamp()
    except ValueError:
        return -math.inf


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _int_id(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


# --------------------------------------------------------------------------------------------------
# In: Label Studio JSON export
# --------------------------------------------------------------------------------------------------


def _ls_task_image(task: Mapping[str, Any], sizes: Mapping[str, Any], where: str) -> str:
    data = task.get("data")
    if not isinstance(data, Mapping):
        raise AnnotationFormatError(f"{where}: has no 'data' object; is this a Label Studio JSON export?")
    candidates = []
    if data.get("name"):
        candidates.append(str(data["name"]))
    url = data.get(IMAGE_NAME)
    if url is None:
        # a project with another image key: the first string value that looks like a file
        url = next((v for v in data.values() if isinstance(v, str) and re.search(r"\.\w{2,5}$", v)), None)
    if isinstance(url, str):
        parsed = urlparse(url)
        query = parse_qs(parsed.query)
        for part in query.get("d", []) + [unquote(parsed.path)]:
            if part:
                candidates.append(part)
                base = os.path.basename(part)
                candidates.append(base)
                # files uploaded to Label Studio are renamed '<8 hex>-<original name>'
                m = re.fullmatch(r"[0-9a-f]{8}-(.+)", base)
                if m:
                    candidates.append(m.group(1))
    name = _resolve_name(candidates, sizes)
    if name is None:
        shown = candidates[0] if candidates else repr(url)
        raise AnnotationFormatError(
            f"{where}: image {shown!r} is not one of the project's images "
            f"({len(sizes)} images, e.g. {sorted(sizes)[:3]})"
        )
    return name


def _ls_result_size(res: Mapping[str, Any], wh: tuple[int, int], where: str) -> None:
    ow, oh = res.get("original_width"), res.get("original_height")
    if ow is None or oh is None:
        return
    if (int(ow), int(oh)) != wh:
        raise AnnotationFormatError(
            f"{where}: drawn on a {int(ow)}x{int(oh)} image, the project's image is {wh[0]}x{wh[1]} (WxH)"
        )


def _ls_label(res: Mapping[str, Any], key: str, classes: dict[str, int], where: str) -> int:
    value = res.get("value") or {}
    labels = value.get(key) if isinstance(value, Mapping) else None
    if not isinstance(labels, list) or len(labels) != 1:
        raise AnnotationFormatError(f"{where}: needs exactly one label in value.{key}, got {_short(labels)}")
    label = str(labels[0])
    if label not in classes:
        raise AnnotationFormatError(
            f"{where}: unknown class {label!r}; the project's classes are {list(classes)}"
        )
    return classes[label]


def _ls_paint(res: Mapping[str, Any], classes: dict[str, int], wh: tuple[int, int], where: str):
    """(class id, boolean mask) of one result, or None for results that carry no class pixels."""
    kind = str(res.get("type", "")).lower()
    value = res.get("value") or {}
    w, h = wh
    if kind == "brushlabels":
        cls = _ls_label(res, "brushlabels", classes, where)
        _ls_result_size(res, wh, where)
        fmt = value.get("format", "rle")
        rle = value.get("rle", res.get("rle"))
        if fmt != "rle" or rle is None:
            raise AnnotationFormatError(f"{where}: brush result without an RLE (format {fmt!r})")
        try:
            flat = brush_decode(rle)
        except ValueError as exc:
            raise AnnotationFormatError(f"{where}: undecodable brush RLE: {exc}") from None
        if flat.size != w * h * 4:
            raise AnnotationFormatError(
                f"{where}: brush RLE holds {flat.size} values, a {w}x{h} RGBA mask has {w * h * 4} "
                "(wrong image size?)"
            )
        return cls, flat.reshape(h, w, 4)[:, :, 3] >= 128
    if kind == "polygonlabels":
        cls = _ls_label(res, "polygonlabels", classes, where)
        _ls_result_size(res, wh, where)
        try:
            pts = np.asarray(value.get("points"), dtype=np.float64)
        except (TypeError, ValueError):
            pts = np.zeros((0,))
        if pts.ndim != 2 or pts.shape[0] < 3 or pts.shape[1] != 2 or not np.isfinite(pts).all():
            raise AnnotationFormatError(
                f"{where}: polygon needs >= 3 [x%, y%] points, got {_short(value.get('points'))}"
            )
        return cls, _fill_polygon(pts * np.array([w, h]) / 100.0, w, h)
    if kind == "rectanglelabels":
        labels = value.get("rectanglelabels") or []
        if list(labels) == [REGION_LABEL]:
            return None
        raise AnnotationFormatError(
            f"{where}: rectangle labeled {labels!r}; rectangles only mark regions ({REGION_LABEL!r}), "
            "paint classes with the brush or polygon tool"
        )
    if kind in _LS_NON_PIXEL_TYPES:
        return None
    raise AnnotationFormatError(
        f"{where}: result type {kind!r} carries no class pixels this import reads "
        "(brushlabels, polygonlabels; rectanglelabels for the region hint)"
    )


def parse_label_studio_export(
    data: Sequence[Mapping[str, Any]],
    class_names: Sequence[str],
    sizes: Mapping[str, Sequence[int]],
    ignore_index: int,
) -> dict[str, np.ndarray]:
    """Label maps of a Label Studio JSON export (the list of tasks with ``annotations[*].result``).

    Reads brush (``brushlabels``, RLE) and polygon (``polygonlabels``, points in percent) results;
    ``region-to-label`` rectangles and non-pixel results (choices, text, ...) are skipped, cancelled
    annotations (``was_cancelled``) too. The image of a task is ``data.name`` (written by
    :func:`label_studio_tasks`) or the file name in ``data.image``. ``sizes``: name -> (W, H).
    Returns name -> ``uint8 [H, W]`` for every image with at least one annotation.
    """
    classes = _class_index(class_names)
    sizes = _check_sizes(sizes)
    ignore = _check_ignore(class_names, ignore_index)
    if not isinstance(data, list):
        raise AnnotationFormatError(
            f"a Label Studio JSON export is a list of tasks; got {type(data).__name__} "
            "(export the project as 'JSON', not 'JSON_MIN' or a single task)"
        )
    todo: dict[str, list[tuple[tuple[float, int, int], list[Any], str]]] = {}
    for t, task in enumerate(data):
        tid = task.get("id", f"#{t}") if isinstance(task, Mapping) else f"#{t}"
        where = f"task {tid}"
        if not isinstance(task, Mapping):
            raise AnnotationFormatError(f"{where}: is not an object")
        anns = task.get("annotations") or task.get("completions") or []
        anns = [a for a in anns if isinstance(a, Mapping) and not a.get("was_cancelled")]
        if not anns:
            continue
        name = _ls_task_image(task, sizes, where)
        for k, ann in enumerate(anns):
            result = ann.get("result") or []
            if not isinstance(result, list):
                raise AnnotationFormatError(
                    f"{where} ({name}), annotation {ann.get('id')}: result is not a list"
                )
            key = (_parse_time(ann.get("updated_at") or ann.get("created_at")), _int_id(ann.get("id")), k)
            todo.setdefault(name, []).append(
                (key, result, f"{where} ({name}), annotation {ann.get('id', k)}")
            )
    out: dict[str, np.ndarray] = {}
    for name, anns in todo.items():
        w, h = sizes[name]
        lab = np.full((h, w), ignore, dtype=np.uint8)
        for _, result, where in sorted(anns, key=lambda a: a[0]):
            for r, res in enumerate(result):
                rwhere = f"{where}, result {res.get('id', r) if isinstance(res, Mapping) else r}"
                if not isinstance(res, Mapping):
                    raise AnnotationFormatError(f"{rwhere}: is not an object")
                painted = _ls_paint(res, classes, (w, h), rwhere)
                if painted is not None:
                    lab[painted[1]] = painted[0]
        out[name] = lab
    return out


# --------------------------------------------------------------------------------------------------
# In: CVAT for images 1.1 XML
# --------------------------------------------------------------------------------------------------


def _xml_int(el: ET.Element, key: str, where: str) -> int:
    try:
        return int(float(el.attrib[key]))
    except (KeyError, ValueError):
        raise AnnotationFormatError(f"{where}: attribute {key!r} missing or not a number") from None


def parse_cvat_xml(
    text: str | bytes,
    class_names: Sequence[str],
    sizes: Mapping[str, Sequence[int]],
    ignore_index: int,
) -> dict[str, np.ndarray]:
    """Label maps of a CVAT for images 1.1 XML: ``<polygon>`` (``points="x1,y1;x2,y2;..."``) and
    ``<mask>`` (CVAT RLE with ``left``/``top``/``width``/``height``) shapes, painted in ``z_order``
    (higher wins, ties by document order); ``region-to-label`` boxes and ``<tag>`` are skipped.
    Returns name -> ``uint8 [H, W]`` for every ``<image>`` in the file."""
    classes = _class_index(class_names)
    sizes = _check_sizes(sizes)
    ignore = _check_ignore(class_names, ignore_index)
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise AnnotationFormatError(f"CVAT XML does not parse: {exc}") from None
    if root.tag != "annotations":
        raise AnnotationFormatError(f"CVAT XML root is <{root.tag}>, expected <annotations>")
    if root.find("track") is not None:
        raise AnnotationFormatError(
            "CVAT XML holds <track> elements (CVAT for video); export the task as 'CVAT for images 1.1'"
        )
    out: dict[str, np.ndarray] = {}
    for k, image in enumerate(root.iter("image")):
        raw = image.attrib.get("name", "")
        where = f"<image id={image.attrib.get('id', k)} name={raw!r}>"
        name = _resolve_name([raw], sizes)
        if name is None:
            raise AnnotationFormatError(
                f"{where}: not one of the project's images ({len(sizes)} images, e.g. {sorted(sizes)[:3]})"
            )
        w, h = sizes[name]
        if "width" in image.attrib or "height" in image.attrib:
            iw, ih = _xml_int(image, "width", where), _xml_int(image, "height", where)
            if (iw, ih) != (w, h):
                raise AnnotationFormatError(f"{where}: is {iw}x{ih}, the project's image is {w}x{h} (WxH)")
        if name in out:
            raise AnnotationFormatError(f"{where}: the image appears twice in the file")
        shapes = []
        for s, el in enumerate(image):
            label = el.attrib.get("label")
            swhere = f"{where} <{el.tag} #{s} label={label!r}>"
            if el.tag == "tag" or (el.tag == "box" and label == REGION_LABEL):
                continue
            if el.tag not in ("polygon", "mask", "box", *_CVAT_OTHER_SHAPES):
                continue
            if label not in classes:
                raise AnnotationFormatError(
                    f"{swhere}: unknown class {label!r}; the project's classes are {list(classes)}"
                )
            if el.tag not in ("polygon", "mask"):
                raise AnnotationFormatError(
                    f"{swhere}: only <polygon> and <mask> shapes label pixels; boxes are region hints "
                    f"(label {REGION_LABEL!r})"
                )
            try:
                z = int(el.attrib.get("z_order", 0))
            except ValueError:
                raise AnnotationFormatError(f"{swhere}: z_order is not an integer") from None
            shapes.append((z, s, el, classes[label], swhere))
        lab = np.full((h, w), ignore, dtype=np.uint8)
        for _, _, el, cls, swhere in sorted(shapes, key=lambda t: (t[0], t[1])):
            if el.tag == "polygon":
                try:
                    pts = np.array(
                        [
                            [float(v) for v in p.split(",")]
                            for p in el.attrib["points"].split(";")
                            if p.strip()
                        ]
                    )
                except (KeyError, ValueError):
                    pts = np.zeros((0,))
                if pts.ndim != 2 or pts.shape[0] < 3 or pts.shape[1] != 2 or not np.isfinite(pts).all():
                    raise AnnotationFormatError(
                        f"{swhere}: points must be 'x1,y1;x2,y2;...' with >= 3 points"
                    )
                lab[_fill_polygon(pts, w, h)] = cls
            else:
                left, top = _xml_int(el, "left", swhere), _xml_int(el, "top", swhere)
                mw, mh = _xml_int(el, "width", swhere), _xml_int(el, "height", swhere)
                if left < 0 or top < 0 or mw <= 0 or mh <= 0 or left + mw > w or top + mh > h:
                    raise AnnotationFormatError(
                        f"{swhere}: mask box left={left} top={top} width={mw} height={mh} is not inside {w}x{h}"
                    )
                try:
                    counts = [int(v) for v in el.attrib.get("rle", "").split(",") if v.strip()]
                    mask = cvat_rle_decode(counts, mw, mh)
                except ValueError as exc:
                    raise AnnotationFormatError(f"{swhere}: undecodable mask RLE: {exc}") from None
                region = lab[top : top + mh, left : left + mw]
                region[mask] = cls
        out[name] = lab
    return out


# --------------------------------------------------------------------------------------------------
# In: PNG label maps
# --------------------------------------------------------------------------------------------------


def read_png_masks(
    folder: str | os.PathLike,
    class_names: Sequence[str],
    sizes: Mapping[str, Sequence[int]],
    ignore_index: int,
) -> dict[str, np.ndarray]:
    """Label maps from ``folder/<image stem>.png`` (one channel, values = class ids or ``ignore_index``;
    a grey RGB PNG with equal channels is accepted). Returns name -> ``uint8 [H, W]``."""
    folder = Path(folder)
    sizes = _check_sizes(sizes)
    ignore = _check_ignore(class_names, ignore_index)
    if not folder.is_dir():
        raise AnnotationFormatError(f"{folder} is not a folder of PNG masks")
    by_stem: dict[str, list[str]] = {}
    for n in sizes:
        by_stem.setdefault(Path(n).stem, []).append(n)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png" and p.is_file())
    if not files:
        raise AnnotationFormatError(f"{folder} holds no .png masks (expected <image stem>.png)")
    out: dict[str, np.ndarray] = {}
    n_cls = len(class_names)
    for path in files:
        names = by_stem.get(path.stem, [])
        if len(names) != 1:
            why = "is not" if not names else f"matches {len(names)} images ({names}), not exactly one"
            raise AnnotationFormatError(
                f"{path}: {path.stem!r} {why} the stem of one of the project's images"
            )
        name = names[0]
        lab = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
        if lab is None:
            raise AnnotationFormatError(f"{path}: not a readable PNG")
        if lab.ndim == 3:
            if lab.shape[2] == 4:
                lab = lab[:, :, :3]
            if not (lab == lab[:, :, :1]).all():
                raise AnnotationFormatError(
                    f"{path}: a colour PNG; masks hold class ids in one channel (0..{n_cls - 1}, ignore {ignore})"
                )
            lab = lab[:, :, 0]
        w, h = sizes[name]
        if lab.shape != (h, w):
            raise AnnotationFormatError(
                f"{path}: is {lab.shape[1]}x{lab.shape[0]}, the image {name!r} is {w}x{h} (WxH)"
            )
        bad = (lab >= n_cls) & (lab != ignore)
        if bad.any():
            vals = sorted(set(np.unique(lab[bad]).tolist()))[:5]
            raise AnnotationFormatError(
                f"{path}: value(s) {vals} are neither class ids 0..{n_cls - 1} nor the ignore id {ignore}"
            )
        out[name] = lab.astype(np.uint8)
    return out
