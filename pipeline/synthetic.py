"""A synthetic Paddy Doctor dataset in the competition's layout, for machines with no credentials or network.

Each class has its own cue (lesion colour, shape or pattern, after the real disease) on a noisy leaf background:
learnable at 64 px by a small random-init model, not trivially. Variety (leaf tint, blades) and age correlate with
the label, for the seeds' multi-target model. One seed, byte-identical files.
"""

from __future__ import annotations

from pathlib import Path
import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter

from pipeline.paddy import CLASSES, SMALLEST_CLASS, VARIETIES, sample_submission_csv, test_image_dir, train_csv

# The ages (days) that occur in the real train.csv.
AGES = (45, 47, 50, 55, 57, 60, 62, 65, 66, 67, 68, 70, 72, 73, 75, 77, 80, 82)
# The crop's age (days) around which each class is most often photographed.
CLASS_MEAN_AGE = dict(zip(CLASSES, (72, 60, 75, 55, 66, 60, 70, 62, 68, 65)))
# Each class's most common variety; ADT45 dominates the rest, as in the real data.
CLASS_VARIETY = {label: VARIETIES[(3 * i + 1) % len(VARIETIES)] for i, label in enumerate(CLASSES)}
LANDSCAPE_FRACTION = 0.05  # most real photos are 480x640 portrait; a few are 640x480
FIRST_TRAIN_ID = 100001
FIRST_TEST_ID = 200001

Rgb = tuple[int, int, int]


def write_synthetic_dataset(
    data_dir: Path | str, *, train_per_class: int, n_test: int, image_size: tuple[int, int], seed: int
) -> None:
    """The competition layout under `data_dir`: `train_per_class` images per class (SMALLEST_CLASS half); (w, h)."""
    data_dir = Path(data_dir)
    rng = np.random.default_rng(seed)
    train = _train_table(train_per_class, rng)
    test_labels = rng.choice(CLASSES, size=n_test)
    test_ids = [f"{FIRST_TEST_ID + i}.jpg" for i in range(n_test)]

    # Each image draws from its own stream (seed, split, index), so one image never shifts another's pixels.
    for index, row in enumerate(train.itertuples(index=False)):
        image = draw_image(row.label, row.variety, image_size, np.random.default_rng((seed, 0, index)))
        _save_jpeg(image, data_dir / "train_images" / row.label / row.image_id, index)
    for index, (image_id, label) in enumerate(zip(test_ids, test_labels)):
        image_rng = np.random.default_rng((seed, 1, index))
        variety = _variety_for(label, image_rng)
        _save_jpeg(draw_image(label, variety, image_size, image_rng), test_image_dir(data_dir) / image_id, index)

    train.to_csv(train_csv(data_dir), index=False)
    # The competition's sample_submission leaves every label empty; so do we.
    pd.DataFrame({"image_id": test_ids, "label": ""}).to_csv(sample_submission_csv(data_dir), index=False)


