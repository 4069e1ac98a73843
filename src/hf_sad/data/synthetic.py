"""Deterministic synthetic detection scenes: no network, no files, exact boxes.

Each scene is a small RGB image with a few coloured glyphs (the classes in `SYNTHETIC_LABELS`) on a cluttered
background: gradients, low-frequency blotches, pixel noise and distractor strokes/blobs that are not objects.
Objects may overlap; a placement is rejected when it would hide too much of an earlier object, so every labelled
object stays clearly visible and its box is the true full extent of its own pixels.

`shifted=True` switches to a second domain (periodic textures, dark blue/purple palette, pastel objects, stronger
noise) with the same classes: the "unlabeled images from another distribution" case of semi-supervised distillation.

`coloured=True` is a harder task of 24 classes: each object is one of the 6 shapes in one of 4 colours (`COLOURS`,
with some jitter of hue, saturation and brightness), and the class is the pair; the shifted domain then keeps the
object colours (they define the classes) and changes the background and the noise.

Every image is a pure function of an integer seed. Datasets derive per-image seeds from (stream, seed, shard, index)
with `numpy.random.SeedSequence`, so the labelled splits (seed=0 train, seed=1 val, ...) and the unlabeled stream
shards draw from disjoint seed families.
"""

from __future__ import annotations

import colorsys
import functools
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

if TYPE_CHECKING:
    import datasets

SYNTHETIC_LABELS: list[str] = ["circle", "square", "triangle", "cross", "ring", "star"]
#: The colours of the coloured task (`coloured=True`): name and hue. There a class is a shape in one of these colours.
COLOURS: tuple[tuple[str, float], ...] = (("red", 0.0), ("yellow", 0.15), ("green", 0.33), ("blue", 0.62))

# Object side as a fraction of the image side, sampled log-uniformly.
MIN_OBJECT_FRACTION = 0.06
MAX_OBJECT_FRACTION = 0.5
# An object may be covered by later objects, but at least this fraction of its pixels must stay visible.
MIN_VISIBLE_FRACTION = 0.6
# Tags that keep the seed families of the labelled splits and the unlabeled stream apart.
_LABELED_STREAM, _UNLABELED_STREAM = 0, 1


def synthetic_labels(coloured: bool = False) -> list[str]:
    """Class names: the 6 shapes, or with `coloured` the 24 "colour shape" classes (id = shape * 4 + colour)."""
    if coloured:
        return [f"{colour} {shape}" for shape in SYNTHETIC_LABELS for colour, _ in COLOURS]
    return list(SYNTHETIC_LABELS)


def synthetic_id2label(coloured: bool = False) -> dict[int, str]:
    """Model label id (0-based, contiguous) -> class name for the synthetic classes (see `synthetic_labels`)."""
    return dict(enumerate(synthetic_labels(coloured)))


# ----------------------------------------------------------------------------------------------------------------------
# Colours and backgrounds (float32 arrays of shape (H, W, 3) in [0, 255])
# ----------------------------------------------------------------------------------------------------------------------


def _hsv(
    rng: np.random.Generator, h: tuple[float, float], s: tuple[float, float], v: tuple[float, float]
) -> np.ndarray:
    """A random RGB colour (3,) in [0, 255] drawn uniformly inside an HSV box."""
    rgb = colorsys.hsv_to_rgb(rng.uniform(*h) % 1.0, rng.uniform(*s), rng.uniform(*v))
    return np.asarray(rgb, dtype=np.float32) * 255.0


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates normalised to [0, 1): (yy, xx), each (size, size) float32."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    return np.meshgrid(c, c, indexing="ij")


@functools.lru_cache(maxsize=8)
def _upsample_matrix(size: int, cells: int) -> np.ndarray:
    """(size, cells) bilinear interpolation weights from a coarse grid of `cells` points to `size` pixels."""
    pos = np.clip((np.arange(size) + 0.5) / size * cells - 0.5, 0, cells - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, cells - 1)
    frac = (pos - lo).astype(np.float32)
    mat = np.zeros((size, cells), dtype=np.float32)
    mat[np.arange(size), lo] += 1.0 - frac
    mat[np.arange(size), hi] += frac
    return mat


def _blotches(
    rng: np.random.Generator, size: int, cells: int, amplitude: float, base: np.ndarray | float = 0.0
) -> np.ndarray:
    """Smooth colour field (size, size, 3): `base` (3, cells, cells) plus random jitter, bilinearly upsampled."""
    coarse = (base + rng.uniform(-amplitude, amplitude, (3, cells, cells))).astype(np.float32)
    up = _upsample_matrix(size, cells)
    return (up @ coarse @ up.T).transpose(1, 2, 0)


