"""The offline ``tiny`` ViLT preset: a ``ViltForQuestionAnswering`` small enough to build in a blink.

It has the same class, processor and preprocessing (384 px shortest edge, 32 px patches, 40 text
positions) as ``dandelin/vilt-b32-finetuned-vqa``, but a 32-wide, 2-layer transformer with seeded
random weights, a small WordPiece vocabulary built here, and ten answers that include ``yes`` and
``no``. Its feature size (the input of the classifier's last Linear) is ``2 * hidden = 64``; the
real model's is 1536. It is saved with ``save_pretrained`` and always loaded back through
``from_pretrained``, exactly like a real model.

Untrained weights drawn at the usual scale (0.02) answer the same for every image. The preset
draws them wider and centres the yes/no bias on a fixed set of drawn scenes and noise images, so
its answers vary from image to image and fall on both sides of 0.5: every branch of the system
(fall / no fall, confident / offloaded) gets exercised. It detects nothing: the weights are random.
"""

from __future__ import annotations

from pathlib import Path

from fallwatch.hub import build_atomically
from edge_worker.rng import seeded

RECIPE_VERSION = 2
HIDDEN = 32
INIT_RANGE = 0.5  # wide random weights: answers differ between images
ANSWERS = ("yes", "no", "fall", "standing", "sitting", "lying", "walking", "0", "1", "2")
WORDS = (
    "is the person falling fallen lying on floor ground a an there someone who what doing are down "
    "standing sitting walking fall yes no in this image video picture man woman people anyone has"
).split()
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"
PUNCT = "?.,!'-:;\"()"


def tiny_dir_name(seed: int) -> str:
    return "tiny-vilt" if seed == 0 else f"tiny-vilt-seed{seed}"


def ensure_tiny_vilt(root: Path, seed: int = 0) -> Path:
    """The tiny ViLT directory under ``root``, built once (atomically) if missing or stale."""
    recipe = {"model": "tiny-vilt", "version": RECIPE_VERSION, "seed": seed}
    return build_atomically(Path(root) / tiny_dir_name(seed), recipe, lambda d: build_tiny_vilt(d, seed))


def tiny_vocab() -> dict[str, int]:
    """A WordPiece vocabulary: BERT specials, a few question words, single chars and ``##`` pieces."""
    tokens = [*SPECIALS, *dict.fromkeys(WORDS), *CHARS, *PUNCT, *(f"##{c}" for c in CHARS)]
    return {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}


def tiny_vilt_config(vocab_size: int):
    from transformers import ViltConfig

    return ViltConfig(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * HIDDEN,
        image_size=384,
        patch_size=32,
        max_position_embeddings=40,
        id2label=dict(enumerate(ANSWERS)),
        label2id={a: i for i, a in enumerate(ANSWERS)},
        pad_token_id=0,
        initializer_range=INIT_RANGE,
    )


def vilt_b32_vqa_config():
    """The public config of ``dandelin/vilt-b32-finetuned-vqa`` (written in, nothing downloaded).

    ViLT-B/32: hidden 768, 12 layers, 12 heads, 384 px images in 32 px patches, 40 text positions,
    3129 VQA answers ("yes" is answer 3 and "no" answer 9, as in the real head). Used to build
    full-size models with random weights for tests and benchmarks.
    """
    from transformers import ViltConfig

    answers = [f"answer{i}" for i in range(3129)]
    answers[3], answers[9] = "yes", "no"
    return ViltConfig(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        image_size=384, patch_size=32, max_position_embeddings=40, vocab_size=30522,
        id2label=dict(enumerate(answers)), label2id={a: i for i, a in enumerate(answers)},
    )


def build_tiny_vilt(out: Path, seed: int = 0) -> None:
    """Write the tiny model, processor and tokenizer into ``out`` with ``save_pretrained``."""
    from transformers import BertTokenizer, ViltForQuestionAnswering, ViltImageProcessor, ViltProcessor

    vocab = tiny_vocab()
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=40)
    image_processor = ViltImageProcessor(size={"shortest_edge": 384}, size_divisor=32)
    with seeded(seed):
        model = ViltForQuestionAnswering(tiny_vilt_config(len(vocab)))
    processor = ViltProcessor(image_processor=image_processor, tokenizer=tokenizer)
    centre_yes_no(model, processor, seed)
    model.save_pretrained(out)
    processor.save_pretrained(out)


def centring_images(seed: int) -> list:
    """Drawn rooms with people (half lying) and noise images: what the preset is centred on."""
    import numpy as np

    from fallwatch.synth import make_scene

    rng = np.random.default_rng([seed, 7])
    scenes = [make_scene(rng, 160, fall=i % 2 == 0).image for i in range(16)]
    noise = [rng.integers(0, 256, size=(80, 96, 3), dtype=np.uint8) for _ in range(16)]
    return scenes + noise


def centre_yes_no(model, processor, seed: int) -> None:
    """Shift the yes-answer bias so the median yes-minus-no logit over :func:`centring_images` is 0."""
    import torch

    yes, no = model.config.label2id["yes"], model.config.label2id["no"]
    enc = processor(images=centring_images(seed), text=["is the person falling?"] * 32, return_tensors="pt",
                    padding=True)
    model.eval()
    with torch.inference_mode(), seeded(seed):  # ViLT samples image patches at random
        logits = model(**enc).logits
        diff = (logits[:, yes] - logits[:, no]).median()
        model.classifier[3].bias[yes] -= diff
