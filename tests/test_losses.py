import numpy as np
import pytest
import torch
import torch.nn.functional as F
from segmentation_models_pytorch.losses import DiceLoss, LovaszLoss

from urbanseg.errors import UserError
from urbanseg.training.losses import (
    SegmentationLoss,
    class_weights,
    cross_entropy,
    ohem_cross_entropy,
    pixel_count_array,
)


def _batch(seed=0, n=2, c=5, h=6, w=7, ignore_frac=0.2):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, h, w, generator=g, requires_grad=True)
    target = torch.randint(0, c, (n, h, w), generator=g)
    target[torch.rand(n, h, w, generator=g) < ignore_frac] = 255
    return logits, target


def test_class_weights_follow_their_formulas():
    counts = np.array([600, 300, 100, 0, 0])  # two classes never seen in training
    f = np.array([0.6, 0.3, 0.1])
    inv = class_weights(counts, "inverse")
    np.testing.assert_allclose(inv[:3], (1 / f) / (1 / f).mean(), rtol=1e-6)
    sq = class_weights(counts, "sqrt")
    np.testing.assert_allclose(sq[:3], (1 / np.sqrt(f)) / (1 / np.sqrt(f)).mean(), rtol=1e-6)
    med = class_weights(counts, "median")
    ref = np.median(f) / f
    np.testing.assert_allclose(med[:3], ref / ref.mean(), rtol=1e-6)
    for w in (inv, sq, med):
        assert w.dtype == np.float32 and w.shape == (5,)
        assert (w[3:] == 0).all() and w[2] > w[1] > w[0]  # rarer class, larger weight
    assert class_weights(counts, "none") is None
    with pytest.raises(UserError, match="no labelled pixels"):
        class_weights(np.zeros(3), "inverse")


def test_pixel_counts_from_list_or_dict():
    classes = ["a", "b"]
    assert pixel_count_array([3, 4], classes).tolist() == [3, 4]
    assert pixel_count_array({"b": 4, "a": 3}, classes).tolist() == [3, 4]
    with pytest.raises(UserError, match="lack classes"):
        pixel_count_array({"a": 3}, classes)
    with pytest.raises(UserError, match="3 pixel counts for 2 classes"):
        pixel_count_array([1, 2, 3], classes)


@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_matches_torch(weighted):
    logits, target = _batch()
    weight = torch.tensor([0.5, 1.0, 2.0, 1.5, 0.1]) if weighted else None
    ours = cross_entropy(logits, target, weight)
    ref = F.cross_entropy(logits, target, weight=weight, ignore_index=255)
    torch.testing.assert_close(ours, ref)


def test_all_ignored_batch_gives_zero_not_nan():
    logits, target = _batch()
    target[:] = 255
    for loss in (
        cross_entropy(logits, target),
        ohem_cross_entropy(logits, target),
        SegmentationLoss("ce+dice")(logits, target),
        SegmentationLoss("ce+lovasz")(logits, target),
    ):
        assert loss.shape == () and torch.isfinite(loss) and float(loss.detach()) == 0.0
    assert torch.isnan(F.cross_entropy(logits, target, ignore_index=255))  # what we guard against


def test_ohem_keeps_everything_when_all_pixels_are_hard():
    logits, target = _batch(seed=1)
    torch.testing.assert_close(ohem_cross_entropy(logits, target, thresh=1.0), cross_entropy(logits, target))


def test_ohem_keeps_the_hardest_fraction_when_few_are_below_threshold():
    logits, target = _batch(seed=2, h=10, w=10)
    # thresh tiny: (almost) nothing is below it, so the min_kept hardest pixels decide
    loss = ohem_cross_entropy(logits, target, thresh=1e-6, min_kept=0.25)
    lg, t = logits.detach().numpy(), target.numpy()
    valid = t != 255
    prob = np.exp(lg - lg.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    p_true = np.take_along_axis(prob, np.where(valid, t, 0)[:, None], 1)[:, 0][valid]
    nll = -np.log(p_true)
    keep = int(np.ceil(0.25 * valid.sum()))
    ref = np.sort(nll)[::-1][:keep].mean()  # lowest true-class probability = highest loss
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    loss.backward()
    # pixels that were not mined get no gradient
    assert (logits.grad.abs().sum(1) > 0).sum() == keep


def test_ohem_is_above_plain_ce_on_a_mostly_easy_batch():
    _, target = _batch(seed=3)
    easy = F.one_hot(target.clamp(max=4), 5).permute(0, 3, 1, 2).float() * 8
    easy[:, :, :2] = 0  # two rows stay uncertain: the hard pixels
    assert float(ohem_cross_entropy(easy, target)) > 3 * float(cross_entropy(easy, target))


@pytest.mark.parametrize("kind, region", [("ce+dice", DiceLoss), ("ce+lovasz", LovaszLoss)])
def test_combined_loss_is_ce_plus_smp_loss(kind, region):
    logits, target = _batch(seed=4)
    ours = SegmentationLoss(kind)(logits, target)
    ref = F.cross_entropy(logits, target, ignore_index=255) + region("multiclass", ignore_index=255)(logits, target)
    torch.testing.assert_close(ours, ref)
    ours.backward()
    assert torch.isfinite(logits.grad).all()


def test_weights_move_with_the_module_and_bf16_logits_work():
    crit = SegmentationLoss("ce", weight=np.array([1, 2, 3, 4, 5], np.float32), ohem=True)
    assert "weight" in crit.state_dict()
    logits, target = _batch(seed=5)
    loss = crit(logits.to(torch.bfloat16), target)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
