"""The training set that ``--data`` names, opened and checked against the options."""

from __future__ import annotations

from pathlib import Path

from .errors import DataError
from .image_folder import ImageFolderDataset
from .recordio import RecordIODataset
from .synthetic import SyntheticIdentities


def build_train_set(options):
    """(dataset, number of classes) for --data, checked against --num-classes and --num-images."""
    if options.data == "synthetic":
        dataset = SyntheticIdentities(options.synthetic_identities, options.synthetic_samples,
                                      seed=options.synthetic_seed)
        where = "the synthetic set"
    else:
        path = Path(options.data)
        where = str(path)
        if not path.exists():
            raise DataError(f"--data {path}: no such file or folder")
        if path.suffix == ".rec" or (path.is_dir() and (path / "train.rec").exists()):
            dataset = _open_recordio(path if path.suffix == ".rec" else path / "train.rec")
        elif path.is_dir():
            dataset = _open_image_folder(path)
        else:
            raise DataError(f"--data {path}: expected 'synthetic', an image folder or a .rec file")
    if len(dataset) == 0:
        raise DataError(f"--data {options.data}: holds no images")
    declared = dataset.num_classes
    if options.num_classes is not None and options.num_classes != declared:
        raise DataError(f"--num-classes {options.num_classes} disagrees with {where}, which has {declared} identities")
    if getattr(options, "num_images", None) is not None and options.num_images != len(dataset):
        raise DataError(f"--num-images {options.num_images} disagrees with {where}, which has {len(dataset)} images")
    # A RecordIO set declares its identities in its header; reading every record's label to
    # check them would cost a pass over the file: the head rejects a label out of range.
    if not isinstance(dataset, RecordIODataset):
        top_label = int(dataset.labels.max())
        if top_label >= declared:
            raise DataError(f"{where} has label {top_label}, outside [0, {declared}) of its {declared} identities")
    return dataset, declared


def _open_recordio(path: Path):
    index = path.with_suffix(".idx")
    if not index.exists():
        raise DataError(f"--data {path}: its index {index} is missing (a .rec file needs the .idx beside it)")
    try:
        # faces are mirror-symmetric: flipping is InsightFace's one training augmentation
        return RecordIODataset(path, random_flip=True)
    except DataError:
        raise
    except (OSError, ValueError, KeyError, EOFError) as error:
        raise DataError(f"--data {path}: not a readable RecordIO dataset ({error})") from None


def _open_image_folder(path: Path):
    try:
        return ImageFolderDataset(path, random_flip=True)
    except DataError:
        raise
    except (OSError, ValueError) as error:
        raise DataError(f"--data {path}: not a usable image folder ({error})") from None
