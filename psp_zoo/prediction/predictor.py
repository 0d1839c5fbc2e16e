"""Segment your own images with a checkpoint: label maps, palette PNGs, overlays and legends.

Every image goes through the checkpoint's own test pipeline via
:func:`psp_zoo.evaluation.semseg_inference.labels_of_image`, so a prediction here is exactly what the
evaluation scores: mmseg's (its resize, whole or sliding-window mode and ``align_corners``; in memory
that does not grow with classes x pixels) or, for the PSPNet authors' checkpoints (test mode
``semseg``), their protocol. ``Predictor`` loads the model once for many images; ``predict`` is the
one-call form for a single image.
"""
from __future__ import annotations

import collections
import dataclasses
import glob
import logging
import re
import warnings
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..datasets.readers import cityscapes_train_ids_to_label_ids, decode_image
from ..errors import PspZooError
from ..evaluation.semseg_inference import labels_of_image
from ..hub.options import FetchOptions, SpeedOptions, split_options
from ..manifest.loading import DatasetSpec, EvalSettings
from ..model.factory import resolve
from ..model.optimization import optimize
from .pictures import (
    IMAGE_EXTENSIONS,
    OUTPUT_FORMATS,
    OUTPUT_SUFFIXES,
    legend,
    overlay,
    save_cityscapes_png,
    save_labels_npy,
    save_palette_png,
    save_rgb_png,
)

__all__ = ["Predictor", "predict", "predict_files", "read_input_image", "expand_image_args", "output_stems",
           "check_output_format", "IMAGE_EXTENSIONS", "OUTPUT_FORMATS"]

PathLike = Union[str, Path]
log = logging.getLogger("psp_zoo")


@dataclasses.dataclass
class Predictor:
    """A model with the test settings it is run with; call it on H x W x 3 uint8 RGB images."""

    model: torch.nn.Module
    dataset: DatasetSpec
    settings: EvalSettings
    num_classes: int
    ms_flip: bool = False
    device: torch.device = torch.device("cpu")

    @classmethod
    def create(cls, name_or_model: Union[str, torch.nn.Module], *, dataset: Optional[str] = None,
               ms_flip: bool = False, device: Union[None, str, torch.device] = None,
               checkpoint: Optional[PathLike] = None, speed: Optional[SpeedOptions] = None,
               fetch: Optional[FetchOptions] = None, **keywords) -> "Predictor":
        """From a manifest name (its weights and test settings) or a model object (``dataset=``'s
        test settings with the model's ``align_corners``). Keywords as :func:`psp_zoo.evaluate`."""
        fetch, speed, overrides = split_options(keywords, fetch, speed)
        target = resolve(name_or_model, dataset=dataset, checkpoint=checkpoint, fetch=fetch, device=device,
                         overrides=overrides)
        speed.check(target.device)  # before anything is downloaded or built
        return cls(optimize(target.load(), speed), target.dataset, target.settings, target.num_classes,
                   ms_flip, target.device)

    @property
    def class_names(self) -> Tuple[str, ...]:
        return self.dataset.class_names(self.num_classes)

    @property
    def palette(self) -> Tuple[Tuple[int, int, int], ...]:
        return self.dataset.palette

    def __call__(self, image_rgb: np.ndarray) -> np.ndarray:
        """The H x W uint8 label map (class ids) of one H x W x 3 uint8 RGB image."""
        labels = labels_of_image(self.model, image_rgb, self.settings, self.ms_flip, device=self.device)
        return labels.to(torch.uint8).cpu().numpy()

    def write(self, image_rgb: np.ndarray, labels: np.ndarray, out_dir: PathLike, stem: str,
              fmt: str = "png") -> List[Path]:
        """Save one prediction under ``out_dir``: palette PNG, overlay and legend, or raw ``.npy``."""
        out_dir = Path(out_dir)
        check_output_format(fmt, self.dataset.key, self.num_classes)
        if fmt == "npy":
            return [save_labels_npy(out_dir / f"{stem}.npy", labels)]
        if fmt == "cityscapes":  # the image's own name, as the benchmark server matches it
            return [save_cityscapes_png(out_dir / f"{stem}.png", cityscapes_train_ids_to_label_ids(labels))]
        labels_name, overlay_name, legend_name = (stem + s for s in OUTPUT_SUFFIXES["png"])
        return [
            save_palette_png(out_dir / labels_name, labels, self.palette),
            save_rgb_png(out_dir / overlay_name, overlay(image_rgb, labels, self.palette)),
            save_rgb_png(out_dir / legend_name, legend(labels, self.palette, self.class_names)),
        ]


