"""The labeling loop end to end on real CamVid images treated as unlabeled: the ground truth plays
the annotator and answers each round in another tool's own export format (PNG masks, a Label Studio
JSON export with brush RLE, CVAT for images 1.1 XML with masks). Real fast networks trained for
real; the CLI as a user runs it (one line on stderr and exit 2 for every bad input)."""

from __future__ import annotations

import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from ralis_gym.cli import main as cli
from ralis_gym.data.base import read_label
from ralis_gym.data.camvid import CAMVID_CLASSES, CAMVID_PALETTE
from ralis_gym.labeling import LabelingProject
from ralis_gym.labeling import formats as fmt

POOL, VAL = 12, 4
VOID = 11
RW, RH = 80, 90


@pytest.fixture(scope="module")
def camvid_images(camvid_root, tmp_path_factory):
    """16 CamVid train images in one folder (the team's unlabeled images), their ground truth aside,
    and the dataset YAML (class names, void 11, regions of 80x90)."""
    work = tmp_path_factory.mktemp("labeling")
    images, truth = work / "images", work / "truth"
    images.mkdir()
    truth.mkdir()
    src = Path(camvid_root) / "camvid"
    names = sorted(p.name for p in (src / "train").glob("*.png"))[:: 367 // (POOL + VAL)][: POOL + VAL]
    for n in names:
        shutil.copy(src / "train" / n, images / n)
        shutil.copy(src / "trainannot" / n, truth / n)
    config = work / "camvid.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "camvid-team",
                "class_names": list(CAMVID_CLASSES),
                "ignore_index": VOID,
                "region_size": [RW, RH],
                "palette": [list(c) for c in CAMVID_PALETTE],
            }
        )  # fmt: skip
    )
    return work, images, truth, names


