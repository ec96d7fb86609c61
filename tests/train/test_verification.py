"""Verification .bin files and InsightFace's 10-fold accuracy protocol."""

import pickle

import numpy as np
import pytest
import torch

from margin_ext.train.data import (
    compute_embeddings,
    encode_npy,
    evaluate_verification,
    load_verification_bin,
    synthetic_verification_pairs,
    write_verification_bin,
)
from margin_ext.train.data.errors import DataWarning
from margin_ext.train.data.verification import kfold_splits, pair_distances


def pair_embeddings(distances, scale=1.0):
    """2-D embeddings whose pairs are exactly at the given squared euclidean distances.

    Unit vectors at angle theta are at squared distance 2 - 2 cos(theta).
    """
    theta = np.arccos(1.0 - np.asarray(distances) / 2.0)
    a = np.stack([np.ones_like(theta), np.zeros_like(theta)], axis=1)
    b = np.stack([np.cos(theta), np.sin(theta)], axis=1)
    return scale * a, scale * b


# ---------------------------------------------------------------- the protocol


def test_kfold_splits_match_unshuffled_kfold():
    splits = kfold_splits(23, 10)
    assert [len(test) for _, test in splits] == [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]
    assert np.concatenate([test for _, test in splits]).tolist() == list(range(23))
    train, test = splits[1]
    assert test.tolist() == [3, 4, 5]
    assert train.tolist() == [0, 1, 2] + list(range(6, 23))
    [(train, test)] = kfold_splits(5, 1)
    assert train.tolist() == test.tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        kfold_splits(5, 10)


def test_ten_fold_protocol_pinned_by_hand():
    # 20 pairs, 10 folds of 2: pair 2f is positive, pair 2f+1 negative.
    # Fold 0 holds a hard positive (1.205) and a hard negative (1.305); all other
    # positives sit at 0.555 and negatives at 1.555.
    #  * fold 0 trains on the easy folds only: every threshold in (0.555, 1.555]
    #    is perfect, the smallest grid value 0.56 wins; on its test fold the hard
    #    positive is rejected, the hard negative too: accuracy 1/2.
    #  * folds 1..9 train with the hard pairs: only (1.205, 1.305] is perfect,
    #    threshold 1.21; their test pairs are easy: accuracy 1.
    # Mean = (0.5 + 9) / 10 = 0.95, population std = 0.15,
    # mean threshold = (0.56 + 9 * 1.21) / 10 = 1.145.
    # Picking the threshold on all 20 pairs, or on the test fold, would give 1.0.
    distances = np.tile([0.555, 1.555], 10)
    distances[0], distances[1] = 1.205, 1.305
    issame = np.tile([True, False], 10)
    a, b = pair_embeddings(distances, scale=3.7)  # normalisation must undo the scale
    result = evaluate_verification(torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(issame))
    np.testing.assert_allclose(result.fold_accuracies, [0.5] + [1.0] * 9)
    assert result.accuracy == pytest.approx(0.95)
    assert result.std == pytest.approx(0.15)
    assert result.threshold == pytest.approx(1.145)


def test_flipped_embeddings_are_summed_before_normalising():
    distances = np.tile([0.555, 1.555], 10)
    distances[0], distances[1] = 1.205, 1.305
    issame = np.tile([True, False], 10)
    a, b = pair_embeddings(distances)
    rng = np.random.default_rng(0)
    noise_a, noise_b = rng.normal(size=a.shape), rng.normal(size=b.shape)
    # Each side only has the pinned geometry once its two halves are added.
    result = evaluate_verification(a - noise_a, b - noise_b, issame, flipped_a=noise_a, flipped_b=noise_b)
    assert result.accuracy == pytest.approx(0.95)
    assert result.threshold == pytest.approx(1.145)
    unflipped = evaluate_verification(a - noise_a, b - noise_b, issame)
    assert unflipped.threshold != pytest.approx(1.145)
    with pytest.raises(ValueError, match="both"):
        evaluate_verification(a, b, issame, flipped_a=a)


def test_pair_distances_are_squared_euclidean_of_unit_vectors():
    a = np.array([[2.0, 0.0], [0.0, 5.0], [1.0, 1.0]])
    b = np.array([[3.0, 0.0], [0.0, -1.0], [-1.0, 1.0]])
    np.testing.assert_allclose(pair_distances(a, b), [0.0, 4.0, 2.0], atol=1e-12)


def test_separable_pairs_verify_perfectly():
    distances = np.where(np.arange(40) % 3 == 0, 0.3, 1.9)
    a, b = pair_embeddings(distances)
    result = evaluate_verification(a, b, np.arange(40) % 3 == 0)
    assert result.accuracy == 1.0 and result.std == 0.0
    assert 0.3 < result.threshold <= 1.9


