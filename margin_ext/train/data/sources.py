"""The training set that ``--data`` names, opened and checked against the options."""

from __future__ import annotations

from pathlib import Path

from .errors import DataError
from .image_folder import ImageFolderDataset
from .recordio import RecordIODataset
from .synthetic import SyntheticIdentities


def build_train_set(options, extra_problems=()):
    """(dataset, number of classes) for --data, checked against --num-classes and --num-images.

    Every problem found, the caller's ``extra_problems`` included, is reported in one
    DataError, so that shrinking a preset to a smaller dataset takes one try. The
    synthetic set is checked from its options, before its images are rendered.
    """
    problems = list(extra_problems)
    if options.data == "synthetic":
        classes, images = options.synthetic_identities, options.synthetic_identities * options.synthetic_samples
        problems += _count_problems(options, "the synthetic set", classes, images)
        if problems:
            raise _combined(problems)
        dataset = SyntheticIdentities(options.synthetic_identities, options.synthetic_samples,
                                      seed=options.synthetic_seed)
        return dataset, dataset.num_classes
    try:
        dataset = _open(Path(options.data))
    except DataError as error:
        raise _combined(problems + [str(error)]) from None
    problems += _count_problems(options, options.data, dataset.num_classes, len(dataset))
    if problems:
        raise _combined(problems)
    # A RecordIO set declares its identities in its header; reading every record's label to
    # check them would cost a pass over the file: the head rejects a label out of range.
    if not isinstance(dataset, RecordIODataset):
        top_label = int(dataset.labels.max())
        if top_label >= dataset.num_classes:
            raise DataError(f"{options.data} has label {top_label}, outside [0, {dataset.num_classes}) of its "
                            f"{dataset.num_classes} identities")
    return dataset, dataset.num_classes


def _open(path: Path):
    if not path.exists():
        raise DataError(f"--data {path}: no such file or folder")
    if path.suffix == ".rec" or (path.is_dir() and (path / "train.rec").exists()):
        dataset = _open_recordio(path if path.suffix == ".rec" else path / "train.rec")
    elif path.is_dir():
        dataset = _open_image_folder(path)
    else:
        raise DataError(f"--data {path}: expected 'synthetic', an image folder or a .rec file")
    if len(dataset) == 0:
        raise DataError(f"--data {path}: holds no images")
    return dataset


def _count_problems(options, where, classes: int, images: int) -> list:
    problems = []
    if options.num_classes is not None and options.num_classes != classes:
        problems.append(f"--num-classes {options.num_classes} disagrees with {where}, which has {classes} "
                        f"identities")
    if getattr(options, "num_images", None) is not None and options.num_images != images:
        problems.append(f"--num-images {options.num_images} disagrees with {where}, which has {images} images")
    return problems


def _combined(problems) -> DataError:
    if len(problems) == 1:
        return DataError(problems[0])
    return DataError(f"{len(problems)} problems: " + "; ".join(problems))


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