def _run(*argv: str, capsys) -> tuple[int, str, str]:
    code = cli(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _ground_truth(truth: Path, name: str) -> np.ndarray:
    return read_label(truth / name)


def _requested(folder: Path) -> dict[str, list[list[int]]]:
    boxes: dict[str, list[list[int]]] = {}
    for q in json.loads((folder / "suggestions.json").read_text()):
        boxes.setdefault(q["image"], []).append(q["box"])
    return boxes


def _inside(lab: np.ndarray, boxes: list[list[int]]) -> np.ndarray:
    """The ground truth inside the boxes, void elsewhere (what an annotator paints)."""
    out = np.full_like(lab, VOID)
    for x, y, w, h in boxes:
        out[y : y + h, x : x + w] = lab[y : y + h, x : x + w]
    return out


def _answer_png(folder: Path, truth: Path, out: Path) -> Path:
    out.mkdir()
    for name, boxes in _requested(folder).items():
        cv2.imwrite(str(out / name), _inside(_ground_truth(truth, name), boxes))
    return out


def _answer_label_studio(folder: Path, truth: Path, out: Path) -> Path:
    """A Label Studio JSON export of the round's tasks: one annotation per task with one brush result
    per class painted inside the requested regions (what the brush tool stores)."""
    tasks = json.loads((folder / "label-studio-tasks.json").read_text())
    boxes = _requested(folder)
    export = []
    for k, task in enumerate(tasks, start=1):
        name = task["data"]["name"]
        lab = _inside(_ground_truth(truth, name), boxes[name])
        h, w = lab.shape
        result = [
            {
                "id": f"r{c}", "type": "brushlabels", "from_name": fmt.BRUSH_NAME, "to_name": fmt.IMAGE_NAME,
                "original_width": w, "original_height": h, "image_rotation": 0,
                "value": {"format": "rle", "rle": fmt.brush_mask_rle(lab == c), "brushlabels": [CAMVID_CLASSES[c]]},
            }
            for c in np.unique(lab) if c != VOID
        ]  # fmt: skip
        export.append({
            "id": k, "data": task["data"],
            "annotations": [{"id": k, "result": result, "was_cancelled": False, "updated_at": "2026-12-02T07:00:00Z"}],
        })  # fmt: skip
    out.mkdir(exist_ok=True)
    path = out / "export.json"
    path.write_text(json.dumps(export))
    return path


def _answer_cvat(folder: Path, truth: Path, out: Path) -> Path:
    """CVAT for images 1.1 XML with one <mask> per class inside the requested regions."""
    parts = ["<?xml version='1.0' encoding='utf-8'?>", "<annotations>", "<version>1.1</version>"]
    for k, (name, boxes) in enumerate(_requested(folder).items()):
        lab = _inside(_ground_truth(truth, name), boxes)
        h, w = lab.shape
        parts.append(f'<image id="{k}" name="{name}" width="{w}" height="{h}">')
        for c in np.unique(lab):
            if c == VOID:
                continue
            ys, xs = np.nonzero(lab == c)
            top, left, bottom, right = ys.min(), xs.min(), ys.max() + 1, xs.max() + 1
            rle = fmt.cvat_rle_encode(lab[top:bottom, left:right] == c)
            parts.append(
                f'<mask label="{CAMVID_CLASSES[c]}" source="manual" occluded="0" rle="{", ".join(map(str, rle))}" '
                f'left="{left}" top="{top}" width="{right - left}" height="{bottom - top}" z_order="0"/>'
            )
        parts.append("</image>")
    parts.append("</annotations>")
    out.mkdir(exist_ok=True)
    path = out / "annotations.xml"
    path.write_text("\n".join(parts))
    return path


def test_three_rounds_suggest_import_train(camvid_images, tmp_path, capsys):
    work, images, truth, names = camvid_images
    project = tmp_path / "project"
    code, out, err = _run("label", "init", str(project), "--images", str(images), "--config", str(work / "camvid.yaml"), capsys=capsys)  # fmt: skip
    assert code == 0, err
    assert f"{POOL + VAL} images" in out
    # The team holds out 4 fully labeled images for validation.
    val = tmp_path / "validation"
    val.mkdir()
    for n in names[POOL:]:
        shutil.copy(truth / n, val / n)
    code, out, err = _run("label", "import", str(project), "--from", str(val), "--validation", capsys=capsys)
    assert code == 0, err
    answers = (_answer_png, _answer_label_studio, _answer_cvat)
    vals = []
    for k, answer in enumerate(answers, start=1):
        code, out, err = _run("label", "suggest", str(project), "--budget", "24", "--strategy", "entropy", capsys=capsys)  # fmt: skip
        assert code == 0, err
        folder = project / "rounds" / f"round-{k:03d}"
        for f in (
            "suggestions.json",
            "suggestions.csv",
            "label-studio-tasks.json",
            "label-studio-config.xml",
            "cvat.xml",
        ):
            assert (folder / f).stat().st_size > 0, f
        assert list((folder / "overlays").glob("*.png"))
        requested = _requested(folder)
        assert sum(map(len, requested.values())) == 24 and not set(requested) & set(names[POOL:])
        reply = answer(folder, truth, tmp_path / f"answer{k}")
        code, out, err = _run("label", "import", str(project), "--from", str(reply), "--annotator", "gt", capsys=capsys)  # fmt: skip
        assert code == 0, err
        with LabelingProject(project) as proj:  # the stored pixels are the answer, inside the regions only
            split, mask = proj.split("pool")
            for i, name in enumerate(split.image_names):
                want = _inside(_ground_truth(truth, name), [])
                for r, c in np.argwhere(mask[i]):
                    want[r * RH : (r + 1) * RH, c * RW : (c + 1) * RW] = _ground_truth(truth, name)[
                        r * RH : (r + 1) * RH, c * RW : (c + 1) * RW
                    ]
                np.testing.assert_array_equal(split.labels[i], want, err_msg=name)
            assert int(mask.sum()) <= 24 * k
        code, out, err = _run("label", "train", str(project), "--max-epochs", "30", "--patience", "5", capsys=capsys)  # fmt: skip
        assert code == 0, err
        with LabelingProject(project) as proj:
            vals.append(proj.status(plot=False)["models"][-1]["val_miou"])
    assert vals[-1] > vals[0] + 0.02, vals  # labels help: the validation curve rises over the rounds
    code, out, err = _run("label", "status", str(project), capsys=capsys)
    assert code == 0 and "round 3" in out and "validation mIoU" in out
    assert (project / "status.png").stat().st_size > 0
    # Label Studio tasks: a region hint per request and the model's pre-annotation inside it.
    tasks = json.loads((project / "rounds" / "round-003" / "label-studio-tasks.json").read_text())
    kinds = {r["type"] for t in tasks for p in t["predictions"] for r in p["result"]}
    assert {"rectanglelabels", "brushlabels"} <= kinds


def _counts(project: Path) -> tuple[int, int, int]:
    db = sqlite3.connect(project / "project.db")
    try:
        return tuple(
            db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("labels", "imports", "requests")
        )
    finally:
        db.close()


@pytest.fixture()
def suggested(camvid_images, tmp_path):
    work, images, truth, names = camvid_images
    project = tmp_path / "project"
    with LabelingProject.init(project, images, work / "camvid.yaml") as proj:
        proj.suggest(12, "random", overlays=False)
    return project, truth, project / "rounds" / "round-001"


def test_bad_inputs_give_one_line_and_change_nothing(suggested, camvid_images, tmp_path, capsys):
    project, truth, folder = suggested
    work, images, _, names = camvid_images
    before = _counts(project)
    requested = _requested(folder)
    name = sorted(requested)[0]
    cases = {}
    wrong_size = tmp_path / "wrong_size"
    wrong_size.mkdir()
    cv2.imwrite(str(wrong_size / name), np.zeros((100, 100), np.uint8))
    cases["wrong_size"] = (wrong_size, "100x100")
    out_of_range = tmp_path / "out_of_range"
    out_of_range.mkdir()
    lab = _inside(_ground_truth(truth, name), requested[name])
    lab[lab == 3] = 40
    lab[requested[name][0][1], requested[name][0][0]] = 40
    cv2.imwrite(str(out_of_range / name), lab)
    cases["out_of_range"] = (out_of_range, "40")
    never = tmp_path / "never"
    never.mkdir()
    other = next(n for n in names if n not in requested)
    cv2.imwrite(str(never / other), _ground_truth(truth, other))
    cases["never_requested"] = (never, "none of the regions")
    for case, (src, needle) in cases.items():
        code, out, err = _run("label", "import", str(project), "--from", str(src), capsys=capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in err, (case, err)
        assert _counts(project) == before, case
    # A good import, then the same file again: a duplicate, refused.
    good = _answer_png(folder, truth, tmp_path / "good")
    assert _run("label", "import", str(project), "--from", str(good), capsys=capsys)[0] == 0
    after = _counts(project)
    code, out, err = _run("label", "import", str(project), "--from", str(good), capsys=capsys)
    assert code == 2 and "imported before" in err and _counts(project) == after
    # A corrupt image refuses the project at init, naming the file.
    broken = tmp_path / "broken"
    shutil.copytree(images, broken)
    (broken / "zz_corrupt.png").write_bytes(b"not a png")
    code, out, err = _run("label", "init", str(tmp_path / "p2"), "--images", str(broken), "--config", str(work / "camvid.yaml"), capsys=capsys)  # fmt: skip
    assert code == 2 and "zz_corrupt.png" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "p2" / "project.db").exists()
    code, out, err = _run("label", "suggest", str(tmp_path / "nowhere"), "--budget", "3", capsys=capsys)
    assert code == 2 and "not a labeling project" in err


#: runs ``ralis-gym label ...`` with a connection that stops inside the import's transaction (after
#: its rows are written, before the commit) and says so through a marker file, so the test can kill
#: the process exactly there
HALT_IN_TRANSACTION = """
import pathlib, sqlite3, sys, time

class Halting(sqlite3.Connection):
    def executemany(self, sql, rows):
        cursor = super().executemany(sql, rows)
        if sql.startswith("INSERT INTO labels"):
            pathlib.Path(sys.argv[1]).touch()
            time.sleep(600)
        return cursor

connect = sqlite3.connect
sqlite3.connect = lambda *a, **k: connect(*a, factory=Halting, **k)
from ralis_gym.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_killed_import_leaves_the_project_consistent(suggested, tmp_path):
    """SIGKILL the import inside its transaction, with every row of it written but not committed:
    the project is as before (SQLite rolls the transaction back), and a rerun imports everything."""
    project, truth, folder = suggested
    reply = _answer_label_studio(folder, truth, tmp_path / "ls")
    args = ["label", "import", str(project), "--from", str(reply)]
    before = _counts(project)
    marker = tmp_path / "in-transaction"
    proc = subprocess.Popen(
        [sys.executable, "-c", HALT_IN_TRANSACTION, str(marker), *args], stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the import never reached its transaction"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert _counts(project) == before  # nothing of the killed import is visible
    db = sqlite3.connect(project / "project.db")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    final = subprocess.run([sys.executable, "-m", "ralis_gym.cli", *args], capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    labels, imports, requests = _counts(project)
    assert imports == before[1] + 1 and labels > before[0] and requests == before[2]


def test_suggest_with_a_trained_ralis_policy(camvid_images, tmp_path):
    """``--strategy ralis``: the committed RALIS policy scores every open region with the paper's
    features; its requests are distinct regions ranked by the policy's Q-values, a later round never
    requests them again, and without a policy file the strategy is refused."""
    work, images, truth, names = camvid_images
    policy = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "ralis-camvid-fast.zip"
    with LabelingProject.init(tmp_path / "p", images, work / "camvid.yaml") as proj:
        out = proj.suggest(10, "ralis", policy=policy, overlays=False)
        queue = json.loads((Path(out["folder"]) / "suggestions.json").read_text())
        assert out["regions"] == 10 and len({q["region_id"] for q in queue}) == 10
        scores = [q["score"] for q in queue]
        assert np.isfinite(scores).all() and scores == sorted(scores, reverse=True)
        ent = proj.suggest(10, "entropy", overlays=False)
        ent_ids = {q["region_id"] for q in json.loads((Path(ent["folder"]) / "suggestions.json").read_text())}
        assert not ent_ids & {q["region_id"] for q in queue}  # never requested twice
    with pytest.raises(Exception, match="needs a trained policy"):
        with LabelingProject(tmp_path / "p") as proj:
            proj.suggest(3, "ralis")
