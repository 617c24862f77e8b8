"""The goldfish example's images: five committed drawings and seeded Pillow drawings.

- ``training_images()``: the five 224×224 cartoon goldfish in ``examples/data/``, the
  only images the adapters train on.
- ``held_out_goldfish(n, seed)``: new cartoon goldfish drawn here, never trained on;
  they vary body shape, colour, size, position, direction, fins and background.
- ``controls(seed)``: cartoon scenes that are not fish (a car, a house, a clock, an
  empty aquarium, ...); an adapter that learnt "goldfish" and not "orange things on
  blue" leaves their predictions alone.

Everything is drawn at twice the size and downsampled, so edges are anti-aliased like
the training drawings. The same seed gives the same images on every machine.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 224
_S = 2  # supersampling factor
_W = SIZE * _S
DATA = Path(__file__).resolve().parent / "data"

RGB = tuple[int, int, int]


def training_images() -> list[tuple[str, Image.Image]]:
    """The five committed training drawings, as (name, 224×224 RGB image)."""
    paths = sorted(DATA.glob("goldfish_*.png"))
    if len(paths) != 5:
        raise FileNotFoundError(
            f"expected 5 training drawings examples/data/goldfish_*.png in {DATA}, found "
            f"{len(paths)}; restore them from the repository."
        )
    return [(p.stem, Image.open(p).convert("RGB").resize((SIZE, SIZE))) for p in paths]


# ----------------------------------------------------------------- helpers
def _canvas(top: RGB, bottom: RGB) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("RGB", (_W, _W))
    draw = ImageDraw.Draw(img)
    for y in range(_W):
        t = y / (_W - 1)
        draw.line([(0, y), (_W, y)], fill=_mix(top, bottom, t))
    return img, draw


def _mix(a: RGB, b: RGB, t: float) -> RGB:
    return tuple(round(x + (y - x) * t) for x, y in zip(a, b))  # type: ignore[return-value]


def _darker(c: RGB, f: float = 0.7) -> RGB:
    return tuple(round(x * f) for x in c)  # type: ignore[return-value]


def _finish(img: Image.Image) -> Image.Image:
    return img.resize((SIZE, SIZE), Image.Resampling.LANCZOS)


def _bubbles(draw: ImageDraw.ImageDraw, rng: random.Random, n: int) -> None:
    for _ in range(n):
        r = rng.uniform(4, 11) * _S
        x, y = rng.uniform(0, _W), rng.uniform(0, _W)
        draw.ellipse([x - r, y - r, x + r, y + r], outline=(235, 245, 255), width=2 * _S)


def _seaweed(draw: ImageDraw.ImageDraw, rng: random.Random, n: int) -> None:
    for _ in range(n):
        x0 = rng.uniform(0.05, 0.95) * _W
        height = rng.uniform(0.25, 0.5) * _W
        phase, amp = rng.uniform(0, math.tau), rng.uniform(6, 14) * _S
        pts = [(x0 + amp * math.sin(phase + k / 3), _W - k * height / 12) for k in range(13)]
        draw.line(pts, fill=(40, 140, 60), width=5 * _S, joint="curve")


def _sand(draw: ImageDraw.ImageDraw, rng: random.Random) -> None:
    top = rng.uniform(0.86, 0.92) * _W
    draw.rectangle([0, top, _W, _W], fill=(226, 205, 150))


# ----------------------------------------------------------------- goldfish
_FISH_COLOURS: list[RGB] = [
    (255, 140, 20), (250, 160, 40), (255, 120, 30), (245, 170, 60), (255, 150, 0),
    (240, 110, 20), (255, 175, 70),
]
_WATER: list[tuple[RGB, RGB]] = [
    ((120, 200, 245), (30, 110, 200)), ((150, 215, 250), (50, 130, 210)),
    ((100, 180, 235), (20, 90, 180)), ((170, 225, 250), (70, 150, 220)),
]


_PLAIN: list[RGB] = [(255, 255, 255), (253, 232, 236), (250, 243, 224), (232, 246, 232)]


def _goldfish(rng: random.Random) -> Image.Image:
    if rng.random() < 0.7:  # in water, like most training drawings
        top, bottom = rng.choice(_WATER)
        img, draw = _canvas(top, bottom)
        if rng.random() < 0.4:
            _sand(draw, rng)
        if rng.random() < 0.5:
            _seaweed(draw, rng, rng.randint(1, 3))
        _bubbles(draw, rng, rng.randint(3, 9))
    else:  # on a plain light background, like two of them
        plain = rng.choice(_PLAIN)
        img, draw = _canvas(plain, plain)

    body = rng.choice(_FISH_COLOURS)
    fin = _mix(body, (255, 220, 150), rng.uniform(0.2, 0.5))
    line = _darker(body, 0.75)
    w = rng.uniform(0.36, 0.5) * _W  # body width
    h = w * rng.uniform(0.62, 0.8)  # body height
    cx = rng.uniform(0.5, 0.62) * _W
    cy = rng.uniform(0.42, 0.58) * _W
    lw = 3 * _S

    # Tail: a forked fan behind the body (the fish faces right; flipped below).
    tail_len = w * rng.uniform(0.45, 0.65)
    spread = h * rng.uniform(0.45, 0.7)
    root = (cx - w * 0.45, cy)
    tip_top = (root[0] - tail_len, cy - spread)
    tip_bottom = (root[0] - tail_len, cy + spread)
    notch = (root[0] - tail_len * rng.uniform(0.55, 0.8), cy)
    draw.polygon([root, tip_top, notch, tip_bottom], fill=fin, outline=line, width=lw)
    for k in (-0.5, 0.0, 0.5):
        draw.line([root, (notch[0] - tail_len * 0.1, cy + k * spread)], fill=line, width=_S)
    # Dorsal fin on top, pelvic fin below.
    d0 = cx - w * rng.uniform(0.2, 0.3)
    draw.polygon(
        [(d0, cy - h * 0.4), (cx - w * 0.05, cy - h * rng.uniform(0.75, 0.95)),
         (cx + w * 0.12, cy - h * 0.42)],
        fill=fin, outline=line, width=lw,
    )
    draw.polygon(
        [(cx - w * 0.05, cy + h * 0.4), (cx - w * 0.12, cy + h * 0.75),
         (cx + w * 0.1, cy + h * 0.42)],
        fill=fin, outline=line, width=lw,
    )
    # Body, scales, pectoral fin, eye, mouth.
    draw.ellipse([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], fill=body, outline=line,
                 width=lw)
    for row in (-0.15, 0.1):
        for col in (-0.15, 0.0, 0.15):
            sx, sy, r = cx + col * w, cy + row * h, w * 0.07
            draw.arc([sx - r, sy - r, sx + r, sy + r], 250, 110, fill=line, width=_S)
    px, py = cx - w * 0.02, cy + h * 0.08
    draw.ellipse([px - w * 0.12, py - h * 0.08, px + w * 0.1, py + h * 0.1], fill=fin,
                 outline=line, width=_S * 2)
    ex, ey, er = cx + w * 0.27, cy - h * 0.1, w * rng.uniform(0.08, 0.11)
    draw.ellipse([ex - er, ey - er, ex + er, ey + er], fill=(255, 255, 255), outline=(40, 30, 30),
                 width=_S * 2)
    pr = er * 0.55
    draw.ellipse([ex + er * 0.2 - pr, ey - pr, ex + er * 0.2 + pr, ey + pr], fill=(20, 20, 30))
    hr = pr * 0.35
    draw.ellipse([ex + er * 0.35 - hr, ey - pr * 0.5 - hr, ex + er * 0.35 + hr, ey - pr * 0.5 + hr],
                 fill=(255, 255, 255))
    mx, my = cx + w * 0.42, cy + h * 0.12
    draw.arc([mx - w * 0.06, my - h * 0.06, mx + w * 0.04, my + h * 0.05], 20, 160, fill=line,
             width=_S * 2)

    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return _finish(img)


def held_out_goldfish(n: int = 24, seed: int = 2024) -> list[tuple[str, Image.Image]]:
    """``n`` new cartoon goldfish, drawn from ``seed``; none is a training image."""
    rng = random.Random(seed)
    return [(f"new_fish_{i:02d}", _goldfish(rng)) for i in range(n)]


# ----------------------------------------------------------------- controls
def _sky(rng: random.Random) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    return _canvas((140, 200, 250), (215, 235, 250))


def _car(rng: random.Random) -> Image.Image:
    img, draw = _sky(rng)
    draw.rectangle([0, 0.72 * _W, _W, _W], fill=(90, 90, 95))
    colour = rng.choice([(210, 30, 40), (30, 80, 200), (240, 200, 30)])
    draw.rounded_rectangle([0.12 * _W, 0.5 * _W, 0.88 * _W, 0.7 * _W], radius=12 * _S, fill=colour,
                           outline=(30, 30, 30), width=3 * _S)
    draw.polygon([(0.28 * _W, 0.5 * _W), (0.38 * _W, 0.36 * _W), (0.64 * _W, 0.36 * _W),
                  (0.74 * _W, 0.5 * _W)], fill=colour, outline=(30, 30, 30), width=3 * _S)
    draw.polygon([(0.33 * _W, 0.49 * _W), (0.4 * _W, 0.39 * _W), (0.62 * _W, 0.39 * _W),
                  (0.68 * _W, 0.49 * _W)], fill=(190, 225, 245))
    for x in (0.3, 0.7):
        r = 0.08 * _W
        draw.ellipse([x * _W - r, 0.7 * _W - r, x * _W + r, 0.7 * _W + r], fill=(25, 25, 25))
        draw.ellipse([x * _W - r / 2, 0.7 * _W - r / 2, x * _W + r / 2, 0.7 * _W + r / 2],
                     fill=(170, 170, 170))
    return _finish(img)


def _house(rng: random.Random) -> Image.Image:
    img, draw = _sky(rng)
    draw.rectangle([0, 0.8 * _W, _W, _W], fill=(80, 170, 70))
    wall = rng.choice([(240, 220, 180), (230, 200, 200), (250, 250, 240)])
    draw.rectangle([0.25 * _W, 0.45 * _W, 0.75 * _W, 0.82 * _W], fill=wall, outline=(60, 40, 30),
                   width=3 * _S)
    draw.polygon([(0.2 * _W, 0.46 * _W), (0.5 * _W, 0.2 * _W), (0.8 * _W, 0.46 * _W)],
                 fill=(170, 50, 40), outline=(60, 30, 20), width=3 * _S)
    draw.rectangle([0.44 * _W, 0.62 * _W, 0.56 * _W, 0.82 * _W], fill=(110, 70, 40))
    for x in (0.3, 0.6):
        draw.rectangle([x * _W, 0.52 * _W, (x + 0.1) * _W, 0.6 * _W], fill=(170, 210, 240),
                       outline=(60, 40, 30), width=2 * _S)
    return _finish(img)


def _clock(rng: random.Random) -> Image.Image:
    img, draw = _canvas((235, 230, 220), (215, 210, 200))
    c, r = _W / 2, 0.4 * _W
    draw.ellipse([c - r, c - r, c + r, c + r], fill=(255, 255, 255), outline=(40, 40, 40),
                 width=8 * _S)
    for k in range(12):
        a = k * math.tau / 12
        draw.line([(c + 0.82 * r * math.sin(a), c - 0.82 * r * math.cos(a)),
                   (c + 0.93 * r * math.sin(a), c - 0.93 * r * math.cos(a))],
                  fill=(40, 40, 40), width=4 * _S)
    h, m = rng.uniform(0, math.tau), rng.uniform(0, math.tau)
    draw.line([(c, c), (c + 0.5 * r * math.sin(h), c - 0.5 * r * math.cos(h))], fill=(20, 20, 20),
              width=7 * _S)
    draw.line([(c, c), (c + 0.78 * r * math.sin(m), c - 0.78 * r * math.cos(m))],
              fill=(20, 20, 20), width=4 * _S)
    return _finish(img)


def _tree(rng: random.Random) -> Image.Image:
    img, draw = _sky(rng)
    draw.rectangle([0, 0.82 * _W, _W, _W], fill=(90, 170, 70))
    draw.rectangle([0.45 * _W, 0.5 * _W, 0.55 * _W, 0.85 * _W], fill=(120, 80, 40))
    for dx, dy, r in ((0, -0.1, 0.22), (-0.15, 0.02, 0.17), (0.15, 0.02, 0.17)):
        x, y = (0.5 + dx) * _W, (0.38 + dy) * _W
        draw.ellipse([x - r * _W, y - r * _W, x + r * _W, y + r * _W], fill=(50, 140, 50),
                     outline=(30, 90, 30), width=3 * _S)
    return _finish(img)


def _mug(rng: random.Random) -> Image.Image:
    img, draw = _canvas((245, 240, 230), (200, 185, 165))
    colour = rng.choice([(200, 40, 50), (40, 90, 170), (250, 250, 250)])
    draw.ellipse([0.58 * _W, 0.38 * _W, 0.82 * _W, 0.66 * _W], outline=(40, 40, 40),
                 width=14 * _S)
    draw.rectangle([0.25 * _W, 0.3 * _W, 0.65 * _W, 0.78 * _W], fill=colour, outline=(40, 40, 40),
                   width=3 * _S)
    draw.ellipse([0.25 * _W, 0.26 * _W, 0.65 * _W, 0.34 * _W], fill=(90, 55, 30),
                 outline=(40, 40, 40), width=3 * _S)
    return _finish(img)


def _traffic_light(rng: random.Random) -> Image.Image:
    img, draw = _sky(rng)
    draw.rectangle([0.47 * _W, 0.7 * _W, 0.53 * _W, _W], fill=(60, 60, 60))
    draw.rounded_rectangle([0.36 * _W, 0.08 * _W, 0.64 * _W, 0.72 * _W], radius=10 * _S,
                           fill=(35, 35, 35))
    lit = rng.randrange(3)
    for k, colour in enumerate(((230, 30, 30), (240, 190, 20), (40, 200, 60))):
        c = colour if k == lit else _darker(colour, 0.35)
        y, r = (0.19 + 0.2 * k) * _W, 0.08 * _W
        draw.ellipse([0.5 * _W - r, y - r, 0.5 * _W + r, y + r], fill=c)
    return _finish(img)


def _flower(rng: random.Random) -> Image.Image:
    img, draw = _canvas((200, 235, 200), (120, 190, 110))
    c = (0.5 * _W, 0.42 * _W)
    draw.line([c, (0.5 * _W, _W)], fill=(40, 120, 40), width=6 * _S)
    petal = rng.choice([(230, 60, 140), (250, 230, 60), (150, 90, 220)])
    for k in range(8):
        a = k * math.tau / 8
        x, y, r = c[0] + 0.16 * _W * math.cos(a), c[1] + 0.16 * _W * math.sin(a), 0.09 * _W
        draw.ellipse([x - r, y - r, x + r, y + r], fill=petal, outline=_darker(petal), width=2 * _S)
    r = 0.09 * _W
    draw.ellipse([c[0] - r, c[1] - r, c[0] + r, c[1] + r], fill=(120, 70, 20))
    return _finish(img)


def _checkerboard(rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (_W, _W), (250, 250, 250))
    draw = ImageDraw.Draw(img)
    n = rng.choice([6, 8])
    cell = _W / n
    for i in range(n):
        for j in range(n):
            if (i + j) % 2:
                box = [i * cell, j * cell, (i + 1) * cell, (j + 1) * cell]
                draw.rectangle(box, fill=(20, 20, 20))
    return _finish(img)


def _sun_hills(rng: random.Random) -> Image.Image:
    img, draw = _sky(rng)
    r = 0.12 * _W
    sx, sy = rng.uniform(0.25, 0.75) * _W, 0.25 * _W
    draw.ellipse([sx - r, sy - r, sx + r, sy + r], fill=(255, 220, 40))
    for k in range(10):
        a = k * math.tau / 10
        draw.line([(sx + 1.3 * r * math.cos(a), sy + 1.3 * r * math.sin(a)),
                   (sx + 1.7 * r * math.cos(a), sy + 1.7 * r * math.sin(a))],
                  fill=(255, 200, 30), width=4 * _S)
    draw.ellipse([-0.3 * _W, 0.6 * _W, 0.7 * _W, 1.4 * _W], fill=(90, 170, 70))
    draw.ellipse([0.3 * _W, 0.65 * _W, 1.3 * _W, 1.5 * _W], fill=(70, 150, 60))
    return _finish(img)


def _umbrella(rng: random.Random) -> Image.Image:
    img, draw = _canvas((180, 190, 200), (120, 130, 145))
    colour = rng.choice([(220, 40, 60), (60, 60, 200), (40, 160, 90)])
    draw.pieslice([0.15 * _W, 0.2 * _W, 0.85 * _W, 0.8 * _W], 180, 360, fill=colour,
                  outline=(30, 30, 30), width=3 * _S)
    draw.line([(0.5 * _W, 0.5 * _W), (0.5 * _W, 0.82 * _W)], fill=(40, 40, 40), width=4 * _S)
    draw.arc([0.5 * _W, 0.76 * _W, 0.6 * _W, 0.88 * _W], 0, 180, fill=(40, 40, 40), width=4 * _S)
    for _ in range(25):
        x, y = rng.uniform(0, _W), rng.uniform(0, _W)
        draw.line([(x, y), (x - 4 * _S, y + 14 * _S)], fill=(210, 220, 235), width=_S)
    return _finish(img)


def _balloon(rng: random.Random) -> Image.Image:
    # Orange on blue, like the fish, but a balloon.
    img, draw = _canvas((110, 185, 245), (175, 220, 250))
    colour = rng.choice([(250, 140, 30), (240, 110, 30)])
    cx, cy = rng.uniform(0.4, 0.6) * _W, 0.38 * _W
    rx, ry = 0.17 * _W, 0.21 * _W
    draw.line([(cx, cy + ry), (cx - 0.05 * _W, cy + ry + 0.15 * _W), (cx + 0.03 * _W, 0.95 * _W)],
              fill=(60, 60, 60), width=2 * _S)
    draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=colour, outline=_darker(colour),
                 width=3 * _S)
    draw.polygon([(cx - 0.03 * _W, cy + ry + 0.02 * _W), (cx, cy + ry - 0.01 * _W),
                  (cx + 0.03 * _W, cy + ry + 0.02 * _W)], fill=_darker(colour))
    draw.ellipse([cx - 0.5 * rx, cy - 0.6 * ry, cx - 0.2 * rx, cy - 0.2 * ry], fill=(255, 200, 140))
    return _finish(img)


def _empty_aquarium(rng: random.Random) -> Image.Image:
    # The hardest control: the training drawings' water, bubbles, sand and weed, no fish.
    top, bottom = rng.choice(_WATER)
    img, draw = _canvas(top, bottom)
    _sand(draw, rng)
    _seaweed(draw, rng, rng.randint(2, 4))
    _bubbles(draw, rng, rng.randint(5, 10))
    return _finish(img)


def _rocket(rng: random.Random) -> Image.Image:
    img, draw = _canvas((20, 25, 60), (50, 40, 100))
    for _ in range(30):
        x, y, r = rng.uniform(0, _W), rng.uniform(0, _W), rng.uniform(1, 2.5) * _S
        draw.ellipse([x - r, y - r, x + r, y + r], fill=(250, 250, 220))
    draw.polygon([(0.42 * _W, 0.3 * _W), (0.5 * _W, 0.1 * _W), (0.58 * _W, 0.3 * _W)],
                 fill=(220, 40, 40))
    draw.rectangle([0.42 * _W, 0.3 * _W, 0.58 * _W, 0.7 * _W], fill=(235, 235, 240),
                   outline=(80, 80, 90), width=2 * _S)
    r = 0.045 * _W
    draw.ellipse([0.5 * _W - r, 0.42 * _W - r, 0.5 * _W + r, 0.42 * _W + r], fill=(90, 170, 230),
                 outline=(60, 60, 70), width=2 * _S)
    draw.polygon([(0.42 * _W, 0.55 * _W), (0.34 * _W, 0.72 * _W), (0.42 * _W, 0.7 * _W)],
                 fill=(220, 40, 40))
    draw.polygon([(0.58 * _W, 0.55 * _W), (0.66 * _W, 0.72 * _W), (0.58 * _W, 0.7 * _W)],
                 fill=(220, 40, 40))
    draw.polygon([(0.45 * _W, 0.7 * _W), (0.5 * _W, 0.88 * _W), (0.55 * _W, 0.7 * _W)],
                 fill=(250, 170, 30))
    return _finish(img)


CONTROLS: dict[str, Callable[[random.Random], Image.Image]] = {
    "car": _car,
    "house": _house,
    "clock": _clock,
    "tree": _tree,
    "mug": _mug,
    "traffic_light": _traffic_light,
    "flower": _flower,
    "checkerboard": _checkerboard,
    "sun_and_hills": _sun_hills,
    "umbrella": _umbrella,
    "balloon": _balloon,
    "empty_aquarium": _empty_aquarium,
    "rocket": _rocket,
}


def controls(seed: int = 7) -> list[tuple[str, Image.Image]]:
    """One drawing of each scene in :data:`CONTROLS`, none of them a fish."""
    rng = random.Random(seed)
    return [(name, draw(rng)) for name, draw in CONTROLS.items()]
