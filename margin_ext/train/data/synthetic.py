"""A built-in synthetic identity set that needs no download.

Each identity is a latent prototype: a random unit vector in a small latent
space. A sample of an identity perturbs its prototype with intra-class noise,
adds identity-independent nuisance factors (think pose and lighting) and is
then rendered into a small image by a fixed, seeded random generator network
(linear -> tanh -> upsample -> conv -> tanh -> upsample -> conv -> tanh),
followed by a random crop (alignment jitter) and pixel noise. A backbone has to
learn to undo the rendering and ignore the nuisances to tell identities apart,
which makes the set a cheap stand-in for a face dataset on a CPU.

Everything is a function of ``seed``: the renderer, the training identities
and the held-out verification identities come from separate seed streams, so
verification identities never coincide with training ones while the images
share the same "world" (renderer and noise model).
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

LATENT_DIM = 32
NUISANCE_DIM = 8
_RENDER_WIDTH = 16  # feature maps inside the renderer

# Defaults shared by the training set and the verification pairs, so that both
# live in the same world unless a caller changes them on purpose. Chosen so raw
# pixels verify at ~0.68 while a small CNN with plain softmax reaches ~0.9.
DEFAULT_NOISE = 0.5  # expected norm of the intra-class offset around a unit prototype
DEFAULT_NUISANCE = 2.0  # std of the identity-independent latent factors
DEFAULT_JITTER = 2  # maximum crop shift in pixels
DEFAULT_PIXEL_NOISE = 0.05
_CHUNK = 4096  # samples rendered at once, bounds peak memory
# Sets of more images are rendered image by image as they are read (a million identities
# would take 3 GiB per process at 16 x 16 x 3 float32); smaller ones once, up front.
RENDER_AHEAD_LIMIT = 1 << 18


def derive_seed(*parts) -> int:
    """A stable 63-bit seed from any printable parts (unlike ``hash``, stable across runs)."""
    digest = hashlib.sha256(repr(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _generator(*parts) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(derive_seed(*parts))
    return generator


def random_prototypes(count: int, latent_dim: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` random unit vectors of ``latent_dim`` components."""
    return F.normalize(torch.randn(count, latent_dim, generator=generator), dim=1)


