"""The paper's FPN-ResNet-50 segmenter on CPU: architecture, ImageNet loading, crops, training, MC dropout.

Everything runs on small inputs so the file stays well under 90 s on two CPU cores. Tests that need
the real CamVid labels are skipped when the data is not installed.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from ralis_gym.data.base import DatasetInfo, SegmentationSplit
from ralis_gym.data.camvid import CAMVID_INFO
from ralis_gym.errors import ConfigError
from ralis_gym.regions.grid import RegionGrid
from ralis_gym.segmentation.fpn import FPNResNet50, build_fpn, load_imagenet_backbone
from ralis_gym.segmentation.paper import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PaperSegmenter,
    normalise_images,
    randint_inclusive,
    sample_image_crops,
    sample_region_crops,
)


@pytest.fixture(scope="module", autouse=True)
def _single_thread() -> Iterator[None]:
    """One intra-op thread for this module, restored afterwards.

    The inputs are tiny, so a second thread buys little, and when other processes share the two
    cores OpenMP's spinning barriers make 2-thread convolutions ~10x slower than 1-thread ones.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def camvid_dt(camvid_root) -> SegmentationSplit:
    from ralis_gym.data import load_dataset

    return load_dataset("camvid", camvid_root).split("d_t")


@pytest.fixture(scope="module")
def tiny_split(camvid_dt: SegmentationSplit) -> SegmentationSplit:
    """Three real CamVid images cut to 90x120 with a 3x3 grid of 40x30 regions (fast full-res passes)."""
    info = DatasetInfo(
        name="camvid-tiny",
        class_names=CAMVID_INFO.class_names,
        ignore_index=CAMVID_INFO.ignore_index,
        image_size=(120, 90),
        region_size=(40, 30),
    )
    idx = [0, 1, 2]
    return SegmentationSplit(
        info=info,
        name="tiny",
        image_names=tuple(camvid_dt.image_names[i] for i in idx),
        images=np.ascontiguousarray(camvid_dt.images[idx, 100:190, 150:270]),
        labels=np.ascontiguousarray(camvid_dt.labels[idx, 100:190, 150:270]),
    )


# --- architecture ------------------------------------------------------------------------------
@pytest.mark.parametrize(("classes", "expected"), [(11, 28_526_027), (19, 28_562_899)])
def test_parameter_count_matches_the_reference_network(classes: int, expected: int) -> None:
    with torch.device("meta"):
        model = FPNResNet50(classes)
    assert sum(p.numel() for p in model.parameters()) == expected  # not the BN running statistics


@pytest.mark.parametrize("size", [(360, 480), (224, 224), (90, 130)])
def test_forward_output_has_input_size(size: tuple[int, int]) -> None:
    model = build_fpn(11, torch.Generator().manual_seed(0)).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))
    assert out.shape == (1, 11, *size)
    assert torch.isfinite(out).all()


def test_build_is_seeded_and_leaves_global_rng_alone() -> None:
    state = torch.random.get_rng_state()
    a = build_fpn(11, torch.Generator().manual_seed(5))
    assert torch.equal(torch.random.get_rng_state(), state)
    b = build_fpn(11, torch.Generator().manual_seed(5))
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(ta, tb), name
    # spec init: backbone convs normal(0, sqrt(2 / (k*k*out))), BN weight 1, bias 0
    w = a.backbone.layer3[0].conv2.weight
    assert abs(float(w.detach().std()) - (2.0 / (9 * 256)) ** 0.5) < 0.05 * (2.0 / (9 * 256)) ** 0.5
    assert torch.all(a.backbone.bn1.weight == 1) and torch.all(a.backbone.bn1.bias == 0)
    c = build_fpn(11, torch.Generator().manual_seed(6))
    assert not torch.equal(a.classifier.weight, c.classifier.weight)


