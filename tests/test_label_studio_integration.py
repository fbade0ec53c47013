"""A real Label Studio round trip of a labeling project: ``ralis-gym label suggest`` writes the round's
tasks and labeling config, Label Studio imports them (images served by its local-files storage),
annotations are created through its API from CamVid ground truth, and its JSON export is imported
back with ``ralis-gym label import``.

Label Studio pins many packages, so it lives in its own virtualenv: set ``RALIS_GYM_LABEL_STUDIO`` to
its ``label-studio`` executable (``.ci/run`` does). Without it the test is skipped. The server runs on
127.0.0.1 on a free port with a temporary data directory and HOME, and is stopped (process group
kill) whatever happens. HTTP with the standard library only.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from ralis_gym.cli import main as cli
from ralis_gym.data.camvid import CAMVID_CLASSES
from ralis_gym.labeling import LabelingProject
from ralis_gym.labeling import formats as F

pytestmark = pytest.mark.slow

ENV = "RALIS_GYM_LABEL_STUDIO"
TOKEN = "ralisgym0123456789abcdef"  # legacy API token given to the user at creation (--user-token)
USER, PASSWORD = "ralis-gym@example.com", "ralis-gym-test-pw"
START_TIMEOUT = 300.0
CLASSES = list(CAMVID_CLASSES)
IGNORE, W, H, RW, RH = 11, 480, 360, 80, 90
IMAGES = ("0001TP_006690.png", "0006R0_f02040.png", "0016E5_01290.png")

CONVERTER_SCRIPT = r"""
import json, sys
import numpy as np
try:
    from label_studio_sdk.converter.brush import encode_rle
except ImportError:
    from label_studio_converter.brush import encode_rle
