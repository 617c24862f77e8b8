"""The goldfish example's summary table (text) and report picture (PNG)."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

GOLDFISH = 1


@dataclass(frozen=True)
class Article:
    """The article whose method the example reproduces, as the outputs cite it."""

    title: str = "LoRA原理与实现--PyTorch自己搭建LoRA模型"
    english: str = "LoRA, how it works and how to build it yourself in PyTorch"
    method: str = "B·A·flatten(x)"
    did: str = ("fine-tuned a frozen ImageNet VGG19 with a rank-10 adapter on the flattened "
                "input image, logits = VGG19(x) + B·A·flatten(x), until five illustrated "
                "goldfish were classified \"goldfish\"")

    @property
    def intro(self) -> str:
        """What the console prints first: the article, what it did, what this run does."""
        text = (f'The article "{self.title}" ("{self.english}") {self.did}. This run repeats '
                "that and puts loraplug's inject_lora beside it.")
        return textwrap.fill(text, width=92)

    @property
    def legend(self) -> str:
        """The picture's citation; its default font has Latin glyphs only."""
        return (f'article = the input-level adapter {self.method} of "{self.english}" (an '
                "article in Chinese), which trained it on a frozen VGG19 until five "
                "illustrated goldfish were classified goldfish.")


ARTICLE = Article()
TITLES = {
    "training": "Training fish (the only images trained on)",
    "held_out": "New fish (never trained on)",
    "controls": "Controls (not fish: their labels should not change)",
}
METHODS = {"input_level": f"article: input-level {ARTICLE.method}",
           "inject_lora": "loraplug: inject_lora"}


def short(label: str, width: int = 22) -> str:
    return label if len(label) <= width else label[: width - 1] + "…"


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def counts(report: dict, predictions: dict[str, list[int]]) -> dict[str, str]:
    """The judged numbers of one set of predictions, as text cells."""
    before = report["before"]["controls"]
    fish = {g: sum(p == GOLDFISH for p in predictions[g]) for g in ("training", "held_out")}
    kept = sum(a == b for a, b in zip(predictions["controls"], before))
    gold = sum(p == GOLDFISH for p in predictions["controls"])
    n = {g: len(v) for g, v in predictions.items()}
    return {
        "training fish called goldfish": f"{fish['training']}/{n['training']}",
        "new fish called goldfish": f"{fish['held_out']}/{n['held_out']}",
        "controls that kept their label": f"{kept}/{n['controls']}",
        "controls called goldfish": f"{gold}/{n['controls']}",
    }


def print_summary(report: dict, categories: list[str]) -> None:
    """Print the comparison table and every control's label before and after."""
    methods = report["methods"]
    header = ["", "before (frozen)", *(METHODS[m["method"]] for m in methods)]
    rows = [
        ["trainable parameters", "0", *(f"{m['trainable']:,}" for m in methods)],
        ["adapter files", "", *(_size(m["adapter_bytes"]) for m in methods)],
        ["training", "", *(f"{m['steps']} steps, {m['seconds']:.1f} s" for m in methods)],
    ]
    judged = [counts(report, report["before"])] + [counts(report, m["predictions"])
                                                   for m in methods]
    for key in judged[0]:
        rows.append([key, *(j[key] for j in judged)])
    rows.append(["adapters disabled = base", "",
                 *("bit for bit" if m["disabled_equals_base"] else "DIFFERENT" for m in methods)])
    _table(f"\n{report['backbone']}: five cartoon goldfish, two adapters", header, rows)

    names = report["names"]["controls"]
    rows = []
    for i, name in enumerate(names):
        before = report["before"]["controls"][i]
        cells = [name, short(categories[before])]
        for m in methods:
            after = m["predictions"]["controls"][i]
            cells.append(short(categories[after]) + ("" if after == before else "  (changed)"))
        rows.append(cells)
    _table("\nControls, top-1 label before and after", ["control", "before",
           *(METHODS[m["method"]] for m in methods)], rows)


def _table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print(title)
    for r in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


# --------------------------------------------------------------------------- picture
THUMB, PAD, COLS = 120, 8, 7
LINE = 15
GREEN, RED, GREY, BLACK = (20, 130, 40), (200, 30, 30), (90, 90, 90), (0, 0, 0)


def draw_report(images: dict, report: dict, categories: list[str]) -> Image.Image:
    """Every image with its top-1 label before and after, for both methods."""
    methods = report["methods"]
    font = ImageFont.load_default(size=12)
    bold = ImageFont.load_default(size=16)
    cell_w = THUMB + 2 * PAD + 40
    cell_h = THUMB + PAD + LINE * (1 + len(methods)) + PAD
    width = COLS * cell_w + 2 * PAD
    height = PAD
    for items in images.values():
        height += 28 + -(-len(items) // COLS) * cell_h
    height += 4 * LINE
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    y = PAD
    for group, items in images.items():
        draw.text((PAD, y + 4), TITLES[group], fill=BLACK, font=bold)
        y += 28
        for i, (_, img) in enumerate(items):
            x0 = PAD + (i % COLS) * cell_w
            y0 = y + (i // COLS) * cell_h
            sheet.paste(img.resize((THUMB, THUMB), Image.Resampling.LANCZOS), (x0, y0))
            before = report["before"][group][i]
            lines = [("base: " + short(categories[before], 20), GREY)]
            for m in methods:
                after = m["predictions"][group][i]
                if group == "controls":
                    colour = GREEN if after == before else RED
                else:
                    colour = GREEN if after == GOLDFISH else RED
                tag = "article" if m["method"] == "input_level" else "loraplug"
                lines.append((f"{tag}: " + short(categories[after], 18), colour))
            for k, (text, colour) in enumerate(lines):
                draw.text((x0, y0 + THUMB + 2 + k * LINE), text, fill=colour, font=font)
        y += -(-len(items) // COLS) * cell_h
    legend = ("green: fish called goldfish / control kept its label;  red: not.  "
              "loraplug = inject_lora on the last layers.")
    draw.text((PAD, y + LINE), legend, fill=BLACK, font=font)
    draw.text((PAD, y + 2 * LINE), ARTICLE.legend, fill=BLACK, font=font)
    return sheet
