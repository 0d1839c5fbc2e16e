"""Datasets as the reference reads them: ``transforms.py`` (the test-time resize and normalization),
``readers.py`` (the folder layouts the manifest declares, labels, the test-time loader), ``check.py``
(``psp-zoo dataset check``). ``psp_zoo.datasets`` keeps the names it had as one module.
"""
from .readers import (  # the public names of the module this package replaced
    CITYSCAPES_LABEL_IDS,
    Item,
    Sample,
    SegmentationDataset,
    cityscapes_label_ids_to_train_ids,
    cityscapes_train_ids_to_label_ids,
    class_names,
    classes,
    dataset_spec,
    decode_image,
    default_num_workers,
    find_dataset_root,
    list_items,
    locate_split_folder,
    make_loader,
    palette,
    read_image,
    read_label,
    reduce_zero_label,
)

__all__ = ["Item", "Sample", "SegmentationDataset", "dataset_spec", "classes", "class_names", "palette",
           "find_dataset_root", "locate_split_folder", "list_items", "decode_image", "read_image", "read_label",
           "make_loader", "cityscapes_label_ids_to_train_ids", "cityscapes_train_ids_to_label_ids",
           "CITYSCAPES_LABEL_IDS", "reduce_zero_label", "default_num_workers"]