class SyntheticRenderer:
    """The fixed random map from latent codes to images, and the sample noise model."""

    def __init__(
        self,
        image_size: int = 16,
        channels: int = 3,
        noise: float = DEFAULT_NOISE,
        nuisance: float = DEFAULT_NUISANCE,
        jitter: int = DEFAULT_JITTER,
        pixel_noise: float = DEFAULT_PIXEL_NOISE,
        seed: int = 0,
        latent_dim: int = LATENT_DIM,
    ):
        if image_size < 4:
            raise ValueError(f"image_size must be at least 4, got {image_size}")
        if channels < 1:
            raise ValueError(f"channels must be positive, got {channels}")
        if noise < 0 or nuisance < 0 or pixel_noise < 0 or jitter < 0:
            raise ValueError("noise, nuisance, pixel_noise and jitter must be non-negative")
        self.image_size = image_size
        self.channels = channels
        self.noise = float(noise)
        self.nuisance = float(nuisance)
        self.jitter = int(jitter)
        self.pixel_noise = float(pixel_noise)
        self.latent_dim = latent_dim
        self.canvas_size = image_size + 2 * self.jitter
        self.base_size = max(2, math.ceil(self.canvas_size / 4))

        # The renderer depends on the seed and the image geometry only, so the
        # training set and the verification pairs of one seed share it.
        weights = _generator(seed, "renderer", image_size, channels, latent_dim)
        in_features = latent_dim + NUISANCE_DIM
        out_features = _RENDER_WIDTH * self.base_size * self.base_size
        self.fc_weight = torch.randn(out_features, in_features, generator=weights) / math.sqrt(in_features)
        self.fc_bias = 0.1 * torch.randn(out_features, generator=weights)
        fan_in = _RENDER_WIDTH * 9
        self.conv1_weight = 1.5 * torch.randn(_RENDER_WIDTH, _RENDER_WIDTH, 3, 3, generator=weights) / math.sqrt(fan_in)
        self.conv2_weight = 1.5 * torch.randn(channels, _RENDER_WIDTH, 3, 3, generator=weights) / math.sqrt(fan_in)

    def render(self, latent: torch.Tensor) -> torch.Tensor:
        """Latent codes (N x (latent_dim + NUISANCE_DIM)) -> canvases (N x C x S x S) in [-1, 1]."""
        hidden = torch.tanh(F.linear(latent, self.fc_weight, self.fc_bias))
        hidden = hidden.view(-1, _RENDER_WIDTH, self.base_size, self.base_size)
        hidden = F.interpolate(hidden, size=2 * self.base_size, mode="bilinear", align_corners=False)
        hidden = torch.tanh(F.conv2d(hidden, self.conv1_weight, padding=1))
        hidden = F.interpolate(hidden, size=self.canvas_size, mode="bilinear", align_corners=False)
        return torch.tanh(F.conv2d(hidden, self.conv2_weight, padding=1))

    def sample(self, prototypes: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Render one noisy sample per label; returns N x C x image_size x image_size float32."""
        images = []
        for start in range(0, len(labels), _CHUNK):
            images.append(self._sample_chunk(prototypes, labels[start:start + _CHUNK], generator))
        if not images:
            return torch.empty(0, self.channels, self.image_size, self.image_size)
        return torch.cat(images)

    def sample_each(self, prototypes: torch.Tensor, labels: torch.Tensor, generators) -> torch.Tensor:
        """One sample per label, label i's noise drawn from ``generators[i]``, rendered together:
        ``sample(prototypes, labels[i:i + 1], generators[i])`` for each i, up to float rounding."""
        noise = [self._noise(1, generator) for generator in generators]
        if not noise:
            return torch.empty(0, self.channels, self.image_size, self.image_size)
        return self._noisy_images(prototypes, labels, *(torch.cat(parts) for parts in zip(*noise)))

    def _sample_chunk(self, prototypes, labels, generator):
        return self._noisy_images(prototypes, labels, *self._noise(len(labels), generator))

    def _noise(self, count: int, generator: torch.Generator):
        """(latent offsets, nuisance factors, crop shifts, pixel noise) of ``count`` samples."""
        # Noise of expected norm ``noise`` around a unit prototype.
        offsets = torch.randn(count, self.latent_dim, generator=generator) * (self.noise / math.sqrt(self.latent_dim))
        nuisance = self.nuisance * torch.randn(count, NUISANCE_DIM, generator=generator)
        shifts = torch.randint(0, 2 * self.jitter + 1, (count, 2), generator=generator)
        pixels = self.pixel_noise * torch.randn(count, self.channels, self.image_size, self.image_size,
                                                generator=generator)
        return offsets, nuisance, shifts, pixels

    def _noisy_images(self, prototypes, labels, offsets, nuisance, shifts, pixels):
        identity = F.normalize(prototypes[labels] + offsets, dim=1) * math.sqrt(self.latent_dim)
        canvas = self.render(torch.cat([identity, nuisance], dim=1))
        # Alignment jitter: crop a random image_size window out of the canvas.
        rows = shifts[:, 0, None] + torch.arange(self.image_size)
        cols = shifts[:, 1, None] + torch.arange(self.image_size)
        batch = torch.arange(len(labels))[:, None, None, None]
        channel = torch.arange(self.channels)[None, :, None, None]
        images = canvas[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]
        return (images + pixels).clamp_(-1.0, 1.0).contiguous()


class SyntheticIdentities(Dataset):
    """A closed set of synthetic identities, precomputed and deterministic.

    Item ``i`` is ``(image, label)`` with ``image`` a float32 C x H x W tensor in
    [-1, 1] and ``label = i // samples_per_identity`` (int64). All splits of one
    seed share the identities; ``split`` only selects the stream the sample
    noise is drawn from, so ``split="val"`` gives fresh images of the training
    identities (closed-set accuracy). Held-out identities come from
    :func:`synthetic_verification_pairs`.

    The images are not mirror-symmetric: leave horizontal-flip augmentation off.

    Up to ``RENDER_AHEAD_LIMIT`` images are rendered at construction, from one stream;
    larger sets render item ``i`` when it is read, from a stream of its own, (seed,
    split, i): as deterministic, but other images than the up-front rendering would give.
    A batch read at once (``__getitems__``, what a DataLoader calls) renders its images
    together: the same images up to float rounding, many times faster than one by one.
    """

    def __init__(
        self,
        num_identities: int = 1000,
        samples_per_identity: int = 20,
        image_size: int = 16,
        channels: int = 3,
        noise: float = DEFAULT_NOISE,
        nuisance: float = DEFAULT_NUISANCE,
        jitter: int = DEFAULT_JITTER,
        pixel_noise: float = DEFAULT_PIXEL_NOISE,
        seed: int = 0,
        split: str = "train",
    ):
        if num_identities < 1 or samples_per_identity < 1:
            raise ValueError(
                f"need at least one identity and one sample each, got "
                f"num_identities={num_identities}, samples_per_identity={samples_per_identity}"
            )
        self.renderer = SyntheticRenderer(image_size, channels, noise, nuisance, jitter, pixel_noise, seed)
        self.num_identities = num_identities
        self.samples_per_identity = samples_per_identity
        self.split = split
        self.prototypes = random_prototypes(num_identities, LATENT_DIM, _generator(seed, "train-identities"))
        self.labels = torch.arange(num_identities, dtype=torch.int64).repeat_interleave(samples_per_identity)
        self.seed = seed
        self.images = None
        if len(self.labels) <= RENDER_AHEAD_LIMIT:
            self.images = self.renderer.sample(self.prototypes, self.labels, _generator(seed, "samples", split))

    @property
    def num_classes(self) -> int:
        return self.num_identities

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.__getitems__([index])[0]

    def __getitems__(self, indices):
        """The items of ``indices`` (what a DataLoader asks for a batch): rendered on read, the
        batch's images are rendered together, each from its own stream."""
        if self.images is not None:
            return [(self.images[index], self.labels[index]) for index in indices]
        indices = [range(len(self))[index] for index in indices]  # negative indices too, IndexError past the end
        labels = self.labels[indices]
        generators = [_generator(self.seed, "sample", self.split, index) for index in indices]
        images = self.renderer.sample_each(self.prototypes, labels, generators)
        return list(zip(images, labels))


def synthetic_verification_pairs(
    num_identities: int = 200,
    pairs: int = 1000,
    image_size: int = 16,
    channels: int = 3,
    noise: float = DEFAULT_NOISE,
    nuisance: float = DEFAULT_NUISANCE,
    jitter: int = DEFAULT_JITTER,
    pixel_noise: float = DEFAULT_PIXEL_NOISE,
    seed: int = 0,
):
    """Verification pairs over held-out identities, shaped like an InsightFace set.

    Returns ``(images_a, images_b, issame)``: two N x C x H x W float32 tensors
    and an N-element bool tensor, ``pairs // 2`` of them positive (two different
    samples of one identity) and the rest negative (two different identities),
    in a seeded random order. Pass the same rendering parameters and seed as
    the training :class:`SyntheticIdentities` so both live in the same world.
    """
    if num_identities < 2:
        raise ValueError(f"negative pairs need at least 2 identities, got {num_identities}")
    if pairs < 2:
        raise ValueError(f"need at least 2 pairs (one positive, one negative), got {pairs}")
    renderer = SyntheticRenderer(image_size, channels, noise, nuisance, jitter, pixel_noise, seed)
    # A seed stream of its own keeps these identities apart from the training ones.
    prototypes = random_prototypes(num_identities, LATENT_DIM, _generator(seed, "verification-identities"))
    generator = _generator(seed, "verification-pairs")

    positives = pairs // 2
    issame = torch.zeros(pairs, dtype=torch.bool)
    issame[:positives] = True
    issame = issame[torch.randperm(pairs, generator=generator)]

    labels_a = torch.randint(0, num_identities, (pairs,), generator=generator)
    # A non-zero shift modulo the identity count always lands on another identity.
    shift = torch.randint(1, num_identities, (pairs,), generator=generator)
    labels_b = torch.where(issame, labels_a, (labels_a + shift) % num_identities)

    images_a = renderer.sample(prototypes, labels_a, generator)
    images_b = renderer.sample(prototypes, labels_b, generator)
    return images_a, images_b, issame
