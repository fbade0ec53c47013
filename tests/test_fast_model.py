"""The fast model on real CamVid images: exact loss/evaluation shortcuts, caching, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ralis_gym.data import load_dataset
from ralis_gym.data.base import SegmentationSplit
from ralis_gym.errors import ConfigError
from ralis_gym.segmentation.encoder import (
    CellEncoder,
    EncoderConfig,
    clear_feature_cache,
    feature_cache_dir,
    split_features,
)
from ralis_gym.segmentation.fast import (
    MLP_HEAD,
    FastSegmenter,
    cell_cross_entropy,
    class_weights_from_counts,
    default_stride,
)
from ralis_gym.segmentation.metrics import SegmentationMetrics, confusion_matrix
from ralis_gym.segmentation.pretrain import train_until_plateau
from ralis_gym.segmentation.uncertainty import pixel_entropy


@pytest.fixture(scope="module")
def camvid(camvid_root, tmp_path_factory):
    """(dataset, 4 val images) with every cache (decoded arrays, features) in a temporary folder."""
    mp = pytest.MonkeyPatch()
    mp.setenv("RALIS_GYM_CACHE", str(tmp_path_factory.mktemp("ralis-cache")))
    clear_feature_cache()
    ds = load_dataset("camvid", camvid_root)
    small = ds.split("val").subset(range(4), name="val4")
    yield ds, small
    clear_feature_cache()
    mp.undo()


def _seg(ds, seed: int = 0, **kw) -> FastSegmenter:
    return FastSegmenter(ds.info, device="cpu", seed=seed, **kw)


def _some_labeled(
    seg: FastSegmenter, n_images: int, per_image: int = 3, seed: int = 0, split_size: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """A few labeled regions in each of the first ``n_images`` images: (anchor ids, labeled mask)."""
    rng = np.random.default_rng(seed)
    labeled = np.zeros((split_size, seg.grid.rows, seg.grid.cols), dtype=bool)
    for i in range(n_images):
        labeled.reshape(split_size, -1)[i, rng.choice(seg.grid.per_image, per_image, replace=False)] = True
    image, row, col = np.nonzero(labeled)
    return seg.grid.make_ids(image, row, col), labeled


@torch.no_grad()
def _pixel_loss(seg: FastSegmenter, split: SegmentationSplit, idx: np.ndarray, labeled: np.ndarray) -> float:
    """The training loss (``cell_cross_entropy``) over the labeled pixels of whole images, eval mode."""
    logits = seg.native_logits(split, idx).flatten(2).transpose(1, 2)
    mask = seg._cell_mask(np.asarray(labeled, dtype=bool)[idx]).unsqueeze(-1)
    hist = seg.targets(split)[torch.from_numpy(idx)].float() * mask
    return float(cell_cross_entropy(logits, hist.to(seg.device), seg.class_weights))


def _weights(seg: FastSegmenter) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in seg.head.state_dict().items()}


def test_default_stride_and_validation(camvid):
    ds, _ = camvid
    assert default_stride((80, 90)) == 10
    assert default_stride((128, 128)) == 16
    with pytest.raises(ConfigError, match="divide the region size"):
        _seg(ds, stride=4, encoder=EncoderConfig(stride=4))  # 4 does not divide 90
    with pytest.raises(ConfigError, match="differs from the encoder stride"):
        _seg(ds, stride=5, encoder=EncoderConfig(stride=10))


def test_loss_falls_on_a_few_labeled_regions(camvid):
    ds, small = camvid
    seg = _seg(ds, lr=1e-2)
    anchors, labeled = _some_labeled(seg, 3)
    idx = np.arange(3)
    seg.initialise(small, labeled)
    before = _pixel_loss(seg, small, idx, labeled)
    losses = [seg.fit_regions(small, anchors, labeled, epochs=1) for _ in range(15)]
    after = _pixel_loss(seg, small, idx, labeled)
    assert losses[-1] < 0.7 * losses[0]
    assert after < 0.7 * before


def test_loss_equals_full_resolution_pixel_cross_entropy(camvid):
    """The training loss (on cell histograms) is the masked, class-weighted per-pixel CE of the
    upsampled output."""
    ds, small = camvid
    seg = _seg(ds)
    anchors, labeled = _some_labeled(seg, 4, per_image=5)
    seg.fit_regions(small, anchors, labeled, epochs=2)
    idx = np.arange(4)
    probs = seg.predict_proba(small, idx)
    pixel_mask = seg.grid.pixel_mask(labeled)
    target = np.where(pixel_mask, small.labels[idx], ds.info.ignore_index).astype(np.int64)
    expected = F.nll_loss(
        torch.log(probs),
        torch.from_numpy(target),
        weight=seg.head.class_weights,
        ignore_index=ds.info.ignore_index,
    )
    assert _pixel_loss(seg, small, idx, labeled) == pytest.approx(float(expected), rel=1e-4)


def test_pixels_outside_labeled_regions_do_not_matter(camvid):
    ds, small = camvid
    probe = _seg(ds)
    anchors, labeled = _some_labeled(probe, 4)
    outside = ~probe.grid.pixel_mask(labeled)
    changed = small.labels.copy()
    changed[outside] = (changed[outside].astype(np.int64) + 3) % ds.info.num_classes
    changed[outside & (np.arange(changed.shape[2]) % 7 == 0)] = ds.info.ignore_index
    relabeled = SegmentationSplit(ds.info, "val4-relabeled", small.image_names, small.images, changed)
    assert (relabeled.labels != small.labels).any()

    a, b = _seg(ds, seed=5), _seg(ds, seed=5)
    loss_a = a.fit_regions(small, anchors, labeled, epochs=3)
    loss_b = b.fit_regions(relabeled, anchors, labeled, epochs=3)
    assert loss_a == loss_b
    wa, wb = _weights(a), _weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert _pixel_loss(a, small, np.arange(4), labeled) == _pixel_loss(b, relabeled, np.arange(4), labeled)


def test_unlabeled_anchor_contributes_nothing(camvid):
    """An anchor in an image without any labeled region carries no loss (an anchor's image is
    trained on with every labeled region of it, as the reference's masked targets)."""
    ds, small = camvid
    seg = _seg(ds)
    _, labeled = _some_labeled(seg, 2)  # images 0 and 1 carry labels, 2 and 3 none
    seg.initialise(small, labeled)
    image, row, col = np.nonzero(~labeled[2:])
    before = _weights(seg)
    assert seg.fit_regions(small, seg.grid.make_ids(image[:5] + 2, row[:5], col[:5]), labeled) == 0.0
    after = _weights(seg)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_fast_evaluate_equals_full_resolution_evaluate(camvid):
    ds, small = camvid
    seg = _seg(ds)
    seg.fit_images(small, epochs=2)
    # slow, obviously correct: per-pixel confusion of the upsampled prediction
    probs = seg.predict_proba(small, np.arange(len(small)))
    cm = confusion_matrix(
        probs.argmax(1), torch.from_numpy(np.asarray(small.labels)), ds.info.num_classes, ds.info.ignore_index
    )
    full = SegmentationMetrics.from_confusion(cm)
    for bs in (None, 3):
        fast = seg.evaluate(small, batch_size=bs)
        assert np.array_equal(fast.confusion, full.confusion)
        assert fast.miou == full.miou
    # labels holding the ignore id are excluded from both
    assert fast.confusion.sum() == int((small.labels != ds.info.ignore_index).sum())


def test_predict_proba_shapes_and_normalisation(camvid):
    ds, small = camvid
    seg = _seg(ds)
    seg.fit_images(small, epochs=1)
    probs = seg.predict_proba(small, [0, 2])
    w, h = ds.info.image_size
    assert probs.shape == (2, ds.info.num_classes, h, w)
    assert probs.dtype == torch.float32
    assert torch.all(probs >= 0)
    assert torch.allclose(probs.sum(1), torch.ones(2, h, w), atol=1e-5)
    # nearest upsampling: constant inside every stride x stride cell
    s = seg.stride
    cells = probs.reshape(2, ds.info.num_classes, h // s, s, w // s, s)
    assert torch.equal(cells, cells[:, :, :, :1, :, :1].expand_as(cells))
    assert np.array_equal(seg.predict(small, [0, 2]), probs.argmax(1).numpy().astype(np.uint8))


def test_same_seed_same_weights(camvid):
    ds, small = camvid
    anchors = np.arange(len(small) * _seg(ds).grid.per_image)
    runs = []
    for seed in (7, 7, 8):
        seg = _seg(ds, seed=seed, hflip=True, train_dropout=True)
        labeled = np.ones((len(small), seg.grid.rows, seg.grid.cols), dtype=bool)
        seg.fit_regions(small, anchors, labeled, epochs=2)
        runs.append(_weights(seg))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not torch.equal(runs[0]["inp.weight"], runs[2]["inp.weight"])


def test_mc_dropout_differs_between_passes_and_is_reproducible(camvid):
    ds, small = camvid
    seg = _seg(ds)
    seg.fit_images(small, epochs=1)
    plain = seg.predict_proba(small, [1])
    assert torch.equal(plain, seg.predict_proba(small, [1]))  # no dropout outside MC passes
    state = seg.generator.get_state()
    mc = seg.mc_dropout_proba(small, [1], passes=3)
    assert mc.shape == (3, *plain.shape)
    assert not torch.equal(mc[0], mc[1]) and not torch.equal(mc[1], mc[2])
    assert torch.allclose(mc.sum(2), torch.ones_like(mc[:, :, 0]), atol=1e-5)
    seg.generator.set_state(state)
    assert torch.equal(mc, seg.mc_dropout_proba(small, [1], passes=3))


def test_feature_cache_hit_returns_identical_features(camvid):
    ds, small = camvid
    seg = _seg(ds)
    first = seg.features(small)
    assert seg.features(small) is not None and torch.equal(seg.features(small), first)
    files = list((feature_cache_dir() / seg.encoder.config.key).glob(f"{small.key}-*.npy"))
    assert len(files) == 1
    clear_feature_cache()
    from_disk = seg.features(small)  # memory cleared: read back from the .npy file
    assert torch.equal(from_disk, first)
    clear_feature_cache()
    fresh = split_features(seg.encoder, small, disk_cache=False).view_as(first)  # encode again
    assert torch.equal(fresh, first)
    assert first.dtype == torch.float16 and first.shape == (len(small), seg.cells, seg.encoder.dim)


def test_float32_feature_copy_is_cached_and_changes_no_result(camvid, monkeypatch):
    """The float32 copy of a split's features is made once and reused; without it (budget 0) every
    forward converts the float16 features itself and gives the same logits and training to the bit."""
    from ralis_gym.segmentation import fast

    ds, small = camvid
    idx = np.arange(len(small))
    base = split_features(_seg(ds).encoder, small)
    assert fast.float32_features(base) is fast.float32_features(base)  # cached
    assert fast.float32_features(base).dtype == torch.float32

    def run() -> tuple[torch.Tensor, dict]:
        seg = _seg(ds)
        anchors, labeled = _some_labeled(seg, 3)
        seg.fit_regions(small, anchors, labeled, epochs=2)
        return seg.native_logits(small, idx), _weights(seg)

    cached_logits, cached_w = run()
    monkeypatch.setattr(fast, "FLOAT32_CACHE_BYTES", 0)
    monkeypatch.setattr(fast, "_FLOAT32", {})
    assert fast.float32_features(base) is base  # over budget: no copy
    plain_logits, plain_w = run()
    assert torch.equal(cached_logits, plain_logits)
    assert all(torch.equal(cached_w[k], plain_w[k]) for k in cached_w)


def test_encoder_is_flip_equivariant(camvid):
    _, small = camvid
    enc = CellEncoder()
    images = np.asarray(small.images[:2])
    feats = enc.encode(images)
    mirrored = enc.encode(np.ascontiguousarray(images[:, :, ::-1]))
    expected = feats.flip(2)[..., enc.flip_permutation()]
    assert torch.allclose(mirrored, expected, atol=2e-3, rtol=1e-3)


def test_model_state_round_trip(camvid):
    ds, small = camvid
    seg = _seg(ds, width=32)
    seg.fit_images(small, epochs=1)
    state = seg.model_state()
    clone = FastSegmenter.from_state(ds.info, state, device="cpu")
    assert clone.width == 32 and clone.is_initialised
    assert torch.equal(clone.native_logits(small, [0, 1]), seg.native_logits(small, [0, 1]))
    other = _seg(ds, width=32, encoder=EncoderConfig(context_sizes=(3, 7)))
    with pytest.raises(ConfigError, match="encoder features"):
        other.load_model_state(state)
    with pytest.raises(ConfigError, match="'width': 32"):
        _seg(ds, width=16).load_model_state(state)
    mlp = _seg(ds, **MLP_HEAD)  # the pre-v2 head is a configuration of the same class
    mlp.fit_images(small, epochs=1)
    assert torch.equal(FastSegmenter.from_state(ds.info, mlp.model_state(), device="cpu").native_logits(small, [0]),
                       mlp.native_logits(small, [0]))  # fmt: skip


def test_fit_images_uses_the_pretraining_rate(camvid):
    ds, small = camvid
    seg = _seg(ds, lr=1e-3, pretrain_lr=5e-2)
    one = small.subset([0], name="val-one")
    seg.fit_images(one, epochs=1)
    seg.step_lr()
    seen = []
    step = seg.optimizer.step

    def spy(*args, **kwargs):
        seen.append(seg.optimizer.param_groups[0]["lr"])
        return step(*args, **kwargs)

    seg.optimizer.step = spy
    seg.fit_images(one, epochs=1)
    assert seen and all(v == pytest.approx(5e-2 * seg.lr_gamma) for v in seen)
    assert seg.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * seg.lr_gamma)


def test_class_weights_and_early_stopping(camvid):
    ds, small = camvid
    w = class_weights_from_counts(np.array([100, 25, 0, 400]), "sqrt_median")
    assert w[2] == w.max() and w[0] > w[3] and w[1] > w[0]
    assert torch.equal(class_weights_from_counts(np.array([1, 2]), "none"), torch.ones(2))
    seg = _seg(ds)
    train, val = small.subset([0, 1], name="val-a"), small.subset([2, 3], name="val-b")
    start = seg.evaluate(val).miou
    out = train_until_plateau(seg, lambda: seg.fit_images(train), val, 4, 1, progress=False)
    assert 1 <= len(out["history"]) <= 4
    assert out["best_miou"] == max([start] + [h["miou"] for h in out["history"]])
    assert seg.evaluate(small.subset([2, 3], name="val-b")).miou == pytest.approx(out["best_miou"])


def test_prediction_maps_match_full_resolution(camvid):
    ds, small = camvid
    seg = _seg(ds)
    seg.fit_images(small, epochs=1)
    pred, ent = seg.prediction_maps(small, np.arange(3))
    probs = seg.predict_proba(small, np.arange(3))  # full resolution, then the per-pixel maps
    ref_pred, ref_ent = probs.argmax(1), pixel_entropy(probs)
    assert torch.equal(pred, ref_pred)
    assert torch.allclose(ent, ref_ent, atol=1e-6)


def _module_trunk(head, x, positions, rows, cols):
    """The head written with its modules in NCHW, the obviously-correct version of ``GridHead.trunk``."""
    w = head.inp.weight / head.feature_std
    b = head.inp.bias - w @ head.feature_mean
    h = (x @ w.T + (positions @ head.pos.weight.T + b)).view(x.shape[0], rows, cols, -1)
    h = h.permute(0, 3, 1, 2).contiguous()
    h = F.relu(head.norm0(h))
    for block in head.blocks:
        h = block(h)  # ContextBlock.forward: Conv2d / BatchNorm2d modules
    return h


@pytest.mark.parametrize("separable", [True, False])
def test_cells_last_head_equals_the_module_forward(separable):
    """The cells-last fast path (oneDNN 3x3 on a channels-last view, 1x1 as matmuls, batch norm over
    the last axis) gives the module forward's numbers, in training (outputs, running statistics,
    gradients) and in eval mode."""
    from ralis_gym.segmentation.encoder import position_encoding
    from ralis_gym.segmentation.fast import GridHead

    rows, cols = 6, 8
    pos = position_encoding(rows, cols).reshape(rows * cols, -1)
    g = torch.Generator().manual_seed(0)
    fast = GridHead(20, pos.shape[1], 16, 5, (1, 2, 0), separable, True)
    fast.reset_parameters(g)
    ref = GridHead(20, pos.shape[1], 16, 5, (1, 2, 0), separable, True)
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(3, rows * cols, 20, generator=g)
    for mode in ("train", "eval"):
        fast.train(mode == "train")
        ref.train(mode == "train")
        out = fast.classify(fast.trunk(x, pos, rows, cols))
        expected = ref.cls(_module_trunk(ref, x, pos, rows, cols))
        assert out.shape == expected.shape == (3, 5, rows, cols)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
        if mode == "train":
            (out.square().mean()).backward()
            (expected.square().mean()).backward()
            for (name, p), q in zip(fast.named_parameters(), ref.parameters()):
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    for (name, a), b in zip(fast.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)  # running stats, counters


def test_class_argmax_is_argmax_index_for_index():
    from ralis_gym.features.regions import class_argmax

    g = torch.Generator().manual_seed(0)
    ties = torch.randint(0, 3, (4, 7, 5, 6), generator=g).float()  # many ties: first index wins
    ties[0, :, 0, 0] = float("nan")
    ties[1, 2, 1, 1] = float("nan")
    for t in (
        ties,
        torch.randn(2, 3, 7, 5, 6, generator=g),
        ties.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2),
    ):
        assert torch.equal(class_argmax(t), t.argmax(-3))