@functools.lru_cache(maxsize=8)
def _noise_bank(size: int) -> np.ndarray:
    """A fixed (2 * size, 2 * size, 3) float32 tile of unit Gaussian noise.

    Drawing fresh noise for every pixel dominated the render time; a random crop of a fixed tile, randomly flipped and
    scaled, is as good for training and keeps each scene a pure function of its seed.
    """
    return np.random.default_rng(20240607).standard_normal((2 * size, 2 * size, 3), dtype=np.float32)


def _noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """(size, size, 3) Gaussian pixel noise with standard deviation `sigma`."""
    oy, ox = rng.integers(0, size, 2)
    step = 1 if rng.random() < 0.5 else -1  # flip vertically or horizontally
    return _noise_bank(size)[oy : oy + size, ox : ox + size][::step, ::-step] * np.float32(sigma)


def _direction(rng: np.random.Generator, size: int) -> np.ndarray:
    """Projection of every pixel centre on a random unit direction: (size, size), in units of the image side."""
    yy, xx = _grid(size)
    theta = rng.uniform(0, 2 * np.pi)
    return xx * np.float32(np.cos(theta)) + yy * np.float32(np.sin(theta))


def _default_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Muted two-colour linear gradient plus soft blotches (the labelled / source domain)."""
    c1 = _hsv(rng, (0, 1), (0.05, 0.4), (0.35, 0.9))
    c2 = _hsv(rng, (0, 1), (0.05, 0.4), (0.35, 0.9))
    # Bilinear upsampling reproduces a linear ramp exactly, so the gradient is built on the coarse grid for free.
    cells = int(rng.integers(3, 7))
    t = _direction(rng, cells)
    t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    ramp = c1[:, None, None] + t[None] * (c2 - c1)[:, None, None]
    return _blotches(rng, size, cells, 30.0, base=ramp)


def _shifted_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Dark blue/purple periodic texture (stripes, checkerboard or rings) plus blotches (the shifted domain)."""
    c1 = _hsv(rng, (0.5, 0.85), (0.4, 0.9), (0.08, 0.35))
    c2 = _hsv(rng, (0.5, 0.85), (0.3, 0.8), (0.25, 0.55))
    freq = np.float32(rng.uniform(3, 10) * 2 * np.pi)
    kind = rng.integers(3)
    if kind == 0:  # stripes
        t = 0.5 + 0.5 * np.sin(freq * _direction(rng, size) + rng.uniform(0, 2 * np.pi))
    elif kind == 1:  # checkerboard, rotated
        t = (np.sin(freq * _direction(rng, size)) * np.sin(freq * _direction(rng, size)) > 0).astype(np.float32)
    else:  # concentric rings around a random centre
        yy, xx = _grid(size)
        cy, cx = rng.uniform(0, 1, 2).astype(np.float32)
        t = 0.5 + 0.5 * np.sin(freq * np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2))
    bg = c1 + t[..., None] * (c2 - c1)
    return bg + _blotches(rng, size, int(rng.integers(2, 5)), 20.0)


def _object_colour(rng: np.random.Generator, shifted: bool) -> np.ndarray:
    """Saturated colours in the default domain, pastel ones in the shifted domain."""
    if shifted:
        return _hsv(rng, (0, 1), (0.1, 0.45), (0.75, 1.0))
    return _hsv(rng, (0, 1), (0.55, 1.0), (0.45, 1.0))


# ----------------------------------------------------------------------------------------------------------------------
# Glyphs: each is drawn into its own local mask so its box is exact
# ----------------------------------------------------------------------------------------------------------------------


def _polygon(n: int, radius: float, phase: float, centre: float, radii: np.ndarray | None = None) -> list[tuple]:
    """Vertices of an n-gon (or star when `radii` alternate) around (centre, centre) in local pixel coordinates."""
    angles = phase + 2 * np.pi * np.arange(n) / n
    r = radius * (radii if radii is not None else 1.0)
    return list(zip((centre + r * np.cos(angles)).tolist(), (centre + r * np.sin(angles)).tolist()))


def _rotation(angle: float) -> np.ndarray:
    """(2, 2) counter-clockwise rotation matrix."""
    return np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])


