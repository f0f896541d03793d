"""EpisodeSampler: N-way K-shot episodes, T tasks at a time, straight from a uint8 tensor.

One call to sample() is a handful of tensor ops whatever T, N, K and Q are; no Python code
runs per image or per task:

1. classes: per task, N distinct classes out of the sampler's classes (the data set's
   classes times the rotations): the N largest of uniform random keys, in random order;
2. images: per (task, class), K + Q distinct images of that class, the same way (classes with
   fewer images than the largest give their absent positions a key below every real one);
3. two gathers (index_select of rows), support and query, from the uint8 tensor that was moved to
   the target device once, when the sampler was built, and one conversion: pixel / 255.
   Rotated classes are rows of rotated copies made then (torch.rot90 of the whole tensor, one
   copy per rotation: memory x R), so a rotation costs nothing per episode.

So the K support and Q query images of a class are different images of the same class (for
Omniglot: different drawers of the same character, in the same rotation).

Order within a task is class-major: support = K images of label 0, then K of label 1, ...,
query likewise with Q per label, labels 0..N-1 balanced. The label of a class is its position
among the task's N randomly drawn classes, so labels carry no information across tasks. Nothing
is shuffled further: per-task losses and batch-statistics BatchNorm do not depend on the order.

Rotations: the sampler's classes are (class, rotation) pairs; class id c means data-set class
c // R rotated by rotations[c % R] degrees counterclockwise (torch.rot90 with k = degrees / 90
over the (H, W) dimensions), R = len(rotations). Rotations (0, 90, 180, 270) make 4 classes of
every character, as MAML does for Omniglot meta-training; meta-testing uses (0,).

Randomness comes only from the sampler's own CPU torch.Generator (seeded by `seed`), so an
episode stream is reproducible on any device, and state_dict()/load_state_dict() save and
restore it: a resumed run draws exactly the episodes it would have drawn.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from .classes import ImageClasses

ROTATIONS = (0, 90, 180, 270)


@dataclass
class Episode:
    """x_support [T, N*K, C, H, W] float, y_support [T, N*K] long, x_query [T, N*Q, C, H, W],
    y_query [T, N*Q] on the sampler's device; classes [T, N] (data-set class of each label),
    rotations [T, N] (its rotation in degrees), support_ids [T, N*K] and query_ids [T, N*Q]
    (rows of ImageClasses.images that were drawn) on the CPU. Unpacks as the four tensors
    meta_step takes: `xs, ys, xq, yq = sampler.sample()`."""

    x_support: torch.Tensor
    y_support: torch.Tensor
    x_query: torch.Tensor
    y_query: torch.Tensor
    classes: torch.Tensor
    rotations: torch.Tensor
    support_ids: torch.Tensor
    query_ids: torch.Tensor

    def __iter__(self):
        return iter((self.x_support, self.y_support, self.x_query, self.y_query))


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"EpisodeSampler: {name}={value!r} is invalid: expected an int >= "
                         f"{minimum}")
    return value


class EpisodeSampler:
    """Episodes of `tasks` N-way K-shot tasks with Q query images per class.

    classes: an ImageClasses (load_omniglot(...).classes(), load_image_folder, ...).
    rotations: degrees from (0, 90, 180, 270), each a copy of every class (see module doc).
    device, dtype: where and in which floating dtype x_* are returned (labels are long).
    seed: seeds the sampler's own CPU generator. images_on_device: copy the uint8 images to
    `device` once (default) so each episode is a gather there; False gathers on the CPU and
    moves only the episode (for data sets larger than the device's memory).
    """

    def __init__(self, classes: ImageClasses, n_way: int, k_shot: int, q_query: int,
                 tasks: int, *, rotations: Sequence[int] = (0,), device="cpu",
                 dtype: torch.dtype = torch.float32, seed: int = 0,
                 images_on_device: bool = True):
        if not isinstance(classes, ImageClasses):
            raise ValueError(f"EpisodeSampler needs an ImageClasses (from load_omniglot(...)"
                             f".classes(), load_image_folder or load_mini_imagenet), got "
                             f"{type(classes).__name__}")
        self.n_way = _check_int("n_way", n_way, 1)
        self.k_shot = _check_int("k_shot", k_shot, 1)
        self.q_query = _check_int("q_query", q_query, 1)
        self.tasks = _check_int("tasks", tasks, 1)
        self.seed = _check_int("seed", seed, 0)
        self.rotations = self._check_rotations(rotations, classes.image_shape)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"EpisodeSampler: dtype={dtype!r} is invalid: use a floating dtype "
                             f"such as torch.float32")
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"EpisodeSampler: device={device!r} is invalid: {e}") from e
        self.dtype = dtype
        n_base = classes.n_classes
        if n_way > n_base * len(self.rotations):
            raise ValueError(f"EpisodeSampler: n_way={n_way} but there are only {n_base} "
                             f"classes x {len(self.rotations)} rotations: lower n_way or use "
                             f"more classes")
        small = (classes.counts < k_shot + q_query).nonzero().flatten().tolist()
        if small:
            ex = ", ".join(f"{classes.names[c]!r} ({int(classes.counts[c])})" for c in small[:3])
            raise ValueError(f"EpisodeSampler: {len(small)} classes have fewer than k_shot + "
                             f"q_query = {k_shot + q_query} images, e.g. {ex}: lower k_shot or "
                             f"q_query, or drop them with classes.subset(...)")
        self.classes = classes
        self._counts = classes.counts.clone()
        self._names_digest = hashlib.sha256("\n".join(classes.names).encode()).hexdigest()
        self._offsets = classes.offsets
        self._max_count = int(classes.counts.max())
        self._uniform = bool((classes.counts == self._max_count).all())
        self._images_on_device = bool(images_on_device)
        images = classes.images.to(self.device) if images_on_device else classes.images
        self._lut = torch.arange(256, dtype=self.dtype).div_(255).to(self.device)
        if self.rotations != (0,):  # R rotated copies: a rotation is then just a row offset
            images = torch.cat([torch.rot90(images, r // 90, dims=(-2, -1))
                                for r in self.rotations])
        self._images = images
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(self.seed)

    @staticmethod
    def _check_rotations(rotations, image_shape) -> tuple:
        rot = tuple(rotations) if isinstance(rotations, (tuple, list)) else None
        if not rot or any(r not in ROTATIONS or isinstance(r, bool) for r in rot) \
                or len(set(rot)) != len(rot):
            raise ValueError(f"EpisodeSampler: rotations={rotations!r} is invalid: a non-empty "
                             f"sequence of distinct degrees from {ROTATIONS}, e.g. (0,) or "
                             f"(0, 90, 180, 270)")
        if any(r % 180 for r in rot) and image_shape[1] != image_shape[2]:
            raise ValueError(f"EpisodeSampler: rotations by 90 or 270 degrees need square "
                             f"images, these are {image_shape[1]}x{image_shape[2]}")
        return rot

    @property
    def n_classes(self) -> int:
        """Classes the sampler draws from: data-set classes x rotations."""
        return self.classes.n_classes * len(self.rotations)

    def sample(self) -> Episode:
        """The next `tasks` tasks of the stream (see the module docstring for the layout)."""
        T, N, K, R = self.tasks, self.n_way, self.k_shot, len(self.rotations)
        g, S = self.generator, K + self.q_query
        # float64 keys: ties (which would make the choice depend on the sort) practically never
        cls = torch.rand(T, self.n_classes, generator=g, dtype=torch.float64).topk(N, dim=1)[1]
        base, rot = cls // R, cls % R
        keys = torch.rand(T, N, self._max_count, generator=g, dtype=torch.float64)
        if not self._uniform:  # positions past a class's count are never among the top S
            keys.masked_fill_(torch.arange(self._max_count) >= self._counts[base][..., None], -1.0)
        ids = self._offsets[base][..., None] + keys.topk(S, dim=-1)[1]    # [T, N, S] rows
        rows = ids + (rot * self.classes.n_images)[..., None]            # in the rotated copies
        x_s, x_q = self._gather(rows[..., :K]), self._gather(rows[..., K:])
        labels = torch.arange(N, device=self.device)
        return Episode(
            x_support=x_s, y_support=labels.repeat_interleave(K).repeat(T, 1),
            x_query=x_q, y_query=labels.repeat_interleave(self.q_query).repeat(T, 1),
            classes=base, rotations=torch.tensor(self.rotations, dtype=torch.long)[rot],
            support_ids=ids[..., :K].reshape(T, -1), query_ids=ids[..., K:].reshape(T, -1))

    def _gather(self, rows: torch.Tensor) -> torch.Tensor:
        """[T, N, k] rows of the (rotated) image tensor -> float [T, N*k, C, H, W] / 255."""
        shape = (rows.shape[0], rows.shape[1] * rows.shape[2], *self._images.shape[1:])
        rows = rows.reshape(-1)
        if self._images_on_device:
            x = self._images.index_select(0, rows.to(self.device))
        else:
            x = self._images.index_select(0, rows).to(self.device, non_blocking=True)
        # pixel / 255 through a 256-entry table computed on the CPU: CUDA divides by a scalar
        # as a multiplication by its reciprocal, which differs from the CPU's division in the
        # last bit for some pixels (seen on an H100); the table gives every device the CPU's
        # values.
        return self._lut.index_select(0, x.reshape(-1).int()).view(shape)

    def __iter__(self) -> Iterator[Episode]:
        """An endless stream of episodes."""
        while True:
            yield self.sample()

    def _config(self) -> dict:
        return {"n_way": self.n_way, "k_shot": self.k_shot, "q_query": self.q_query,
                "tasks": self.tasks, "rotations": list(self.rotations),
                "counts": self._counts.tolist(), "classes_sha256": self._names_digest}

    def state_dict(self) -> dict:
        """The generator state and the settings it belongs to (torch.save-able)."""
        return {"generator": self.generator.get_state(), "seed": self.seed,
                "config": self._config()}

    def load_state_dict(self, state: dict) -> None:
        """Continue the episode stream saved by state_dict(), from a sampler with the same
        settings and classes."""
        if not isinstance(state, dict) or "generator" not in state or "config" not in state:
            raise ValueError("EpisodeSampler.load_state_dict needs the dict state_dict() returned")
        mine, theirs = self._config(), state["config"]
        diff = [k for k in mine if mine[k] != theirs.get(k)]
        if diff:
            shown = ", ".join(f"{k}: saved {str(theirs.get(k))[:40]}, here {str(mine[k])[:40]}"
                              for k in diff)
            raise ValueError(f"EpisodeSampler.load_state_dict: the state was saved by a sampler "
                             f"with other settings ({shown}): build the sampler with the saved "
                             f"settings and classes to resume")
        self.generator.set_state(state["generator"])