def test_mismatched_issame_length_is_rejected():
    a, b = pair_embeddings([0.5, 1.5, 0.5])
    with pytest.raises(ValueError, match="2 issame labels for 3 pairs"):
        evaluate_verification(a, b, [True, False], nfolds=2)


# ---------------------------------------------------------------- .bin files


def bin_images(count, size=6):
    rng = np.random.default_rng(1)
    return [rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8) for _ in range(count)]


def test_verification_bin_roundtrip(tmp_path):
    images = bin_images(6)
    issame = [True, False, True]
    path = tmp_path / "lfw.bin"
    write_verification_bin(path, [encode_npy(image) for image in images], issame)
    loaded, flags = load_verification_bin(path, image_size=(6, 6))
    assert loaded.shape == (6, 3, 6, 6) and loaded.dtype == torch.float32
    assert flags.dtype == torch.bool and flags.tolist() == issame
    expected = torch.from_numpy(images[3].astype(np.float32)).permute(2, 0, 1) / 127.5 - 1
    torch.testing.assert_close(loaded[3], expected)
    raw, _ = load_verification_bin(path, image_size=(6, 6), as_uint8=True)
    assert raw.dtype == torch.uint8 and torch.equal(raw[5], torch.from_numpy(images[5]).permute(2, 0, 1))


def test_verification_bin_accepts_numpy_buffers_and_resizes(tmp_path):
    images = bin_images(2, size=8)
    path = tmp_path / "cfp_fp.bin"
    # Some published files hold the encoded images as numpy byte arrays.
    bins = [np.frombuffer(encode_npy(image), dtype=np.uint8) for image in images]
    with open(path, "wb") as handle:
        pickle.dump((bins, [False]), handle, protocol=2)
    with pytest.warns(DataWarning, match="8x8 pixels resized to the model's 4x4"):
        loaded, flags = load_verification_bin(path, image_size=(4, 4))
    assert loaded.shape == (2, 3, 4, 4) and flags.tolist() == [False]
    # A uniform image stays uniform through the resize.
    write_verification_bin(path, [encode_npy(np.full((8, 8, 3), 255, np.uint8))] * 2, [True])
    with pytest.warns(DataWarning):
        loaded, _ = load_verification_bin(path, image_size=(4, 4))
    assert torch.all(loaded == 1.0)


def test_verification_bin_pair_count_must_match(tmp_path):
    path = tmp_path / "bad.bin"
    with pytest.raises(ValueError, match="3 images for 1 pairs"):
        write_verification_bin(path, [encode_npy(image) for image in bin_images(3)], [True])
    with open(path, "wb") as handle:
        pickle.dump(([encode_npy(image) for image in bin_images(3)], [True]), handle)
    with pytest.raises(ValueError, match="3 images for 1 pairs"):
        load_verification_bin(path, image_size=(6, 6))


# ---------------------------------------------------------------- embeddings


def test_compute_embeddings_batches_flips_and_restores_mode():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5), torch.nn.BatchNorm1d(5))
    model.train()
    images = torch.randn(7, 1, 3, 4)
    embeddings, flipped = compute_embeddings(model, images, batch_size=3, flip=True)
    assert model.training
    model.eval()
    torch.testing.assert_close(embeddings, model(images))
    torch.testing.assert_close(flipped, model(torch.flip(images, dims=(-1,))))
    assert not torch.allclose(embeddings, flipped)


# ---------------------------------------------------------------- synthetic pairs


def test_synthetic_pairs_are_balanced_deterministic_and_carry_identity():
    images_a, images_b, issame = synthetic_verification_pairs(num_identities=50, pairs=400, seed=2)
    assert images_a.shape == images_b.shape == (400, 3, 16, 16)
    assert issame.dtype == torch.bool and int(issame.sum()) == 200
    assert 0 < int(issame[:40].sum()) < 40  # shuffled, so every fold has both kinds
    again_a, _, again_same = synthetic_verification_pairs(num_identities=50, pairs=400, seed=2)
    assert torch.equal(again_a, images_a) and torch.equal(again_same, issame)
    # Even raw pixels carry some identity signal; a backbone must do much better.
    raw = evaluate_verification(images_a.flatten(1), images_b.flatten(1), issame)
    assert 0.55 < raw.accuracy < 0.9


def test_synthetic_pairs_need_two_identities():
    with pytest.raises(ValueError, match="at least 2 identities"):
        synthetic_verification_pairs(num_identities=1, pairs=10)