def _glyph_mask(rng: np.random.Generator, label: int, side: int) -> np.ndarray:
    """Boolean mask (side, side) of one glyph of class `label`, randomly rotated/proportioned, touching its crop."""
    canvas = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(canvas)
    c, r = side / 2.0, side / 2.0
    phase = rng.uniform(0, 2 * np.pi)
    name = SYNTHETIC_LABELS[label]
    if name in ("circle", "ring"):
        aspect = rng.uniform(0.8, 1.0)
        ry = r * aspect
        draw.ellipse((0, c - ry, side - 1, c + ry - 1), fill=255)
        if name == "ring":
            k = rng.uniform(0.45, 0.7)  # inner / outer radius
            draw.ellipse((c - k * r, c - k * ry, c + k * r - 1, c + k * ry - 1), fill=0)
    elif name == "square":
        draw.polygon(_polygon(4, r, phase, c), fill=255)  # circumradius r: never clipped by the crop
    elif name == "triangle":
        draw.polygon(_polygon(3, r, phase, c, rng.uniform(0.85, 1.0, 3)), fill=255)
    elif name == "cross":
        w = rng.uniform(0.22, 0.36)  # half arm width / arm length
        # One arm-tip corner, the inner corner, the next arm-tip corner; tips stay inside the crop at any angle.
        quarter = np.array([(1.0, w), (w, w), (w, 1.0)]) * r / np.hypot(1.0, w)
        pts = np.concatenate([quarter @ _rotation(phase + k * np.pi / 2).T for k in range(4)]) + c
        draw.polygon([tuple(p) for p in pts.tolist()], fill=255)
    else:  # star
        draw.polygon(_polygon(10, r, phase, c, np.tile([1.0, rng.uniform(0.38, 0.5)], 5)), fill=255)
    return np.asarray(canvas) > 0


def _tight(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Tight pixel extent (y0, y1, x0, x1) of a mask, end-exclusive; None when empty."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return None
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _distractors(rng: np.random.Generator, image: Image.Image, shifted: bool, count: int) -> None:
    """Draw clutter that is not an object: thin lines, arcs and irregular blobs (in place)."""
    size = image.width
    draw = ImageDraw.Draw(image)
    for _ in range(count):
        colour = tuple(int(v) for v in _object_colour(rng, shifted) * rng.uniform(0.5, 1.0))
        kind = rng.integers(3)
        if kind == 0:
            pts = rng.uniform(-0.1, 1.1, 4) * size
            draw.line(pts.tolist(), fill=colour, width=int(rng.integers(1, 3)))
        elif kind == 1:
            x0, y0 = rng.uniform(-0.2, 0.8, 2) * size
            d = rng.uniform(0.1, 0.5) * size
            start = rng.uniform(0, 360)
            draw.arc((x0, y0, x0 + d, y0 + d), start, start + rng.uniform(40, 200), fill=colour, width=1)
        else:
            # Irregular blob: many vertices with strongly jittered radii, so it never looks like a class glyph.
            n = int(rng.integers(7, 12))
            cx, cy = rng.uniform(0, size, 2)
            r = rng.uniform(0.03, 0.1) * size
            pts = _polygon(n, r, 0.0, 0.0, rng.uniform(0.3, 1.0, n))
            draw.polygon([(x + cx, y + cy) for x, y in pts], fill=colour)


# ----------------------------------------------------------------------------------------------------------------------
# Scenes
# ----------------------------------------------------------------------------------------------------------------------


def generate_scene(
    seed: int, *, image_size: int = 128, shifted: bool = False, max_objects: int = 6, coloured: bool = False
) -> tuple[Image.Image, dict]:
    """Render one scene, a pure function of its arguments.

    Args:
        seed: any non-negative integer; equal seeds give identical pixels and boxes.
        image_size: side of the square image in pixels.
        shifted: draw from the shifted domain (other backgrounds and palette, same classes).
        max_objects: at most this many objects (at least one is always placed).
        coloured: the 24-class task (class = shape * 4 + colour); otherwise 6 shape classes in random colours.

    Returns:
        `(image, target)`: an RGB `PIL.Image` of size (image_size, image_size) and a dict with
        `"bbox"`: list of [x, y, w, h] (COCO xywh, absolute pixels, float, fully inside the image),
        `"category"`: list of int class ids into `synthetic_labels(coloured)`, `"area"`: list of float box areas
        (w * h).
    """
    rng = np.random.default_rng(seed)
    size = image_size
    bg = _shifted_background(rng, size) if shifted else _default_background(rng, size)
    canvas = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    _distractors(rng, canvas, shifted, int(rng.integers(2, 7)))
    pixels = np.asarray(canvas, dtype=np.float32).copy()

    owner = np.full((size, size), -1, dtype=np.int16)  # index of the object that is visible at each pixel
    full_area: list[int] = []  # pixels of each object's own mask
    visible: list[int] = []  # of which still visible
    target: dict[str, list] = {"bbox": [], "category": [], "area": []}
    log_lo, log_hi = np.log(MIN_OBJECT_FRACTION * size), np.log(MAX_OBJECT_FRACTION * size)
    for _ in range(int(rng.integers(1, max_objects + 1))):
        label = int(rng.integers(len(SYNTHETIC_LABELS)))
        colour = int(rng.integers(len(COLOURS))) if coloured else None
        side = max(round(float(np.exp(rng.uniform(log_lo, log_hi)))), 4)
        mask = _glyph_mask(rng, label, side)
        extent = _tight(mask)
        if extent is None:
            continue
        y0, y1, x0, x1 = extent
        mask = mask[y0:y1, x0:x1]
        h, w = mask.shape
        for _attempt in range(3):
            top, left = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
            region = (slice(top, top + h), slice(left, left + w))
            hidden = owner[region][mask]
            lost = np.bincount(hidden[hidden >= 0], minlength=len(visible))
            if all(v - lost_i >= MIN_VISIBLE_FRACTION * a for v, lost_i, a in zip(visible, lost, full_area)):
                break
        else:
            continue  # no placement keeps the earlier objects visible enough: skip this object
        for i, lost_i in enumerate(lost):
            visible[i] -= int(lost_i)
        owner[region][mask] = len(visible)
        full_area.append(int(mask.sum()))
        visible.append(full_area[-1])
        _paint(rng, pixels[region], mask, shifted, colour)
        target["bbox"].append([float(left), float(top), float(w), float(h)])
        target["category"].append(label if colour is None else label * len(COLOURS) + colour)
        target["area"].append(float(w * h))

    pixels += _noise(rng, size, rng.uniform(8.0, 16.0) if shifted else rng.uniform(2.0, 9.0))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)), target


