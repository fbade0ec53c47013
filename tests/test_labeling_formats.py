"""Annotation formats (``ralis_gym.labeling.formats``): real CamVid label maps play the annotator.

A real label map is cut down to some requested 80x90 regions, written out the way each tool stores
it (Label Studio brush RLE and polygons, CVAT masks and polygons, PNG), parsed back and compared:
exact for the RLEs and PNG, >= 97% of the pixels inside the regions for polygons traced from the
label map. The brush RLE is cross-checked byte for byte against Label Studio's own converter when
one is installed. Every malformed input must give one ``DatasetError`` naming where and what.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np
import pytest

from ralis_gym.data.camvid import CAMVID_CLASSES
from ralis_gym.errors import DatasetError
from ralis_gym.labeling import formats as F

IGNORE = 11
W, H = 480, 360
RW, RH = 80, 90
CLASSES = list(CAMVID_CLASSES)
IMAGES = ("0001TP_006690.png", "0006R0_f02040.png", "0016E5_01290.png")


@pytest.fixture(scope="module")
def camvid(camvid_root: Path) -> dict[str, np.ndarray]:
    """Three real CamVid train label maps (name -> uint8 [360, 480])."""
    folder = camvid_root / "camvid" / "trainannot"
    names = [n for n in IMAGES if (folder / n).is_file()]
    if len(names) < 3:  # another CamVid copy: take its first three label maps
        names = sorted(p.name for p in folder.glob("*.png"))[:3]
    return {n: cv2.imread(str(folder / n), cv2.IMREAD_UNCHANGED) for n in names}


@pytest.fixture(scope="module")
def requests_(camvid) -> list[dict]:
    """Five seeded 80x90 grid regions per image, in the request format of ``suggest``."""
    rng = np.random.default_rng(7)
    out = []
    for name in camvid:
        cells = rng.choice(4 * 6, size=5, replace=False)
        regions = [
            {"id": f"{name}:{c // 6}:{c % 6}", "box": [int(c % 6) * RW, int(c // 6) * RH, RW, RH]}
            for c in cells
        ]
        out.append({"image": name, "width": W, "height": H, "regions": regions})
    return out


def inside_mask(req: dict) -> np.ndarray:
    m = np.zeros((H, W), dtype=bool)
    for r in req["regions"]:
        x, y, w, h = r["box"]
        m[y : y + h, x : x + w] = True
    return m


@pytest.fixture(scope="module")
def expected(camvid, requests_) -> dict[str, np.ndarray]:
    """The annotator's answer: ground truth inside the requested regions, ignore elsewhere."""
    return {
        r["image"]: np.where(inside_mask(r), camvid[r["image"]], IGNORE).astype(np.uint8) for r in requests_
    }


@pytest.fixture(scope="module")
def sizes(camvid) -> dict[str, tuple[int, int]]:
    return {n: (W, H) for n in camvid}


def ls_brush(mask: np.ndarray, cls: int, rid: str) -> dict:
    return {
        "id": rid, "type": "brushlabels", "from_name": F.BRUSH_NAME, "to_name": F.IMAGE_NAME,
        "original_width": mask.shape[1], "original_height": mask.shape[0], "image_rotation": 0,
        "value": {"format": "rle", "rle": F.brush_mask_rle(mask), "brushlabels": [CLASSES[cls]]},
    }  # fmt: skip


def ls_task(name: str, results: list[list[dict]], tid: int = 1, **ann) -> dict:
    """An exported task: one annotation per result list (ids 1.., increasing ``updated_at``)."""
    anns = [
        {"id": tid * 100 + k, "result": res, "was_cancelled": False,
         "updated_at": f"2026-12-01T10:{k:02d}:00.000000Z", **ann}
        for k, res in enumerate(results)
    ]  # fmt: skip
    return {"id": tid, "data": {"image": f"/data/local-files/?d=images/{name}"}, "annotations": anns}


