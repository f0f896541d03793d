"""`implicit_maml.dataset` of the iMAML authors: task definitions and task datasets.

A task is a dict with x_train, y_train, x_val, y_val (torch tensors) and task_def.

- SinusoidDataset: MAML's sinusoid regression, y = amp * sin(x + phase) with amp in
  [0.1, 5], phase in [0, pi], x in [-5, 5]. Draws come in the authors' order (per task: amp,
  phase, x_train, x_val) from numpy's global generator, or from RandomState(seed) if a seed is
  given, so SinusoidDataset(seed=s) equals np.random.seed(s); SinusoidDataset().
- OmniglotTask: an N-way K-shot task definition. Pickles made by the authors'
  generate_task_defs.py load into it unchanged (after imaml_fast.compat.install_aliases());
  its attributes are the authors': root1, root2 (images_background / images_evaluation
  folders), num_cls, num_inst, train_ids, val_ids (image ids: file paths, class by class,
  num_inst each), train_labels, val_labels (class index of each id).
- OmniglotFewShotDataset: task definitions -> task dicts, with a random rotation by a
  multiple of 90 degrees per class (drawn per call, as in the authors' code). Images come
  from files (the authors' omniglot-py folders, read with Pillow, resized to 28x28 with
  Lanczos, scaled to [0, 1]) or, with no files or extra packages, from in-memory arrays per
  class (OmniglotFewShotDataset.from_arrays). It does not use imaml_fast.data.

Differences from the authors' code: rotations use np.rot90 (identical to their
scipy.ndimage.rotate for these angles, without needing scipy); OmniglotTask lists folders in
sorted order (the authors' os.listdir order depends on the file system) and takes the size of
the meta-training split as num_train_classes (the authors hard-code 1200 of 1623).
"""
from __future__ import annotations

import os
import random
from typing import Callable, Dict, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from . import utils

__all__ = ["SinusoidDataset", "OmniglotTask", "OmniglotFewShotDataset", "load_omniglot_image"]

DATA_DIR = os.environ.get("OMNIGLOT_DIR", "omniglot-py")