def _paint(
    rng: np.random.Generator, patch: np.ndarray, mask: np.ndarray, shifted: bool, colour_class: int | None = None
) -> None:
    """Fill `mask` inside `patch` (h, w, 3, a view into the image) with a shaded colour: the hue of `colour_class`
    (jittered), or without one the more contrasting of two random colours."""
    if colour_class is None:
        local = patch[mask].mean(0)
        colour = max((_object_colour(rng, shifted) for _ in range(2)), key=lambda c: float(np.abs(c - local).sum()))
    else:
        hue = COLOURS[colour_class][1]
        colour = _hsv(rng, (hue - 0.02, hue + 0.02), (0.6, 1.0), (0.55, 1.0))
    h, w = mask.shape
    # A linear brightness ramp across the object, so glyphs are not flat stencils.
    gy, gx = rng.uniform(-0.25, 0.25, 2) / np.float32(max(h, w))
    ys, xs = np.nonzero(mask)
    ramp = 1.0 + (gy * (2 * ys - h) + gx * (2 * xs - w)).astype(np.float32)
    patch[ys, xs] = ramp[:, None] * colour


# ----------------------------------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------------------------------


def _derive_seed(*key: int) -> int:
    """A 64-bit scene seed from an integer key; different keys give independent (practically disjoint) seeds."""
    return int(np.random.SeedSequence(list(key)).generate_state(1, dtype=np.uint64)[0])


def labeled_features(coloured: bool = False) -> datasets.Features:
    """Features of `make_labeled_dataset`: the transformers object-detection (cppe-5 style) schema."""
    from .loading import detection_features

    return detection_features(synthetic_labels(coloured))


def _labeled_examples(
    num_images: int, seed: int, image_size: int, shifted: bool, coloured: bool = False
) -> Iterator[dict]:
    next_id = 1  # COCO tools treat annotation id 0 as "unmatched"
    for index in range(num_images):
        image, target = generate_scene(
            _derive_seed(_LABELED_STREAM, seed, index), image_size=image_size, shifted=shifted, coloured=coloured
        )
        n = len(target["bbox"])
        yield {
            "image_id": index,
            "image": image,
            "width": image_size,
            "height": image_size,
            "objects": {"id": list(range(next_id, next_id + n)), **target, "iscrowd": [0] * n},
        }
        next_id += n