def check_output_format(fmt: str, dataset: str, num_classes: int) -> None:
    """Refuse an output format the model cannot fill: Cityscapes benchmark files need the 19
    Cityscapes classes, whose trainIds map back to official labelIds."""
    if fmt not in OUTPUT_FORMATS:
        raise PspZooError(f"unknown output format {fmt!r}; expected one of: {', '.join(OUTPUT_FORMATS)}")
    if fmt == "cityscapes" and (dataset != "cityscapes" or num_classes != 19):
        raise PspZooError(f"the cityscapes output format needs a Cityscapes model with 19 classes; this one "
                          f"predicts {num_classes} {dataset} classes: choose the png or npy format")


def read_input_image(path: PathLike) -> np.ndarray:
    """H x W x 3 uint8 RGB of an image file, decoded by OpenCV as the reference decodes images.

    Raises PspZooError ``cannot read image PATH: why`` (missing, unreadable, not an image)."""
    return decode_image(path)


def _as_rgb(image: Union[PathLike, np.ndarray]) -> np.ndarray:
    if isinstance(image, (str, Path)):
        return read_input_image(image)
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise PspZooError(f"expected an H x W x 3 uint8 RGB image, got {image.dtype} array of shape {image.shape}")
    return image


def predict(name_or_model: Union[str, torch.nn.Module], image: Union[PathLike, np.ndarray], *,
            dataset: Optional[str] = None, ms_flip: bool = False, device: Union[None, str, torch.device] = None,
            checkpoint: Optional[PathLike] = None, **kwargs) -> np.ndarray:
    """The H x W uint8 label map of one image (a file path, or an H x W x 3 uint8 RGB array).

    ``name_or_model`` is a manifest name (its weights are fetched and its test settings used) or a
    model object with ``dataset=``. For many images build a :class:`Predictor` once instead: this
    loads the model on every call. Other keywords go to :meth:`Predictor.create`.
    """
    predictor = Predictor.create(name_or_model, dataset=dataset, ms_flip=ms_flip, device=device,
                                 checkpoint=checkpoint, **kwargs)
    return predictor(_as_rgb(image))


# --------------------------------------------------------------------------------------------
# command-line inputs and output names


def _is_image(path: Path) -> bool:
    """An image file a folder or glob yields; hidden files (``.x.png``, macOS ``._x.jpg``) are not,
    as in the datasets."""
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _images_in(folder: Path, out_dir: Optional[Path]) -> List[Path]:
    """The images directly in ``folder``; in the output folder, earlier outputs are not inputs."""
    found = sorted(p for p in folder.iterdir() if _is_image(p))
    if out_dir is not None and folder.resolve() == out_dir.resolve():
        made = tuple(s for suffixes in OUTPUT_SUFFIXES.values() for s in suffixes)
        found = [p for p in found if not p.name.endswith(made)]
    return found


def _expand(arg: str, out_dir: Optional[Path]) -> List[Path]:
    kinds = ", ".join(IMAGE_EXTENSIONS)
    if glob.has_magic(arg):
        found = []
        for match in map(Path, sorted(glob.glob(arg, recursive=True))):
            found += _images_in(match, out_dir) if match.is_dir() else [match] if _is_image(match) else []
        if not found:
            raise PspZooError(f"{arg!r} matches no image ({kinds})")
        return found
    path = Path(arg)
    if path.is_dir():
        found = _images_in(path, out_dir)
        if not found:
            raise PspZooError(f"folder {arg} holds no image ({kinds})")
        return found
    if not path.exists():
        raise PspZooError(f"no such file or folder: {arg}")
    return [path]  # named explicitly: taken whatever its extension


