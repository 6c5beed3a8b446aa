"""The usage patterns of the cross-entropy tutorials users learn from (../shared/seeds/),
run through cecore with torch computing every expected number."""

import numpy as np
import pytest
import torch
import torch.nn as nn

import cecore
from oracle import assert_close, check_result, torch_bce, torch_cross_entropy


def test_worked_example_two_samples(backend):
    # A tutorial prints 0.5514 for this example; torch itself gives 0.4360.
    logits = np.array([[1.0, 2.0, 0.5], [0.5, 1.5, 2.5]], dtype=np.float32)
    target = np.array([1, 2])
    expected = nn.CrossEntropyLoss()(torch.from_numpy(logits), torch.from_numpy(target)).item()
    loss = cecore.CrossEntropyLoss(backend=backend)(logits, target)
    assert loss.dtype == np.float32
    assert_close(loss, np.float32(expected))
    assert abs(float(loss) - 0.5514) > 0.1  # the tutorial's number is not torch's


def test_criterion_on_random_predictions(backend):
    # criterion = CrossEntropyLoss(); loss = criterion(preds, labels) with preds (3, 4)
    preds = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.LongTensor([0, 1, 2])
    expected = nn.CrossEntropyLoss()(preds, labels).item()
    criterion = cecore.CrossEntropyLoss(backend=backend)
    assert_close(criterion(preds, labels), np.float32(expected))          # torch tensors in
    assert_close(criterion(preds.numpy(), labels.numpy()), np.float32(expected))


def test_training_step_gradient(backend):
    # outputs with requires_grad=True, loss.backward(): cecore returns the same gradient.
    outputs = torch.tensor([[2.0, 1.0, 0.1], [0.5, 2.5, 0.3], [1.2, 0.7, 1.8], [0.1, 0.2, 0.3]],
                           requires_grad=True)
    labels = torch.tensor([0, 1, 2, 2])
    loss = nn.CrossEntropyLoss()(outputs, labels)
    loss.backward()
    ours = cecore.CrossEntropyLoss(backend=backend).loss_and_grad(outputs, labels)
    check_result(ours, (loss.detach().numpy(), outputs.grad.numpy()), np.float32)


def test_passing_probabilities_instead_of_logits_is_a_different_loss(backend):
    # The tutorials' "common mistake": softmax before the loss. Not an error, just another
    # number, and cecore agrees with torch on both.
    logits = np.array([[2.0, 1.0, 0.1]])
    probs = cecore.softmax(logits, backend=backend)
    labels = np.array([0])
    for x in (logits, probs):
        assert_close(cecore.cross_entropy(x, labels, backend=backend),
                     torch_cross_entropy(x, labels)[0])
    assert cecore.cross_entropy(probs, labels, backend=backend) > \
        cecore.cross_entropy(logits, labels, backend=backend)


def test_batch_size_mismatch_is_reported(backend):
    with pytest.raises(ValueError, match="batch_size"):
        cecore.cross_entropy(np.zeros((3, 4)), np.array([0, 1]), backend=backend)


@pytest.mark.parametrize("options", [dict(), dict(weight=[1.0, 3.0, 10.0]),
                                     dict(label_smoothing=0.1)])
def test_class_weights_and_label_smoothing(backend, options):
    logits = np.array([[2.0, 0.5, -1.0], [0.1, 1.5, 0.3], [-0.5, 0.2, 2.0]])
    targets = np.array([0, 1, 2])
    torch_options = {k: torch.tensor(v, dtype=torch.float64) if k == "weight" else v
                     for k, v in options.items()}
    expected = nn.CrossEntropyLoss(**torch_options)(torch.from_numpy(logits),
                                                    torch.from_numpy(targets)).item()
    assert_close(cecore.CrossEntropyLoss(backend=backend, **options)(logits, targets), expected)


def test_segmentation(backend, rng):
    # logits (N, C, H, W), targets (N, H, W), one class per pixel, some pixels ignored.
    logits = rng.standard_normal((2, 21, 24, 20)).astype(np.float32)
    targets = rng.integers(0, 21, (2, 24, 20))
    targets[:, :3] = 255  # a "void" border, as VOC-style masks mark it
    criterion = cecore.CrossEntropyLoss(ignore_index=255, backend=backend)
    check_result(criterion.loss_and_grad(logits, targets),
                 torch_cross_entropy(logits, targets, ignore_index=255), np.float32)
    # binary segmentation with BCE on (B, 1, H, W)
    masks = (rng.random((2, 1, 24, 20)) < 0.3).astype(np.float32)
    check_result(cecore.BCEWithLogitsLoss(backend=backend).loss_and_grad(logits[:, :1], masks),
                 torch_bce(logits[:, :1], masks), np.float32)


def test_multilabel_with_pos_weight(backend, rng):
    logits = rng.standard_normal((16, 5))
    targets = (rng.random((16, 5)) < 0.2).astype(np.float64)
    for pos_weight in (np.array([5.0]), rng.uniform(1, 10, 5)):
        criterion = cecore.BCEWithLogitsLoss(pos_weight=pos_weight, backend=backend)
        check_result(criterion.loss_and_grad(logits, targets),
                     torch_bce(logits, targets, pos_weight=pos_weight), np.float64)
    # binary classification with one logit per sample, shape [B]
    check_result(cecore.BCEWithLogitsLoss(backend=backend).loss_and_grad(logits[:, 0], targets[:, 0]),
                 torch_bce(logits[:, 0], targets[:, 0]), np.float64)


def test_two_class_softmax_equals_one_logit_bce(backend, rng):
    # softmax over logits (0, z) is sigmoid(z): the tutorials' two binary formulations agree.
    z = rng.standard_normal(50)
    y = rng.integers(0, 2, 50)
    two_class = cecore.cross_entropy(np.stack([np.zeros(50), z], axis=1), y, backend=backend)
    one_logit = cecore.binary_cross_entropy_with_logits(z, y.astype(float), backend=backend)
    np.testing.assert_allclose(two_class, one_logit, rtol=1e-12)


def test_language_model_padding_and_perplexity(backend, rng):
    B, T, V = 4, 16, 300
    logits = rng.standard_normal((B, T, V)).astype(np.float32)
    targets = rng.integers(0, V, (B, T))
    lengths = [16, 11, 7, 3]
    for b, n in enumerate(lengths):
        targets[b, n:] = -100  # padding
    flat_logits, flat_targets = logits.reshape(B * T, V), targets.reshape(B * T)
    check_result(cecore.CrossEntropyLoss(backend=backend).loss_and_grad(flat_logits, flat_targets),
                 torch_cross_entropy(flat_logits, flat_targets), np.float32)
    # the class axis second: (B, V, T) K-dim input gives the same loss
    assert_close(cecore.cross_entropy(logits.transpose(0, 2, 1), targets, backend=backend),
                 torch_cross_entropy(flat_logits, flat_targets)[0], np.float32)
    expected = torch.exp(nn.CrossEntropyLoss()(torch.from_numpy(flat_logits),
                                               torch.from_numpy(flat_targets))).item()
    assert_close(cecore.perplexity(flat_logits, flat_targets, backend=backend), expected,
                 np.float32)
    # uniform logits: the perplexity is the vocabulary size
    np.testing.assert_allclose(
        cecore.perplexity(np.zeros((B * T, V)), flat_targets, backend=backend), V, rtol=1e-12)