def make_labeled_dataset(
    num_images: int,
    *,
    seed: int = 0,
    image_size: int = 128,
    shifted: bool = False,
    coloured: bool = False,
    cache_dir: str | None = None,
) -> datasets.Dataset:
    """A labelled `datasets.Dataset` of synthetic scenes in the transformers object-detection schema.

    Columns: `image_id` (int, 0..num_images-1), `image` (`datasets.Image`), `width`, `height` (int, pixels),
    `objects` = {`id`: list[int] (unique, from 1), `area`: list[float] (box w * h, pixels^2),
    `bbox`: list of [x, y, w, h] (COCO xywh, absolute pixels), `category`: list of `ClassLabel` ids, `iscrowd`}.
    `coloured` gives the 24-class task (see `generate_scene`).

    Image i is `generate_scene` with a seed derived from (seed, i), so splits with different `seed` are disjoint.
    The result is cached by datasets (in `cache_dir`, default the datasets cache) under a fingerprint of the
    arguments and of this module's source, so repeated calls and parallel ranks reuse one Arrow file.
    """
    from datasets import Dataset

    source = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
    fingerprint = f"hf-sad-synthetic-{source}-{num_images}-{seed}-{image_size}-{int(shifted)}-{int(coloured)}"
    return Dataset.from_generator(
        _labeled_examples,
        features=labeled_features(coloured),
        gen_kwargs={"num_images": num_images, "seed": seed, "image_size": image_size, "shifted": shifted,
                    "coloured": coloured},
        fingerprint=fingerprint,
        cache_dir=cache_dir,
    )


def _unlabeled_examples(
    shards: list[int],
    seed: int,
    image_size: int,
    shifted: bool,
    num_images: int | None,
    num_shards: int,
    coloured: bool = False,
) -> Iterator[dict]:
    # Round-robin over the shards this worker owns so a single reader still sees every shard.
    index = 0
    while True:
        live = [s for s in shards if num_images is None or index * num_shards + s < num_images]
        if not live:
            return
        for shard in live:
            scene_seed = _derive_seed(_UNLABELED_STREAM, seed, shard, index)
            yield {"image": generate_scene(scene_seed, image_size=image_size, shifted=shifted, coloured=coloured)[0]}
        index += 1


def make_unlabeled_stream(
    *,
    seed: int = 0,
    image_size: int = 128,
    shifted: bool = False,
    num_shards: int = 8,
    num_images: int | None = None,
    coloured: bool = False,
) -> datasets.IterableDataset:
    """A sharded `datasets.IterableDataset` of unlabelled synthetic scenes with one column, `image` (`datasets.Image`).

    Unlimited when `num_images` is None; otherwise `num_images` images in total, spread over the shards (image k of
    shard s is global image k * num_shards + s). `n_shards == num_shards`, so Trainer/accelerate ranks and DataLoader
    workers each get whole shards. Seeds are derived from (seed, shard, k) disjoint from the labelled splits.
    """
    from datasets import Features, IterableDataset
    from datasets import Image as ImageFeature

    return IterableDataset.from_generator(
        _unlabeled_examples,
        features=Features({"image": ImageFeature()}),
        gen_kwargs={
            "shards": list(range(num_shards)),
            "seed": seed,
            "image_size": image_size,
            "shifted": shifted,
            "num_images": num_images,
            "num_shards": num_shards,
            "coloured": coloured,
        },
    )


def write_coco_folder(dataset: datasets.Dataset, folder: str | Path) -> Path:
    """Write a labelled dataset (schema of `make_labeled_dataset`) as `folder/annotations.json` + `folder/images/*.png`.

    COCO category ids are the `ClassLabel` ids + 1 (COCO convention: ids from 1); boxes stay xywh absolute pixels.
    Returns the path of `annotations.json`.
    """
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    names = dataset.features["objects"]["category"].feature.names
    coco: dict[str, list] = {
        "images": [],
        "annotations": [],
        "categories": [{"id": i + 1, "name": name} for i, name in enumerate(names)],
    }
    for row in dataset:
        file_name = f"{row['image_id']:06d}.png"
        row["image"].save(folder / "images" / file_name)
        coco["images"].append(
            {"id": row["image_id"], "file_name": file_name, "width": row["width"], "height": row["height"]}
        )
        objects = row["objects"]
        for ann_id, bbox, area, category in zip(objects["id"], objects["bbox"], objects["area"], objects["category"]):
            coco["annotations"].append(
                {
                    "id": ann_id,
                    "image_id": row["image_id"],
                    "category_id": category + 1,
                    "bbox": bbox,
                    "area": area,
                    "iscrowd": 0,
                }
            )
    path = folder / "annotations.json"
    path.write_text(json.dumps(coco))
    return path