def expand_image_args(args: Sequence[str], out_dir: Optional[PathLike] = None) -> List[Path]:
    """Files, folders (their images, not recursive) and globs (``**`` recurses) -> image paths.

    Raises PspZooError naming the first argument that is missing or matches no image, before any
    work is done. Inputs named twice are done once; earlier outputs in ``out_dir`` are not inputs.
    """
    out = Path(out_dir) if out_dir is not None else None
    unique: Dict[Path, Path] = {}
    for arg in args:
        for path in _expand(arg, out):
            unique.setdefault(path.resolve(), path)
    return list(unique.values())


def output_stems(paths: Sequence[Path]) -> List[str]:
    """A distinct output stem per input: the file stem, prefixed by its folder's name where stems
    repeat (``a/x.png``, ``b/x.png`` -> ``a_x``, ``b_x``), numbered if that still repeats."""
    counts = collections.Counter(p.stem for p in paths)
    wanted = [p.stem if counts[p.stem] == 1 else f"{p.resolve().parent.name}_{p.stem}" for p in paths]
    stems: List[str] = []
    for stem in wanted:
        candidate, number = stem, 2
        while candidate in stems:  # same folder name too (or x.png beside x.jpg)
            candidate, number = f"{stem}-{number}", number + 1
        stems.append(candidate)
    return stems


def _is_out_of_memory(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)) or (
        isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text))


def _image_error(path: Path, exc: BaseException) -> PspZooError:
    """One line naming the image and what went wrong with it (``exc``'s message, whitespace folded)."""
    if isinstance(exc, PspZooError) and str(path) in str(exc):
        return exc.with_traceback(None)  # its frames would keep the image's tensors alive
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) > 300:
        text = text[:297] + "..."
    if _is_out_of_memory(exc):
        return PspZooError(f"{path}: not enough memory for this image ({text}); free memory, or predict it "
                           f"on a device with more")
    return PspZooError(f"{path}: {text}" if isinstance(exc, PspZooError) else f"{path}: {type(exc).__name__}: {text}")


def _check_cityscapes_inputs(paths: Sequence[Path], out_dir: PathLike) -> None:
    """Benchmark files take their image's name, so an image in the output folder would be replaced
    by its own prediction; a name the benchmark server cannot match is worth a warning."""
    out = Path(out_dir).resolve()
    inside = [p for p in paths if p.resolve().parent == out]
    if inside:
        raise PspZooError(f"{inside[0]} is in the output folder {out_dir}, and its Cityscapes result file "
                          f"would replace it (result files keep the image names): write them to another folder")
    odd = [p.name for p in paths if not re.fullmatch(r".+_\d{6}_\d{6}_leftImg8bit", p.stem)]
    if odd:
        warnings.warn(f"{len(odd)} image name(s), e.g. {odd[0]}, are not <city>_<seq>_<frame>_leftImg8bit.png; "
                      f"the Cityscapes benchmark server will not match their result files")


def predict_files(predictor: Predictor, paths: Sequence[Path], out_dir: PathLike, fmt: str = "png"
                  ) -> Iterator[Tuple[Path, Union[List[Path], PspZooError]]]:
    """Predict and save each image; yields (input, written files) or (input, the error) and goes on.

    Any failure on one image (unreadable, a failed write, out of memory, an error inside the
    model) is that image's error, a one-line message naming it; the others are still done.
    """
    if fmt == "cityscapes":
        _check_cityscapes_inputs(paths, out_dir)
    for index, (path, stem) in enumerate(zip(paths, output_stems(paths)), start=1):
        outcome: Union[List[Path], PspZooError]
        log.info("predicting %d/%d: %s", index, len(paths), path)  # a line per image, terminal or not
        try:
            image = read_input_image(path)
            outcome = predictor.write(image, predictor(image), out_dir, stem, fmt)
        except Exception as exc:  # noqa: BLE001 - one image's failure must not end the batch
            outcome = _image_error(path, exc)
        # Yielded outside the except block: a kept exception would hold the failed image's
        # tensors (through its traceback) while the next image runs.
        yield path, outcome
