"""Training and verification data: synthetic identities, image folders, RecordIO, verification .bin files."""

from .decode import decode_image, encode_npy, to_model_input
from .errors import DataError
from .image_folder import ImageFolderDataset
from .recordio import IRHeader, RecordIODataset, RecordIOReader, pack_record, unpack_record, write_recordio
from .synthetic import SyntheticIdentities, synthetic_verification_pairs
from .verification import (
    VerificationResult,
    compute_embeddings,
    evaluate_verification,
    load_verification_bin,
    write_verification_bin,
)

__all__ = [
    "DataError",
    "ImageFolderDataset",
    "IRHeader",
    "RecordIODataset",
    "RecordIOReader",
    "SyntheticIdentities",
    "VerificationResult",
    "compute_embeddings",
    "decode_image",
    "encode_npy",
    "evaluate_verification",
    "load_verification_bin",
    "pack_record",
    "synthetic_verification_pairs",
    "to_model_input",
    "unpack_record",
    "write_recordio",
    "write_verification_bin",
]