# --- ImageNet loading --------------------------------------------------------------------------
def _torchvision_state(model: FPNResNet50, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random tensors under torchvision's ResNet-50 names (old file layout: no num_batches_tracked)."""
    g = torch.Generator().manual_seed(seed)
    state = {
        k: torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
        for k, v in model.backbone.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    state["fc.weight"] = torch.randn(1000, 2048, generator=g)
    state["fc.bias"] = torch.randn(1000, generator=g)
    return state


def test_imagenet_state_dict_loads_into_backbone(tmp_path) -> None:
    model = build_fpn(11, torch.Generator().manual_seed(0))
    state = _torchvision_state(model)
    assert "layer1.0.downsample.0.weight" in state and "layer4.2.bn3.running_var" in state
    path = tmp_path / "resnet50.pth"
    torch.save(state, path)
    head_before = model.classifier.weight.clone()
    loaded = load_imagenet_backbone(model, path)
    assert len(loaded) == len(state) - 2  # fc.* ignored
    own = model.backbone.state_dict()
    for k in loaded:
        assert torch.equal(own[k], state[k]), k
    assert torch.equal(model.classifier.weight, head_before)

    seg = PaperSegmenter(CAMVID_INFO, device="cpu", imagenet_weights=str(path))
    assert torch.equal(seg.model.backbone.conv1.weight, state["conv1.weight"])


def test_imagenet_loading_errors_are_clear(tmp_path) -> None:
    model = build_fpn(11, torch.Generator().manual_seed(0))
    with pytest.raises(FileNotFoundError, match="no download"):
        load_imagenet_backbone(model, tmp_path / "absent.pth")

    state = _torchvision_state(model)
    state.pop("layer2.1.conv2.weight")
    state["layer5.0.conv1.weight"] = torch.zeros(1)
    path = tmp_path / "wrong.pth"
    torch.save(state, path)
    with pytest.raises(ConfigError, match=r"missing.*layer2\.1\.conv2\.weight.*unexpected.*layer5\.0\.conv1"):
        load_imagenet_backbone(model, path)

    state = _torchvision_state(model)
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    torch.save({"state_dict": state}, path)
    with pytest.raises(ConfigError, match="shape mismatch.*conv1.weight"):
        load_imagenet_backbone(model, path)


# --- crops and targets -------------------------------------------------------------------------
def test_randint_inclusive_reaches_both_ends() -> None:
    g = torch.Generator().manual_seed(0)
    draws = randint_inclusive(np.full(2000, 3), np.full(2000, 7), g)
    assert set(draws.tolist()) == {3, 4, 5, 6, 7}


@pytest.mark.parametrize("crop_hw", [(224, 224), (96, 160), (356, 470)])
def test_region_crops_hold_centre_and_mask_unlabeled(camvid_dt: SegmentationSplit, crop_hw) -> None:
    split = camvid_dt.subset([0, 1, 2, 3])
    grid = RegionGrid(CAMVID_INFO.image_size, CAMVID_INFO.region_size)
    rng = np.random.default_rng(0)
    labeled = rng.random((4, grid.rows, grid.cols)) < 0.4
    img, row, col = np.nonzero(labeled)
    anchors = np.repeat(grid.make_ids(img, row, col), 8)
    g = torch.Generator().manual_seed(1)
    batch = sample_region_crops(split, grid, anchors, labeled, crop_hw, g, CAMVID_INFO.ignore_index)
    th, tw = crop_hw
    assert batch.images.shape == (anchors.size, th, tw, 3) and batch.targets.shape == (anchors.size, th, tw)

    boxes = grid.boxes(anchors)
    cy, cx = boxes[:, 2] + boxes[:, 4] // 2, boxes[:, 1] + boxes[:, 3] // 2
    assert np.array_equal(batch.image_index, boxes[:, 0])
    # the reference's crop ranges (inclusive, see ralis_gym.segmentation.paper) and the region centre
    # inside the (closed) crop
    assert np.all((batch.top >= np.maximum(0, cy - th)) & (batch.top <= np.minimum(cy, 360 - th)))
    assert np.all((batch.left >= np.maximum(0, cx - tw)) & (batch.left <= np.minimum(cx, 480 - tw)))
    assert np.all((batch.top <= cy) & (cy <= batch.top + th) & (batch.left <= cx) & (cx <= batch.left + tw))
    assert 0.3 < batch.flip.mean() < 0.7

    masked = np.where(grid.pixel_mask(labeled), split.labels, np.uint8(CAMVID_INFO.ignore_index))
    for i in range(anchors.size):
        t, left, k = batch.top[i], batch.left[i], batch.image_index[i]
        ref_img = split.images[k, t : t + th, left : left + tw]
        ref_lab = masked[k, t : t + th, left : left + tw]
        if batch.flip[i]:
            ref_img, ref_lab = ref_img[:, ::-1], ref_lab[:, ::-1]
        assert np.array_equal(batch.images[i], ref_img)
        assert np.array_equal(batch.targets[i], ref_lab)
        # at least half of the anchor region (in each direction) lands in the crop
        ry, rx = boxes[i, 2], boxes[i, 1]
        rows_in = min(ry + 90, t + th) - max(ry, t)
        cols_in = min(rx + 80, left + tw) - max(rx, left)
        assert rows_in >= 45 and cols_in >= 40


def test_image_crops_are_fully_labeled_and_uniform(camvid_dt: SegmentationSplit) -> None:
    split = camvid_dt.subset([0, 1])
    g = torch.Generator().manual_seed(0)
    batch = sample_image_crops(split, np.array([0, 1, 1, 0]), (224, 224), g)
    for i in range(4):
        t, left, k = batch.top[i], batch.left[i], batch.image_index[i]
        ref = split.labels[k, t : t + 224, left : left + 224]
        assert np.array_equal(batch.targets[i], ref[:, ::-1] if batch.flip[i] else ref)


def test_normalise_images_matches_formula() -> None:
    imgs = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    out = normalise_images(imgs, torch.device("cpu"))
    ref = (
        torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255 - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    ) / (torch.tensor(IMAGENET_STD).view(3, 1, 1))
    assert out.shape == (2, 3, 5, 7)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# --- training ----------------------------------------------------------------------------------
def test_training_loss_falls_on_real_camvid(camvid_dt: SegmentationSplit) -> None:
    split = camvid_dt.subset([0, 1])
    seg = PaperSegmenter(CAMVID_INFO, device="cpu", seed=0, lr=1e-2, batch_size=4, crop_size=(96, 96))
    labeled = np.ones((2, seg.grid.rows, seg.grid.cols), dtype=bool)
    anchors = np.array([3, 10, 24 + 7, 24 + 20])
    batch = sample_region_crops(split, seg.grid, anchors, labeled, (96, 96), seg.generator, 11)
    losses = [seg.train_batch(batch) for _ in range(5)]
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 0.1, losses


def test_same_seed_gives_identical_weights(camvid_dt: SegmentationSplit) -> None:
    split = camvid_dt.subset([0, 1])
    labeled = np.zeros((2, 4, 6), dtype=bool)
    labeled[0, 1, 2] = labeled[1, 3, 5] = True
    grid = RegionGrid(CAMVID_INFO.image_size, CAMVID_INFO.region_size)
    anchors = grid.make_ids(np.array([0, 1]), np.array([1, 3]), np.array([2, 5]))
    states = []
    for _ in range(2):
        seg = PaperSegmenter(CAMVID_INFO, device="cpu", seed=7, batch_size=2, crop_size=(64, 64))
        before = seg.model.classifier.weight.detach().clone()
        seg.fit_regions(split, anchors, labeled)
        assert not torch.equal(before, seg.model.classifier.weight)
        states.append(seg.model_state())
    for k, v in states[0].items():
        assert torch.equal(v, states[1][k]), k


def test_lr_schedule_and_optimizer_reset() -> None:
    seg = PaperSegmenter(CAMVID_INFO, device="cpu", lr=1e-3)
    seg.step_lr()
    seg.step_lr()
    assert seg.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.998**2)
    seg.reset_optimizer()
    group = seg.optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(1e-3)
    assert group["momentum"] == 0.95 and group["weight_decay"] == 1e-4


def test_fit_images_one_crop_per_image_and_snapshot_restore(tiny_split: SegmentationSplit) -> None:
    seg = PaperSegmenter(tiny_split.info, device="cpu", batch_size=2, crop_size=(64, 64))
    snap = seg.snapshot()
    calls = []
    original = seg.train_batch
    seg.train_batch = lambda b: calls.append(len(b)) or original(b)  # type: ignore[method-assign]
    loss = seg.fit_images(tiny_split, epochs=1)
    assert np.isfinite(loss) and calls == [2, 1]  # 3 images, batches of 2: one crop per image
    assert not torch.equal(seg.model.classifier.weight, snap["model"]["classifier.weight"])
    seg.restore(snap)
    assert torch.equal(seg.model.classifier.weight, snap["model"]["classifier.weight"])
    with pytest.raises(ValueError, match="labeled mask"):
        seg.fit_regions(tiny_split, np.array([0]), np.ones((3, 4, 6), dtype=bool))
    n_regions = len(tiny_split) * seg.grid.per_image
    full = np.ones((len(tiny_split), seg.grid.rows, seg.grid.cols), dtype=bool)
    with pytest.raises(ValueError, match=rf"anchor region ids must lie in 0\.\.{n_regions - 1}"):
        seg.fit_regions(tiny_split, np.array([n_regions]), full)


# --- inference and MC dropout ------------------------------------------------------------------
def test_inference_and_mc_dropout(tiny_split: SegmentationSplit) -> None:
    seg = PaperSegmenter(tiny_split.info, device="cpu", seed=0)
    probs = seg.predict_proba(tiny_split, [0, 1])
    assert probs.shape == (2, 11, 90, 120) and probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(1), torch.ones(2, 90, 120))
    assert torch.equal(probs, seg.predict_proba(tiny_split, [0, 1]))  # eval mode: deterministic

    state = seg.generator.get_state()
    mc = seg.mc_dropout_proba(tiny_split, [0, 1], passes=3)
    assert mc.shape == (3, 2, 11, 90, 120)
    assert not torch.allclose(mc[0], mc[1]) and not torch.allclose(mc[0], probs)
    seg.generator.set_state(state)
    assert torch.equal(mc, seg.mc_dropout_proba(tiny_split, [0, 1], passes=3))

    metrics = seg.evaluate(tiny_split)
    assert metrics.confusion.sum() == int((tiny_split.labels != 11).sum())
    assert seg.predict(tiny_split, [2]).shape == (1, 90, 120)
