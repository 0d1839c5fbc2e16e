"""A generated dataset of coloured shapes in a layout of its own, declared in a user manifest: the
fine-tuning walk-through's example, which psp_zoo.testing ships (``psp-zoo dataset example DIR``),
under the names the tests use.

``images/{train,val}/shape_NNN.jpg`` with ``masks/{train,val}/shape_NNN_mask.png``: 3 classes
(background, disc, square), a 2-pixel ring of 255 (ignored) around each shape, as VOC marks its
object borders. Discs are bright yellow-orange, squares dark blue, the background smooth mid-grey
blotches, so a narrow PSPNet can learn it in a few hundred iterations on a CPU.
"""
from __future__ import annotations

from psp_zoo.testing import EXAMPLE_CLASSES as CLASSES
from psp_zoo.testing import EXAMPLE_PALETTE as PALETTE
from psp_zoo.testing import EXAMPLE_SIZE as SIZE
from psp_zoo.testing import EXAMPLE_TRAIN as WALK_THROUGH_TRAIN
from psp_zoo.testing import example_declaration as declaration
from psp_zoo.testing import example_sample as shape_sample
from psp_zoo.testing import write_example_dataset as write_dataset
from psp_zoo.testing import write_example_manifest as write_manifest
from psp_zoo.testing import write_example_split as write_split

__all__ = ["CLASSES", "PALETTE", "SIZE", "WALK_THROUGH_TRAIN", "declaration", "shape_sample", "write_dataset",
           "write_manifest", "write_split"]
