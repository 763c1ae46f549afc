"""
The demo's data and teachers, made from nothing: a small synthetic data set in the MedPix 2.0 layout and schema, whose
images and words carry the labels, and tiny random CLIP and DistilBERT teachers built from transformers' config
classes. `python light-weight-vlm.py --demo` makes them under cache/demo/ and trains on them; the tests use them too.
"""

import os
import random
import tempfile
from contextlib import contextmanager
from pathlib import Path

import jsonlines
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

LOCATIONS = ("Head", "Thorax", "Abdomen", "Spine and Muscles", "Reproductive and Urinary System")
WORDS = {"Head": "brain skull head", "Thorax": "chest lung thorax", "Abdomen": "abdomen liver bowel",
         "Spine and Muscles": "spine vertebra lumbar", "Reproductive and Urinary System": "pelvis bladder kidney"}
FILLER = ("patient presented with pain for two weeks", "image shows a lesion with mild enhancement",
          "no acute findings were noted", "follow up study after treatment", "history of trauma and fever")


def demo_image(rng: random.Random, modality: str, location: str) -> Image.Image:
    w, h = rng.randint(80, 120), rng.randint(80, 120)
    tissue, bone = (110, 235) if modality == "CT" else (180, 40)
    image = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(image)
    box = lambda cx, cy, rx, ry: (w * (cx - rx), h * (cy - ry), w * (cx + rx), h * (cy + ry))
    jitter = lambda: rng.uniform(-0.04, 0.04)
    if location == "Head":
        draw.ellipse(box(0.5 + jitter(), 0.5, 0.36, 0.42), fill=tissue, outline=bone, width=5)
    elif location == "Thorax":
        draw.ellipse(box(0.5, 0.5 + jitter(), 0.45, 0.32), fill=tissue, outline=bone, width=2)
        for cx in (0.32, 0.68):
            draw.ellipse(box(cx, 0.5, 0.12, 0.2), fill=20)
    elif location == "Abdomen":
        draw.ellipse(box(0.5, 0.5 + jitter(), 0.42, 0.36), fill=tissue)
        for _ in range(4):
            draw.ellipse(box(rng.uniform(0.3, 0.7), rng.uniform(0.35, 0.65), 0.07, 0.07), fill=bone)
    elif location == "Spine and Muscles":
        for cy in (0.15, 0.35, 0.55, 0.75):
            draw.rectangle(box(0.5 + jitter(), cy, 0.12, 0.07), fill=bone)
    else:
        draw.ellipse(box(0.5, 0.5, 0.4, 0.3), fill=tissue)
        draw.ellipse(box(0.5, 0.62 + jitter(), 0.12, 0.1), fill=bone)
    noise = np.random.default_rng(rng.getrandbits(32)).normal(128, 40 if modality == "CT" else 15, (h, w))
    noise = Image.fromarray(noise.clip(0, 255).astype(np.uint8))  # seeded: Image.effect_noise is not
    return Image.blend(image.filter(ImageFilter.GaussianBlur(1 if modality == "CT" else 2)), noise, 0.25)


def demo_caption(rng: random.Random, modality: str, location: str) -> str:
    parts = [rng.choice(FILLER)]
    if rng.random() < 0.5:
        parts.insert(0, f"axial {modality.lower()} image")
    if rng.random() < 0.5:
        parts.append(f"of the {rng.choice(WORDS[location].split())}")
    return " ".join(parts)


def make_demo_data(root: Path, seed: int, sizes: dict[str, int] = None) -> None:
    """A small data set in the MedPix 2.0 layout and schema, with images in RGB, RGBA and L modes."""
    sizes = sizes or dict(train=200, dev=60, test=60)
    rng = random.Random(seed)
    with renamed_into(root) as folder:
        (folder / "images").mkdir()
        (folder / "splitted_dataset").mkdir()
        for split, n in sizes.items():
            cases, descriptions = [], []
            for case_no in range(n // 3):
                uid, location = f"DEMO{split}{case_no:04d}", rng.choice(LOCATIONS)
                images = {"CT": [], "MR": []}
                for image_no in range(3):
                    modality, name = rng.choice(("CT", "MR")), f"{uid}_synpic{image_no}"
                    images[modality].append(name)
                    image = demo_image(rng, modality, location).convert(rng.choice(("RGB", "RGBA", "L")))
                    image.save(folder / "images" / f"{name}.png")
                    descriptions.append({"Type": modality, "U_id": uid, "image": name, "Description": {
                        "Caption": demo_caption(rng, modality, location), "Modality": f"{modality} - demo",
                        "Plane": "Axial", "Age": str(rng.randint(5, 90))},
                        "Location": f"{location} (demo)", "Location Category": location})
                cases.append({"U_id": uid, "TAC": images["CT"], "MRI": images["MR"], "Case": {
                    "History": rng.choice(FILLER), "Title": "demo case",
                    "Findings": f"lesion of the {WORDS[location].split()[0]}"}, "Topic": {"Category": "demo"}})
            for kind, records in (("data", cases), ("descriptions", descriptions)):
                with jsonlines.open(folder / "splitted_dataset" / f"{kind}_{split}.jsonl", "w") as writer:
                    writer.write_all(records)


def make_demo_teachers(vision_dir: Path | None, text_dir: Path | None, seed: int) -> None:
    """Tiny random CLIP and DistilBERT teachers and a word-level tokenizer of the demo texts, in the folders given."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, DistilBertConfig, DistilBertModel
    from transformers import PreTrainedTokenizerFast
    torch.manual_seed(seed)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    demo_texts = (*FILLER, *WORDS.values(), "axial ct mr image of the")
    words = sorted({w for line in demo_texts for w in line.split()})
    characters = "abcdefghijklmnopqrstuvwxyz0123456789"
    words += [c for c in characters if c not in words] + [f"##{c}" for c in characters]  # any word spells out
    wordpiece = Tokenizer(models.WordPiece({w: i for i, w in enumerate(specials + words)}, unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=wordpiece, **dict(zip(
        ("pad_token", "unk_token", "cls_token", "sep_token", "mask_token"), specials)))
    text = DistilBertModel(DistilBertConfig(vocab_size=len(tokenizer), dim=64, n_layers=2, n_heads=2, hidden_dim=128,
                                            max_position_embeddings=256))
    if text_dir:
        with renamed_into(text_dir) as folder:
            tokenizer.save_pretrained(folder)
            text.save_pretrained(folder)
    tiny = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    clip = CLIPModel(CLIPConfig(text_config=dict(tiny, vocab_size=99, bos_token_id=0, eos_token_id=1, pad_token_id=1),
                                vision_config=dict(tiny, image_size=32, patch_size=8), projection_dim=32))
    if vision_dir:
        with renamed_into(vision_dir) as folder:
            clip.save_pretrained(folder)
            processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
            processor.save_pretrained(folder)


@contextmanager
def renamed_into(folder: Path):
    """A private temporary folder beside folder to write into; then each file it holds is renamed into its place in
    folder, whole: a run reading folder meanwhile (two demo runs started together, torchrun's processes) never sees a
    half-written file. Interrupted while writing, nothing is moved; while renaming, some files are (each whole)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp") as tmp:
        yield Path(tmp)
        for file in sorted(Path(tmp).rglob("*")):  # images/ before splitted_dataset/: a record's image is there first
            if file.is_file():
                (folder / file.relative_to(tmp)).parent.mkdir(parents=True, exist_ok=True)
                os.replace(file, folder / file.relative_to(tmp))
