"""Data for detection training and distillation.

- `loading.py`: labeled datasets (COCO files and folders, imagefolders, saved and Hub datasets, parquet) and unlabeled
  image sources, loaded and checked before training;
- `stream.py`: the training data of a run, prepared before the trainer (`prepare_training_data`: the mixed stream of
  labeled and unlabeled rows and the run's step count);
- `collator.py`: from rows to model inputs (decoding, bad images and boxes, augmentation);
- `synthetic.py`: the built-in scenes of the demo and the tests.
"""

from .collator import SADDataCollator
from .loading import (
    category_mapping,
    check_labeled_dataset,
    dataset_label_names,
    detection_features,
    load_coco_detection,
    load_labeled_dataset,
    load_unlabeled_images,
)
from .stream import TrainingData, build_training_stream, prepare_training_data

__all__ = [
    "SADDataCollator",
    "TrainingData",
    "build_training_stream",
    "category_mapping",
    "check_labeled_dataset",
    "dataset_label_names",
    "detection_features",
    "load_coco_detection",
    "load_labeled_dataset",
    "load_unlabeled_images",
    "prepare_training_data",
]
