"""A labeling project on a team's own images: which regions to annotate next, round after round.

A project is a folder::

    PROJECT/project.db          every piece of state (SQLite, schema version in ``meta``)
    PROJECT/models/model-N.pt   the segmentation model after each ``train`` (atomic writes)
    PROJECT/rounds/round-N/     what ``suggest`` wrote for the annotators (JSON, CSV, overlays,
                                Label Studio tasks and config, CVAT XML)
    PROJECT/status.png          ``status``: validation curve and class balance of the labels

The loop: ``init`` (images validated, class names / ignore id / region size from a dataset YAML),
``suggest`` (score every unlabeled, not yet requested region with the current model and request the
best ``budget`` of them), the team annotates, ``import_annotations`` (Label Studio JSON, CVAT XML or
PNG masks: only pixels inside requested regions are kept, everything is validated before anything is
written, and the whole import is one SQLite transaction, so a crash or Ctrl-C leaves the project as it
was), ``train`` (fine-tune the fast model on every labeled region, early stopping on the held-out
validation images if the team labeled some, ``import_annotations(validation=True)``), repeat.

Why SQLite: one file, transactions and a schema version from the standard library; the labeled
pixels of a region live in the same row that marks it labeled (zlib-compressed), so "labeled" and
"its pixels" can never disagree.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import sqlite3
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ralis_gym.config import check_keys, load_yaml
from ralis_gym.data.base import IMAGE_SUFFIXES, DatasetInfo, SegmentationSplit, image_files, read_image
from ralis_gym.errors import ConfigError, DatasetError, RalisGymError
from ralis_gym.fileio import atomic_write, sha256_file, unique_temporary
from ralis_gym.methods import HEURISTICS
from ralis_gym.regions import RegionGrid, check_tiling

SCHEMA_VERSION = 1
DB_FILE = "project.db"
#: acquisition strategies of ``suggest`` (``ralis`` needs a trained policy)
STRATEGIES = (*HEURISTICS, "ralis")
#: keys read from a dataset YAML (a custom-dataset YAML's other keys are accepted and ignored)
CONFIG_KEYS = ("name", "class_names", "ignore_index", "image_size", "region_size", "palette")
OTHER_DATASET_KEYS = ("images_dir", "masks_dir", "splits", "split_seed", "split_fractions")

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE images (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, sha256 TEXT NOT NULL,
    role TEXT NOT NULL DEFAULT 'pool' CHECK (role IN ('pool', 'validation'))
);
CREATE TABLE models (
    id INTEGER PRIMARY KEY, path TEXT NOT NULL, created_at TEXT NOT NULL, labeled_regions INTEGER NOT NULL,
    val_miou REAL, epochs INTEGER NOT NULL, train_seconds REAL NOT NULL
);
CREATE TABLE rounds (
    id INTEGER PRIMARY KEY, created_at TEXT NOT NULL, strategy TEXT NOT NULL, budget INTEGER NOT NULL,
    model_id INTEGER REFERENCES models(id), folder TEXT NOT NULL
);
CREATE TABLE requests (
    image_id INTEGER NOT NULL REFERENCES images(id), row INTEGER NOT NULL, col INTEGER NOT NULL,
    round_id INTEGER NOT NULL REFERENCES rounds(id), rank INTEGER NOT NULL, score REAL NOT NULL,
    PRIMARY KEY (image_id, row, col)
);
CREATE TABLE imports (
    id INTEGER PRIMARY KEY, source TEXT NOT NULL, sha256 TEXT NOT NULL UNIQUE, format TEXT NOT NULL,
    annotator TEXT, imported_at TEXT NOT NULL, regions INTEGER NOT NULL, validation INTEGER NOT NULL
);
CREATE TABLE labels (
    image_id INTEGER NOT NULL REFERENCES images(id), row INTEGER NOT NULL, col INTEGER NOT NULL,
    import_id INTEGER NOT NULL REFERENCES imports(id), pixels BLOB NOT NULL,
    PRIMARY KEY (image_id, row, col)
);
"""