z = np.load(sys.argv[1])
print(json.dumps([encode_rle(z[f"a{i}"].astype(int)) for i in range(int(z["n"]))]))
"""


def label_studio_executable() -> Path:
    value = os.environ.get(ENV)
    if not value:
        pytest.skip(
            f"${ENV} is unset: point it at a label-studio executable (its own venv; .ci/run makes one)"
        )
    exe = Path(value).expanduser()
    if not (exe.is_file() and os.access(exe, os.X_OK)):
        pytest.skip(f"${ENV}={value} is not an executable file (label-studio install failed or moved?)")
    return exe


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    def __init__(self, base: str, token: str) -> None:
        self.base, self.token = base, token

    def call(self, method: str, path: str, body: Any = None, raw: bool = False, timeout: float = 120) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.base + path, data=data, method=method,
            headers={"Authorization": f"Token {self.token}", "Content-Type": "application/json"},
        )  # fmt: skip
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                payload = resp.read()
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{method} {path} -> HTTP {exc.code}: {exc.read()[:2000]!r}") from None
        return payload if raw else json.loads(payload or b"null")


def log_tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory, camvid_root):
    """A running Label Studio with a user and a legacy API token; yields (client, docroot, info)."""
    exe = label_studio_executable()
    root = tmp_path_factory.mktemp("label-studio")
    docroot = root / "files"
    (docroot / "images").mkdir(parents=True)
    for name in IMAGES:  # the images Label Studio serves (copies: its storage must own the folder)
        shutil.copyfile(camvid_root / "camvid" / "train" / name, docroot / "images" / name)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "DJANGO_"))}
    env.update({
        "HOME": str(root / "home"),  # it writes ~/.config/label-studio: keep the real HOME clean
        "LABEL_STUDIO_BASE_DATA_DIR": str(root / "data"),
        "LOCAL_FILES_SERVING_ENABLED": "true",
        "LOCAL_FILES_DOCUMENT_ROOT": str(docroot),
        "LATEST_VERSION_CHECK": "false",  # no pypi.org request at start
        "COLLECT_ANALYTICS": "false",
        "SENTRY_DSN": "",
        "FRONTEND_SENTRY_DSN": "",
    })  # fmt: skip
    for key in ("USERNAME", "PASSWORD", "USER_TOKEN", "PORT", "HOST"):  # read by label-studio as settings
        env.pop(key, None)
    cmd = [
        str(exe), "start", "--no-browser", "--data-dir", str(root / "data"),
        "--internal-host", "127.0.0.1", "--port", str(port),
        "--username", USER, "--password", PASSWORD, "--user-token", TOKEN, "--enable-legacy-api-token",
    ]  # fmt: skip
    log = root / "label-studio.log"
    t0 = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True
        )
    try:
        base = f"http://127.0.0.1:{port}"
        while True:
            if proc.poll() is not None:
                pytest.fail(f"label-studio exited with {proc.returncode} before answering:\n{log_tail(log)}")
            if time.monotonic() - t0 > START_TIMEOUT:
                pytest.fail(
                    f"label-studio did not answer {base}/health within {START_TIMEOUT:.0f} s:\n{log_tail(log)}"
                )
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.5)
        started = time.monotonic() - t0
        client = Client(base, TOKEN)
        me = client.call("GET", "/api/current-user/whoami")
        assert me["email"] == USER
        yield client, docroot, {"start_seconds": started, "log": log, "exe": exe}
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=20)


def ls_rgba_rles(
    masks: list[np.ndarray], colors: list[tuple[int, int, int]], exe: Path, tmp: Path
) -> tuple[list[list[int]], str]:
    """Brush RLEs as the Label Studio editor stores them (RGBA canvas: the label's colour, alpha 255
    where painted), encoded by Label Studio's own converter from its venv (ours if it lacks one);
    returns the RLEs and which encoder made them."""
    arrays = []
    for m, (r, g, b) in zip(masks, colors):
        rgba = np.zeros((*m.shape, 4), dtype=np.uint8)
        rgba[m] = (r, g, b, 255)
        arrays.append(rgba.reshape(-1))
    np.savez(tmp / "brush.npz", n=len(arrays), **{f"a{i}": a for i, a in enumerate(arrays)})
    py = exe.parent / "python"
    proc = subprocess.run(
        [str(py), "-c", CONVERTER_SCRIPT, str(tmp / "brush.npz")], capture_output=True, text=True
    )
    if proc.returncode == 0:
        return json.loads(proc.stdout.strip().splitlines()[-1]), f"Label Studio's converter ({py})"
    return [F.brush_encode(a) for a in arrays], "ralis_gym (Label Studio's converter not importable)"


def brush_result(rle: list[int], cls: int, rid: str) -> dict:
    return {
        "id": rid, "type": "brushlabels", "from_name": F.BRUSH_NAME, "to_name": F.IMAGE_NAME,
        "original_width": W, "original_height": H, "image_rotation": 0, "origin": "manual",
        "value": {"format": "rle", "rle": rle, "brushlabels": [CLASSES[cls]]},
    }  # fmt: skip


def test_label_studio_round_trip(label_studio, camvid_root, tmp_path):
    client, docroot, info = label_studio
    gt = {n: cv2.imread(str(camvid_root / "camvid" / "trainannot" / n), cv2.IMREAD_UNCHANGED) for n in IMAGES}
    # A labeling project over the images Label Studio serves; its first round's files are the input.
    config = tmp_path / "camvid.yaml"
    config.write_text(json.dumps({"class_names": CLASSES, "ignore_index": IGNORE, "region_size": [RW, RH]}))
    proj_dir = tmp_path / "project"
    assert (
        cli(["label", "init", str(proj_dir), "--images", str(docroot / "images"), "--config", str(config)])
        == 0
    )
    assert (
        cli(["label", "suggest", str(proj_dir), "--budget", str(4 * len(IMAGES)), "--strategy", "random"])
        == 0
    )
    round_dir = proj_dir / "rounds" / "round-001"
    tasks = json.loads((round_dir / "label-studio-tasks.json").read_text())
    requested = {t["data"]["name"]: t["data"]["regions"] for t in tasks}

    project = client.call(
        "POST",
        "/api/projects",
        {
            "title": "ralis-gym round trip",
            "label_config": (round_dir / "label-studio-config.xml").read_text(),
        },
    )
    pid = project["id"]
    storage = client.call(
        "POST", "/api/storages/localfiles",
        {"project": pid, "title": "images", "path": str(docroot / "images"), "use_blob_urls": True},
    )  # fmt: skip
    assert storage["path"] == str(docroot / "images")
    imported = client.call("POST", f"/api/projects/{pid}/import", tasks)
    assert imported["task_count"] == len(tasks) and imported["prediction_count"] == len(tasks), imported
    listed = client.call("GET", f"/api/tasks?project={pid}&page_size=100")
    listed = listed["tasks"] if isinstance(listed, dict) else listed
    by_name = {t["data"]["name"]: t for t in listed}
    assert set(by_name) == set(requested)

    # Label Studio serves the images to the editor through its local-files storage
    first = by_name[IMAGES[0]]
    served = client.call("GET", first["data"]["image"], raw=True)
    assert served == (docroot / "images" / IMAGES[0]).read_bytes()

    palette = [tuple(int(h[i : i + 2], 16) for i in (1, 3, 5)) for h in F.class_colors(CLASSES)]
    expected = {}
    for k, name in enumerate(sorted(requested)):
        task = by_name[name]
        inside = np.zeros((H, W), dtype=bool)
        for reg in task["data"]["regions"]:  # the boxes as Label Studio kept them in the task data
            x, y, w, h = reg["box"]
            inside[y : y + h, x : x + w] = True
        want = np.where(inside, gt[name], IGNORE).astype(np.uint8)
        expected[name] = want
        present = [c for c in np.unique(want).tolist() if c != IGNORE]
        rles, encoder = ls_rgba_rles(
            [want == c for c in present], [palette[c] for c in present], info["exe"], tmp_path
        )
        truth = [brush_result(r, c, f"gt{c}") for r, c in zip(rles, present)]
        # a first, sloppy annotation (Sky on every labeled pixel), then the real one: the later one wins
        sloppy = [brush_result(F.brush_mask_rle(want != IGNORE), 0, "sloppy")]
        client.call("POST", f"/api/tasks/{task['id']}/annotations", {"result": sloppy, "lead_time": 1.0})
        time.sleep(0.05)  # distinct updated_at
        client.call("POST", f"/api/tasks/{task['id']}/annotations", {"result": truth, "lead_time": 2.0})
        if k == 0:  # and a skipped (cancelled) one after it must not count
            road = [brush_result(F.brush_mask_rle(np.ones((H, W), bool)), 3, "skipped")]
            client.call(
                "POST", f"/api/tasks/{task['id']}/annotations", {"result": road, "was_cancelled": True}
            )

    export = client.call(
        "GET", f"/api/projects/{pid}/export?exportType=JSON&download_all_tasks=true", raw=True
    )
    data = json.loads(export)
    assert len(data) == len(requested)
    assert sum(len(t["annotations"]) for t in data) == 2 * len(requested) + 1
    for t in data:  # the region ids and boxes came back in the task data
        assert t["data"]["regions"] == requested[t["data"]["name"]]
    maps = F.parse_label_studio_export(data, CLASSES, {n: (W, H) for n in IMAGES}, IGNORE)
    assert set(maps) == set(requested)
    for name in requested:
        np.testing.assert_array_equal(maps[name], expected[name], err_msg=name)
    # ... and the export imported back into the project: exactly the requested regions, labeled.
    path = tmp_path / "export.json"
    path.write_bytes(export)
    assert cli(["label", "import", str(proj_dir), "--from", str(path), "--annotator", "ls"]) == 0
    with LabelingProject(proj_dir) as proj:
        split, mask = proj.split("pool")
        assert int(mask.sum()) == sum(
            bool((expected[n][r["box"][1] : r["box"][1] + RH, r["box"][0] : r["box"][0] + RW] != IGNORE).any())
            for n, regs in requested.items() for r in regs
        )  # fmt: skip
        for i, name in enumerate(split.image_names):
            want = expected.get(name, np.full((H, W), IGNORE, np.uint8))
            np.testing.assert_array_equal(split.labels[i], want, err_msg=name)
    print(f"label-studio answered after {info['start_seconds']:.1f} s; annotation RLEs by {encoder}")