class SinusoidDataset(Dataset):
    """num_tasks sinusoid tasks with train_inst / val_inst points each, generated up front.
    Each task also carries amp, phase, x_all, y_all (train then val) as in the authors' code.
    dtype: float32 by default (float16 if float16=True)."""

    def __init__(self, num_tasks=100, train_inst=10, val_inst=10, GPU=False, float16=False,
                 seed: Optional[int] = None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.num_tasks = num_tasks
        self.ntrain, self.nval = train_inst, val_inst
        self.amp_range = [0.1, 5.0]
        self.phase_range = [0.0, np.pi]
        self.input_range = [-5.0, 5.0]
        self.use_gpu = GPU
        self.float16 = float16
        self.dtype = torch.float16 if float16 else (dtype or torch.float32)
        self._rng = None if seed is None else np.random.RandomState(seed)
        self.task_data = self.generate_tasks()

    def sine_function(self, x, amp, phase):
        return amp * np.sin(x + phase)

    def generate_tasks(self, num_tasks=None):
        rng = np.random if self._rng is None else self._rng
        lo, hi = self.input_range

        def tensor(a):  # straight to self.dtype: no float32 round trip for float64
            return utils.to_device(utils.to_tensor(a, dtype=self.dtype), self.use_gpu)

        tasks = []
        for _ in range(self.num_tasks if num_tasks is None else num_tasks):
            amp = rng.uniform(low=self.amp_range[0], high=self.amp_range[1])
            phase = rng.uniform(low=self.phase_range[0], high=self.phase_range[1])
            x_train = rng.uniform(low=lo, high=hi, size=self.ntrain).reshape(-1, 1)
            x_val = rng.uniform(low=lo, high=hi, size=self.nval).reshape(-1, 1)
            y_train = self.sine_function(x_train, amp, phase)
            y_val = self.sine_function(x_val, amp, phase)
            tasks.append(dict(
                amp=amp, phase=phase, task_def=dict(amp=amp, phase=phase),
                x_train=tensor(x_train), y_train=tensor(y_train),
                x_val=tensor(x_val), y_val=tensor(y_val),
                x_all=tensor(np.concatenate([x_train, x_val])),
                y_all=tensor(np.concatenate([y_train, y_val]))))
        return tasks

    def __len__(self):
        return self.num_tasks

    def __getitem__(self, idx):
        return self.task_data[idx]


class OmniglotTask:
    """An N-way (num_cls) K-shot (num_inst) task: num_cls characters drawn from the
    meta-training (train=True) or meta-test characters of `root`, num_inst training and
    num_inst validation images of each.

    root: the authors' omniglot-py folder (images_background/ and images_evaluation/, each
    <alphabet>/<character>/<image>.png). train_val_permutation: a permutation of all
    characters (both folders, alphabets sorted); its first num_train_classes are the
    meta-training characters. rng: a random.Random (default: Python's global generator, as
    the authors' script, which seeds it). OmniglotTask.from_ids builds one without files.
    """

    def __init__(self, train_val_permutation, root=DATA_DIR, num_cls=5, num_inst=1, train=True,
                 num_train_classes=1200, rng: Optional[random.Random] = None):
        rng = random if rng is None else rng  # the module's shuffle/sample: the global generator
        self.root1 = os.path.join(root, "images_background")
        self.root2 = os.path.join(root, "images_evaluation")
        self.num_cls, self.num_inst = num_cls, num_inst
        chars = []
        for folder in (self.root1, self.root2):
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"OmniglotTask: {folder} is not a folder; root must hold "
                                        f"images_background/ and images_evaluation/")
            for lang in sorted(os.listdir(folder)):
                chars += [os.path.join(folder, lang, c)
                          for c in sorted(os.listdir(os.path.join(folder, lang)))]
        perm = list(train_val_permutation)
        if sorted(perm) != list(range(len(chars))):
            raise ValueError(f"train_val_permutation must be a permutation of range({len(chars)}) "
                             f"(the number of characters under {root})")
        chars = [chars[i] for i in perm]
        chars = chars[:num_train_classes] if train else chars[num_train_classes:]
        if len(chars) < num_cls:
            raise ValueError(f"only {len(chars)} characters in this split, fewer than num_cls={num_cls}")
        rng.shuffle(chars)
        self.train_ids, self.val_ids, self.train_labels, self.val_labels = [], [], [], []
        for label, c in enumerate(chars[:num_cls]):
            files = [os.path.join(c, f) for f in sorted(os.listdir(c))]
            if len(files) < 2 * num_inst:
                raise ValueError(f"{c} has {len(files)} images, fewer than 2 * num_inst")
            files = rng.sample(files, len(files))
            self.train_ids += files[:num_inst]
            self.val_ids += files[num_inst:2 * num_inst]
            self.train_labels += [label] * num_inst
            self.val_labels += [label] * num_inst

    @classmethod
    def from_ids(cls, train_ids, train_labels, val_ids, val_labels, num_cls, num_inst,
                 root1=None, root2=None) -> "OmniglotTask":
        """A task definition from explicit ids (file paths or in-memory keys) and labels."""
        self = cls.__new__(cls)
        self.root1, self.root2 = root1, root2
        self.num_cls, self.num_inst = num_cls, num_inst
        self.train_ids, self.val_ids = list(train_ids), list(val_ids)
        self.train_labels, self.val_labels = list(train_labels), list(val_labels)
        return self

    def get_class(self, instance):
        """The character an image id belongs to: its folder (or its key's class part)."""
        return instance[0] if isinstance(instance, tuple) else os.path.dirname(instance)

    def __repr__(self):
        return (f"OmniglotTask(num_cls={self.num_cls}, num_inst={self.num_inst}, "
                f"train_ids={len(self.train_ids)}, val_ids={len(self.val_ids)})")


def load_omniglot_image(path: str) -> np.ndarray:
    """An Omniglot PNG as the authors read it: grayscale, resized to 28x28 with Lanczos,
    float32 in [0, 1]. Needs Pillow."""
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError("reading Omniglot image files needs Pillow (pip install pillow); "
                          "or build the dataset from arrays with "
                          "OmniglotFewShotDataset.from_arrays") from e
    lanczos = getattr(Image, "Resampling", Image).LANCZOS
    with Image.open(path) as im:
        im = im.convert("L").resize((28, 28), resample=lanczos)
        return np.asarray(im, dtype=np.float32) / 255.0