def class_polygons(label: np.ndarray, box: list[int]) -> list[tuple[int, np.ndarray]]:
    """(class, contour points [N, 2] in pixel centres) of every class blob in ``box``, largest first."""
    x, y, w, h = box
    crop = label[y : y + h, x : x + w]
    out = []
    for c in np.unique(crop).tolist():
        if c >= len(CLASSES):
            continue
        contours, _ = cv2.findContours(
            (crop == c).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
        )
        for cnt in contours:
            pts = cnt.reshape(-1, 2) + np.array([x, y])
            if len(pts) >= 3:  # a 1- or 2-point blob is no polygon an annotator could draw
                out.append((cv2.contourArea(cnt), c, pts))
    out.sort(key=lambda t: -t[0])  # big blobs first, small ones drawn over them
    return [(c, pts) for _, c, pts in out]


def agreement(got: np.ndarray, want: np.ndarray, inside: np.ndarray) -> float:
    return float((got[inside] == want[inside]).mean())


# ---------------------------------------------------------------------------------------------
# Label Studio brush RLE
# ---------------------------------------------------------------------------------------------


def random_arrays(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = [
        np.array([7], dtype=np.uint8),
        np.zeros(W * H * 4, dtype=np.uint8),
        rng.integers(0, 256, 5000).astype(np.uint8),  # all literals
        np.repeat(rng.integers(0, 256, 2000), rng.integers(1, 400, 2000)).astype(np.uint8),  # every run class
        np.repeat(np.array([0, 255, 0, 9], dtype=np.uint8), [65536, 65537, 131073, 1]),  # 16-bit run splits
    ]
    for p in (0.01, 0.3, 0.5, 0.97):  # RGBA masks of random blobs at several densities
        small = rng.random((H // 10, W // 10)) < p
        mask = cv2.resize(small.astype(np.uint8), (W, H), interpolation=cv2.INTER_NEAREST).astype(bool)
        mask ^= rng.random((H, W)) < 0.01  # and salt-and-pepper
        arrays.append(np.repeat(mask.reshape(-1).astype(np.uint8) * 255, 4))
    return arrays


def test_brush_rle_round_trip_random():
    for arr in random_arrays():
        rle = F.brush_encode(arr)
        assert all(0 <= b <= 255 for b in rle)
        np.testing.assert_array_equal(F.brush_decode(rle), arr)


CONVERTER_SCRIPT = r"""
import json, sys
import numpy as np
try:
    from label_studio_converter.brush import decode_rle, encode_rle, mask2rle
    where = "label_studio_converter"
except ImportError:
    from label_studio_sdk.converter.brush import decode_rle, encode_rle, mask2rle
    where = "label_studio_sdk.converter"
z = np.load(sys.argv[1])
arrays = [z[f"a{i}"] for i in range(int(z["n"]))]
enc = [encode_rle(a.astype(int)) for a in arrays]
masks = [mask2rle(z[f"m{i}"]) for i in range(int(z["k"]))]
ours = json.load(open(sys.argv[2]))
np.savez(sys.argv[3], *[decode_rle(r) for r in ours])
print(json.dumps({"where": where, "encode": enc, "mask2rle": masks}))
"""


def converter_python() -> tuple[str | None, str]:
    """A Python that imports Label Studio's brush converter: this one, or the Label Studio venv's."""
    candidates = [sys.executable]
    ls = os.environ.get("RALIS_GYM_LABEL_STUDIO")
    if ls:
        candidates += [str(Path(ls).parent / "python"), str(Path(ls).parent / "python3")]
    probe = "import importlib.util as u, sys; sys.exit(0 if u.find_spec('label_studio_converter') or u.find_spec('label_studio_sdk') else 1)"
    for py in candidates:
        if Path(py).is_file() and subprocess.run([py, "-c", probe], capture_output=True).returncode == 0:
            return py, ""
    return None, (
        "Label Studio's brush converter is not installed: neither label-studio-converter in this Python "
        "nor label-studio-sdk next to $RALIS_GYM_LABEL_STUDIO "
        f"({ls or 'unset'}); the round-trip test above still covers encode/decode"
    )


def test_brush_rle_matches_label_studio_converter(tmp_path):
    py, why = converter_python()
    if py is None:
        pytest.skip(why)
    arrays = random_arrays(1)
    rng = np.random.default_rng(3)
    masks = [
        (rng.random((H, W)) < 0.4).astype(np.uint8) * 255,
        np.where(rng.random((36, 48)) < 0.5, 255, 0).astype(np.uint8).repeat(10, 0).repeat(10, 1),
    ]
    np.savez(
        tmp_path / "in.npz", n=len(arrays), k=len(masks),
        **{f"a{i}": a for i, a in enumerate(arrays)}, **{f"m{i}": m for i, m in enumerate(masks)},
    )  # fmt: skip
    ours = [F.brush_encode(a) for a in arrays]
    (tmp_path / "ours.json").write_text(json.dumps(ours))
    proc = subprocess.run(
        [py, "-c", CONVERTER_SCRIPT, str(tmp_path / "in.npz"), str(tmp_path / "ours.json"), str(tmp_path / "dec.npz")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = json.loads(proc.stdout.strip().splitlines()[-1])
    assert ref["encode"] == ours, f"brush RLE differs from {ref['where']}.encode_rle"
    assert ref["mask2rle"] == [F.brush_mask_rle(m > 0) for m in masks]
    dec = np.load(tmp_path / "dec.npz")
    for i, a in enumerate(arrays):  # and the converter decodes our RLE to the same values
        np.testing.assert_array_equal(dec[f"arr_{i}"], a)


def test_brush_decode_rejects_garbage():
    good = F.brush_mask_rle(np.ones((4, 4), dtype=bool))
    for bad in (good[:-3], [0, 0, 0], "abc", [1.5] * 10, [300] * 10):
        with pytest.raises(ValueError):
            F.brush_decode(bad)


# ---------------------------------------------------------------------------------------------
# Label Studio tasks, config and export
# ---------------------------------------------------------------------------------------------


def test_label_studio_config_lists_classes_and_tools():
    root = ET.fromstring(F.label_studio_config(CLASSES))
    image = root.find("Image")
    assert image.get("name") == F.IMAGE_NAME and image.get("value") == "$" + F.IMAGE_NAME
    for tag, name in (("BrushLabels", F.BRUSH_NAME), ("PolygonLabels", F.POLYGON_NAME)):
        el = root.find(tag)
        assert el.get("name") == name and el.get("toName") == F.IMAGE_NAME
        assert [lab.get("value") for lab in el.findall("Label")] == CLASSES
    rect = root.find("RectangleLabels")
    assert [lab.get("value") for lab in rect.findall("Label")] == [F.REGION_LABEL]
    odd = F.label_studio_config(['a "quoted" <class>', "b&c"])  # names are escaped
    assert [lab.get("value") for lab in ET.fromstring(odd).find("BrushLabels")] == [
        'a "quoted" <class>',
        "b&c",
    ]


def test_label_studio_tasks_layout(requests_, camvid):
    tasks = F.label_studio_tasks(
        requests_, CLASSES, lambda n: "/data/local-files/?d=images/" + n, predictions=camvid
    )
    assert len(tasks) == len(requests_)
    for task, req in zip(tasks, requests_):
        assert task["data"]["image"] == "/data/local-files/?d=images/" + req["image"]
        assert task["data"]["name"] == req["image"] and task["data"]["regions"] == req["regions"]
        result = task["predictions"][0]["result"]
        rects = [r for r in result if r["type"] == "rectanglelabels"]
        assert len(rects) == len(req["regions"])
        for rect, reg in zip(rects, req["regions"]):
            x, y, w, h = reg["box"]
            v = rect["value"]
            assert v["rectanglelabels"] == [F.REGION_LABEL]
            np.testing.assert_allclose(
                [v["x"], v["y"], v["width"], v["height"]], [x / 4.8, y / 3.6, w / 4.8, h / 3.6]
            )
        brushes = [r for r in result if r["type"] == "brushlabels"]
        inside = inside_mask(req)
        present = sorted(set(np.unique(camvid[req["image"]][inside]).tolist()) - {IGNORE})
        assert [CLASSES.index(b["value"]["brushlabels"][0]) for b in brushes] == present
        assert len({r["id"] for r in result}) == len(result)
    json.dumps(tasks)  # JSON-ready
    plain = F.label_studio_tasks(requests_, CLASSES, lambda n: n)
    assert all(r["type"] == "rectanglelabels" for t in plain for r in t["predictions"][0]["result"])


def test_label_studio_accepted_predictions_round_trip(requests_, camvid, expected, sizes):
    """An annotator who accepts the (perfect) pre-annotation exports exactly the regions' pixels."""
    tasks = F.label_studio_tasks(
        requests_, CLASSES, lambda n: "/data/local-files/?d=images/" + n, predictions=camvid
    )
    export = []
    for k, t in enumerate(tasks):
        export.append({"id": k + 1, "data": t["data"], "predictions": t["predictions"],
                       "annotations": [{"id": k + 1, "result": t["predictions"][0]["result"]}]})  # fmt: skip
    maps = F.parse_label_studio_export(export, CLASSES, sizes, IGNORE)
    assert set(maps) == set(expected)
    for name, lab in maps.items():
        assert lab.dtype == np.uint8 and lab.shape == (H, W)
        np.testing.assert_array_equal(lab, expected[name])


def test_label_studio_brush_round_trip_camvid(requests_, camvid, expected, sizes):
    export = []
    for k, req in enumerate(requests_):
        lab = expected[req["image"]]
        results = [ls_brush(lab == c, c, f"b{c}") for c in np.unique(lab).tolist() if c != IGNORE]
        export.append(ls_task(req["image"], [results], tid=k + 1))
    maps = F.parse_label_studio_export(export, CLASSES, sizes, IGNORE)
    for name in expected:
        np.testing.assert_array_equal(maps[name], expected[name])


def test_label_studio_polygon_round_trip_camvid(requests_, camvid, expected, sizes):
    export = []
    for k, req in enumerate(requests_):
        results = []
        for reg in req["regions"]:
            for j, (c, pts) in enumerate(class_polygons(expected[req["image"]], reg["box"])):
                pct = (pts + 0.5) / np.array([W, H]) * 100.0  # pixel centres -> Label Studio percent
                results.append({
                    "id": f"{reg['id']}-{j}", "type": "polygonlabels", "from_name": F.POLYGON_NAME,
                    "to_name": F.IMAGE_NAME, "original_width": W, "original_height": H,
                    "value": {"points": pct.tolist(), "closed": True, "polygonlabels": [CLASSES[c]]},
                })  # fmt: skip
        export.append(ls_task(req["image"], [results], tid=k + 1))
    maps = F.parse_label_studio_export(export, CLASSES, sizes, IGNORE)
    for req in requests_:
        inside = inside_mask(req)
        got, want = maps[req["image"]], expected[req["image"]]
        assert agreement(got, want, inside) >= 0.97, agreement(got, want, inside)
        assert (got[~inside] == IGNORE).all()


def test_label_studio_later_annotation_wins_cancelled_skipped(sizes):
    name = next(iter(sizes))
    left = np.zeros((H, W), dtype=bool)
    left[:, :240] = True
    everything = np.ones((H, W), dtype=bool)
    first = [ls_brush(everything, 0, "a")]  # Sky everywhere
    second = [ls_brush(left, 3, "b")]  # then Road on the left half
    task = ls_task(name, [first, second])
    # listed newest first: order comes from updated_at, not from the list
    task["annotations"].reverse()
    cancelled = {"id": 999, "was_cancelled": True, "updated_at": "2026-12-31T00:00:00Z",
                 "result": [ls_brush(everything, 8, "c")]}  # fmt: skip
    task["annotations"].append(cancelled)
    lab = F.parse_label_studio_export([task], CLASSES, sizes, IGNORE)[name]
    assert (lab[:, :240] == 3).all() and (lab[:, 240:] == 0).all()
    # same updated_at: the higher annotation id wins
    for a in task["annotations"]:
        a["updated_at"] = "2026-12-01T10:00:00Z"
    task["annotations"][0]["id"], task["annotations"][1]["id"] = 5, 6  # 'second' gets 5, 'first' 6
    lab = F.parse_label_studio_export([task], CLASSES, sizes, IGNORE)[name]
    assert (lab == 0).all()
    # a task without (non-cancelled) annotations yields nothing
    only_cancelled = {"id": 3, "data": {"image": name}, "annotations": [cancelled]}
    assert F.parse_label_studio_export([only_cancelled], CLASSES, sizes, IGNORE) == {}


def test_label_studio_image_names_from_urls(sizes):
    name = next(iter(sizes))
    res = [ls_brush(np.ones((H, W), dtype=bool), 1, "x")]
    for url in (
        f"/data/local-files/?d=images/{name}",
        f"/data/upload/3/1a2b3c4d-{name}",
        f"s3://bucket/x/{name}",
    ):
        task = {"id": 1, "data": {"image": url}, "annotations": [{"id": 1, "result": res}]}
        assert list(F.parse_label_studio_export([task], CLASSES, sizes, IGNORE)) == [name]


@pytest.mark.parametrize(
    "mutate, match",
    [
        (
            lambda t: t["annotations"][0]["result"][0]["value"].update(brushlabels=["Cat"]),
            r"task 7 .*unknown class 'Cat'",
        ),
        (
            lambda t: t["annotations"][0]["result"][0].update(original_width=960, original_height=720),
            r"task 7 .*drawn on a 960x720 image, the project's image is 480x360",
        ),
        (
            lambda t: t["annotations"][0]["result"][0]["value"].update(
                rle=t["annotations"][0]["result"][0]["value"]["rle"][:-4]
            ),
            r"task 7 .*undecodable brush RLE",
        ),
        (
            lambda t: t["annotations"][0]["result"][0]["value"].update(
                rle=F.brush_mask_rle(np.ones((10, 10), bool))
            ),
            r"task 7 .*brush RLE holds 400 values, a 480x360 RGBA mask has 691200",
        ),
        (
            lambda t: t["data"].update(image="/data/local-files/?d=images/nope.png"),
            r"task 7: image .*nope.png.* is not one of",
        ),
        (
            lambda t: t["annotations"][0]["result"].append(
                {"type": "polygonlabels", "value": {"points": [[1, 1], [2, 2]], "polygonlabels": ["Sky"]}}
            ),
            r"task 7 .*polygon needs >= 3",
        ),
        (
            lambda t: t["annotations"][0]["result"].append(
                {
                    "type": "rectanglelabels",
                    "value": {"x": 1, "y": 1, "width": 5, "height": 5, "rectanglelabels": ["Car"]},
                }
            ),
            r"task 7 .*rectangles only mark regions",
        ),
        (
            lambda t: t["annotations"][0]["result"].append({"type": "keypointlabels", "value": {}}),
            r"task 7 .*result type 'keypointlabels'",
        ),
    ],
)
def test_label_studio_errors(sizes, mutate, match):
    name = next(iter(sizes))
    task = ls_task(name, [[ls_brush(np.ones((H, W), dtype=bool), 1, "x")]], tid=7)
    mutate(task)
    with pytest.raises(DatasetError, match=match) as err:
        F.parse_label_studio_export([task], CLASSES, sizes, IGNORE)
    assert isinstance(err.value, F.AnnotationFormatError)
    assert name in str(err.value) or "nope.png" in str(err.value)


def test_label_studio_export_must_be_a_list(sizes):
    with pytest.raises(DatasetError, match="list of tasks"):
        F.parse_label_studio_export({"id": 1}, CLASSES, sizes, IGNORE)


# ---------------------------------------------------------------------------------------------
# CVAT for images 1.1
# ---------------------------------------------------------------------------------------------


def test_cvat_rle_round_trip_and_convention():
    # row-major over the mask box, 0-run first (cvat-core mask2Rle / rle2Mask)
    assert F.cvat_rle_encode(np.array([[0, 0], [0, 1]], bool)) == [3, 1]
    assert F.cvat_rle_encode(np.array([[1, 1], [0, 0]], bool)) == [0, 2, 2]
    np.testing.assert_array_equal(F.cvat_rle_decode([0, 2, 2], 2, 2), [[1, 1], [0, 0]])
    np.testing.assert_array_equal(F.cvat_rle_decode([1, 2], 2, 2), [[0, 1], [1, 0]])  # missing tail = 0
    rng = np.random.default_rng(0)
    for p in (0.0, 0.02, 0.5, 1.0):
        m = rng.random((37, 53)) < p
        np.testing.assert_array_equal(F.cvat_rle_decode(F.cvat_rle_encode(m), 53, 37), m)


def test_cvat_xml_layout(requests_, camvid):
    root = ET.fromstring(F.cvat_xml(requests_, CLASSES, predictions=camvid))
    assert root.tag == "annotations" and root.findtext("version") == "1.1"
    labels = [lab.findtext("name") for lab in root.find("meta/task/labels")]
    assert labels == [*CLASSES, F.REGION_LABEL]
    images = root.findall("image")
    assert [i.get("name") for i in images] == [r["image"] for r in requests_]
    for img, req in zip(images, requests_):
        assert (img.get("width"), img.get("height")) == ("480", "360")
        boxes = img.findall("box")
        assert [b.findtext("attribute") for b in boxes] == [r["id"] for r in req["regions"]]
        x, y, w, h = req["regions"][0]["box"]
        assert [float(boxes[0].get(k)) for k in ("xtl", "ytl", "xbr", "ybr")] == [x, y, x + w, y + h]
        for m in img.findall("mask"):
            assert {"label", "rle", "left", "top", "width", "height", "z_order"} <= set(m.attrib)


def test_cvat_mask_round_trip_camvid(requests_, camvid, expected, sizes):
    """The CVAT masks written from the ground truth come back exactly (and boxes are skipped)."""
    text = F.cvat_xml(requests_, CLASSES, predictions=camvid)
    maps = F.parse_cvat_xml(text, CLASSES, sizes, IGNORE)
    for name in expected:
        np.testing.assert_array_equal(maps[name], expected[name])


def cvat_doc(images: list[tuple[str, list[str]]], size=(W, H)) -> str:
    body = "".join(
        f'<image id="{k}" name="{n}" width="{size[0]}" height="{size[1]}">{"".join(shapes)}</image>'
        for k, (n, shapes) in enumerate(images)
    )
    return f"<?xml version='1.0'?><annotations><version>1.1</version><meta/>{body}</annotations>"


def test_cvat_polygon_round_trip_camvid(requests_, expected, sizes):
    images = []
    for req in requests_:
        shapes, z = [], 0
        for reg in req["regions"]:
            x, y, w, h = reg["box"]
            shapes.append(
                f'<box label="{F.REGION_LABEL}" occluded="0" xtl="{x}" ytl="{y}" xbr="{x + w}" ybr="{y + h}" z_order="0"/>'
            )
            for c, pts in class_polygons(expected[req["image"]], reg["box"]):
                z += 1
                points = ";".join(f"{px + 0.5:.2f},{py + 0.5:.2f}" for px, py in pts)
                shapes.append(
                    f'<polygon label="{CLASSES[c]}" source="manual" occluded="0" points="{points}" z_order="{z}"/>'
                )
        shapes.reverse()  # document order is the reverse of z_order: z_order must decide
        images.append((req["image"], shapes))
    maps = F.parse_cvat_xml(cvat_doc(images), CLASSES, sizes, IGNORE)
    for req in requests_:
        inside = inside_mask(req)
        got, want = maps[req["image"]], expected[req["image"]]
        assert agreement(got, want, inside) >= 0.97, agreement(got, want, inside)
        assert (got[~inside] == IGNORE).all()


def test_cvat_z_order_and_document_order(sizes):
    name = next(iter(sizes))
    square = lambda lab, z: f'<polygon label="{lab}" points="0,0;10,0;10,10;0,10" z_order="{z}"/>'  # noqa: E731
    full = F.cvat_rle_encode(np.ones((10, 10), bool))
    mask = f'<mask label="Car" rle="{", ".join(map(str, full))}" left="0" top="0" width="10" height="10" z_order="1"/>'
    lab = F.parse_cvat_xml(cvat_doc([(name, [mask, square("Sky", 0)])]), CLASSES, sizes, IGNORE)[name]
    assert (lab[:10, :10] == 8).all() and (lab[10:, :] == IGNORE).all() and (lab[:, 10:] == IGNORE).all()
    lab = F.parse_cvat_xml(cvat_doc([(name, [square("Sky", 0), square("Road", 0)])]), CLASSES, sizes, IGNORE)[
        name
    ]
    assert (lab[:10, :10] == 3).all()  # same z_order: later in the file wins
    # a polygon along pixel edges covers exactly the pixels inside it
    assert (lab != IGNORE).sum() == 100


@pytest.mark.parametrize(
    "shape, match",
    [
        ('<polygon label="Cat" points="0,0;5,0;5,5"/>', r"image id=0 name='IMG'.*unknown class 'Cat'"),
        (
            '<mask label="Car" rle="5, 200" left="0" top="0" width="10" height="10"/>',
            r"image id=0 name='IMG'.*undecodable mask RLE: runs cover 205 pixels",
        ),
        ('<mask label="Car" rle="1, x" left="0" top="0" width="10" height="10"/>', r"undecodable mask RLE"),
        (
            '<mask label="Car" rle="1" left="475" top="0" width="10" height="10"/>',
            r"mask box left=475 .* not inside 480x360",
        ),
        ('<polygon label="Car" points="0,0;5,5"/>', r"points must be 'x1,y1;x2,y2;...'"),
        (
            '<box label="Car" xtl="0" ytl="0" xbr="5" ybr="5"/>',
            r"only <polygon> and <mask> shapes label pixels",
        ),
        ('<ellipse label="Car" cx="5" cy="5" rx="2" ry="2"/>', r"only <polygon> and <mask>"),
    ],
)
def test_cvat_shape_errors(sizes, shape, match):
    name = next(iter(sizes))
    with pytest.raises(DatasetError, match=match.replace("IMG", name)):
        F.parse_cvat_xml(cvat_doc([(name, [shape])]), CLASSES, sizes, IGNORE)


def test_cvat_file_errors(sizes):
    name = next(iter(sizes))
    with pytest.raises(DatasetError, match=rf"name='{name}'>: is 960x720, the project's image is 480x360"):
        F.parse_cvat_xml(cvat_doc([(name, [])], size=(960, 720)), CLASSES, sizes, IGNORE)
    with pytest.raises(DatasetError, match=r"name='other.png'>: not one of the project's images"):
        F.parse_cvat_xml(cvat_doc([("other.png", [])]), CLASSES, sizes, IGNORE)
    with pytest.raises(DatasetError, match="does not parse"):
        F.parse_cvat_xml("<annotations><image", CLASSES, sizes, IGNORE)
    with pytest.raises(DatasetError, match="CVAT for video"):
        F.parse_cvat_xml("<annotations><track id='0' label='Car'/></annotations>", CLASSES, sizes, IGNORE)
    # subfolders in CVAT image names are matched by file name
    maps = F.parse_cvat_xml(cvat_doc([(f"seq/{name}", [])]), CLASSES, sizes, IGNORE)
    assert list(maps) == [name] and (maps[name] == IGNORE).all()


# ---------------------------------------------------------------------------------------------
# PNG label maps
# ---------------------------------------------------------------------------------------------


def test_png_round_trip_camvid(tmp_path, expected, sizes):
    for name, lab in expected.items():
        assert cv2.imwrite(str(tmp_path / (Path(name).stem + ".png")), lab)
    (tmp_path / "notes.txt").write_text("not a mask")
    maps = F.read_png_masks(tmp_path, CLASSES, sizes, IGNORE)
    assert set(maps) == set(expected)
    for name in expected:
        np.testing.assert_array_equal(maps[name], expected[name])


def test_png_errors(tmp_path, sizes):
    name = next(iter(sizes))
    stem = Path(name).stem

    def check(array, match, fname=stem + ".png"):
        folder = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        assert cv2.imwrite(str(folder / fname), array)
        with pytest.raises(DatasetError, match=match):
            F.read_png_masks(folder, CLASSES, sizes, IGNORE)

    check(np.zeros((H // 2, W // 2), np.uint8), rf"{stem}.png: is 240x180, the image '{name}' is 480x360")
    bad = np.zeros((H, W), np.uint8)
    bad[0, 0], bad[1, 1] = 12, 200
    check(bad, r"value\(s\) \[12, 200\] are neither class ids 0..10 nor the ignore id 11")
    check(
        np.zeros((H, W), np.uint8), r"'nope' is not the stem of one of the project's images", fname="nope.png"
    )
    colour = np.zeros((H, W, 3), np.uint8)
    colour[..., 2] = 128
    check(colour, r"a colour PNG")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="holds no .png masks"):
        F.read_png_masks(empty, CLASSES, sizes, IGNORE)