def _train_table(train_per_class: int, rng: np.random.Generator) -> pd.DataFrame:
    labels = [label for label in CLASSES
              for _ in range(train_per_class // 2 if label == SMALLEST_CLASS else train_per_class)]
    ids = FIRST_TRAIN_ID + rng.permutation(len(labels))  # shuffled across classes: an id never gives its label away
    table = pd.DataFrame({"image_id": [f"{i}.jpg" for i in ids], "label": labels,
                          "variety": [_variety_for(label, rng) for label in labels],
                          "age": [_age_for(label, rng) for label in labels]})
    return table.sort_values(["label", "image_id"], ignore_index=True)


def _variety_for(label: str, rng: np.random.Generator) -> str:
    draw = rng.random()
    if draw < 0.6:
        return CLASS_VARIETY[label]
    if draw < 0.8:
        return VARIETIES[0]
    return str(rng.choice(VARIETIES))


def _age_for(label: str, rng: np.random.Generator) -> int:
    ages = np.array(AGES)
    weights = np.exp(-(((ages - CLASS_MEAN_AGE[label]) / 8.0) ** 2))
    return int(rng.choice(ages, p=weights / weights.sum()))


def _save_jpeg(image: Image.Image, path: Path, index: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Varying quality varies file sizes as real phone photos do; it is a function of the index, so deterministic.
    image.save(path, format="JPEG", quality=80 + (index * 7) % 16)


def draw_image(label: str, variety: str, image_size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """One photo of `label` on a leaf of `variety`; (w, h) = `image_size`, sometimes turned to landscape."""
    width, height = image_size
    if rng.random() < LANDSCAPE_FRACTION:
        width, height = height, width
    image = _leaf_background(variety, (width, height), rng)
    return _camera_noise(_distractors(PAINTERS[label](image, rng), rng), rng)


def _leaf_background(variety: str, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    width, height = size
    index = VARIETIES.index(variety)  # the leaf colour and blade count tell varieties apart
    green, blades = (40 + 6 * index, 105 + 5 * (index % 5), 30 + 4 * (index % 3)), 3 + index % 4
    # Leaves fill most of a real photo: the ground between blades is a shadowed green, not a cue of its own.
    image = Image.new("RGB", size, _jitter(tuple(int(c * 0.55) for c in green), rng, 8))
    draw, tilt = ImageDraw.Draw(image), rng.uniform(-0.35, 0.35) * width
    for _ in range(blades * 3):
        x, half = rng.uniform(-0.1, 1.1) * width, rng.uniform(0.05, 0.12) * width
        lean = tilt + rng.normal(0, 0.1 * width)
        shade = _jitter(green, rng, 18)
        draw.polygon([(x - half, height), (x + half, height), (x + lean + half / 3, 0), (x + lean - half / 3, 0)], shade)
        draw.line([(x, height), (x + lean, 0)], fill=_jitter(shade, rng, 10, offset=-15), width=1)
    return image


def _paint_leaf_blight(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Bacterial leaf blight: a long straw-yellow band with a wavy edge, running from a leaf tip."""
    (width, height), draw = image.size, ImageDraw.Draw(image)
    x, band, length = rng.uniform(0.15, 0.85) * width, rng.uniform(0.2, 0.3) * width, rng.uniform(0.45, 0.8) * height
    top = rng.uniform(0, height - length)
    left = [(x - band / 2 + rng.normal(0, band / 6), top + length * t) for t in np.linspace(0, 1, 8)]
    right = [(x + band / 2 + rng.normal(0, band / 6), top + length * t) for t in np.linspace(1, 0, 8)]
    draw.polygon(left + right, _jitter((235, 225, 150), rng, 12))
    return image


def _paint_leaf_streak(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Bacterial leaf streak: many narrow, parallel orange-brown streaks."""
    (width, height), draw = image.size, ImageDraw.Draw(image)
    lean, centre = rng.uniform(-0.15, 0.15) * width, rng.uniform(0.25, 0.75) * width
    for _ in range(rng.integers(8, 14)):
        x, top = centre + rng.normal(0, 0.15 * width), rng.uniform(0, 0.5) * height
        length = rng.uniform(0.3, 0.5) * height
        draw.line([(x, top), (x + lean * length / height, top + length)], _jitter((235, 120, 20), rng, 15),
                  width=max(2, width // 40))
    return image


def _paint_panicle_blight(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Bacterial panicle blight: a drooping panicle of pale tan grains, some darkened."""
    (width, height), draw = image.size, ImageDraw.Draw(image)
    x0, y0 = rng.uniform(0.2, 0.8) * width, rng.uniform(0.1, 0.4) * height
    droop = rng.choice((-1, 1)) * rng.uniform(0.15, 0.3) * width
    stem = [(x0 + droop * t**2, y0 + 0.5 * height * t) for t in np.linspace(0, 1, 12)]
    draw.line(stem, fill=(150, 125, 70), width=max(2, width // 40))
    grain = max(3, width // 30)
    for x, y in stem[1:]:
        for side in (-1, 1):
            gx, gy = x + side * grain * rng.uniform(0.8, 1.6), y + rng.normal(0, grain / 2)
            colour = (110, 60, 40) if rng.random() < 0.3 else (235, 195, 70)
            draw.ellipse([gx - grain, gy - grain / 1.6, gx + grain, gy + grain / 1.6], _jitter(colour, rng, 15))
    return image


def _paint_blast(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Blast: a few spindle-shaped lesions with grey-white centres and brown borders."""
    (width, height), draw = image.size, ImageDraw.Draw(image)
    for _ in range(rng.integers(3, 6)):
        x, y = rng.uniform(0.1, 0.9) * width, rng.uniform(0.1, 0.9) * height
        long, wide = rng.uniform(0.1, 0.16) * height, rng.uniform(0.05, 0.08) * width
        draw.polygon([(x, y - long), (x + wide, y), (x, y + long), (x - wide, y)], _jitter((80, 40, 20), rng, 10))
        draw.polygon([(x, y - long * 0.6), (x + wide * 0.5, y), (x, y + long * 0.6), (x - wide * 0.5, y)],
                     _jitter((190, 190, 200), rng, 10))
    return image


def _paint_brown_spot(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Brown spot: many small round dark-brown spots with yellow halos."""
    (width, height), draw = image.size, ImageDraw.Draw(image)
    radius = max(2.5, width / 30)
    for _ in range(rng.integers(10, 22)):
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        r = radius * rng.uniform(0.7, 1.3)
        draw.ellipse([x - r * 1.5, y - r * 1.5, x + r * 1.5, y + r * 1.5], _jitter((190, 170, 60), rng, 15))
        draw.ellipse([x - r, y - r, x + r, y + r], _jitter((95, 50, 20), rng, 12))
    return image


def _paint_dead_heart(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Dead heart: the central tillers dried to beige-brown among green ones."""
    (width, height), draw = image.size, ImageDraw.Draw(image)
    centre = rng.uniform(0.3, 0.7) * width
    for _ in range(rng.integers(4, 7)):
        x, half, lean = centre + rng.normal(0, 0.1 * width), rng.uniform(0.04, 0.07) * width, rng.normal(0, 0.1 * width)
        draw.polygon([(x - half, height), (x + half, height), (x + lean, rng.uniform(0, 0.3) * height)],
                     _jitter((165, 100, 70), rng, 15))
    return image


def _paint_downy_mildew(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Downy mildew: pale, blotchy whitish-yellow patches over the leaves."""
    (width, height), overlay = image.size, image.copy()
    draw = ImageDraw.Draw(overlay)
    for _ in range(rng.integers(4, 8)):
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        rx, ry = rng.uniform(0.08, 0.16) * width, rng.uniform(0.05, 0.12) * height
        draw.ellipse([x - rx, y - ry, x + rx, y + ry], _jitter((205, 220, 235), rng, 10))
    return Image.blend(image, overlay.filter(ImageFilter.GaussianBlur(2)), 0.75)


def _paint_hispa(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Hispa: short whitish scraping marks in all directions, and a few dark beetles."""
    (width, height), draw = image.size, ImageDraw.Draw(image)
    mark = max(4.0, width / 18)
    for _ in range(rng.integers(14, 26)):
        x, y, angle = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0, np.pi)
        dx, dy = mark * np.cos(angle), mark * np.sin(angle)
        draw.line([(x - dx, y - dy), (x + dx, y + dy)], _jitter((250, 250, 245), rng, 5), width=max(2, width // 40))
    for _ in range(rng.integers(1, 4)):
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        draw.ellipse([x - 2, y - 3, x + 2, y + 3], (25, 25, 30))
    return image


def _paint_normal(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Normal: a healthy leaf, sometimes with glints of light that are not lesions."""
    (width, height), draw = image.size, ImageDraw.Draw(image)
    for _ in range(rng.integers(0, 4)):
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        draw.ellipse([x - 1.5, y - 1.5, x + 1.5, y + 1.5], _jitter((170, 200, 150), rng, 15))
    return image


def _paint_tungro(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Tungro: the leaves turn yellow-orange, strongest towards the tips (the top of the photo)."""
    width, height = image.size
    tint = Image.new("RGB", image.size, _jitter((225, 165, 45), rng, 15))
    top_strength = rng.uniform(0.55, 0.75)
    ramp = np.linspace(top_strength, top_strength * 0.4, height, dtype=np.float32)[:, None]
    mask = Image.fromarray((np.repeat(ramp, width, axis=1) * 255).astype(np.uint8), "L")
    return Image.composite(tint, image, mask)


PAINTERS = dict(zip(CLASSES, (
    _paint_leaf_blight, _paint_leaf_streak, _paint_panicle_blight, _paint_blast, _paint_brown_spot, _paint_dead_heart,
    _paint_downy_mildew, _paint_hispa, _paint_normal, _paint_tungro)))


def _distractors(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Shadows and specks that every class can have, so that 'anything drawn' is not itself a cue."""
    (width, height), draw = image.size, ImageDraw.Draw(image)
    for _ in range(rng.integers(0, 3)):
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(0.05, 0.15) * width
        draw.ellipse([x - r, y - r / 2, x + r, y + r / 2], _jitter((35, 55, 25), rng, 10))
    return image


def _camera_noise(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.9)))
    pixels = np.asarray(image, dtype=np.float32) * rng.uniform(0.9, 1.1)
    pixels += rng.normal(0, 6, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _jitter(colour: Rgb, rng: np.random.Generator, spread: int, offset: int = 0) -> Rgb:
    return tuple(int(np.clip(c + offset + rng.integers(-spread, spread + 1), 0, 255)) for c in colour)