class ProjectError(RalisGymError, ValueError):
    """A labeling project that is missing, of another schema, or asked to do something inconsistent."""


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def load_label_config(path: str | os.PathLike) -> dict[str, Any]:
    """Class names, ignore id, image size, region size (and name, palette) from a dataset YAML.

    A custom-dataset YAML (``ralis_gym.data.custom``) works as is; its folder and split keys are not
    needed here and are ignored. Unknown keys are refused with the list of valid ones.
    """
    raw = load_yaml(path)
    check_keys(raw, CONFIG_KEYS + OTHER_DATASET_KEYS, f"dataset config {path}")
    return {k: raw[k] for k in CONFIG_KEYS if k in raw}


def _info_from(config: dict[str, Any], first_image_size: tuple[int, int], where: str) -> DatasetInfo:
    names = config.get("class_names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"{where}: class_names must be a non-empty list of names")
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: class_names has duplicates: {names}")
    ignore = config.get("ignore_index", 255)
    if not isinstance(ignore, int) or not len(names) <= ignore <= 255:
        raise ConfigError(f"{where}: ignore_index must be an integer in {len(names)}..255; got {ignore!r}")

    def size(key: str, default: tuple[int, int] | None) -> tuple[int, int]:
        value = config.get(key, default)
        if (
            not isinstance(value, (list, tuple))
            or len(value) != 2
            or not all(isinstance(v, int) and v > 0 for v in value)
        ):
            raise ConfigError(f"{where}: {key} must be [width, height] in pixels; got {value!r}")
        return int(value[0]), int(value[1])

    image_size = size("image_size", first_image_size)
    region_size = size("region_size", None)
    check_tiling(image_size, region_size, where)
    palette = tuple(tuple(int(c) for c in rgb) for rgb in config.get("palette", ()) or ())
    return DatasetInfo(
        str(config.get("name", "project")), tuple(names), int(ignore), image_size, region_size, palette
    )


class LabelingProject:
    """One labeling project folder (see the module docstring); ``LabelingProject.init`` makes one.

    Every method that changes the project writes its files first (atomically) and then records them
    in one database transaction, so an interrupted call changes nothing a later call can see.
    """

    def __init__(self, folder: str | os.PathLike, device: str = "auto") -> None:
        self.folder = Path(folder).expanduser().resolve()
        db = self.folder / DB_FILE
        if not db.is_file():
            raise ProjectError(
                f"{self.folder} is not a labeling project (no {DB_FILE}); create one with "
                "`ralis-gym label init PROJECT --images DIR --config dataset.yaml`"
            )
        self.db = sqlite3.connect(db, timeout=60)
        self.db.execute("PRAGMA foreign_keys = ON")
        meta = dict(self.db.execute("SELECT key, value FROM meta"))
        version = int(meta.get("schema_version", 0))
        if version != SCHEMA_VERSION:
            raise ProjectError(
                f"{db} has schema version {version}; this ralis-gym reads version {SCHEMA_VERSION}"
            )
        cfg = json.loads(meta["config"])
        self.info = DatasetInfo(
            cfg["name"], tuple(cfg["class_names"]), cfg["ignore_index"], tuple(cfg["image_size"]),
            tuple(cfg["region_size"]), tuple(tuple(c) for c in cfg.get("palette", ())),
        )  # fmt: skip
        self.images_dir = Path(meta["images_dir"])
        self.start = meta.get("start") or None
        self.device = device
        self.grid = RegionGrid(self.info.image_size, self.info.region_size)
        self._images: dict[str, np.ndarray] = {}

    # --- creation ---------------------------------------------------------------------------
    @classmethod
    def init(
        cls,
        folder: str | os.PathLike,
        images: str | os.PathLike,
        config: str | os.PathLike | dict[str, Any] | None = None,
        start: str | os.PathLike | None = None,
        device: str = "auto",
    ) -> LabelingProject:
        """Create a project over the images of a folder. ``config`` (a dataset YAML or a dict) gives
        ``class_names``, ``region_size`` and optionally ``ignore_index`` (255), ``image_size`` (the
        first image's) and ``palette``. Every image is decoded once: a corrupt file or one of another
        size is refused, naming it. ``start``: a fast-model checkpoint to suggest with before the
        first ``train`` (a start network of ``ralis-gym pretrain`` with the same classes); without
        one the first round is scored by an untrained network (close to random)."""
        folder, images = Path(folder).expanduser().resolve(), Path(images).expanduser().resolve()
        if (folder / DB_FILE).exists():
            raise ProjectError(f"{folder} is already a labeling project; open it or pick another folder")
        if not images.is_dir():
            raise ProjectError(f"images folder {images} does not exist")
        paths = image_files(images)
        if not paths:
            raise ProjectError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {images}")
        if config is None:
            raise ConfigError(
                "a labeling project needs class_names and region_size: pass --config dataset.yaml"
            )
        cfg = load_label_config(config) if not isinstance(config, dict) else dict(config)
        first = read_image(paths[0])
        info = _info_from(
            cfg, (first.shape[1], first.shape[0]), str(config if not isinstance(config, dict) else "config")
        )
        for p in paths:
            img = read_image(p)  # DatasetError naming a corrupt file
            if (img.shape[1], img.shape[0]) != info.image_size:
                raise DatasetError(
                    f"image {p} is {img.shape[1]}x{img.shape[0]} but the project's images are "
                    f"{info.image_size[0]}x{info.image_size[1]} (WxH); resize it or set image_size"
                )
        if start is not None and not Path(start).is_file():
            raise ProjectError(f"start checkpoint {start} does not exist")
        folder.mkdir(parents=True, exist_ok=True)
        tmp = unique_temporary(folder / DB_FILE)
        db = sqlite3.connect(tmp)
        try:
            with db:
                db.executescript(SCHEMA)
                meta = {
                    "schema_version": str(SCHEMA_VERSION), "created_at": _now(), "images_dir": str(images),
                    "start": str(Path(start).resolve()) if start else "",
                    "config": json.dumps({
                        "name": info.name, "class_names": list(info.class_names),
                        "ignore_index": info.ignore_index, "image_size": list(info.image_size),
                        "region_size": list(info.region_size), "palette": [list(c) for c in info.palette],
                    }),
                }  # fmt: skip
                db.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
                db.executemany(
                    "INSERT INTO images (name, sha256) VALUES (?, ?)",
                    [(p.name, sha256_file(p)) for p in paths],
                )
            db.close()
            os.replace(tmp, folder / DB_FILE)  # the project exists only once it is complete
        except BaseException:
            db.close()
            tmp.unlink(missing_ok=True)
            raise
        return cls(folder, device=device)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> LabelingProject:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic change: committed when the block ends, rolled back if it raises."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.rollback()
            raise
        self.db.commit()

    # --- images, labels, model ----------------------------------------------------------------
    def image_names(self, role: str | None = None) -> list[str]:
        query, args = "SELECT name FROM images ORDER BY id", ()
        if role is not None:
            query, args = "SELECT name FROM images WHERE role = ? ORDER BY id", (role,)
        return [r[0] for r in self.db.execute(query, args)]

    def _image(self, name: str) -> np.ndarray:
        if name not in self._images:
            self._images[name] = read_image(self.images_dir / name)
        return self._images[name]

    def _labeled(self, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Label maps ``[I, H, W]`` (ignore where nothing is labeled) and the labeled-region mask
        ``[I, rows, cols]`` of some images, from the database."""
        w, h = self.info.image_size
        rw, rh = self.info.region_size
        index = {n: i for i, n in enumerate(names)}
        labels = np.full((len(names), h, w), self.info.ignore_index, dtype=np.uint8)
        mask = np.zeros((len(names), self.grid.rows, self.grid.cols), dtype=bool)
        rows = self.db.execute(
            "SELECT images.name, labels.row, labels.col, labels.pixels FROM labels JOIN images "
            "ON images.id = labels.image_id"
        )
        for name, r, c, blob in rows:
            if name in index:
                i = index[name]
                patch = np.frombuffer(zlib.decompress(blob), dtype=np.uint8).reshape(rh, rw)
                labels[i, r * rh : (r + 1) * rh, c * rw : (c + 1) * rw] = patch
                mask[i, r, c] = True
        return labels, mask

    def split(self, role: str = "pool") -> tuple[SegmentationSplit, np.ndarray]:
        """The images of a role (``pool`` or ``validation``) with their labels so far, and the
        labeled-region mask ``[I, rows, cols]``."""
        names = self.image_names(role)
        if not names:
            raise ProjectError(f"the project has no {role} images")
        labels, mask = self._labeled(names)
        images = np.stack([self._image(n) for n in names])
        return SegmentationSplit(
            self.info, f"label-{self.info.name}-{role}", tuple(names), images, labels
        ), mask

    def latest_model(self) -> tuple[int | None, str | None]:
        row = self.db.execute("SELECT id, path FROM models ORDER BY id DESC LIMIT 1").fetchone()
        return (row[0], str(self.folder / row[1])) if row else (None, self.start)

    def segmenter(self, seed: int = 0) -> Any:
        """The current fast model: the newest ``train`` result, else the start checkpoint, else a
        fresh (untrained) network."""
        from ralis_gym.segmentation.fast import FastSegmenter

        _, path = self.latest_model()
        if path is None:
            return FastSegmenter(self.info, device=self.device, seed=seed)
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        state = ckpt.get("model_state", ckpt)
        return FastSegmenter.from_state(self.info, state, device=self.device, seed=seed)

    # --- the loop ------------------------------------------------------------------------------
    def suggest(
        self, budget: int, strategy: str = "entropy", policy: str | os.PathLike | None = None, seed: int = 0,
        mc_passes: int = 20, overlays: bool = True, image_url: str | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """Request the ``budget`` best unlabeled, not yet requested regions; write the round's files.

        Strategies: the label-free heuristics of the environment (``entropy``, ``margin``, ``bald``,
        ``class_balance``), ``random`` (seeded) or ``ralis`` (a trained ``RalisDQN`` policy scoring
        every region with the paper's features; ``policy`` is its .zip). ``image_url`` is the prefix
        of the images' URLs in the Label Studio tasks (default: Label Studio's local-files URL
        relative to the images folder's parent, see the README). Returns the round's summary.
        """
        from ralis_gym.labeling import formats
        from ralis_gym.segmentation.uncertainty import LABEL_FREE_SCORES, region_scores

        if strategy not in STRATEGIES:
            raise ConfigError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")
        if not isinstance(budget, int) or budget <= 0:
            raise ConfigError(f"budget must be a positive number of regions; got {budget!r}")
        if strategy == "ralis" and (policy is None or not Path(policy).is_file()):
            raise ConfigError(f"strategy 'ralis' needs a trained policy file (--policy); got {policy!r}")
        split, labeled = self.split("pool")
        names = list(split.image_names)
        ids = {n: i for n, i in self.db.execute("SELECT name, id FROM images")}
        requested = np.zeros_like(labeled)
        slot = {n: i for i, n in enumerate(names)}
        for name, r, c in self.db.execute(
            "SELECT images.name, row, col FROM requests JOIN images ON images.id = requests.image_id"
        ):
            if name in slot:
                requested[slot[name], r, c] = True
        open_ = ~labeled & ~requested
        if not open_.any():
            raise ProjectError("every region of the pool is labeled or already requested")
        model_id, _ = self.latest_model()
        n_round = 1 + (self.db.execute("SELECT COALESCE(MAX(id), 0) FROM rounds").fetchone()[0])
        seg = self.segmenter(seed)
        rows, cols = self.grid.rows, self.grid.cols
        idx = np.arange(len(names))
        with torch.no_grad():
            if strategy == "random":
                scores = np.random.default_rng([seed, n_round]).random(open_.shape)  # a new draw per round
            elif strategy in LABEL_FREE_SCORES:
                class_pixels = np.bincount(split.labels.reshape(-1), minlength=256)[: self.info.num_classes]
                scores = region_scores(seg, split, idx, rows, cols, strategy, class_pixels, mc_passes)
                scores = scores.cpu().numpy()
            else:
                scores = self._ralis_scores(seg, split, policy)
        scores = np.where(open_, scores, -np.inf)
        order = np.argsort(-scores, axis=None, kind="stable")[: min(budget, int(open_.sum()))]
        image, row, col = np.unravel_index(order, open_.shape)
        # Predicted classes and pre-annotations are needed for the requested images only.
        wanted = np.unique(image)
        pred = np.zeros((len(names), *split.labels.shape[1:]), dtype=np.uint8)
        pred[wanted] = seg.predict(split, wanted)
        folder = self.folder / "rounds" / f"round-{n_round:03d}"
        rw, rh = self.info.region_size
        queue = []
        for rank, (i, r, c) in enumerate(zip(image, row, col), start=1):
            box = [int(c) * rw, int(r) * rh, rw, rh]
            patch = pred[i, r * rh : (r + 1) * rh, c * rw : (c + 1) * rw]
            counts = np.bincount(patch.reshape(-1), minlength=self.info.num_classes)
            top = [self.info.class_names[k] for k in np.argsort(-counts)[:3] if counts[k] > 0]
            queue.append({
                "rank": rank, "image": names[i], "row": int(r), "col": int(c), "box": box,
                "score": float(scores[i, r, c]), "predicted_classes": top,
                "region_id": f"{names[i]}:{int(r)}:{int(c)}",
            })  # fmt: skip
        self._write_round(folder, split, queue, pred, overlays, image_url, formats)
        with self._transaction() as db:
            cur = db.execute(
                "INSERT INTO rounds (created_at, strategy, budget, model_id, folder) VALUES (?, ?, ?, ?, ?)",
                (_now(), strategy, budget, model_id, str(folder.relative_to(self.folder))),
            )
            db.executemany(
                "INSERT INTO requests (image_id, row, col, round_id, rank, score) VALUES (?, ?, ?, ?, ?, ?)",
                [(ids[q["image"]], q["row"], q["col"], cur.lastrowid, q["rank"], q["score"]) for q in queue],
            )
        return {"round": cur.lastrowid, "regions": len(queue), "folder": str(folder), "strategy": strategy}

    def _ralis_scores(self, seg: Any, split: SegmentationSplit, policy: str | os.PathLike) -> np.ndarray:
        from agents import RalisDQN
        from agents.suggest import rank_regions

        model = RalisDQN.load(str(policy), device="cpu")
        names = self.image_names("validation")
        state = (
            self.split("validation")[0] if names else split.subset(range(min(10, len(split))), name="state")
        )
        queue = rank_regions(model.q_net, seg, split, state)
        scores = np.full((len(split), self.grid.rows, self.grid.cols), -np.inf)
        index = {n: i for i, n in enumerate(split.image_names)}
        rw, rh = self.info.region_size
        for item in queue:
            x, y, _, _ = item["box"]
            scores[index[item["image"]], y // rh, x // rw] = item["score"]
        return scores

    def _write_round(self, folder: Path, split, queue, pred, overlays: bool, image_url, formats) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        text = json.dumps(queue, indent=2)
        atomic_write(folder / "suggestions.json", lambda f: f.write(text.encode()))
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["rank", "image", "x", "y", "width", "height", "score", "predicted_classes"])
        for q in queue:
            writer.writerow(
                [q["rank"], q["image"], *q["box"], f"{q['score']:.6g}", " ".join(q["predicted_classes"])]
            )
        atomic_write(folder / "suggestions.csv", lambda f: f.write(buf.getvalue().encode()))
        w, h = self.info.image_size
        by_image: dict[str, list[dict[str, Any]]] = {}
        for q in queue:
            by_image.setdefault(q["image"], []).append({"id": q["region_id"], "box": q["box"]})
        requests = [{"image": n, "width": w, "height": h, "regions": regs} for n, regs in by_image.items()]
        index = {n: i for i, n in enumerate(split.image_names)}
        predictions = {n: pred[index[n]] for n in by_image}
        prefix = image_url if image_url is not None else f"/data/local-files/?d={self.images_dir.name}/"
        tasks = formats.label_studio_tasks(
            requests, list(self.info.class_names), lambda n: prefix + n, predictions=predictions
        )
        ls = json.dumps(tasks, indent=2)
        atomic_write(folder / "label-studio-tasks.json", lambda f: f.write(ls.encode()))
        cfg = formats.label_studio_config(list(self.info.class_names))
        atomic_write(folder / "label-studio-config.xml", lambda f: f.write(cfg.encode()))
        cvat = formats.cvat_xml(requests, list(self.info.class_names), predictions=predictions)
        atomic_write(folder / "cvat.xml", lambda f: f.write(cvat.encode()))
        if overlays:
            from agents.suggest import draw_queue

            draw_queue(split, queue, len(queue), folder / "overlays")

    def import_annotations(
        self, source: str | os.PathLike, fmt: str | None = None, validation: bool = False,
        annotator: str | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """Record annotations: a Label Studio JSON export (``label-studio``), CVAT for images 1.1 XML
        (``cvat``) or a folder of PNG masks (``png``; the format is guessed from the path).

        Only pixels inside requested regions are kept (a region whose pixels all came back ignore
        stays requested). ``validation=True`` imports whole images as held-out validation images
        (PNG masks or an export covering whole images; never suggested, never trained on). Every
        check runs before anything is written (unknown image, wrong size, class id out of range, an
        image none of whose regions was requested, a region labeled before, the same file imported
        twice): the first failure raises one ``DatasetError``/``ProjectError`` naming it, and the
        project is unchanged. The import itself is one transaction.
        """
        from ralis_gym.labeling import formats

        source = Path(source).expanduser()
        if not source.exists():
            raise ProjectError(f"import source {source} does not exist")
        fmt = fmt or (
            "png" if source.is_dir() else {".json": "label-studio", ".xml": "cvat"}.get(source.suffix)
        )
        if fmt not in ("label-studio", "cvat", "png"):
            raise ProjectError(f"cannot tell the format of {source}; pass --format label-studio, cvat or png")
        digest = _sha256_source(source)
        seen = self.db.execute("SELECT id, imported_at FROM imports WHERE sha256 = ?", (digest,)).fetchone()
        if seen:
            raise ProjectError(
                f"{source} was imported before (import #{seen[0]}, {seen[1]}); nothing written"
            )
        names = self.image_names()
        sizes = {n: tuple(self.info.image_size) for n in names}
        classes, ignore = list(self.info.class_names), self.info.ignore_index
        if fmt == "label-studio":
            maps = formats.parse_label_studio_export(json.loads(source.read_text()), classes, sizes, ignore)
        elif fmt == "cvat":
            maps = formats.parse_cvat_xml(source.read_text(), classes, sizes, ignore)
        else:
            maps = formats.read_png_masks(source, classes, sizes, ignore)
        ids = {n: i for n, i in self.db.execute("SELECT name, id FROM images")}
        roles = dict(self.db.execute("SELECT name, role FROM images"))
        labeled = {(i, r, c) for i, r, c in self.db.execute("SELECT image_id, row, col FROM labels")}
        pending = {
            (i, r, c)
            for i, r, c in self.db.execute("SELECT image_id, row, col FROM requests")
            if (i, r, c) not in labeled
        }
        pending_by_image: dict[int, list[tuple[int, int]]] = {}
        for i, r, c in pending:
            pending_by_image.setdefault(i, []).append((r, c))
        rw, rh = self.info.region_size
        rows_out, dropped, empty = [], 0, 0
        for name, lab in sorted(maps.items()):
            if name not in ids:
                raise ProjectError(f"{source}: image {name!r} is not in this project; nothing written")
            lab = np.asarray(lab, dtype=np.uint8)
            bad = (lab >= self.info.num_classes) & (lab != ignore)
            if bad.any():
                raise DatasetError(
                    f"{source}: image {name!r} holds class id(s) {sorted(set(lab[bad].tolist()))[:5]} outside "
                    f"0..{self.info.num_classes - 1} and the ignore id {ignore}; nothing written"
                )
            i = ids[name]
            patches = lab.reshape(self.grid.rows, rh, self.grid.cols, rw).transpose(0, 2, 1, 3)
            painted = (patches != ignore).any(axis=(2, 3))  # [rows, cols]
            if validation:
                if roles[name] != "validation" and any(ii == i for ii, _, _ in labeled | pending):
                    raise ProjectError(
                        f"{source}: image {name!r} has requested or labeled regions; a validation image "
                        "must be held out from the pool (import it before suggesting from it)"
                    )
                cells = [(int(r), int(c)) for r, c in np.argwhere(painted)]
            else:
                if roles[name] == "validation":
                    raise ProjectError(
                        f"{source}: image {name!r} is a validation image; import it with --validation"
                    )
                wanted = [(int(r), int(c)) for r, c in np.argwhere(painted) if (i, r, c) in pending]
                again = [(int(r), int(c)) for r, c in np.argwhere(painted) if (i, r, c) in labeled]
                if again and not wanted:
                    r, c = again[0]
                    raise ProjectError(
                        f"{source}: region {name} box {[c * rw, r * rh, rw, rh]} is already labeled "
                        "(a duplicate import?); nothing written"
                    )
                requested_here = np.zeros_like(painted)
                for r, c in pending_by_image.get(i, ()):
                    requested_here[r, c] = True
                if not requested_here.any():
                    raise ProjectError(
                        f"{source}: none of the regions of image {name!r} was requested; nothing written "
                        "(suggest first, or import whole images with --validation)"
                    )
                dropped += int((patches != ignore).sum(axis=(2, 3))[~requested_here].sum())
                empty += int((requested_here & ~painted).sum())
                cells = wanted
            for r, c in cells:
                rows_out.append((i, r, c, zlib.compress(np.ascontiguousarray(patches[r, c]).tobytes())))
        if not rows_out:
            raise ProjectError(f"{source}: no labeled pixel inside a requested region; nothing written")
        with self._transaction() as db:
            cur = db.execute(
                "INSERT INTO imports (source, sha256, format, annotator, imported_at, regions, validation) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (str(source), digest, fmt, annotator, _now(), len(rows_out), int(validation)),
            )
            db.executemany(
                "INSERT INTO labels (image_id, row, col, import_id, pixels) VALUES (?, ?, ?, ?, ?)",
                [(i, r, c, cur.lastrowid, blob) for i, r, c, blob in rows_out],
            )
            if validation:
                db.executemany(
                    "UPDATE images SET role = 'validation' WHERE id = ?", sorted({(i,) for i, *_ in rows_out})
                )
        return {"import": cur.lastrowid, "regions": len(rows_out), "format": fmt,
                "pixels_outside_requests": dropped, "requested_regions_left_empty": empty}  # fmt: skip

    def train(
        self, max_epochs: int = 60, patience: int = 8, seed: int = 0, progress: bool = False
    ) -> dict[str, Any]:
        """Fine-tune the current model on every labeled region of the pool; with validation images,
        until their mIoU has not improved for ``patience`` epochs (the library's early-stopping rule,
        best weights kept), else for ``max_epochs``. Saves ``models/model-N.pt`` and records it."""
        from ralis_gym.segmentation.pretrain import train_until_plateau

        split, labeled = self.split("pool")
        if not labeled.any():
            raise ProjectError("nothing is labeled yet: suggest, annotate and import first")
        seg = self.segmenter(seed)
        image, row, col = np.nonzero(labeled)
        anchors = self.grid.make_ids(image, row, col)
        t0 = time.perf_counter()
        val_names = self.image_names("validation")
        if val_names:
            val = self.split("validation")[0]
            out = train_until_plateau(
                seg, lambda: seg.fit_regions(split, anchors, labeled), val, max_epochs, patience,
                progress=progress, desc="label train",
            )  # fmt: skip
            val_miou, epochs = out["best_miou"], out["epochs"]
        else:
            for _ in range(max_epochs):
                seg.fit_regions(split, anchors, labeled)
                seg.step_lr()
            val_miou, epochs = None, max_epochs
        seconds = time.perf_counter() - t0
        n_model = 1 + self.db.execute("SELECT COALESCE(MAX(id), 0) FROM models").fetchone()[0]
        rel = Path("models") / f"model-{n_model:03d}.pt"
        state = seg.model_state()
        atomic_write(self.folder / rel, lambda f: torch.save({"model_state": state}, f))
        with self._transaction() as db:
            cur = db.execute(
                "INSERT INTO models (path, created_at, labeled_regions, val_miou, epochs, train_seconds) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (str(rel), _now(), int(labeled.sum()), val_miou, epochs, seconds),
            )
        return {"model": cur.lastrowid, "path": str(self.folder / rel), "labeled_regions": int(labeled.sum()),
                "val_miou": val_miou, "epochs": epochs, "seconds": seconds}  # fmt: skip

    def status(self, plot: bool = True) -> dict[str, Any]:
        """Rounds, labeled fraction, class balance of the labels, the validation curve (and a PNG)."""
        pool = self.image_names("pool")
        total = len(pool) * self.grid.per_image
        labels, mask = self._labeled(pool)
        counts = np.bincount(labels.reshape(-1), minlength=256)[: self.info.num_classes]
        rounds = [
            {"round": r, "strategy": s, "budget": b, "created_at": t,
             "requested": n_req, "labeled": n_lab}
            for r, s, b, t, n_req, n_lab in self.db.execute(
                "SELECT rounds.id, strategy, budget, created_at, COUNT(requests.rank), "
                "SUM(CASE WHEN labels.image_id IS NULL THEN 0 ELSE 1 END) FROM rounds "
                "LEFT JOIN requests ON requests.round_id = rounds.id LEFT JOIN labels ON "
                "labels.image_id = requests.image_id AND labels.row = requests.row AND labels.col = requests.col "
                "GROUP BY rounds.id ORDER BY rounds.id"
            )
        ]  # fmt: skip
        models = [
            {"model": m, "labeled_regions": n, "val_miou": v, "epochs": e, "created_at": t}
            for m, n, v, e, t in self.db.execute(
                "SELECT id, labeled_regions, val_miou, epochs, created_at FROM models ORDER BY id"
            )
        ]
        out = {
            "project": str(self.folder), "pool_images": len(pool), "validation_images": len(self.image_names("validation")),
            "labeled_regions": int(mask.sum()), "pool_regions": total,
            "labeled_fraction": float(mask.sum() / max(total, 1)),
            "class_pixels": {c: int(n) for c, n in zip(self.info.class_names, counts)},
            "rounds": rounds, "models": models,
        }  # fmt: skip
        if plot:
            out["plot"] = str(self._plot_status(out))
        return out

    def _plot_status(self, status: dict[str, Any]) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
        pts = [
            (m["labeled_regions"], 100 * m["val_miou"]) for m in status["models"] if m["val_miou"] is not None
        ]
        if pts:
            a.plot(*zip(*pts), "o-")
        a.set_xlabel("labeled regions")
        a.set_ylabel("validation mIoU (%)")
        a.set_title("validation curve" if pts else "validation curve (no validation images yet)")
        a.grid(alpha=0.3)
        names, px = list(status["class_pixels"]), np.array(list(status["class_pixels"].values()), dtype=float)
        b.bar(range(len(names)), 100 * px / max(px.sum(), 1))
        b.set_xticks(range(len(names)), names, rotation=60, ha="right")
        b.set_ylabel("% of labeled pixels")
        b.set_title(f"class balance ({status['labeled_regions']} regions)")
        fig.tight_layout()
        path = self.folder / "status.png"
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        atomic_write(path, lambda f: f.write(buf.getvalue()))
        return path


def _sha256_source(source: Path) -> str:
    """Content hash of an import: the file, or every file of a folder (names and bytes)."""
    if source.is_file():
        return sha256_file(source)
    h = hashlib.sha256()
    for p in sorted(q for q in source.rglob("*") if q.is_file()):
        h.update(p.relative_to(source).as_posix().encode() + b"\0" + sha256_file(p).encode())
    return h.hexdigest()