class OmniglotFewShotDataset(Dataset):
    """Task definitions (OmniglotTask) -> task dicts.

    task_defs: list of OmniglotTask. Their ids are file paths (read with image_loader,
        default load_omniglot_image) or, when `images` is given, keys (class, index) into it.
    images: per-class image arrays, a dict or a sequence: images[class] is [n, 28, 28] or
        [n, 1, 28, 28], float values used as they are.
    transform / target_transform: applied to the stacked x / y tensors of each split.
    rotate: rotate each class by a random multiple of 90 degrees on every access (the
        authors' augmentation); rotations come from numpy's global generator, or from
        RandomState(seed) when a seed is given.
    Returns dict(task_def, x_train [N*K, 1, 28, 28], y_train (long), x_val, y_val).
    """

    def __init__(self, task_defs, transform=None, target_transform=None, GPU=False, *,
                 images: Union[Dict, Sequence, None] = None, image_loader: Optional[Callable] = None,
                 rotate=True, seed: Optional[int] = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.task_defs = list(task_defs)
        self.transform, self.target_transform = transform, target_transform
        self.use_gpu = GPU
        self.images = images
        self.image_loader = image_loader
        self.rotate, self.dtype = rotate, dtype
        self._rng = None if seed is None else np.random.RandomState(seed)

    @classmethod
    def from_arrays(cls, images, num_tasks, num_cls=5, num_inst=1, seed=0, **kwargs):
        """num_tasks N-way K-shot tasks sampled from in-memory images[class] arrays (each
        class needs at least 2 * num_inst images): classes without replacement, then a
        random split of each class's images into num_inst train and num_inst val."""
        keys = list(images.keys()) if isinstance(images, dict) else list(range(len(images)))
        if len(keys) < num_cls:
            raise ValueError(f"{len(keys)} classes given, fewer than num_cls={num_cls}")
        rng = np.random.RandomState(seed)
        defs = []
        for _ in range(num_tasks):
            tr, va = [], []
            for c in rng.choice(len(keys), size=num_cls, replace=False):
                n = len(images[keys[c]])
                if n < 2 * num_inst:
                    raise ValueError(f"class {keys[c]!r} has {n} images, fewer than 2 * num_inst")
                order = rng.permutation(n)
                tr += [(keys[c], int(i)) for i in order[:num_inst]]
                va += [(keys[c], int(i)) for i in order[num_inst:2 * num_inst]]
            labels = [i // num_inst for i in range(num_cls * num_inst)]
            defs.append(OmniglotTask.from_ids(tr, labels, va, labels, num_cls, num_inst))
        return cls(defs, images=images, **kwargs)

    def __len__(self):
        return len(self.task_defs)

    def _image(self, image_id) -> np.ndarray:
        if self.images is not None:
            key, i = image_id
            img = np.asarray(utils.to_numpy(self.images[key][i]))
        else:
            img = (self.image_loader or load_omniglot_image)(image_id)
        return img.reshape(28, 28)

    def _split(self, ids, labels, turns, num_inst):
        x = [np.rot90(self._image(i), int(turns[k // num_inst])).reshape(1, 28, 28)
             for k, i in enumerate(ids)]
        x = utils.to_device(utils.to_tensor(np.stack(x), dtype=self.dtype), self.use_gpu)
        y = utils.to_device(utils.to_tensor(np.asarray(labels), dtype=torch.long), self.use_gpu)
        if self.transform:
            x = self.transform(x)
        if self.target_transform:
            y = self.target_transform(y)
        return x, y

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(f"task index {index} out of range for {len(self)} tasks")
        td = self.task_defs[index]
        rng = np.random if self._rng is None else self._rng
        if self.rotate:  # the authors draw angles from [0, 90, 180, 270]: k quarter turns
            turns = (rng.choice([0., 90., 180., 270.], size=(td.num_cls,), replace=True) // 90)
        else:
            turns = np.zeros(td.num_cls)
        x_train, y_train = self._split(td.train_ids, td.train_labels, turns, td.num_inst)
        x_val, y_val = self._split(td.val_ids, td.val_labels, turns, td.num_inst)
        return dict(task_def=td, x_train=x_train, y_train=y_train, x_val=x_val, y_val=y_val)
