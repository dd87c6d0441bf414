"""latexocr: turn an image of a math formula into LaTeX, in JAX/Flax.

A convolutional stem and Transformer encoder read the formula image (trained with an auxiliary CTC
loss that reads the tokens straight off the image cells); a Transformer decoder writes IM2LATEX-style LaTeX
tokens, greedily or by beam search, with a KV cache inside one jitted loop.

    python latexocr.py predict data/images/1015942522.png [--beam 5]
    python latexocr.py train --config configs/train.yaml --set training.max_minutes=10
    python latexocr.py eval --config configs/eval.yaml
    python latexocr.py vocab --split my_data/train.json --out my_data/vocab.json
    python latexocr.py pretrain --config configs/pretrain.yaml
    python latexocr.py train --config configs/finetune_rl.yaml   # CE + REINFORCE fine-tuning

Every command runs on the sample set in data/ when given no arguments. Data preparation,
rendering, the web page and the benchmark are in latexocr_tools.py beside this module.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import copy
import ctypes
import dataclasses
import functools
import hashlib
import inspect
import io
import itertools
import json
import logging
import math
import os
import re
import shlex
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageFilter, UnidentifiedImageError
from scipy import ndimage

# optax, orbax, nltk, tqdm and yaml are imported where they are used: `predict` on a loaded
# checkpoint needs none but orbax, and each import lengthens a new process's start.
if TYPE_CHECKING:
    import optax

MODULE_DIR = Path(__file__).resolve().parent
PAD, SOS, EOS, UNK, CLS, SEP, MASK = "<PAD>", "<SOS>", "<EOS>", "<UNK>", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = (PAD, SOS, EOS, UNK, CLS, SEP, MASK)
PAD_ID, SOS_ID, EOS_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = range(7)
SPLITS = ("train", "validate", "test")
MAX_IMAGE_PIXELS = 50_000_000
MAX_IMAGE_SCALE = 8.0


class UserError(Exception):
    """A mistake the user can fix; main() prints it as one line and exits non-zero."""


# --- config -----------------------------------------------------------------------------------
# A `...Section` is one section of a YAML config file; a `...Config` fixes a network's shape
# (LatexOCRConfig, FeatureExtractorConfig) and is saved with its checkpoints.

MODEL_SIZES = {
    "tiny": dict(dim=64, encoder_layers=2, decoder_layers=2, heads=2, mlp_dim=128),
    "small": dict(dim=256, encoder_layers=4, decoder_layers=3, heads=8, mlp_dim=1024),
    "base": dict(dim=512, encoder_layers=8, decoder_layers=6, heads=8, mlp_dim=2048),
}


@dataclasses.dataclass(frozen=True)
class DataSection:
    train_split: str = "data/train.json"
    validate_split: str = "data/validate.json"
    test_split: str = "data/test.json"
    vocab_path: str = "data/vocab.json"
    image_base_dir: str = "data/images"
    # Ink (the cropped formula) is scaled so its height lies in this range, keeping aspect ratio.
    min_ink_height: int = 12
    max_ink_height: int = 180
    # Images whose median glyph height (px) is well above this, IM2LATEX-100K's (half of its
    # images lie within 7.5-10), are first shrunk to it, so a screenshot at 1.5 or 2 times the
    # size reads much as at the usual size; 0 turns this off.
    glyph_height: float = 9.0
    margin: int = 4
    bucket_heights: tuple[int, ...] = (32, 64, 128, 192)
    bucket_widths: tuple[int, ...] = (128, 256, 512, 768)
    # Token sequences (with <SOS>/<EOS>) are padded to the smallest of these that fits.
    sequence_buckets: tuple[int, ...] = (48, 96, 160, 256)


@dataclasses.dataclass(frozen=True)
class ModelSection:
    size: str = "small"
    # The encoder gives one vector per cell of cell_height x cell_width pixels. Cells are narrow
    # because a formula is read left to right and its glyphs are about 8 px wide at IM2LATEX-100K's
    # size: a 16 px wide cell would hold two or three of them.
    cell_height: int = 16
    cell_width: int = 8
    # 3x3 convolutions in the stem; those past the cell size keep stride 1, so a finer grid can
    # start from the weights of a coarser one with the same number.
    stem_convolutions: int = 4
    max_seq_len: int = 256
    dropout: float = 0.1


@dataclasses.dataclass(frozen=True)
class TrainingSection:
    checkpoint_dir: str = "runs/small"
    batch_size: int = 16
    grad_accum_steps: int = 1
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_steps: int = 500
    total_steps: int = 20000
    max_minutes: float = 0.0
    grad_clip: float = 1.0
    label_smoothing: float = 0.1
    # Weight of the CTC loss that reads the formula's tokens straight off the image memory (see
    # ctc_loss); 0 trains the decoder's cross-entropy alone.
    ctc_weight: float = 0.5
    bf16: bool = False
    augment: bool = True
    # A share (shrink_share) of the training images is shrunk by a random factor down to this
    # (bicubic, as a screenshot at a lower zoom), so the model also meets glyphs smaller than
    # IM2LATEX-100K's; 1: never.
    shrink_to: float = 1.0
    shrink_share: float = 0.5
    # The share of the shrunk images then enlarged back to their size (resize_ink), as predict
    # enlarges an image whose glyphs are small (evaluation.size_factors above 1): the model learns to
    # read them blurred at the usual size, with the cells of that size.
    enlarge_back: float = 0.0
    # Only images shrunk by a factor below this are enlarged back: reading enlarges an image only
    # when its glyphs measure 6 px or less (ENLARGE_UP_TO_GLYPH), about 0.67 of IM2LATEX-100K's
    # 9, so a shrunk image above that is read as it is; 1: any shrunk image.
    enlarge_below: float = 1.0
    seed: int = 0
    eval_every: int = 500
    val_samples: int = 200
    log_every: int = 20
    keep_checkpoints: int = 2
    # Validation and the best checkpoint use an exponential moving average of the weights, updated
    # every optimizer step with this decay (0: the weights themselves); it averages away the noise
    # of the last steps' updates.
    ema_decay: float = 0.0
    # An OCR checkpoint whose parameters start a new run (fine-tuning); empty: random initialisation.
    init_checkpoint: str = ""


@dataclasses.dataclass(frozen=True)
class EvaluationSection:
    checkpoint_path: str = "data/model"
    split: str = "test"
    batch_size: int = 32
    primary_metric: str = "bleu"
    generation_method: str = "greedy"
    beam_width: int = 5
    # Beams are compared by summed log-probability / length ** length_penalty.
    length_penalty: float = 0.7
    # A screenshot's size is unknown and the model reads best at IM2LATEX-100K's own sizes, so an
    # image whose glyphs measure large is also read shrunk by each factor below 1 here, one whose
    # glyphs measure small enlarged by each factor above 1, and the answer with the best score is
    # kept (see size_variants); [] reads each image once, as preprocessing leaves it.
    size_factors: tuple[float, ...] = (2.0, 0.7, 0.5)
    # Only an image whose first answer (as preprocessing leaves it) scores at most this is read
    # at those other sizes: a confident first answer is seldom beaten (how it was chosen: docs/
    # RESULTS.md, Image size). 0 reads every size always.
    confident_score: float = -0.5
    # Answers at several sizes are compared by score + size_prior x log2(factor): the model's scores
    # favour shrunk readings a little too much (docs/RESULTS.md, Image size). 0 compares scores alone.
    size_prior: float = 0.2
    output_dir: str = "evaluation_results"

    @property
    def decode_width(self) -> int:
        """The beam width to decode with; 1 is greedy decoding."""
        return self.beam_width if self.generation_method == "beam" else 1

    def describe_decoding(self) -> str:
        method = "greedy" if self.decode_width == 1 else f"beam {self.beam_width}, length penalty {self.length_penalty:g}"
        sizes = (f", size factors {' '.join(f'{f:g}' for f in self.size_factors)} below score {self.confident_score:g}"
                 f" with size prior {self.size_prior:g}" if self.size_factors else "")
        return method + sizes


@dataclasses.dataclass(frozen=True)
class FeatureExtractorSection:
    """The Transformer over LaTeX tokens whose features score formulas (pretrained by `pretrain`
    with the `training` section's optimizer, schedule and loop)."""

    size: str = "small"
    dropout: float = 0.1
    checkpoint_path: str = "runs/extractor"
    # Formula sources: split JSON files (their captions) or text files with one formula a line.
    train_formulas: tuple[str, ...] = ("data/train.json",)
    validate_formulas: str = "data/validate.json"
    mask_prob: float = 0.15
    max_bracket_depth: int = 8
    mlm_weight: float = 1.0
    depth_weight: float = 1.0
    pooling: str = "mean"


@dataclasses.dataclass(frozen=True)
class RLSection:
    """Stage 2: loss = ce_weight * cross-entropy + lambda_rl * REINFORCE; lambda_rl 0 is plain
    cross-entropy. A sample's reward is extractor_weight * cosine(extractor features of sample and
    reference) + bleu_weight * its BLEU-4 + edit_weight * (1 - normalised edit distance)
    + exact_match_bonus when it equals the reference."""

    lambda_rl: float = 0.0
    ce_weight: float = 1.0
    temperature: float = 1.0
    # mean: the batch's mean reward (the original); self_critical: the reward of the greedy decode.
    baseline: str = "mean"
    extractor_weight: float = 1.0
    bleu_weight: float = 0.0
    edit_weight: float = 0.0
    exact_match_bonus: float = 1.0


@dataclasses.dataclass(frozen=True)
class Config:
    data: DataSection = DataSection()
    model: ModelSection = ModelSection()
    training: TrainingSection = TrainingSection()
    evaluation: EvaluationSection = EvaluationSection()
    feature_extractor: FeatureExtractorSection = FeatureExtractorSection()
    rl: RLSection = RLSection()


@dataclasses.dataclass(frozen=True)
class LatexOCRConfig:
    """Everything that fixes the network's shape; saved with every checkpoint."""

    vocab_size: int
    dim: int
    encoder_layers: int
    decoder_layers: int
    heads: int
    mlp_dim: int
    cell_height: int
    cell_width: int
    stem_convolutions: int
    max_seq_len: int
    dropout: float = 0.0
    dtype: str = "float32"

    def cell_grid(self, image_shape: Sequence[int]) -> tuple[int, int]:
        """Rows and columns of encoder cells for images [B, H, W, ...]."""
        return image_shape[1] // self.cell_height, image_shape[2] // self.cell_width


@dataclasses.dataclass(frozen=True)
class FeatureExtractorConfig:
    """Everything that fixes the feature extractor's shape; saved with its checkpoints."""

    vocab_size: int
    dim: int
    layers: int
    heads: int
    mlp_dim: int
    max_seq_len: int
    max_bracket_depth: int
    dropout: float = 0.0
    dtype: str = "float32"


METRIC_DIRECTIONS = {"bleu": "max", "edit_distance": "min", "exact_match": "max", "token_accuracy": "max"}


def _convert(value: Any, default: Any, key: str) -> Any:
    """Coerce a YAML / command-line value to the type of the field's default."""
    try:
        if isinstance(default, bool):
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            if isinstance(value, bool):
                return value
            raise ValueError
        if isinstance(default, tuple):
            items = value.strip("[]()").split(",") if isinstance(value, str) else list(value)
            return tuple(_convert(v, default[0], key) for v in items if str(v).strip() != "")
        # YAML's `yes`, a list or a mapping is never a number or a name.
        if isinstance(value, (bool, list, dict)) or value is None:
            raise ValueError
        if isinstance(default, str):
            return str(value)
        number = float(value)
        if not math.isfinite(number) or (isinstance(default, int) and not number.is_integer()):
            raise ValueError
        return int(number) if isinstance(default, int) else number
    except (TypeError, ValueError):
        raise UserError(f"config key {key}: {value!r} is not a valid {type(default).__name__}") from None


def apply_overrides(config: Config, overrides: dict[str, dict[str, Any]]) -> Config:
    sections = [f.name for f in dataclasses.fields(Config)]
    replaced = {}
    for section_name, values in overrides.items():
        if section_name not in sections:
            raise UserError(f"unknown config section '{section_name}' (known: {', '.join(sections)})")
        section = getattr(config, section_name)
        if not isinstance(values, dict):
            raise UserError(f"config section '{section_name}' must be a mapping of keys to values")
        fields = {f.name for f in dataclasses.fields(section)}
        changes = {}
        for key, value in values.items():
            if key not in fields:
                raise UserError(
                    f"unknown config key '{section_name}.{key}' (known: {', '.join(sorted(fields))})")
            changes[key] = _convert(value, getattr(section, key), f"{section_name}.{key}")
        replaced[section_name] = dataclasses.replace(replaced.get(section_name, section), **changes)
    return validate_config(dataclasses.replace(config, **replaced))


def is_power_of_two(n: int) -> bool:
    return n >= 2 and n & (n - 1) == 0


def validate_config(config: Config) -> Config:
    data, model, training, evaluation, extractor, rl = (config.data, config.model, config.training, config.evaluation,
                                                        config.feature_extractor, config.rl)
    reward_weights = (rl.extractor_weight, rl.bleu_weight, rl.edit_weight, rl.exact_match_bonus)
    for name in ("bucket_heights", "bucket_widths", "sequence_buckets"):
        if not getattr(data, name):
            raise UserError(f"data.{name} must not be empty")
    checks = [
        (model.size in MODEL_SIZES, f"model.size must be one of {', '.join(MODEL_SIZES)}"),
        (is_power_of_two(model.cell_height) and is_power_of_two(model.cell_width)
         and model.cell_width <= model.cell_height,
         "model.cell_height and model.cell_width must be powers of two (2, 4, 8, ...), cell_width <= cell_height"),
        (model.stem_convolutions >= 0 and 1 << model.stem_convolutions >= model.cell_height,
         "model.stem_convolutions must be at least log2(model.cell_height) (4 for 16 px high cells)"),
        (data.margin >= 0, "data.margin must be >= 0"),
        (data.glyph_height >= 0, "data.glyph_height must be >= 0 (0 turns glyph-size normalization off)"),
        (min(data.bucket_heights + data.bucket_widths) > 0,
         "data.bucket_heights and data.bucket_widths must be positive"),
        (all(h % model.cell_height == 0 for h in data.bucket_heights)
         and all(w % model.cell_width == 0 for w in data.bucket_widths),
         "data.bucket_heights must be multiples of model.cell_height, data.bucket_widths of model.cell_width"),
        (0 < data.min_ink_height <= data.max_ink_height <= max(data.bucket_heights) - 2 * data.margin,
         "need 0 < data.min_ink_height <= data.max_ink_height <= largest bucket height - 2*margin"),
        (max(data.sequence_buckets) <= model.max_seq_len, "data.sequence_buckets must be at most model.max_seq_len"),
        (min(data.sequence_buckets) >= 3, "data.sequence_buckets must be at least 3"),
        (0.0 <= model.dropout < 1.0, "model.dropout must be in [0, 1)"),
        (training.batch_size > 0, "training.batch_size must be positive"),
        (training.grad_accum_steps > 0, "training.grad_accum_steps must be positive"),
        (training.seed >= 0, "training.seed must be >= 0"),
        (training.lr > 0, "training.lr must be positive"),
        (training.weight_decay >= 0, "training.weight_decay must be >= 0"),
        (training.warmup_steps >= 0, "training.warmup_steps must be >= 0"),
        (training.total_steps > training.warmup_steps, "training.total_steps must exceed training.warmup_steps"),
        (training.max_minutes >= 0, "training.max_minutes must be >= 0 (0 = no time limit)"),
        (training.grad_clip > 0, "training.grad_clip must be positive"),
        (0.0 <= training.label_smoothing < 1.0, "training.label_smoothing must be in [0, 1)"),
        (training.ctc_weight >= 0, "training.ctc_weight must be >= 0 (0 turns the CTC loss off)"),
        (training.eval_every > 0 and training.log_every > 0, "training.eval_every and log_every must be positive"),
        (training.val_samples > 0, "training.val_samples must be positive"),
        (training.keep_checkpoints > 0, "training.keep_checkpoints must be positive"),
        (0 <= training.ema_decay < 1, "training.ema_decay must be in [0, 1) (0: no average)"),
        (0 < training.shrink_to <= 1, "training.shrink_to must be in (0, 1] (1: never shrink)"),
        (0 < training.shrink_share <= 1, "training.shrink_share must be in (0, 1]"),
        (0 <= training.enlarge_back <= 1, "training.enlarge_back must be in [0, 1] (0: never enlarge back)"),
        (0 < training.enlarge_below <= 1, "training.enlarge_below must be in (0, 1] (1: any shrunk image)"),
        (evaluation.batch_size > 0, "evaluation.batch_size must be positive"),
        (evaluation.split in SPLITS, f"evaluation.split must be one of {', '.join(SPLITS)}"),
        (evaluation.primary_metric in METRIC_DIRECTIONS,
         f"evaluation.primary_metric must be one of {', '.join(METRIC_DIRECTIONS)}"),
        (evaluation.generation_method in ("greedy", "beam"),
         "evaluation.generation_method must be 'greedy' or 'beam'"),
        (evaluation.beam_width >= 1, "evaluation.beam_width must be at least 1"),
        (evaluation.length_penalty >= 0, "evaluation.length_penalty must be >= 0"),
        (all(0 < f <= MAX_IMAGE_SCALE and f != 1 for f in evaluation.size_factors),
         f"evaluation.size_factors must lie in (0, {MAX_IMAGE_SCALE:g}], none of them 1"),
        (evaluation.size_prior >= 0, "evaluation.size_prior must be >= 0 (0: compare scores alone)"),
        (extractor.size in MODEL_SIZES, f"feature_extractor.size must be one of {', '.join(MODEL_SIZES)}"),
        (0.0 <= extractor.dropout < 1.0, "feature_extractor.dropout must be in [0, 1)"),
        (bool(extractor.train_formulas), "feature_extractor.train_formulas must name at least one file"),
        (0.0 < extractor.mask_prob < 1.0, "feature_extractor.mask_prob must be in (0, 1)"),
        (extractor.max_bracket_depth >= 1, "feature_extractor.max_bracket_depth must be at least 1"),
        (extractor.mlm_weight >= 0 and extractor.depth_weight >= 0 and extractor.mlm_weight + extractor.depth_weight > 0,
         "feature_extractor.mlm_weight and depth_weight must be >= 0, not both 0"),
        (extractor.pooling in ("mean", "cls"), "feature_extractor.pooling must be 'mean' or 'cls'"),
        (rl.lambda_rl >= 0 and rl.ce_weight >= 0 and rl.lambda_rl + rl.ce_weight > 0,
         "rl.lambda_rl and rl.ce_weight must be >= 0, not both 0"),
        (rl.temperature > 0, "rl.temperature must be positive"),
        (rl.baseline in ("mean", "self_critical"), "rl.baseline must be 'mean' or 'self_critical'"),
        (min(reward_weights) >= 0 and sum(reward_weights) > 0,
         "rl.extractor_weight, bleu_weight, edit_weight and exact_match_bonus must be >= 0, not all 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    return config


def parse_set_options(options: Sequence[str]) -> dict[str, dict[str, Any]]:
    overrides: dict[str, dict[str, Any]] = collections.defaultdict(dict)
    for option in options:
        key, sep, value = option.partition("=")
        section, dot, field = key.partition(".")
        if not sep or not dot:
            raise UserError(f"--set expects section.key=value, got '{option}'")
        overrides[section][field] = value
    return dict(overrides)


def load_config(path: str | None, set_options: Sequence[str] = ()) -> Config:
    import yaml

    overrides: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise UserError(f"config file not found: {path}")
        try:
            overrides = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise UserError(f"config file {path} is not valid YAML{where}: {problem}") from None
        if not isinstance(overrides, dict):
            raise UserError(f"config file {path} must hold a mapping of sections")
    config = apply_overrides(Config(), overrides)
    return apply_overrides(config, parse_set_options(set_options))


def latexocr_config(config: Config, vocab_size: int) -> LatexOCRConfig:
    section = config.model
    return LatexOCRConfig(
        vocab_size=vocab_size, cell_height=section.cell_height, cell_width=section.cell_width,
        stem_convolutions=section.stem_convolutions, max_seq_len=section.max_seq_len,
        dropout=section.dropout, dtype="bfloat16" if config.training.bf16 else "float32",
        **MODEL_SIZES[section.size])


def feature_extractor_config(config: Config, vocab_size: int) -> FeatureExtractorConfig:
    section = config.feature_extractor
    size = MODEL_SIZES[section.size]
    return FeatureExtractorConfig(
        vocab_size=vocab_size, dim=size["dim"], layers=size["encoder_layers"], heads=size["heads"],
        mlp_dim=size["mlp_dim"], max_seq_len=config.model.max_seq_len, max_bracket_depth=section.max_bracket_depth,
        dropout=section.dropout, dtype="bfloat16" if config.training.bf16 else "float32")


def resolve_path(path: str) -> Path:
    """Relative paths are taken from the current directory, then from the project directory."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute() or candidate.exists():
        return candidate
    in_project = MODULE_DIR / candidate
    return in_project if in_project.exists() else candidate


# --- vocabulary and tokenizer -----------------------------------------------------------------

# A raw LaTeX string splits into IM2LATEX tokens: environments, \left/\right with their
# delimiter, control words (`\operatorname*` whole, as IM2LATEX-100K keeps it), control symbols,
# then single characters.
LATEX_TOKEN = re.compile(
    r"\\(?:begin|end)\{[a-zA-Z*]+\}"
    r"|\\(?:left|right)(?![a-zA-Z])\s*(?:\\[a-zA-Z]+|\\.|[^\s\\])"
    r"|\\operatorname\*|\\[a-zA-Z]+"
    r"|\\."
    r"|\S")


class Vocabulary:
    def __init__(self, tokens: Sequence[str]):
        if tuple(tokens[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise UserError(f"vocabulary must start with the special tokens {' '.join(SPECIAL_TOKENS)}")
        if len(set(tokens)) != len(tokens):
            raise UserError("vocabulary holds a token twice")
        self.tokens = tuple(tokens)
        self.ids = {token: i for i, token in enumerate(self.tokens)}

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, tokens: Sequence[str]) -> list[int]:
        return [self.ids.get(token, UNK_ID) for token in tokens]

    def decode(self, ids: Sequence[int]) -> list[str]:
        """Token strings up to the first <EOS>, without <SOS>/<PAD>."""
        out = []
        for i in ids:
            if i == EOS_ID:
                break
            if i not in (PAD_ID, SOS_ID):
                out.append(self.tokens[i])
        return out

    def tokenize(self, text: str) -> list[str]:
        """Whitespace-separated vocabulary tokens are kept whole; anything else is split as LaTeX."""
        tokens = []
        for chunk in text.split():
            tokens.extend([chunk] if chunk in self.ids else LATEX_TOKEN.findall(chunk))
        return tokens

    def to_json(self) -> dict[str, int]:
        return dict(self.ids)


def detokenize(tokens: Sequence[str]) -> str:
    return " ".join(tokens)


def compact_latex(tokens: Sequence[str]) -> str:
    """Tokens as a person types LaTeX, the same formula to LaTeX: no spaces but after a control
    word followed by a letter, and in a control space (the token `\\`)."""
    text = ""
    for token in tokens:
        if re.search(r"\\[a-zA-Z]+$", text) and re.match(r"[a-zA-Z]", token):
            text += " "
        text += "\\ " if token == "\\" else token
    return text


OUTPUT_FORMATS = {"tokens": "{}", "latex": "{}", "inline": "${}$", "display": "\\[{}\\]"}


def format_answer(tokens: Sequence[str], form: str) -> str:
    """tokens: IM2LATEX-100K's space-separated tokens; latex: compact (see compact_latex);
    inline and display: compact, wrapped in `$...$` or `\\[...\\]`."""
    return OUTPUT_FORMATS[form].format(detokenize(tokens) if form == "tokens" else compact_latex(tokens))


LEFT_DELIMITER = re.compile(r"\\left(?![a-zA-Z])")  # \left( or \left, not \leftarrow
RIGHT_DELIMITER = re.compile(r"\\right(?![a-zA-Z])")


def bracket_depths(tokens: Sequence[str], cap: int) -> list[int]:
    r"""Per token, how many `{ }` groups and `\left ... \right` pairs enclose it, capped at `cap`.
    Brackets sit at the depth outside them; an unmatched closing one is ignored at depth 0."""
    depths, depth = [], 0
    for token in tokens:
        if token == "}" or RIGHT_DELIMITER.match(token):
            depth = max(depth - 1, 0)
        depths.append(min(depth, cap))
        if token == "{" or LEFT_DELIMITER.match(token):
            depth += 1
    return depths


def build_vocabulary(captions: Sequence[Sequence[str]], min_count: int = 1) -> Vocabulary:
    counts = collections.Counter(token for caption in captions for token in caption)
    ranked = sorted((t for t, c in counts.items() if c >= min_count and t not in SPECIAL_TOKENS),
                    key=lambda t: (-counts[t], t))
    return Vocabulary(SPECIAL_TOKENS + tuple(ranked))


def load_vocabulary(path: str | Path) -> Vocabulary:
    file = resolve_path(str(path))
    if not file.is_file():
        raise UserError(f"vocabulary file not found: {path} (build one with `latexocr.py vocab`)")
    try:
        mapping = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"vocabulary file {path} is not valid JSON: {error}") from None
    if not isinstance(mapping, dict) or not all(isinstance(v, int) for v in mapping.values()):
        raise UserError(f"vocabulary file {path} must map tokens to integer ids")
    if sorted(mapping.values()) != list(range(len(mapping))):
        raise UserError(f"vocabulary file {path}: ids must be 0..{len(mapping) - 1} without gaps")
    return Vocabulary(sorted(mapping, key=mapping.__getitem__))


# --- images -----------------------------------------------------------------------------------

def decode_image(file: Any, name: str) -> Image.Image:
    """Fully decode an image from a path or binary file, refusing decompression bombs from the
    size in the header, before decoding."""
    try:
        with Image.open(file) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise UserError(f"image {name} is {image.width}x{image.height} pixels, over the "
                                f"{MAX_IMAGE_PIXELS:,} pixel limit; crop or downscale it")
            image.load()
            return image.copy()
    except Image.DecompressionBombError:  # Pillow's own limit, far above ours, hit while opening
        raise UserError(f"image {name} is over the {MAX_IMAGE_PIXELS:,} pixel limit; crop or downscale it") from None
    except UnidentifiedImageError:
        raise UserError(f"cannot read image {name}: not an image in a format Pillow reads (PNG, JPEG, ...)") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise UserError(f"cannot read image {name}: {error}") from None


def open_image(path: str | Path) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"image not found: {path}")
    return decode_image(path, str(path))


def rescale_image(image: Image.Image, factor: float) -> Image.Image:
    """The image resized by factor (Pillow bicubic, as a screenshot at another zoom would be), for
    measuring how answers change with image size."""
    if factor == 1.0:
        return image
    if image.mode not in ("L", "RGB", "RGBA", "I", "F"):
        image = image.convert("RGBA")
    size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
    return image.resize(size, Image.BICUBIC)


def ink_crop(image: Image.Image, name: str = "image") -> np.ndarray:
    """Ink intensity (0 = paper, 255 = ink) cropped to the ink, as uint8 [height, width].

    Transparent pixels become white paper; a light-on-dark image is inverted, judged by its border.
    """
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(paper, rgba)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = array.max() if array.max() > 0 else 1.0
        gray = (array / top * 255).astype(np.uint8)
    else:
        gray = np.asarray(image.convert("L"), dtype=np.uint8)
    if gray.size == 0:
        raise UserError(f"{name} is empty")
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    ink = (gray if np.median(border) < 128 else 255 - gray).astype(np.int16)
    paper = int(np.median(np.concatenate([ink[0], ink[-1], ink[:, 0], ink[:, -1]])))
    ink = np.clip(ink - paper, 0, 255).astype(np.uint8)  # tinted paper becomes 0
    rows, cols = np.nonzero(ink > 50)
    if rows.size == 0:
        raise UserError(f"{name} holds no visible formula (blank image)")
    return ink[rows.min(): rows.max() + 1, cols.min(): cols.max() + 1]


def resize_ink(ink: np.ndarray, height: int, width: int) -> np.ndarray:
    """The ink at height x width, by Lanczos: it keeps small glyphs' strokes sharper than bilinear
    (docs/RESULTS.md, Image size)."""
    if ink.shape == (height, width):
        return ink
    return np.asarray(Image.fromarray(ink).resize((max(width, 1), max(height, 1)), Image.LANCZOS))


# Glyphs up to this factor above data.glyph_height are left alone: the model reads IM2LATEX-100K
# at its own sizes best, and they vary (bringing every image to exactly 9 px read worse at 1x).
# Small glyphs are left alone too: many are real small print, which reads worse enlarged; an
# image whose glyphs measure small is also read enlarged (size_variants) and the better kept.
GLYPH_TOLERANCE = 1.3


def glyph_height(ink: np.ndarray) -> float | None:
    """Median height of the connected ink shapes at least 2 px tall. It follows the font size, not
    the layout: a fraction or a big operator makes the crop taller but leaves most glyphs alone."""
    labels, count = ndimage.label(ink > 96, structure=np.ones((3, 3)))
    heights = np.array([rows.stop - rows.start for rows, _ in ndimage.find_objects(labels)]) if count else np.zeros(0)
    tall = heights[heights >= 2]
    return float(np.median(tall)) if tall.size else None


def glyph_scale(measured: float | None, data: DataSection) -> float:
    if not data.glyph_height or measured is None or measured <= GLYPH_TOLERANCE * data.glyph_height:
        return 1.0
    return data.glyph_height / measured


def scale_into_range(ink: np.ndarray, data: DataSection, measured_glyph: float | None) -> np.ndarray:
    """Scale (aspect kept) so the glyphs (measured_glyph px; None leaves them alone) are not much
    above the usual size, the ink height is within range and the width fits the widest bucket."""
    height, width = ink.shape
    scale = glyph_scale(measured_glyph, data)
    if height * scale < data.min_ink_height:
        scale = data.min_ink_height / height
    elif height * scale > data.max_ink_height:
        scale = data.max_ink_height / height
    scale = min(scale, (max(data.bucket_widths) - 2 * data.margin) / width)
    if scale == 1.0:
        return ink
    return resize_ink(ink, max(1, round(height * scale)), max(1, round(width * scale)))


def choose_bucket(shape: tuple[int, int], data: DataSection) -> tuple[int, int]:
    height, width = shape[0] + 2 * data.margin, shape[1] + 2 * data.margin
    bucket_h = next((h for h in sorted(data.bucket_heights) if h >= height), max(data.bucket_heights))
    bucket_w = next((w for w in sorted(data.bucket_widths) if w >= width), max(data.bucket_widths))
    return bucket_h, bucket_w


def place_in_bucket(ink: np.ndarray, bucket: tuple[int, int], margin: int) -> np.ndarray:
    """Paste ink at the top-left (after the margin) of a blank canvas of the bucket's shape, as
    float32 in [0, 1]; ink that does not fit is shrunk, aspect kept."""
    bucket_h, bucket_w = bucket
    room_h, room_w = bucket_h - 2 * margin, bucket_w - 2 * margin
    height, width = ink.shape
    if height > room_h or width > room_w:
        scale = min(room_h / height, room_w / width)
        ink = resize_ink(ink, max(1, int(height * scale)), max(1, int(width * scale)))
    canvas = np.zeros(bucket, np.float32)
    canvas[margin: margin + ink.shape[0], margin: margin + ink.shape[1]] = ink / 255.0
    return canvas


# Glyph heights (px) from which an image is also read shrunk, and up to which it is also read
# enlarged, by evaluation.size_factors. On 150 held-out real val images, glyphs measure 7-10 px
# (p10-p90) as they are, 9.5-15 at 1.5 times the size, 3-5 at half (docs/RESULTS.md, Image size).
SHRINK_FROM_GLYPH = 9.0
ENLARGE_UP_TO_GLYPH = 6.0


class SizedImage(NamedTuple):
    """An image to read (an ink crop or a canvas) and the factor its crop was resized by (1: as
    preprocessing leaves it)."""
    factor: float
    image: np.ndarray


def size_variants(ink: np.ndarray, data: DataSection, factors: Sequence[float]) -> list[SizedImage]:
    """The crop as preprocessing scales it, then the crop resized by each factor its glyph height
    calls for (only brought within the ink height range and the widest bucket). Answers change
    with image size, and a wrong size tends to give a less confident answer, so whoever reads
    these keeps the answer with the best score (see Predictor.read_best)."""
    measured = glyph_height(ink) if data.glyph_height or factors else None
    variants = [SizedImage(1.0, scale_into_range(ink, data, measured))]
    if not factors or measured is None:
        return variants
    height, width = ink.shape
    for factor in factors:
        if (factor < 1 and measured >= SHRINK_FROM_GLYPH) or (factor > 1 and measured <= ENLARGE_UP_TO_GLYPH):
            resized = resize_ink(ink, max(1, round(height * factor)), max(1, round(width * factor)))
            variants.append(SizedImage(factor, scale_into_range(resized, data, None)))
    return variants


def preprocess_image(image: Image.Image, data: DataSection, name: str = "image",
                     size_factors: Sequence[float] = ()) -> list[SizedImage]:
    """The preprocessing of predict and serve (eval and train hold the same inks in a Dataset):
    canvases [bucket_h, bucket_w] float32, the first as preprocessing leaves the image, then the
    other sizes its glyphs call for."""
    return [SizedImage(factor, place_in_bucket(ink, choose_bucket(ink.shape, data), data.margin))
            for factor, ink in size_variants(ink_crop(image, name), data, size_factors)]


def augment_ink(ink: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random scale, rotation, shear, blur and contrast on an ink crop (uint8)."""
    image = Image.fromarray(ink)
    scale = rng.uniform(0.75, 1.25)
    image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                         Image.BILINEAR)
    if rng.random() < 0.5:
        shear = rng.uniform(-0.15, 0.15)
        extra = int(abs(shear) * image.height) + 1
        # PIL maps each output pixel to input (x + shear*y + offset, y); the offset keeps it in view.
        offset = -shear * image.height if shear > 0 else 0.0
        image = image.transform((image.width + extra, image.height), Image.AFFINE,
                                (1, shear, offset, 0, 1, 0), Image.BILINEAR, fillcolor=0)
    if rng.random() < 0.5:
        image = image.rotate(rng.uniform(-2.0, 2.0), Image.BILINEAR, expand=True, fillcolor=0)
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    out = np.asarray(image, np.float32)
    if rng.random() < 0.5:
        out = out * rng.uniform(0.6, 1.0)
    return np.clip(out, 0, 255).astype(np.uint8)


def shrink_plan(heights: np.ndarray, rng: np.random.Generator, training: TrainingSection,
                data: DataSection) -> tuple[np.ndarray, np.ndarray]:
    """Per ink crop of the given heights, the factor it is shrunk by and whether it is then
    enlarged back: a random share (shrink_share) is shrunk by a random factor in [shrink_to, 1],
    and a share (enlarge_back) of those shrunk below enlarge_below is enlarged back. One seen small
    is shrunk no lower than preprocessing leaves images (data.min_ink_height); one enlarged back
    may go lower, as a short formula's screenshot at half size does before reading enlarges it."""
    count = len(heights)
    factors = np.where(rng.random(count) < training.shrink_share, rng.uniform(training.shrink_to, 1.0, count), 1.0)
    enlarged = (factors < training.enlarge_below) & (rng.random(count) < training.enlarge_back)
    floor = np.minimum(1.0, data.min_ink_height / np.asarray(heights, np.float64))
    return np.where(enlarged, factors, np.maximum(factors, floor)), enlarged


def shrunk_shape(shape: tuple[int, int], factor: float) -> tuple[int, int]:
    return max(1, round(shape[0] * factor)), max(1, round(shape[1] * factor))


def shrink_ink(ink: np.ndarray, factor: float, enlarge_back: bool = False) -> np.ndarray:
    """The ink crop resized by factor (bicubic, as a screenshot at a lower zoom); with enlarge_back
    then resized back to its own size as size_variants enlarges (resize_ink)."""
    if factor == 1.0:
        return ink
    height, width = shrunk_shape(ink.shape, factor)
    shrunk = np.asarray(Image.fromarray(ink).resize((width, height), Image.BICUBIC))
    return resize_ink(shrunk, *ink.shape) if enlarge_back else shrunk


def add_noise(canvas: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if rng.random() < 0.3:
        canvas = np.clip(canvas + rng.normal(0, rng.uniform(0.01, 0.08), canvas.shape), 0, 1)
    return canvas.astype(np.float32)


# --- data -------------------------------------------------------------------------------------

@dataclasses.dataclass
class Example:
    name: str
    image_path: Path
    caption: list[str]
    ids: np.ndarray


@dataclasses.dataclass
class SplitReport:
    path: str
    loaded: int = 0
    sampled_from: int = 0
    skipped: dict[str, list[str]] = dataclasses.field(default_factory=lambda: collections.defaultdict(list))
    unknown_tokens: int = 0

    def summary(self) -> str:
        parts = [f"{self.path}: {self.loaded} examples"
                 + (f" (a sample of the {self.sampled_from} loaded)" if self.sampled_from else "")]
        for reason, names in self.skipped.items():
            shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            parts.append(f"skipped {len(names)} ({reason}: {shown})")
        if self.unknown_tokens:
            parts.append(f"{self.unknown_tokens} tokens not in the vocabulary (mapped to {UNK})")
        return ", ".join(parts)


class JsonObject(list):
    """A JSON object's (key, value) pairs in file order, so repeated keys can be seen."""


def read_split_file(path: str | Path) -> tuple[dict[str, Any], list[str]]:
    """The entries of a split file, and the image names it gives more than once (the first
    entry of each is kept)."""
    file = resolve_path(str(path))
    if not file.is_file():
        raise UserError(f"split file not found: {path}")
    try:
        pairs = json.loads(file.read_text(), object_pairs_hook=JsonObject)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"split file {path} is not valid JSON: {error}") from None
    if not isinstance(pairs, JsonObject):
        raise UserError(f"split file {path} must map image names to {{img_path, caption, caption_len}}")
    entries: dict[str, Any] = {}
    duplicates = []
    for name, entry in pairs:
        if name in entries:
            duplicates.append(name)
        else:
            entries[name] = dict(entry) if isinstance(entry, JsonObject) else entry
    return entries, duplicates


def split_captions(path: str | Path) -> list[str]:
    """The captions of a split file (entries without a text caption are left out)."""
    return [e["caption"] for e in read_split_file(path)[0].values()
            if isinstance(e, dict) and isinstance(e.get("caption"), str)]


def load_split(path: str | Path, data: DataSection, vocab: Vocabulary) -> tuple[list[Example], SplitReport]:
    """Examples of one split; entries with problems are skipped and counted by reason."""
    max_tokens = max(data.sequence_buckets) - 2  # room for <SOS> and <EOS>
    entries, duplicates = read_split_file(path)
    base = resolve_path(data.image_base_dir)
    report = SplitReport(str(path))
    if duplicates:
        report.skipped["image name given again, first entry kept"] = duplicates
    examples = []
    for name, entry in entries.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("img_path"), str) \
                or not isinstance(entry.get("caption"), str):
            report.skipped["entry lacks img_path or caption strings"].append(name)
            continue
        caption = entry["caption"].split()
        image_path = base / entry["img_path"]
        if not caption:
            report.skipped["empty caption"].append(name)
        elif len(caption) > max_tokens:
            report.skipped[f"caption longer than {max_tokens} tokens"].append(name)
        elif not image_path.is_file():
            report.skipped["image file missing"].append(name)
        else:
            ids = vocab.encode(caption)
            report.unknown_tokens += sum(i == UNK_ID for i in ids)
            examples.append(Example(name, image_path, caption, np.array(ids, np.int32)))
    report.loaded = len(examples)
    return examples, report


def sequence_bucket(length: int, data: DataSection) -> int:
    return next(b for b in sorted(data.sequence_buckets) if b >= length)


def token_array(ids_list: Sequence[np.ndarray], length: int) -> np.ndarray:
    """[batch, length] rows of <SOS> ids <EOS> <PAD>..."""
    out = np.full((len(ids_list), length), PAD_ID, np.int32)
    for row, ids in enumerate(ids_list):
        out[row, 0] = SOS_ID
        out[row, 1: 1 + len(ids)] = ids
        out[row, 1 + len(ids)] = EOS_ID
    return out


class Dataset:
    """Examples with their ink crops held in memory (decoded once), grouped into fixed shapes.
    With size_factors, an example is held once per size it may be read at (see size_variants):
    owners[i] says which of the distinct examples entry i is, variants[i] which of its size
    variants (0: as preprocessing leaves it) and factors[i] that variant's factor."""

    def __init__(self, examples: list[Example], data: DataSection, report: SplitReport | None = None,
                 workers: int = 2, image_scale: float = 1.0, size_factors: Sequence[float] = ()):
        """An image that cannot be read (corrupt, blank) is skipped and counted in `report`;
        without a report it is an error. Each image is first resized by image_scale."""
        self.data = data
        self.image_scale = image_scale
        self.size_factors = tuple(size_factors)
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            loaded = list(pool.map(self._load_inks, examples))
        failed = [(example, inks) for example, inks in zip(examples, loaded) if isinstance(inks, UserError)]
        if failed:
            if report is None:
                raise failed[0][1]
            report.skipped["image unreadable or blank"] += [example.name for example, _ in failed]
            report.loaded -= len(failed)
        kept = [(example, inks) for example, inks in zip(examples, loaded) if not isinstance(inks, UserError)]
        entries = [(owner, variant, example, sized) for owner, (example, inks) in enumerate(kept)
                   for variant, sized in enumerate(inks)]
        self.distinct = len(kept)
        self.owners = [owner for owner, _, _, _ in entries]
        self.variants = [variant for _, variant, _, _ in entries]
        self.factors = [sized.factor for _, _, _, sized in entries]
        self.examples = [example for _, _, example, _ in entries]
        self.inks = [sized.image for _, _, _, sized in entries]
        self.keys = [choose_bucket(ink.shape, data) + (sequence_bucket(len(ex.ids) + 2, data),)
                     for ex, ink in zip(self.examples, self.inks)]

    def _load_inks(self, example: Example) -> list[SizedImage] | UserError:
        try:
            image = rescale_image(open_image(example.image_path), self.image_scale)
            return size_variants(ink_crop(image, example.name), self.data, self.size_factors)
        except UserError as error:
            return error

    def __len__(self) -> int:
        return len(self.examples)

    def groups(self, keys: Sequence[tuple[int, int, int]] | None = None) -> dict[tuple[int, int, int], list[int]]:
        """Entry indices by shape: their own (self.keys), or those given (one per entry)."""
        groups: dict[tuple[int, int, int], list[int]] = collections.defaultdict(list)
        for index, key in enumerate(self.keys if keys is None else keys):
            groups[key].append(index)
        return dict(sorted(groups.items()))

    def epoch_batches(self, batch_size: int, seed: int, epoch: int,
                      keys: Sequence[tuple[int, int, int]] | None = None) -> list[np.ndarray]:
        """A shuffled epoch of same-shape batches (shapes as in `groups`); a short last batch per
        shape is filled with random members of its group, so every batch has the full size."""
        rng = np.random.default_rng([seed, epoch])
        batches = []
        for members in self.groups(keys).values():
            order = rng.permutation(members)
            for start in range(0, len(order), batch_size):
                chunk = order[start: start + batch_size]
                fill = rng.choice(members, batch_size - len(chunk))
                batches.append(np.concatenate([chunk, fill]).astype(np.int64))
        return [batches[i] for i in rng.permutation(len(batches))]

    def ordered_batches(self, batch_size: int, entries: Sequence[int] | None = None) -> list[tuple[np.ndarray, int]]:
        """Every entry (or every one of `entries`) once, in same-shape batches: (indices padded to
        batch_size, real count)."""
        chosen = None if entries is None else set(entries)
        batches = []
        for group in self.groups().values():
            members = group if chosen is None else [i for i in group if i in chosen]
            for start in range(0, len(members), batch_size):
                chunk = members[start: start + batch_size]
                batches.append((np.array(chunk + [chunk[0]] * (batch_size - len(chunk))), len(chunk)))
        return batches

    def batch(self, indices: np.ndarray, rngs: Sequence[np.random.Generator] | None = None, augment: bool = False,
              inks: Sequence[np.ndarray] | None = None, key: tuple[int, int, int] | None = None) -> dict[str, np.ndarray]:
        """images [batch, H, W, 1] float32 and tokens [batch, L] int32, of the shape `key` (default:
        the first entry's); row i holds inks[i] (default: its entry's ink) and, with augment, is
        distorted drawing from rngs[i]."""
        height, width, length = key or self.keys[indices[0]]
        images = []
        for row, i in enumerate(indices):
            ink = self.inks[i] if inks is None else inks[row]
            ink = augment_ink(ink, rngs[row]) if augment else ink
            canvas = place_in_bucket(ink, (height, width), self.data.margin)
            images.append(add_noise(canvas, rngs[row]) if augment else canvas)
        tokens = token_array([self.examples[i].ids for i in indices], length)
        return {"images": np.stack(images)[..., None], "tokens": tokens}


class BatchStream:
    """A deterministic batch sequence: batch k depends only on (seed, k), so a resumed run sees
    exactly the batches an uninterrupted run would. Built one step ahead in a worker thread so
    that preparing a batch overlaps the device step. With several processes, each builds only
    its own rows of every global batch (`shard`)."""

    part, parts = 0, 1

    def shard(self, part: int, parts: int) -> None:
        self.part, self.parts = part, parts

    def own_rows(self, batch_size: int) -> np.ndarray:
        per_part = batch_size // self.parts
        return np.arange(self.part * per_part, (self.part + 1) * per_part)

    def make(self, k: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def iterate(self, start: int, pool: concurrent.futures.Executor) -> Iterator[dict[str, np.ndarray]]:
        future = pool.submit(self.make, start)
        for k in itertools.count(start + 1):
            batch = future.result()
            future = pool.submit(self.make, k)
            yield batch


class TrainBatches(BatchStream):
    """Same-shape image batches of a Dataset, a shuffled epoch at a time, shrunk and augmented
    as `training` asks (its batch_size, seed, augment and shrink_* keys). Each epoch shrinks a
    random share of the images (see shrink_plan) and batches each image in the bucket of its
    shrunk size, so a shrunk image costs fewer cells; a share (enlarge_back) of those shrunk below
    enlarge_below is enlarged back and batched at its own size."""

    def __init__(self, dataset: Dataset, training: TrainingSection):
        self.dataset, self.training = dataset, training
        self._heights = np.array([ink.shape[0] for ink in dataset.inks])
        self._epoch_lengths: list[int] = []
        self._plan: tuple[int, Any] = (-1, None)

    def epoch_plan(self, epoch: int) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, list[tuple[int, int, int]]]:
        """An epoch's batches, and per entry the factor it is shrunk by, whether it is enlarged
        back, and the shape it is batched at."""
        if self._plan[0] != epoch:
            dataset = self.dataset
            factors, enlarged, keys = np.ones(len(dataset)), np.zeros(len(dataset), bool), dataset.keys
            if self.training.shrink_to < 1:
                factors, enlarged = shrink_plan(self._heights, np.random.default_rng([self.training.seed, 3, epoch]),
                                                self.training, dataset.data)
                keys = [key if back else choose_bucket(shrunk_shape(ink.shape, factor), dataset.data) + key[2:]
                        for ink, factor, back, key in zip(dataset.inks, factors, enlarged, dataset.keys)]
            batches = dataset.epoch_batches(self.training.batch_size, self.training.seed, epoch, keys)
            self._plan = (epoch, (batches, factors, enlarged, keys))
        return self._plan[1]

    def locate(self, k: int) -> tuple[int, int]:
        """(epoch, position in it) of batch k; epochs differ in length, as their shapes do."""
        epoch = 0
        while True:
            if epoch == len(self._epoch_lengths):
                self._epoch_lengths.append(len(self.epoch_plan(epoch)[0]))
            if k < self._epoch_lengths[epoch]:
                return epoch, k
            k -= self._epoch_lengths[epoch]
            epoch += 1

    def make(self, k: int) -> dict[str, np.ndarray]:
        epoch, position = self.locate(k)
        batches, factors, enlarged, keys = self.epoch_plan(epoch)
        rows = self.own_rows(self.training.batch_size)
        indices = batches[position][rows]
        # One generator per row of the global batch, so a row looks the same however it is sharded.
        rngs = [np.random.default_rng([self.training.seed, 1, k, row]) for row in rows] if self.training.augment else None
        inks = [shrink_ink(self.dataset.inks[i], factors[i], enlarged[i]) for i in indices]
        return self.dataset.batch(indices, rngs, self.training.augment, inks, keys[batches[position][0]])


def formula_bucket(formula: Sequence[str], data: DataSection) -> int:
    """The sequence bucket of `[CLS] formula [SEP]`; longer formulas are cut to the largest."""
    return sequence_bucket(min(len(formula) + 2, max(data.sequence_buckets)), data)


def formula_lines(path: str) -> list[str]:
    """The formulas of a split JSON file (its captions) or of a text file (one a line)."""
    if path.endswith(".json"):
        return split_captions(path)
    file = resolve_path(path)
    if not file.is_file():
        raise UserError(f"formula file not found: {path}")
    try:
        return file.read_text().splitlines()
    except UnicodeDecodeError as error:
        raise UserError(f"formula file {path} is not UTF-8 text: {error}") from None


def read_formulas(path: str, vocab: Vocabulary) -> tuple[list[list[str]], int]:
    """Token lists of formula_lines(path), and how many tokens are not in the vocabulary (they
    become <UNK>)."""
    formulas = [line.split() for line in formula_lines(path) if line.split()]
    unknown = sum(token not in vocab.ids for formula in formulas for token in formula)
    return formulas, unknown


def extractor_inputs(formulas: Sequence[Sequence[str]], vocab: Vocabulary, length: int,
                     max_depth: int) -> dict[str, np.ndarray]:
    """tokens [B, length]: [CLS] ids [SEP] <PAD>...; depths [B, length]: bracket depth of each
    formula token, -1 on [CLS], [SEP] and <PAD> (not scored). Formulas are cut to fit."""
    tokens = np.full((len(formulas), length), PAD_ID, np.int32)
    depths = np.full((len(formulas), length), -1, np.int32)
    for row, formula in enumerate(formulas):
        formula = list(formula)[: length - 2]
        tokens[row, 0], tokens[row, 1 + len(formula)] = CLS_ID, SEP_ID
        tokens[row, 1: 1 + len(formula)] = vocab.encode(formula)
        depths[row, 1: 1 + len(formula)] = bracket_depths(formula, max_depth)
    return {"tokens": tokens, "depths": depths}


class FormulaBatches(BatchStream):
    """Random batches of formulas of one sequence bucket each (the bucket of a formula drawn
    uniformly, so buckets come up in proportion to their size)."""

    def __init__(self, formulas: list[list[str]], vocab: Vocabulary, data: DataSection, batch_size: int,
                 seed: int, max_depth: int):
        self.formulas, self.vocab, self.batch_size, self.seed, self.max_depth = formulas, vocab, batch_size, seed, max_depth
        self.buckets = [formula_bucket(f, data) for f in formulas]
        self.members: dict[int, list[int]] = collections.defaultdict(list)
        for index, bucket in enumerate(self.buckets):
            self.members[bucket].append(index)

    def make(self, k: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, 2, k])
        bucket = self.buckets[rng.integers(len(self.formulas))]
        chosen = rng.choice(self.members[bucket], self.batch_size)[self.own_rows(self.batch_size)]
        return extractor_inputs([self.formulas[i] for i in chosen], self.vocab, bucket, self.max_depth)


def write_json_atomic(path: Path, value: Any) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(value, indent=1, ensure_ascii=False) + "\n")
    os.replace(temporary, path)


# --- models -----------------------------------------------------------------------------------


def attention_weights(q: jax.Array, k: jax.Array, mask: jax.Array) -> jax.Array:
    """q [B, Lq, H, D], k [B, Lk, H, D], mask broadcastable to [B, H, Lq, Lk] -> weights [B, H, Lq, Lk]
    (float32, each query's row sums to 1)."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
    logits = jnp.where(mask, logits.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(logits, axis=-1)


# In training, self-attention over more positions than this runs QUERY_BLOCK queries at a time,
# each block's weights recomputed for the gradient instead of kept: at batch 16 one layer's weights
# over a 192 x 768 image's 1,152 cells take 680 MB, and XLA planned 14 GB for that training step.
BLOCKWISE_ABOVE, QUERY_BLOCK = 512, 384


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, block: int) -> jax.Array:
    """What attention_weights gives each query, applied to v ([B, Lq, H, D]), for `block` queries at
    a time (queries padded to a multiple; mask must not vary by query): the gradient then holds one
    block's weights at once."""
    queries = q.shape[1]
    padded = jnp.pad(q, ((0, 0), (0, -queries % block), (0, 0), (0, 0)))
    blocks = padded.reshape(q.shape[0], -1, block, *q.shape[2:]).swapaxes(0, 1)  # [n, B, block, H, D]

    @jax.checkpoint
    def read(query_block: jax.Array) -> jax.Array:
        weights = attention_weights(query_block, k, mask)
        return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v)

    out = jax.lax.map(read, blocks).swapaxes(0, 1)  # [B, n, block, H, D]
    return out.reshape(q.shape[0], -1, *q.shape[2:])[:, :queries]


class MultiHeadAttention(nn.Module):
    cfg: LatexOCRConfig | FeatureExtractorConfig  # both name the fields these blocks read

    def setup(self):
        heads, head_dim = self.cfg.heads, self.cfg.dim // self.cfg.heads
        dense = lambda: nn.DenseGeneral((heads, head_dim), dtype=self.cfg.dtype)  # noqa: E731
        self.query, self.key, self.value = dense(), dense(), dense()
        self.out = nn.DenseGeneral(self.cfg.dim, axis=(-2, -1), dtype=self.cfg.dtype)

    def keys_values(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.key(x), self.value(x)

    def __call__(self, x: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, blockwise: bool = False) -> jax.Array:
        """blockwise (only for a mask that does not vary by query): see blockwise_attention."""
        if blockwise and x.shape[1] > BLOCKWISE_ABOVE:
            return self.out(blockwise_attention(self.query(x), k, v, mask, QUERY_BLOCK))
        weights = attention_weights(self.query(x), k, mask)
        # Kept only when the caller asks for the "intermediates" collection (attention pictures).
        self.sow("intermediates", "weights", weights)
        return self.out(jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v))


class MLP(nn.Module):
    cfg: LatexOCRConfig | FeatureExtractorConfig

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        x = nn.gelu(nn.Dense(self.cfg.mlp_dim, dtype=self.cfg.dtype)(x))
        x = nn.Dropout(self.cfg.dropout)(x, deterministic=deterministic)
        return nn.Dense(self.cfg.dim, dtype=self.cfg.dtype)(x)


class EncoderBlock(nn.Module):
    cfg: LatexOCRConfig | FeatureExtractorConfig

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool, mask: jax.Array | None = None) -> jax.Array:
        """mask: which keys each query may attend to (broadcast to [B, H, Lq, Lk]); None: all."""
        attend = MultiHeadAttention(self.cfg)
        h = nn.LayerNorm(dtype=self.cfg.dtype)(x)
        h = attend(h, *attend.keys_values(h), jnp.ones((), bool) if mask is None else mask, blockwise=not deterministic)
        x = x + nn.Dropout(self.cfg.dropout)(h, deterministic=deterministic)
        h = MLP(self.cfg)(nn.LayerNorm(dtype=self.cfg.dtype)(x), deterministic)
        return x + nn.Dropout(self.cfg.dropout)(h, deterministic=deterministic)


def grid_positions(rows: int, cols: int, dim: int) -> jax.Array:
    """[rows, cols, dim] fixed 2-D position code: sines and cosines of the row at geometric
    frequencies in the first half of the channels, of the column in the second (as DETR)."""
    frequencies = 1.0 / 10000 ** (jnp.arange(dim // 4) / (dim // 4))

    def code(n: int) -> jax.Array:
        angles = jnp.arange(n)[:, None] * frequencies[None]
        return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], -1)

    return jnp.concatenate([jnp.broadcast_to(code(rows)[:, None], (rows, cols, dim // 2)),
                            jnp.broadcast_to(code(cols)[None], (rows, cols, dim // 2))], -1)


class ConvStem(nn.Module):
    """One vector per cell from 3x3 convolutions of stride 2 along each axis until the cell's size
    is reached there (stride 1 after), channels doubling up to dim, each group-normalised: glyphs
    are a few pixels wide, and early convolutions make transformers on images train more steadily
    (Xiao et al. 2021, "Early convolutions help transformers see better")."""

    cfg: LatexOCRConfig

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        cfg = self.cfg
        layers = cfg.stem_convolutions
        down, across = cfg.cell_height.bit_length() - 1, cfg.cell_width.bit_length() - 1
        x = images.astype(cfg.dtype)
        for i in range(layers):
            strides = (2 if i < down else 1, 2 if i < across else 1)
            x = nn.Conv(max(cfg.dim >> (layers - 1 - i), 16), (3, 3), strides=strides,
                        padding="SAME", kernel_init=nn.initializers.he_normal(), dtype=cfg.dtype, name=f"conv_{i}")(x)
            x = nn.gelu(nn.GroupNorm(num_groups=8, dtype=cfg.dtype, name=f"norm_{i}")(x))
        return nn.Dense(cfg.dim, dtype=cfg.dtype, name="project")(x)


class Encoder(nn.Module):
    """Convolutional stem, fixed 2-D position code, pre-LN transformer blocks: [B, rows * cols, D],
    row by row."""

    cfg: LatexOCRConfig

    @nn.compact
    def __call__(self, images: jax.Array, deterministic: bool) -> jax.Array:
        cfg = self.cfg
        x = ConvStem(cfg, name="stem")(images)  # [B, rows, cols, D]
        rows, cols = x.shape[1], x.shape[2]
        x = x + grid_positions(rows, cols, cfg.dim).astype(cfg.dtype)
        x = x.reshape(x.shape[0], rows * cols, cfg.dim)
        x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
        for i in range(cfg.encoder_layers):
            x = EncoderBlock(cfg, name=f"block_{i}")(x, deterministic)
        return nn.LayerNorm(dtype=cfg.dtype, name="norm")(x)


class DecoderBlock(nn.Module):
    """Pre-LN: causal self-attention, cross-attention to the image, MLP."""

    cfg: LatexOCRConfig

    def setup(self):
        cfg = self.cfg
        self.norm_self, self.norm_cross, self.norm_mlp = (nn.LayerNorm(dtype=cfg.dtype) for _ in range(3))
        self.self_attention = MultiHeadAttention(cfg)
        self.cross_attention = MultiHeadAttention(cfg)
        self.mlp = MLP(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def cross_keys_values(self, memory: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.cross_attention.keys_values(memory)

    def __call__(self, x, cross_kv, cells, deterministic):
        """Teacher-forced: x [B, L, D] attends causally to itself, then to the image cells
        (cells [B, cells]: which are image; None: all)."""
        h = self.norm_self(x)
        causal = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool))
        x = x + self.dropout(self.self_attention(h, *self.self_attention.keys_values(h), causal),
                             deterministic=deterministic)
        return self.read_image_and_mix(x, cross_kv, cells, deterministic)

    def step(self, x, cross_kv, cells, cache, position):
        """One position: x [B, 1, D] and the keys/values of the positions before it, cache
        (k, v) each [B, cache length, H, Dh] -> x, and the cache with this position's written in."""
        h = self.norm_self(x)
        cache = tuple(jax.lax.dynamic_update_slice_in_dim(stored, new.astype(stored.dtype), position, 1)
                      for stored, new in zip(cache, self.self_attention.keys_values(h)))
        visible = jnp.arange(cache[0].shape[1]) <= position
        x = x + self.self_attention(h, *cache, visible)
        return self.read_image_and_mix(x, cross_kv, cells, True), cache

    def read_image_and_mix(self, x, cross_kv, cells, deterministic):
        """x [B * beams, L, D] (rows image-major) reads its image's memory, cross_kv [B, cells, H, Dh]
        each: one image's beams are queries of one row, so beam search reads each memory once."""
        mask = jnp.ones((), bool) if cells is None else cells[:, None, None, :]
        queries = self.norm_cross(x).reshape(cross_kv[0].shape[0], -1, x.shape[-1])  # [B, beams * L, D]
        read = self.cross_attention(queries, *cross_kv, mask).reshape(x.shape)
        x = x + self.dropout(read, deterministic=deterministic)
        return x + self.dropout(self.mlp(self.norm_mlp(x), deterministic), deterministic=deterministic)


class LatexOCR(nn.Module):
    cfg: LatexOCRConfig

    def setup(self):
        cfg = self.cfg
        self.encoder = Encoder(cfg)
        self.token_embed = nn.Embed(cfg.vocab_size, cfg.dim, embedding_init=nn.initializers.normal(0.02))
        self.position_embed = self.param("position_embed", nn.initializers.normal(0.02),
                                         (cfg.max_seq_len, cfg.dim))
        self.blocks = [DecoderBlock(cfg) for _ in range(cfg.decoder_layers)]
        self.norm = nn.LayerNorm(dtype=cfg.dtype)
        self.head = nn.Dense(cfg.vocab_size, dtype=cfg.dtype)
        self.ctc_head = nn.Dense(cfg.vocab_size, dtype=cfg.dtype)
        self.dropout = nn.Dropout(cfg.dropout)

    def __call__(self, images: jax.Array, tokens: jax.Array, deterministic: bool = True) -> jax.Array:
        """Teacher-forced logits [B, L, vocab] for input tokens [B, L]."""
        memory = self.encode(images, deterministic)
        return self.decode(tokens, self.cross_keys_values(memory), deterministic)

    def encode(self, images: jax.Array, deterministic: bool = True) -> jax.Array:
        return self.encoder(images, deterministic)

    def logits_and_ctc_logits(self, images: jax.Array, tokens: jax.Array, deterministic: bool = True):
        """Teacher-forced logits [B, L, vocab], and per image cell the CTC head's logits
        [B, cells, vocab] with the cells in reading order: column by column, top to bottom in each."""
        memory = self.encode(images, deterministic)
        rows, cols = self.cfg.cell_grid(images.shape)
        columns = memory.reshape(memory.shape[0], rows, cols, -1).transpose(0, 2, 1, 3).reshape(memory.shape)
        logits = self.decode(tokens, self.cross_keys_values(memory), deterministic)
        return logits, self.ctc_head(columns).astype(jnp.float32)

    def cross_keys_values(self, memory: jax.Array) -> list[tuple[jax.Array, jax.Array]]:
        """Per decoder layer, the image's keys and values: computed once per decoded image."""
        return [block.cross_keys_values(memory) for block in self.blocks]

    def _embed(self, tokens: jax.Array, positions: jax.Array, deterministic: bool) -> jax.Array:
        x = self.token_embed(tokens) + self.position_embed[positions]
        return self.dropout(x.astype(self.cfg.dtype), deterministic=deterministic)

    def _logits(self, x: jax.Array) -> jax.Array:
        return self.head(self.norm(x)).astype(jnp.float32)

    def decode(self, tokens, cross_kv, deterministic: bool = True, cells: jax.Array | None = None) -> jax.Array:
        x = self._embed(tokens, jnp.arange(tokens.shape[1]), deterministic)
        for block, kv in zip(self.blocks, cross_kv):
            x = block(x, kv, cells, deterministic)
        return self._logits(x)

    def decode_step(self, token: jax.Array, position: jax.Array, cache: list[tuple[jax.Array, jax.Array]],
                    cross_kv, cells: jax.Array | None = None) -> tuple[jax.Array, list[tuple[jax.Array, jax.Array]]]:
        """One cached step: token [B] at position -> logits [B, vocab], and the cache (per layer
        its self-attention keys and values) with this position's written in."""
        x = self._embed(token[:, None], position[None], True)
        new_cache = []
        for block, kv, layer_cache in zip(self.blocks, cross_kv, cache):
            x, layer_cache = block.step(x, kv, cells, layer_cache, position)
            new_cache.append(layer_cache)
        return self._logits(x)[:, 0], new_cache


def init_cache(cfg: LatexOCRConfig, batch: int, length: int | None = None) -> list[tuple[jax.Array, jax.Array]]:
    shape = (batch, length or cfg.max_seq_len, cfg.heads, cfg.dim // cfg.heads)
    return [(jnp.zeros(shape, cfg.dtype), jnp.zeros(shape, cfg.dtype)) for _ in range(cfg.decoder_layers)]


class FeatureExtractor(nn.Module):
    """A bidirectional Transformer over `[CLS] tokens [SEP]`, with a masked-LM head and a
    bracket-depth head used only in pretraining."""

    cfg: FeatureExtractorConfig

    def setup(self):
        cfg = self.cfg
        self.token_embed = nn.Embed(cfg.vocab_size, cfg.dim, embedding_init=nn.initializers.normal(0.02))
        self.position_embed = self.param("position_embed", nn.initializers.normal(0.02),
                                         (cfg.max_seq_len, cfg.dim))
        self.blocks = [EncoderBlock(cfg) for _ in range(cfg.layers)]
        self.norm = nn.LayerNorm(dtype=cfg.dtype)
        self.mlm_head = nn.Dense(cfg.vocab_size, dtype=cfg.dtype)
        self.depth_head = nn.Dense(cfg.max_bracket_depth + 1, dtype=cfg.dtype)
        self.dropout = nn.Dropout(cfg.dropout)

    def __call__(self, tokens: jax.Array, deterministic: bool = True) -> jax.Array:
        """Hidden states [B, L, dim]; <PAD> positions are never attended to."""
        x = self.token_embed(tokens) + self.position_embed[: tokens.shape[1]]
        x = self.dropout(x.astype(self.cfg.dtype), deterministic=deterministic)
        keys = (tokens != PAD_ID)[:, None, None, :]
        for block in self.blocks:
            x = block(x, deterministic, keys)
        return self.norm(x)

    def pretraining_logits(self, tokens: jax.Array, deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
        hidden = self(tokens, deterministic)
        return self.mlm_head(hidden).astype(jnp.float32), self.depth_head(hidden).astype(jnp.float32)


def init_extractor_params(model: FeatureExtractor, seed: int) -> Any:
    return model.init(jax.random.PRNGKey(seed), jnp.full((1, 3), CLS_ID, jnp.int32),
                      method=FeatureExtractor.pretraining_logits)["params"]


def extractor_features(model: FeatureExtractor, params: Any, tokens: jax.Array, pooling: str) -> jax.Array:
    """tokens [B, L] (`[CLS] ids [SEP] <PAD>...`) -> features [B, dim]: the mean hidden state
    over non-<PAD> positions, or the [CLS] one."""
    hidden = model.apply({"params": params}, tokens).astype(jnp.float32)
    if pooling == "cls":
        return hidden[:, 0]
    weights = (tokens != PAD_ID).astype(jnp.float32)[..., None]
    return (hidden * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)


def make_features(model: FeatureExtractor, pooling: str):
    """The jitted `features(params, token_ids) -> [batch, dim]` that scores formulas."""
    return jax.jit(lambda params, token_ids: extractor_features(model, params, token_ids, pooling))


def cosine_similarity(a: jax.Array, b: jax.Array) -> jax.Array:
    return (a * b).sum(-1) / jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), 1e-8)


def init_params(model: LatexOCR, seed: int) -> Any:
    data_shape = (1, model.cfg.cell_height, model.cfg.cell_width, 1)
    return model.init(jax.random.PRNGKey(seed), jnp.zeros(data_shape), jnp.zeros((1, 2), jnp.int32),
                      method=LatexOCR.logits_and_ctc_logits)["params"]


def count_params(params: Any) -> int:
    return sum(x.size for x in jax.tree.leaves(params))


# --- decoding ---------------------------------------------------------------------------------

class Memory(NamedTuple):
    """What the decoder reads of a batch of encoded images: per decoder layer, the cross-attention
    keys and values [B, length, H, Dh], and which of the length cells hold the image [B, length]
    (the rest pad memories of different sizes to one length, so one decoder serves them all)."""
    keys_values: list[tuple[jax.Array, jax.Array]]
    cells: jax.Array


def encode_memory(model: LatexOCR, params: Any, images: jax.Array, length: int | None = None) -> Memory:
    """Encode images [B, H, W, 1] once for decoding; length: pad the memory to this many cells
    (default: the images' own)."""
    variables = {"params": params}
    keys_values = model.apply(variables, model.apply(variables, images, method=LatexOCR.encode),
                              method=LatexOCR.cross_keys_values)
    cells = keys_values[0][0].shape[1]
    length = length or cells
    pad = functools.partial(jnp.pad, pad_width=((0, 0), (0, length - cells), (0, 0), (0, 0)))
    return Memory(jax.tree.map(pad, keys_values), jnp.broadcast_to(jnp.arange(length) < cells, (images.shape[0], length)))


def step_function(model: LatexOCR, params: Any, memory: Memory):
    """The decoder as the searches below see it (flax wmt's tokens_to_logits): (token [B * beams],
    position, cache) -> (logits [B * beams, vocab], cache with this position written in), rows
    image-major, for the memory of B images."""
    def tokens_to_logits(token, position, cache):
        return model.apply({"params": params}, token, position, cache, memory.keys_values, memory.cells,
                           method=LatexOCR.decode_step)
    return tokens_to_logits


def cache_segments(max_seq_len: int) -> list[int]:
    return [n for n in (64, 128) if n < max_seq_len] + [max_seq_len]


def run_in_segments(keep_going, step, state: dict[str, Any], segments: Sequence[int]) -> dict[str, Any]:
    """Run a decoding while_loop whose self-attention cache starts short and is lengthened to the
    next segment only when the position reaches its end. Every step reads the whole cache, so
    a 50-token formula then reads 64 cached positions per step instead of max_seq_len."""
    for length in segments:
        def lengthen(x, length=length):
            return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))

        def within(s, length=length):
            return keep_going(s) & (s["position"] < length - 1)

        state = jax.lax.while_loop(within, step, {**state, "cache": jax.tree.map(lengthen, state["cache"])})
    return state


def decode_loop(tokens_to_logits, cfg: LatexOCRConfig, batch: int, pick, key: jax.Array):
    """The cached decoding loop shared by greedy decoding and sampling: one lax.while_loop that
    stops when every row has emitted <EOS>. `pick(logits [B, vocab], key) -> tokens [B]`.
    Returns tokens [B, max_seq_len] (<SOS> first, <PAD> after <EOS>) and the summed
    log-probability of each row's tokens [B]."""
    segments = cache_segments(cfg.max_seq_len)

    def keep_going(s):
        return ~jnp.all(s["done"])

    def step(s):
        position, done = s["position"], s["done"]
        logits, cache = tokens_to_logits(s["tokens"][:, position], position, s["cache"])  # [B, vocab]
        chosen = pick(logits, jax.random.fold_in(key, position)).astype(jnp.int32)  # [B]
        chosen_log_prob = jnp.take_along_axis(jax.nn.log_softmax(logits), chosen[:, None], 1)[:, 0]  # [B]
        next_token = jnp.where(done, PAD_ID, chosen)  # [B]
        return dict(position=position + 1, tokens=s["tokens"].at[:, position + 1].set(next_token),
                    log_prob=s["log_prob"] + jnp.where(done, 0.0, chosen_log_prob), cache=cache,
                    done=done | (next_token == EOS_ID))

    state = dict(position=jnp.int32(0),
                 tokens=jnp.full((batch, cfg.max_seq_len), PAD_ID, jnp.int32).at[:, 0].set(SOS_ID),
                 log_prob=jnp.zeros(batch), cache=init_cache(cfg, batch, segments[0]), done=jnp.zeros(batch, bool))
    state = run_in_segments(keep_going, step, state, segments)
    return state["tokens"], state["log_prob"]


def greedy_pick(logits: jax.Array, key: jax.Array) -> jax.Array:
    return jnp.argmax(logits, -1)


def greedy_decode(model: LatexOCR, params: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    tokens_to_logits = step_function(model, params, encode_memory(model, params, images))
    return decode_loop(tokens_to_logits, model.cfg, images.shape[0], greedy_pick, jax.random.PRNGKey(0))


def sample_decode(model: LatexOCR, params: Any, images: jax.Array, key: jax.Array,
                  temperature: float) -> tuple[jax.Array, jax.Array]:
    """Draw one sequence per image from the model's distribution sharpened (T < 1) or flattened
    (T > 1) by the temperature; the log-probabilities returned are those of the model itself."""
    tokens_to_logits = step_function(model, params, encode_memory(model, params, images))
    return decode_loop(tokens_to_logits, model.cfg, images.shape[0],
                       lambda logits, step_key: jax.random.categorical(step_key, logits / temperature), key)


def length_normalised(log_prob: jax.Array, length: jax.Array, length_penalty: float) -> jax.Array:
    """Summed log-probability / length ** length_penalty (length counts <EOS>, not <SOS>)."""
    return log_prob / jnp.maximum(length, 1).astype(jnp.float32) ** length_penalty


def sequence_lengths(tokens: jax.Array) -> jax.Array:
    """Generated tokens per row, <EOS> included: everything after <SOS> that is not <PAD>."""
    return jnp.sum(tokens[..., 1:] != PAD_ID, axis=-1)


def gather_beams(x: jax.Array, beams: jax.Array) -> jax.Array:
    """x [B, width, ...] -> x[b, beams[b, j]] [B, len(beams[b]), ...]."""
    return jnp.take_along_axis(x, beams.reshape(*beams.shape, *[1] * (x.ndim - 2)), 1)


def best_beam(scores: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per image the highest score [B] and its beam's tokens [B, L], of scores [B, width] and
    tokens [B, width, L]."""
    top = jnp.argmax(scores, 1)[:, None]  # [B, 1]
    return jnp.take_along_axis(scores, top, 1)[:, 0], gather_beams(tokens, top)[:, 0]


def beam_loop(tokens_to_logits, cfg: LatexOCRConfig, batch: int, beam_width: int,
              length_penalty: float) -> tuple[jax.Array, jax.Array]:
    """Batched beam search over the KV cache in one lax.while_loop, which stops when every beam
    of every image has emitted <EOS> or can no longer beat the best finished one (or at
    max_seq_len). tokens_to_logits reads rows image-major ([B * width]). Returns the best
    hypothesis per image, tokens [B, max_seq_len], and its length-normalised score [B].

    Beams are ranked by summed log-probability. A finished beam stays in its slot, extended only
    by <PAD> at no cost, until better live beams push it out; the best finished hypothesis by
    length-normalised score is also kept aside, so a pushed-out one is never lost. Slot 0 follows
    the greedy path until greedy emits <EOS>, so the answer never scores below greedy decoding
    (the original's beam search could lose its best hypothesis); beam_width 1 is greedy."""
    width, length, vocab = beam_width, cfg.max_seq_len, cfg.vocab_size
    segments = cache_segments(length)
    slot = jnp.arange(width)
    word = jnp.arange(vocab)
    # Only slot 0 is live at the start; the others are dead (score -inf) until filled.
    state = dict(
        position=jnp.int32(0),
        tokens=jnp.full((batch, width, length), PAD_ID, jnp.int32).at[:, :, 0].set(SOS_ID),
        log_prob=jnp.where(slot == 0, 0.0, -jnp.inf)[None].repeat(batch, 0),
        done=(slot > 0)[None].repeat(batch, 0),
        on_greedy_path=jnp.ones(batch, bool),
        cache=init_cache(cfg, batch * width, segments[0]),
        best_tokens=jnp.full((batch, length), PAD_ID, jnp.int32).at[:, 0].set(SOS_ID),
        best_score=jnp.full(batch, -jnp.inf),
    )

    def keep_going(s):
        # A live beam's score can only fall, so its best possible outcome is its current
        # log-probability spread over the longest possible length; once that cannot beat the
        # best finished hypothesis (and the greedy path has ended), it is dropped.
        hopeful = ~s["done"] & (s["log_prob"] / float(length - 1) ** length_penalty > s["best_score"][:, None])
        return jnp.any(jnp.any(hopeful, axis=1) | s["on_greedy_path"])

    def step(s):
        position = s["position"]
        logits, cache = tokens_to_logits(s["tokens"][:, :, position].reshape(-1), position, s["cache"])
        log_probs = jax.nn.log_softmax(logits).reshape(batch, width, vocab)
        pad_only = jnp.where(word == PAD_ID, 0.0, -jnp.inf)  # [vocab]
        candidates = s["log_prob"][:, :, None] + jnp.where(s["done"][:, :, None], pad_only, log_probs)  # [B, width, vocab]
        greedy_token = jnp.argmax(log_probs[:, 0], -1)  # [B]
        forced = (s["on_greedy_path"][:, None, None] & (slot == 0)[None, :, None]
                  & (word[None, None, :] == greedy_token[:, None, None]))  # [B, width, vocab]
        _, chosen = jax.lax.top_k(jnp.where(forced, jnp.inf, candidates).reshape(batch, -1), width)  # [B, width]
        parent, token = chosen // vocab, (chosen % vocab).astype(jnp.int32)  # [B, width] each
        log_prob = jnp.take_along_axis(candidates.reshape(batch, -1), chosen, 1)  # [B, width]
        parent_done = gather_beams(s["done"], parent)  # [B, width]
        tokens = gather_beams(s["tokens"], parent).at[:, :, position + 1].set(token)  # [B, width, L]
        finished_now = (token == EOS_ID) & ~parent_done  # [B, width]
        score = jnp.where(finished_now, length_normalised(log_prob, position + 1, length_penalty), -jnp.inf)
        top_score, top_tokens = best_beam(score, tokens)  # [B], [B, L]
        rows = (jnp.arange(batch)[:, None] * width + parent).reshape(-1)  # [B * width]
        return dict(
            position=position + 1, tokens=tokens, log_prob=log_prob, done=parent_done | (token == EOS_ID),
            on_greedy_path=s["on_greedy_path"] & (greedy_token != EOS_ID),
            cache=jax.tree.map(lambda x: x[rows], cache),
            best_tokens=jnp.where((top_score > s["best_score"])[:, None], top_tokens, s["best_tokens"]),
            best_score=jnp.maximum(top_score, s["best_score"]),
        )

    s = run_in_segments(keep_going, step, state, segments)
    # Beams still live here were cut off at max_seq_len; they compete too, so that a greedy path
    # that never ends is still a candidate.
    live_score, live_tokens = best_beam(
        jnp.where(s["done"], -jnp.inf, length_normalised(s["log_prob"], s["position"], length_penalty)), s["tokens"])
    return (jnp.where((live_score > s["best_score"])[:, None], live_tokens, s["best_tokens"]),
            jnp.maximum(live_score, s["best_score"]))


def decode_memory(model: LatexOCR, params: Any, memory: Memory, beam_width: int,
                  length_penalty: float) -> tuple[jax.Array, jax.Array]:
    """Tokens [B, max_seq_len] and length-normalised scores [B] read from encoded images: greedy
    at beam_width 1 (its scores comparable with beam search's), else beam search."""
    batch = memory.cells.shape[0]
    if beam_width == 1:
        tokens, log_prob = decode_loop(step_function(model, params, memory), model.cfg, batch, greedy_pick,
                                       jax.random.PRNGKey(0))
        return tokens, length_normalised(log_prob, sequence_lengths(tokens), length_penalty)
    return beam_loop(step_function(model, params, memory), model.cfg, batch, beam_width, length_penalty)


def beam_search(model: LatexOCR, params: Any, images: jax.Array, beam_width: int,
                length_penalty: float) -> tuple[jax.Array, jax.Array]:
    """beam_loop over images [B, H, W, 1] (at any width, 1 included)."""
    memory = encode_memory(model, params, images)
    return beam_loop(step_function(model, params, memory), model.cfg, images.shape[0], beam_width, length_penalty)


def best_scored(owners: Sequence[int], scores: Sequence[float]) -> list[int]:
    """Entry i is a reading of image owners[i] (owners run 0, 1, ... in order; an entry not read
    scores -inf); per image, the entry whose answer scored best (the first on a tie)."""
    best: dict[int, int] = {}
    for entry, owner in enumerate(owners):
        if owner not in best or scores[entry] > scores[best[owner]]:
            best[owner] = entry
    return [best[owner] for owner in range(len(best))]


class Reading(NamedTuple):
    """An image's answer: its tokens and score, which of its size variants gave it (0: as
    preprocessing leaves it), and how many of them were read."""
    tokens: list[str]
    score: float
    variant: int
    sizes_read: int


def other_sizes_to_read(owners: Sequence[int], variants: Sequence[int], scores: Sequence[float],
                        confident_score: float) -> list[int]:
    """The entries (variant > 0) of the images whose first reading (variant 0) scored at most
    confident_score."""
    unsure = {owner for owner, variant, score in zip(owners, variants, scores) if variant == 0 and score <= confident_score}
    return [entry for entry, (owner, variant) in enumerate(zip(owners, variants)) if variant > 0 and owner in unsure]


# The source this process runs, read once: a long-running process (serve) must not file the programs
# it traces under the name of a newer version installed over it.
SOURCE_DIGEST = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def program_path(directory: Path, kind: str, *parts: Any) -> Path:
    """Where a traced program is kept: its name changes with this module's source, the JAX
    version and backend, and the parts that shape it."""
    key = repr([SOURCE_DIGEST, jax.__version__, jax.default_backend(), *parts])
    return directory / f"{kind}-{hashlib.sha256(key.encode()).hexdigest()[:32]}.bin"


# Every new version of this module or of JAX names its programs anew; the old ones would pile
# up, so storing a program deletes those that nobody has read for this many days.
UNUSED_PROGRAM_DAYS = 30


def remove_unused_programs(directory: Path, now: float) -> None:
    for path in directory.iterdir():
        with contextlib.suppress(OSError):  # another process may be removing it too
            if now - path.stat().st_mtime > UNUSED_PROGRAM_DAYS * 86400:
                path.unlink()


def exported_program(path: Path, export) -> jax.export.Exported:
    """The traced program stored at path, or export() written there whole (or not at all: a
    read-only cache only costs the tracing). A file that does not read back is traced again.
    Reading a program marks it as in use (its modification time)."""
    try:
        exported = jax.export.deserialize(bytearray(path.read_bytes()))
        with contextlib.suppress(OSError):
            os.utime(path)
        return exported
    except FileNotFoundError:
        pass
    except Exception:  # a truncated or foreign file fails in flatbuffers or jax with many types
        print(f"latexocr: traced program {path} is unreadable; tracing it again", file=sys.stderr)
    exported = export()
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_unused_programs(path.parent, time.time())
        temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        temporary.write_bytes(exported.serialize())
        os.replace(temporary, path)
    return exported


def memory_lengths(cfg: LatexOCRConfig, data: DataSection) -> list[int]:
    """The cell counts image memories are padded to for decoding: 256 and 1,024 (a one-line formula of
    IM2LATEX-100K's size fills up to 64 x 512 px, 256 cells of 16 x 8) where below the largest
    bucket's cells, then those. Few lengths, few decoders; each padded cell costs every step."""
    most = max(math.prod(cfg.cell_grid((1, height, width))) for height in data.bucket_heights
               for width in data.bucket_widths)
    return [n for n in (256, 1024) if n < most] + [most]


def ink_columns(canvas: np.ndarray) -> int:
    return int(np.count_nonzero(canvas.max(axis=0)))


def return_freed_memory() -> None:
    """Give the system back what the allocator keeps of freed memory (glibc's malloc_trim): XLA frees
    a decoder's working memory or dropped programs into the heap, where the process keeps it."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class Predictor:
    """A model with its parameters and vocabulary, and its jitted programs: an encoder per image
    shape and a decoder per batch size, memory length and beam width.

    With a program_dir, each program is also traced only once across processes: tracing the
    decoding loops takes longer than reading their compiled code from the compilation cache,
    so a new `predict` process reads the traced program (jax.export) from program_dir."""

    def __init__(self, model: LatexOCR, params: Any, vocab: Vocabulary, data: DataSection,
                 decoding: EvaluationSection = EvaluationSection(), program_dir: Path | None = None):
        self.model, self.params, self.vocab, self.data = model, params, vocab, data
        self.size_factors, self.confident_score = tuple(decoding.size_factors), decoding.confident_score
        self.size_prior = decoding.size_prior
        self.length_penalty = decoding.length_penalty
        self.memory_lengths = memory_lengths(model.cfg, data)
        self.program_dir = program_dir
        self._programs: dict[Any, Any] = {}

    def with_params(self, params: Any) -> Predictor:
        """The same programs (compiled once) reading other parameters."""
        twin = copy.copy(self)
        twin.params = params
        return twin

    def _program(self, kind: str, parts: tuple, function, *arrays):
        """function(params, *arrays) jitted, once per kind, parts and input shapes; with a
        program_dir, traced once across processes and read back from there."""
        specs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (self.params, *arrays))
        key = (kind, parts, jax.tree_util.tree_structure(specs), tuple(jax.tree.leaves(specs)))
        if key not in self._programs:
            program = jax.jit(function)
            if self.program_dir is not None:
                path = program_path(self.program_dir, kind, dataclasses.asdict(self.model.cfg), *parts,
                                    jax.tree_util.tree_structure(specs), specs)
                program = jax.jit(exported_program(path, lambda: jax.export.export(program)(*specs)).call)
            self._programs[key] = program
        return self._programs[key](self.params, *arrays)

    def encode(self, images: np.ndarray, length: int | None = None) -> Memory:
        """images [B, H, W, 1] -> their Memory, padded to length cells (default: their own)."""
        keys_values, cells = self._program(
            "encoder", (length,), lambda p, x: tuple(encode_memory(self.model, p, x, length)), images)
        return Memory(keys_values, cells)

    def decode_memory(self, memory: Memory, beam_width: int = 1) -> tuple[list[list[str]], np.ndarray]:
        """Token lists and their length-normalised log-probabilities, read from encoded images."""
        ids, scores = self._program(
            "decoder", (self.length_penalty, beam_width),
            lambda p, kv, cells: decode_memory(self.model, p, Memory(kv, cells), beam_width, self.length_penalty),
            *memory)
        return [self.vocab.decode(row) for row in np.asarray(ids)], np.asarray(scores)

    def memory_length(self, image_shape: Sequence[int]) -> int:
        """The smallest of memory_lengths that holds the cells of images [B, H, W, ...]."""
        cells = math.prod(self.model.cfg.cell_grid(image_shape))
        return next(n for n in self.memory_lengths if n >= cells)

    def decode_batch(self, images: np.ndarray, beam_width: int = 1) -> tuple[list[list[str]], np.ndarray]:
        """images [B, H, W, 1] of one shape -> token lists and their length-normalised log-probabilities.
        The memory is padded to the next power of two cells (at most the largest bucket's): a
        handful of decoders serve every bucket shape, and padding costs little of a decoding step.
        (predict_images pads further, to load fewer programs in a short process.)"""
        cells = math.prod(self.model.cfg.cell_grid(images.shape))
        return self.decode_memory(self.encode(images, min(1 << (cells - 1).bit_length(), self.memory_lengths[-1])),
                                  beam_width)

    def predict_images(self, canvases: Sequence[np.ndarray], beam_width: int = 1,
                       batch_size: int = 16) -> list[tuple[list[str], float]]:
        """Decode preprocessed canvases of any bucket shapes: each encoded alone and its memory
        padded to the smallest of memory_lengths that holds it, then the memories of a length
        decoded together, widest ink first (a batch runs until its longest answer ends), in batches
        padded to a power of two, so few programs compile. (tokens, score) per canvas, in order."""
        results: list[tuple[list[str], float]] = [([], 0.0) for _ in canvases]
        by_length: dict[int, list[int]] = collections.defaultdict(list)
        for i, canvas in enumerate(canvases):
            by_length[self.memory_length((1, *canvas.shape))].append(i)
        for length, members in by_length.items():
            members.sort(key=lambda i: -ink_columns(canvases[i]))
            for start in range(0, len(members), batch_size):
                chunk = members[start: start + batch_size]
                memories = [self.encode(canvases[i][None, ..., None], length) for i in chunk]
                memories += memories[-1:] * (min(batch_size, 1 << (len(chunk) - 1).bit_length()) - len(chunk))
                tokens, scores = self.decode_memory(jax.tree.map(lambda *rows: np.concatenate(rows), *memories), beam_width)
                del memories
                return_freed_memory()  # else the next batch's peak stacks on this one's freed memory
                for i, row, score in zip(chunk, tokens, scores):
                    results[i] = (row, float(score))
        return results

    def preprocess(self, image: Image.Image, name: str = "image") -> list[SizedImage]:
        """The canvases an image is read from (see preprocess_image)."""
        return preprocess_image(image, self.data, name, self.size_factors)

    def read(self, images: Sequence[str | Path | bytes | Image.Image | np.ndarray],
             beam_width: int = 1) -> list[Reading]:
        """Read images given as paths, encoded file bytes, PIL images or uint8 arrays (gray, RGB
        or RGBA), decoding same-size ones together; a Reading per image, in order."""
        def as_image(number: int, source) -> Image.Image:
            if isinstance(source, (str, Path)):
                return open_image(source)
            if isinstance(source, bytes):
                return decode_image(io.BytesIO(source), f"number {number} (bytes)")
            if isinstance(source, np.ndarray):
                return Image.fromarray(source)
            return source

        return self.read_images([self.preprocess(as_image(n, image), f"image {n}") for n, image in enumerate(images)],
                                beam_width)

    def read_best(self, owners: Sequence[int], sizes: Sequence[int], factors: Sequence[float],
                  decode) -> tuple[list[tuple[list[str], float]], list[int]]:
        """The two rounds of reading: every entry at size 0 (as preprocessing leaves its image),
        then the other sizes of the images whose first answer scores at most confident_score.
        decode(entries) answers those entries, (tokens, score) each, in order. Returns every
        entry's answer (unread: no tokens, score -inf) and, per image, the entry kept: the best
        by score + size_prior x log2(its factor)."""
        answers: list[tuple[list[str], float]] = [([], -math.inf)] * len(owners)

        def read(entries: list[int]) -> list[float]:
            for entry, answer in zip(entries, decode(entries)):
                answers[entry] = answer
            return [score for _, score in answers]

        scores = read([entry for entry, size in enumerate(sizes) if size == 0])
        scores = read(other_sizes_to_read(owners, sizes, scores, self.confident_score))
        preferences = [score + self.size_prior * math.log2(factor) for score, factor in zip(scores, factors)]
        return answers, best_scored(owners, preferences)

    def read_images(self, variants: Sequence[Sequence[SizedImage]], beam_width: int = 1,
                    batch_size: int = 16) -> list[Reading]:
        """Read every image (its canvases, as `preprocess` makes them, the first read first) and
        keep, per image, the best answer (see read_best)."""
        canvases = [sized.image for image in variants for sized in image]
        factors = [sized.factor for image in variants for sized in image]
        owners = [owner for owner, image in enumerate(variants) for _ in image]
        sizes = [size for image in variants for size in range(len(image))]
        answers, kept = self.read_best(
            owners, sizes, factors,
            lambda entries: self.predict_images([canvases[e] for e in entries], beam_width, batch_size))
        read_count = collections.Counter(owner for owner, (_, score) in zip(owners, answers) if score > -math.inf)
        return [Reading(*answers[entry], sizes[entry], read_count[image]) for image, entry in enumerate(kept)]

    def read_dataset(self, dataset: Dataset, batch_size: int, beam_width: int = 1,
                     progress: bool = False) -> tuple[list[int], list[list[str]], int]:
        """read_best over a Dataset's size variants: per distinct example, the entry kept and
        its answer, and how many entries were read. With beam search, batch_size counts beams
        (images x width)."""
        from tqdm import tqdm

        def decode(entries: list[int]) -> list[tuple[list[str], float]]:
            answers = {}
            batches = dataset.ordered_batches(max(1, batch_size // beam_width), entries)
            for indices, count in tqdm(batches, desc="decoding", disable=not progress, leave=False):
                decoded, scores = self.decode_batch(dataset.batch(indices)["images"], beam_width)
                answers.update(zip(indices[:count].tolist(), zip(decoded[:count], scores[:count].tolist())))
            return [answers[entry] for entry in entries]

        answers, kept = self.read_best(dataset.owners, dataset.variants, dataset.factors, decode)
        return kept, [answers[i][0] for i in kept], sum(score > -math.inf for _, score in answers)


# --- metrics ----------------------------------------------------------------------------------

def bleu4(references: Sequence[Sequence[str]], hypotheses: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 (nltk, uniform weights, no smoothing), x100."""
    from nltk.translate.bleu_score import corpus_bleu

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return 100.0 * corpus_bleu([[list(r)] for r in references], [list(h) for h in hypotheses])


def sentence_bleu4(reference: Sequence, hypothesis: Sequence) -> float:
    """One formula's BLEU in [0, 1]: up to 4-grams, fewer when either side is shorter (so a
    right 2-token formula scores 1), smoothed (nltk method 1) so that a partly right formula
    without a matching 4-gram still scores above 0."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    orders = min(4, len(reference), len(hypothesis))
    if orders == 0:
        return float(len(reference) == len(hypothesis))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(sentence_bleu([list(reference)], list(hypothesis), weights=[1 / orders] * orders,
                                   smoothing_function=SmoothingFunction().method1))


def edit_similarity(reference: Sequence, hypothesis: Sequence) -> float:
    """1 - token Levenshtein distance / max(len ref, len hyp): 1 for equal sequences, 0 for nothing in common."""
    import Levenshtein

    return 1.0 - Levenshtein.distance(list(reference), list(hypothesis)) / max(len(reference), len(hypothesis), 1)


def edit_distance(references, hypotheses) -> float:
    """Mean over the set of token Levenshtein distance / max(len ref, len hyp), x100 (lower is better)."""
    scores = [1.0 - edit_similarity(r, h) for r, h in zip(references, hypotheses)]
    return 100.0 * float(np.mean(scores)) if scores else 0.0


def exact_match(references, hypotheses) -> float:
    matches = [list(r) == list(h) for r, h in zip(references, hypotheses)]
    return 100.0 * float(np.mean(matches)) if matches else 0.0


def token_accuracy(references, hypotheses) -> float:
    """The original project's per-token accuracy: position-wise matched tokens over
    min(len ref, len hyp), both summed over the set, x100."""
    matched = sum(sum(a == b for a, b in zip(r, h)) for r, h in zip(references, hypotheses))
    total = sum(min(len(r), len(h)) for r, h in zip(references, hypotheses))
    return 100.0 * matched / total if total else 0.0


def compute_metrics(references, hypotheses) -> dict[str, float]:
    return {"bleu": bleu4(references, hypotheses), "edit_distance": edit_distance(references, hypotheses),
            "exact_match": exact_match(references, hypotheses),
            "token_accuracy": token_accuracy(references, hypotheses)}


def format_metrics(metrics: dict[str, float]) -> str:
    names = {"bleu": "BLEU-4", "edit_distance": "edit distance", "exact_match": "exact match %",
             "token_accuracy": "token accuracy %"}
    return "\n".join(f"{names[k]:<18}{metrics[k]:8.2f}" for k in names if k in metrics)


# --- losses and steps -------------------------------------------------------------------------

def cross_entropy(logits: jax.Array, targets: jax.Array, label_smoothing: float) -> tuple[jax.Array, jax.Array]:
    """Mean label-smoothed cross-entropy over non-<PAD> targets, and the count of those targets."""
    import optax

    vocab_size = logits.shape[-1]
    labels = optax.smooth_labels(jax.nn.one_hot(targets, vocab_size), label_smoothing)
    losses = optax.softmax_cross_entropy(logits, labels)
    weights = (targets != PAD_ID).astype(jnp.float32)
    count = jnp.maximum(weights.sum(), 1.0)
    return (losses * weights).sum() / count, count


def learning_rate(training: TrainingSection, update: int) -> float:
    """The rate of optimizer update `update`: linear warmup from 0 to training.lr, then cosine
    decay to 1 % of it at total_steps."""
    if update < training.warmup_steps:
        return training.lr * update / training.warmup_steps
    decay_steps = max(training.total_steps - training.warmup_steps, 1)
    cosine = 0.5 * (1 + math.cos(math.pi * min(update - training.warmup_steps, decay_steps) / decay_steps))
    return training.lr * (0.01 + 0.99 * cosine)


def make_optimizer(training: TrainingSection) -> optax.GradientTransformation:
    """Clipped AdamW whose updates are for a learning rate of 1: each step scales them by the rate
    it is given (make_step), so a new schedule compiles no new programs. The rate is a schedule,
    not the constant 1, so that the optimizer state keeps its update count, as checkpoints hold it."""
    import optax

    optimizer = optax.chain(optax.clip_by_global_norm(training.grad_clip),
                            optax.adamw(lambda count: 1.0, weight_decay=training.weight_decay))
    if training.grad_accum_steps > 1:
        optimizer = optax.MultiSteps(optimizer, every_k_schedule=training.grad_accum_steps)
    return optimizer


def make_step(loss_and_metrics, optimizer: optax.GradientTransformation):
    """Jitted (params, opt_state, batch, key, learning rate) -> (params, opt_state, metrics),
    buffers donated, for any `loss_and_metrics(params, batch, key) -> (loss, metrics)`."""
    import optax

    def step(params, opt_state, batch, key, lr):
        (loss, metrics), grads = jax.value_and_grad(loss_and_metrics, has_aux=True)(params, batch, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, jax.tree.map(lambda update: lr * update, updates))
        return params, opt_state, {"loss": loss, **metrics, "grad_norm": optax.tree.norm(grads)}

    return jax.jit(step, donate_argnums=(0, 1))


def ocr_cross_entropy(model: LatexOCR, params: Any, batch: dict[str, jax.Array], key: jax.Array,
                      label_smoothing: float) -> tuple[jax.Array, jax.Array]:
    """Teacher-forced cross-entropy of the reference captions, with dropout."""
    tokens = batch["tokens"]
    logits = model.apply({"params": params}, batch["images"], tokens[:, :-1], deterministic=False,
                         rngs={"dropout": key})
    return cross_entropy(logits, tokens[:, 1:], label_smoothing)


def image_reliance(logits_fn, params: Any, dataset: Dataset, rows: int) -> dict[str, float]:
    """How much the decoder reads the image: the teacher-forced loss (nats per token, no label
    smoothing) of the largest same-shape group of validation examples, with their own images and
    with each row given the next row's image. A decoder that has become a language model of LaTeX
    and ignores the image scores both the same (`image_gain` near 0), however low its loss.
    logits_fn: jitted (params, images, input tokens) -> logits."""
    members = max(dataset.groups().values(), key=len)[:rows]
    if len(members) < 2:
        return {}
    batch = dataset.batch(np.asarray(members))
    images, tokens = jnp.asarray(batch["images"]), jnp.asarray(batch["tokens"])

    def loss(shown: jax.Array) -> float:
        return float(cross_entropy(logits_fn(params, shown, tokens[:, :-1]), tokens[:, 1:], 0.0)[0])

    own = loss(images)
    return {"val_loss": own, "image_gain": loss(jnp.roll(images, 1, axis=0)) - own}


def ctc_loss(ctc_logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """CTC loss (nats per target token) of the caption tokens `targets` [B, L] (<EOS> and <PAD>
    left out) read off the image cells [B, cells, vocab], <PAD> as CTC's blank; and the fraction of
    rows it counts. A caption needs a cell per token plus one per repeated token, so a row whose
    image has too few cells is left out rather than scored infinite.

    Why: trained by cross-entropy alone, the decoder learned LaTeX as a language model and the
    image memory became the same vector at every cell (cross-attention spread evenly gives every
    cell the same gradient); this loss makes each cell say which tokens it shows."""
    import optax

    padding = ((targets == PAD_ID) | (targets == EOS_ID)).astype(jnp.float32)
    lengths = (1 - padding).sum(-1)
    repeats = ((targets[:, 1:] == targets[:, :-1]) & (padding[:, 1:] == 0)).sum(-1)
    feasible = (lengths + repeats <= ctc_logits.shape[1]).astype(jnp.float32)
    losses = optax.ctc_loss(ctc_logits, jnp.zeros(ctc_logits.shape[:2]), targets, padding, blank_id=PAD_ID)
    return (losses * feasible).sum() / jnp.maximum((lengths * feasible).sum(), 1.0), feasible.mean()


def make_train_step(model: LatexOCR, optimizer: optax.GradientTransformation, label_smoothing: float,
                    ctc_weight: float):
    """The OCR model's step: cross-entropy of the decoder + ctc_weight * CTC of the image memory
    (not computed at all when ctc_weight is 0)."""

    def loss_and_metrics(params, batch, key):
        if not ctc_weight:
            ce, count = ocr_cross_entropy(model, params, batch, key, label_smoothing)
            return ce, {"tokens": count, "ce": ce}
        tokens = batch["tokens"]
        logits, ctc_logits = model.apply({"params": params}, batch["images"], tokens[:, :-1], deterministic=False,
                                         rngs={"dropout": key}, method=LatexOCR.logits_and_ctc_logits)
        ce, count = cross_entropy(logits, tokens[:, 1:], label_smoothing)
        ctc, ctc_rows = ctc_loss(ctc_logits, tokens[:, 1:])
        return ce + ctc_weight * ctc, {"tokens": count, "ce": ce, "ctc": ctc, "ctc_rows": ctc_rows}

    return make_step(loss_and_metrics, optimizer)


def sequence_log_probs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Summed log-probability of each row's targets [B, L] (<EOS> included, <PAD> not) under
    teacher-forced logits [B, L, vocab]: differentiable, unlike the sampler's running sum."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
    chosen = jnp.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    return (chosen * (targets != PAD_ID)).sum(-1)


def reinforce_loss(log_probs: jax.Array, advantages: jax.Array) -> jax.Array:
    """mean(-log p(sample) * advantage) with the advantage held constant: its gradient raises the
    probability of samples that beat the baseline and lowers that of the others."""
    return -(log_probs * jax.lax.stop_gradient(advantages)).mean()


def as_extractor_input(tokens: jax.Array) -> jax.Array:
    """Decoder rows (<SOS> ids <EOS> <PAD>...) framed as the extractor reads formulas ([CLS] ids [SEP] <PAD>...)."""
    return jnp.where(tokens == SOS_ID, CLS_ID, jnp.where(tokens == EOS_ID, SEP_ID, tokens))


def formula_ids(row: np.ndarray) -> list[int]:
    """The formula's token ids in a decoder row: after <SOS>, up to <EOS> or the end."""
    ids = [int(t) for t in row[1:]]
    return ids[: ids.index(EOS_ID)] if EOS_ID in ids else [t for t in ids if t != PAD_ID]


def text_rewards(rl: RLSection, references: Sequence[list[int]], hypotheses: Sequence[list[int]]) -> np.ndarray:
    """The parts of each sample's reward computed from its tokens on the host: BLEU, edit
    similarity and the exact-match bonus (the extractor's part is added on the device)."""
    rewards = np.zeros(len(references), np.float32)
    for i, (reference, hypothesis) in enumerate(zip(references, hypotheses)):
        if rl.bleu_weight:
            rewards[i] += rl.bleu_weight * sentence_bleu4(reference, hypothesis)
        if rl.edit_weight:
            rewards[i] += rl.edit_weight * edit_similarity(reference, hypothesis)
        rewards[i] += rl.exact_match_bonus * (reference == hypothesis)
    return rewards


def trim_to_bucket(rows: np.ndarray, least: int, buckets: Sequence[int]) -> np.ndarray:
    """Decoded rows [B, max_seq_len] cut to the smallest sequence bucket that holds every row
    and is at least `least` (the references' width, so one shape serves both most of the time)."""
    longest = max(least, int(np.max(np.sum(rows != PAD_ID, axis=1))))
    return rows[:, : next((b for b in sorted(buckets) if b >= longest), rows.shape[1])]


def make_rl_step(model: LatexOCR, optimizer: optax.GradientTransformation, label_smoothing: float,
                 rl: RLSection, sequence_buckets: Sequence[int], extractor: tuple[Any, Any] | None = None):
    """The stage-2 step: draw one sequence per image with the KV-cached sampler (and, for the
    self-critical baseline, the greedy one), score it against the reference on the host, then
    one jitted update of ce_weight * CE + lambda_rl * REINFORCE. The sampled sequences'
    log-probabilities are recomputed teacher-forced so that they carry gradient. `extractor` is
    the frozen (features function, parameters) when rl.extractor_weight > 0."""
    decoded_names = ("samples", "greedy") if rl.baseline == "self_critical" else ("samples",)

    @jax.jit
    def decode(params, images, key):
        decoded = {"samples": sample_decode(model, params, images, jax.random.fold_in(key, 1), rl.temperature)[0]}
        if rl.baseline == "self_critical":
            decoded["greedy"] = greedy_decode(model, params, images)[0]
        return decoded

    def rewards_of(batch, name):
        rewards = batch[f"{name}_reward"]
        if extractor is not None:
            features, extractor_params = extractor[0], batch["extractor"]
            reference = features(extractor_params, as_extractor_input(batch["tokens"]))
            candidate = features(extractor_params, as_extractor_input(batch[name]))
            rewards = rewards + rl.extractor_weight * cosine_similarity(candidate, reference)
        return rewards

    def loss_and_metrics(params, batch, key):
        samples = batch["samples"]
        # The policy that drew the samples, so no dropout here.
        logits = model.apply({"params": params}, batch["images"], samples[:, :-1])
        rewards = rewards_of(batch, "samples")
        baseline = rewards.mean() if rl.baseline == "mean" else rewards_of(batch, "greedy")
        rl_loss = reinforce_loss(sequence_log_probs(logits, samples[:, 1:]), rewards - baseline)
        metrics = {"rl_loss": rl_loss, "reward": rewards.mean(), "exact": batch["exact"].mean()}
        if rl.ce_weight == 0:
            return rl.lambda_rl * rl_loss, metrics
        ce_loss, count = ocr_cross_entropy(model, params, batch, key, label_smoothing)
        return rl.ce_weight * ce_loss + rl.lambda_rl * rl_loss, {"ce_loss": ce_loss, "tokens": count, **metrics}

    update = make_step(loss_and_metrics, optimizer)

    @functools.lru_cache(maxsize=1)
    def replicated_extractor(mesh: jax.sharding.Mesh):
        return to_global(extractor[1], jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))

    def step(params, opt_state, batch, key, lr):
        rows = batch["images"].sharding
        decoded = jax.device_put(decode(params, batch["images"], key), rows)
        reference_rows = local_rows(batch["tokens"])
        references = [formula_ids(row) for row in reference_rows]
        extra = {}
        for name in decoded_names:
            tokens = local_rows(decoded[name])
            hypotheses = [formula_ids(row) for row in tokens]
            extra[name] = trim_to_bucket(tokens, reference_rows.shape[1], sequence_buckets)
            extra[f"{name}_reward"] = text_rewards(rl, references, hypotheses)
            if name == "samples":
                extra["exact"] = np.array([r == h for r, h in zip(references, hypotheses)], np.float32)
        batch = {**batch, **to_global(extra, rows)}
        if extractor is not None:
            batch["extractor"] = replicated_extractor(rows.mesh)
        return update(params, opt_state, batch, key, lr)

    return step


def mask_tokens(key: jax.Array, tokens: jax.Array, vocab_size: int, mask_prob: float) -> tuple[jax.Array, jax.Array]:
    """BERT masking: each formula token is chosen with probability mask_prob; of the chosen, 80 %
    become [MASK], 10 % a random ordinary token, 10 % stay. Returns (inputs, chosen)."""
    choose_key, kind_key, random_key = jax.random.split(key, 3)
    ordinary = (tokens != PAD_ID) & (tokens != CLS_ID) & (tokens != SEP_ID)
    chosen = ordinary & (jax.random.uniform(choose_key, tokens.shape) < mask_prob)
    kind = jax.random.uniform(kind_key, tokens.shape)
    random_tokens = jax.random.randint(random_key, tokens.shape, len(SPECIAL_TOKENS), vocab_size)
    inputs = jnp.where(chosen & (kind < 0.8), MASK_ID, jnp.where(chosen & (kind < 0.9), random_tokens, tokens))
    return inputs, chosen


def pretraining_losses(model: FeatureExtractor, params: Any, batch: dict[str, jax.Array], key: jax.Array,
                       mask_prob: float, deterministic: bool) -> dict[str, jax.Array]:
    """Masked-LM cross-entropy over the chosen tokens and bracket-depth cross-entropy over every
    formula token, with their accuracies."""
    import optax

    mask_key, dropout_key = jax.random.split(key)
    inputs, chosen = mask_tokens(mask_key, batch["tokens"], model.cfg.vocab_size, mask_prob)
    mlm_logits, depth_logits = model.apply({"params": params}, inputs, deterministic,
                                           method=FeatureExtractor.pretraining_logits, rngs={"dropout": dropout_key})
    scored = batch["depths"] >= 0

    def mean_over(values, where):
        weights = where.astype(jnp.float32)
        return (values * weights).sum() / jnp.maximum(weights.sum(), 1.0)

    mlm_losses = optax.softmax_cross_entropy_with_integer_labels(mlm_logits, batch["tokens"])
    depth_losses = optax.softmax_cross_entropy_with_integer_labels(depth_logits, jnp.maximum(batch["depths"], 0))
    return {
        "mlm_loss": mean_over(mlm_losses, chosen), "depth_loss": mean_over(depth_losses, scored),
        "mlm_correct": ((jnp.argmax(mlm_logits, -1) == batch["tokens"]) & chosen).sum(), "mlm_count": chosen.sum(),
        "depth_correct": ((jnp.argmax(depth_logits, -1) == batch["depths"]) & scored).sum(), "depth_count": scored.sum(),
    }


def make_pretrain_step(model: FeatureExtractor, optimizer: optax.GradientTransformation,
                       section: FeatureExtractorSection):
    """The masked-LM + bracket-depth step of the feature extractor."""

    def loss_and_metrics(params, batch, key):
        parts = pretraining_losses(model, params, batch, key, section.mask_prob, deterministic=False)
        loss = section.mlm_weight * parts["mlm_loss"] + section.depth_weight * parts["depth_loss"]
        return loss, {"mlm_loss": parts["mlm_loss"], "depth_loss": parts["depth_loss"]}

    return make_step(loss_and_metrics, optimizer)


# --- checkpoints ------------------------------------------------------------------------------

def checkpoint_manager(directory: Path, keep: int):
    import orbax.checkpoint as ocp

    # A save cut off by a crash leaves a temporary folder; it is removed when the run resumes.
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, cleanup_tmp_directories=True)
    return ocp.CheckpointManager(directory.resolve(), options=options)


CHECKPOINT_KINDS = {LatexOCRConfig: "ocr", FeatureExtractorConfig: "feature_extractor"}


def checkpoint_metadata(cfg: LatexOCRConfig | FeatureExtractorConfig, vocab: Vocabulary, data: DataSection,
                        extra: dict) -> dict:
    return {"kind": CHECKPOINT_KINDS[type(cfg)], "model": dataclasses.asdict(cfg), "vocab": list(vocab.tokens),
            "data": dataclasses.asdict(data), **extra}


def params_digest(params: Any) -> str:
    """SHA-256 of every parameter's name, dtype, shape and bytes (this process's copy), saved with
    a checkpoint so that damaged weights are noticed when loaded instead of decoding garbage."""
    digest = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(params), key=lambda item: jax.tree_util.keystr(item[0])):
        array = np.asarray(leaf.addressable_data(0) if isinstance(leaf, jax.Array) else leaf)
        digest.update(f"{jax.tree_util.keystr(path)} {array.dtype} {array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def save_checkpoint(manager, step: int, params: Any, metadata: dict, opt_state: Any = None,
                    ema_params: Any = None) -> None:
    """Orbax writes into a temporary directory and renames it when complete, so an interrupted
    save never replaces the previous checkpoint."""
    import orbax.checkpoint as ocp

    metadata = {**metadata, "params_sha256": params_digest(params)}
    items = {"params": ocp.args.StandardSave(params), "meta": ocp.args.JsonSave(metadata)}
    if opt_state is not None:
        items["opt_state"] = ocp.args.StandardSave(opt_state)
    if ema_params is not None:
        items["ema_params"] = ocp.args.StandardSave(ema_params)
    manager.save(step, args=ocp.args.Composite(**items))


def checkpoint_steps(directory: Path) -> list[int]:
    """Completed steps only: orbax renames a step's temporary folder to its number when done."""
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and (p / "params").is_dir())


def to_storage(params: Any) -> Any:
    """float16 copy for the best checkpoint, which only serves inference (half the size on disk);
    restoring into a float32 target casts back."""
    return jax.tree.map(lambda x: x.astype(jnp.float16) if x.dtype == jnp.float32 else x, params)


def find_checkpoint_dir(path: str) -> Path:
    """A run directory holds `best/`; a checkpoint directory holds numbered steps."""
    root = resolve_path(path)
    if not root.is_dir():
        raise UserError(f"checkpoint not found: {path} (train one with `latexocr.py train`)")
    candidate = root / "best" if (root / "best").is_dir() else root
    if not checkpoint_steps(candidate):
        raise UserError(f"no checkpoint steps in {candidate} (is this a training run directory?)")
    return candidate


def read_metadata(directory: Path, step: int) -> dict:
    file = directory / str(step) / "meta" / "metadata"
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"checkpoint {directory / str(step)} has no readable metadata: {error}") from None


def network_config_from_metadata(metadata: dict, where: Path, kind: type = LatexOCRConfig):
    """The saved LatexOCRConfig (or FeatureExtractorConfig), refusing a checkpoint of the other kind."""
    saved_kind = metadata.get("kind", "ocr")
    if saved_kind != CHECKPOINT_KINDS[kind]:
        names = {"ocr": "OCR model", "feature_extractor": "feature extractor"}
        raise UserError(f"checkpoint {where} holds the weights of the {names.get(saved_kind, saved_kind)}, "
                        f"not of the {names[CHECKPOINT_KINDS[kind]]} needed here")
    saved = metadata.get("model")
    if not isinstance(saved, dict):
        raise UserError(f"checkpoint {where} has a malformed model config: no 'model' mapping in its metadata")
    if "stem_convolutions" not in saved and isinstance(saved.get("cell_height"), int):
        # Saved before model.stem_convolutions existed: one convolution per halving of the cell height.
        saved = {**saved, "stem_convolutions": saved["cell_height"].bit_length() - 1}
    fields = {field.name for field in dataclasses.fields(kind)}
    if set(saved) - fields:
        # An earlier encoder design (a patch embedding, model.patch_size) left keys this one lacks.
        raise UserError(f"checkpoint {where} was saved for another network design (unknown model settings: "
                        f"{', '.join(sorted(set(saved) - fields))}) and cannot be loaded; train it again with "
                        "this version, or use the shipped default model")
    try:
        return kind(**{**saved, "dtype": "float32"})
    except TypeError as error:
        raise UserError(f"checkpoint {where} has a malformed model config: {error}") from None


def leaf_name(path: Sequence[Any]) -> str:
    """A leaf's dotted name as orbax stores it (a named tuple's fields are stored as mapping keys)."""
    return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def leaves_by_name(tree: Any) -> dict[str, Any]:
    return {leaf_name(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def shape_mismatch(stored: dict[str, Any], target: dict[str, Any]) -> str | None:
    """The first parameter whose stored shape differs from the target's, or that only one side has."""
    for key in sorted(stored.keys() | target.keys()):
        if key not in target:
            return f"it holds {key}, which this model does not have"
        if key not in stored:
            return f"it lacks {key}"
        if tuple(stored[key].shape) != tuple(target[key].shape):
            return f"{key} is stored with shape {tuple(stored[key].shape)}, this model needs {tuple(target[key].shape)}"
    return None


def cast_like(array: jax.Array, target: jax.ShapeDtypeStruct) -> jax.Array:
    """array in target's dtype. Within one process numpy casts it: JAX would compile a program for
    each parameter shape, costing a predict process memory and time (docs/RESULTS.md)."""
    if array.dtype == target.dtype:
        return array
    if array.is_fully_addressable:
        return jax.device_put(np.asarray(array).astype(target.dtype), array.sharding)
    return array.astype(target.dtype)


def restore_items(directory: Path, step: int, items: dict[str, Any]) -> dict[str, Any]:
    """Restore each named item into its target's shapes, dtypes and placement. The stored shapes
    are compared first (a failed restore leaves orbax's background reads complaining), and the
    parameters are checked against the digest saved with them, in the dtype they were stored in."""
    import orbax.checkpoint as ocp

    where = directory / str(step)
    handlers = {"meta": ocp.JsonCheckpointHandler(), **{name: ocp.StandardCheckpointHandler() for name in items}}
    options = ocp.CheckpointManagerOptions(create=False)
    with ocp.CheckpointManager(directory.resolve(), options=options, item_handlers=handlers) as manager:
        try:
            saved = manager.item_metadata(step)
        except Exception as error:  # orbax raises many types for an unreadable step
            raise UserError(f"checkpoint {where} is unreadable: {str(error).splitlines()[0][:300]}") from None
        stored = {}
        for name, target in items.items():
            if saved.get(name) is None:  # orbax answers None for an item whose metadata it cannot read
                raise UserError(f"checkpoint {where} has no readable {name}")
            stored[name] = leaves_by_name(saved[name])
            problem = shape_mismatch(stored[name], leaves_by_name(target))
            if problem:
                raise UserError(f"checkpoint {where} does not match this model: {problem}")
        as_stored = {name: ocp.args.StandardRestore(jax.tree_util.tree_map_with_path(
            lambda path, t, leaves=stored[name]: jax.ShapeDtypeStruct(t.shape, leaves[leaf_name(path)].dtype,
                                                                      sharding=t.sharding), target))
            for name, target in items.items()}
        try:
            restored = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore(), **as_stored))
        except Exception as error:  # tensorstore reports a truncated or missing data file as a bare Exception
            reason = str(error).split(". See full TensorStore details")[0].splitlines()[0][:200]
            raise UserError(f"checkpoint {where} is damaged or incomplete ({reason}); "
                            "copy it again or use another checkpoint") from None
    saved_digest = restored["meta"].get("params_sha256")
    if "params" in restored and saved_digest and params_digest(restored["params"]) != saved_digest:
        raise UserError(f"checkpoint {where} is damaged: its parameters do not match the checksum saved with them; "
                        "copy it again or use another checkpoint")
    return {name: jax.tree.map(cast_like, restored[name], items[name]) for name in items}


def abstract(tree: Any, sharding: jax.sharding.Sharding | None = None) -> Any:
    """Shapes and dtypes to restore into, placed by `sharding` (default: this process's first
    device), so a checkpoint saved from any number of devices restores onto these."""
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def parameter_shapes(model: nn.Module, init, program_dir: Path | None) -> Any:
    """The shapes and dtypes of the model's parameters. Tracing init for them is most of the
    time a cold start spends restoring, so with a program_dir the traced init is kept there."""
    if program_dir is None:
        return jax.eval_shape(lambda: init(model, 0))
    exported = exported_program(program_path(program_dir, "init", type(model).__name__, dataclasses.asdict(model.cfg)),
                                lambda: jax.export.export(jax.jit(lambda: init(model, 0)))())
    return jax.tree_util.tree_unflatten(exported.out_tree, exported.out_avals)


def restore_model(path: str, kind: type, program_dir: Path | None = None) -> tuple[Any, Any, dict]:
    """Model, parameters and metadata from a checkpoint alone (its best step); kind is
    LatexOCRConfig (the OCR model) or FeatureExtractorConfig (the feature extractor). program_dir: see
    parameter_shapes."""
    module, init = {LatexOCRConfig: (LatexOCR, init_params),
                    FeatureExtractorConfig: (FeatureExtractor, init_extractor_params)}[kind]
    directory = find_checkpoint_dir(path)
    step = checkpoint_steps(directory)[-1]
    metadata = read_metadata(directory, step)
    model = module(network_config_from_metadata(metadata, directory / str(step), kind))
    target = abstract(parameter_shapes(model, init, program_dir))
    return model, restore_items(directory, step, {"params": target})["params"], metadata


def cache_directory() -> str:
    """Where compiled programs persist across processes (`$LATEXOCR_CACHE_DIR`; empty: nowhere)."""
    return os.environ.get("LATEXOCR_CACHE_DIR", str(Path.home() / ".cache" / "latexocr" / "jax"))


def traced_program_dir() -> Path | None:
    """Where traced decoders are kept beside the compiled programs (see Predictor)."""
    directory = cache_directory()
    return Path(directory) / "latexocr-traced" if directory else None


def data_section(saved: dict) -> DataSection:
    """The image settings a checkpoint's metadata holds (JSON lists back to tuples)."""
    return DataSection(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})


def load_predictor(path: str, decoding: EvaluationSection = EvaluationSection(),
                   program_dir: Path | None = None) -> Predictor:
    """Rebuild model, parameters, vocabulary and image settings from a checkpoint alone, to decode
    as `decoding` says (beam length penalty, the other sizes an image is read at)."""
    model, params, metadata = restore_model(path, LatexOCRConfig, program_dir)
    return_freed_memory()  # what restoring used beside the parameters
    return Predictor(model, params, Vocabulary(metadata["vocab"]), data_section(metadata["data"]), decoding, program_dir)


def check_compatible(metadata: dict, cfg: LatexOCRConfig | FeatureExtractorConfig, vocab: Vocabulary, where: Path,
                     may_differ: Sequence[str] = ()) -> None:
    saved = network_config_from_metadata(metadata, where, type(cfg))
    differences = [f"{f}: checkpoint {getattr(saved, f)} vs config {getattr(cfg, f)}"
                   for f in (f.name for f in dataclasses.fields(cfg))
                   if f not in ("dtype", *may_differ) and getattr(saved, f) != getattr(cfg, f)]
    if differences:
        raise UserError(f"checkpoint {where} was made with another model config ({'; '.join(differences)})")
    saved_tokens = list(metadata["vocab"])
    if saved_tokens != list(vocab.tokens):
        first = next((i for i, (a, b) in enumerate(zip(saved_tokens, vocab.tokens)) if a != b),
                     min(len(saved_tokens), len(vocab)))
        difference = (f"id {first} is {saved_tokens[first]!r} there, {vocab.tokens[first]!r} here"
                      if first < min(len(saved_tokens), len(vocab)) else "one is a prefix of the other")
        raise UserError(f"checkpoint {where} was made with another vocabulary ({len(saved_tokens)} tokens vs "
                        f"{len(vocab)} in the configured vocab.json; {difference})")


def load_feature_extractor(path: str) -> tuple[FeatureExtractor, Any, Vocabulary]:
    """The extractor model, its parameters and vocabulary from a `pretrain` checkpoint (best step)."""
    model, params, metadata = restore_model(path, FeatureExtractorConfig)
    return model, params, Vocabulary(metadata["vocab"])


# --- training loop ----------------------------------------------------------------------------

class RunLog:
    """Appends one JSON object per event to the run's log file and mirrors a line to the console;
    with several processes only process 0 writes."""

    def __init__(self, path: Path):
        self.path = path
        self.writes = jax.process_index() == 0

    def write(self, event: str, console: bool = True, **values: Any) -> None:
        if not self.writes:
            return
        record = {"time": round(time.time(), 3), "event": event, **values}
        with self.path.open("a") as file:
            file.write(json.dumps(record) + "\n")
        if console:
            shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
            print(f"[{event}] {shown}", file=sys.stderr)


def is_better(maximize: bool, new: float, old: float | None) -> bool:
    if old is None:
        return True
    return new > old if maximize else new < old


def evaluate_dataset(predictor: Predictor, dataset: Dataset, batch_size: int, beam_width: int = 1,
                     progress: bool = False):
    """Metrics, and per distinct example (in order) the example and the answer kept (see
    Predictor.read_dataset), and how many readings it took."""
    kept, answers, readings = predictor.read_dataset(dataset, batch_size, beam_width, progress)
    examples = [dataset.examples[i] for i in kept]
    return compute_metrics([example.caption for example in examples], answers), examples, answers, readings


@dataclasses.dataclass
class Trainee:
    """What `run_training` needs from one kind of training: OCR with cross-entropy, or
    pretraining the feature extractor."""

    params: Any
    make_step: Any  # optimizer -> jitted (params, opt_state, batch, key) -> (params, opt_state, metrics)
    batches: Any  # a BatchStream
    validate: Any  # params -> metrics dict, or None without validation data
    primary_metric: str
    maximize: bool
    metadata: Any  # extra dict -> checkpoint metadata
    start_info: dict


def data_parallel_mesh(batch_size: int) -> jax.sharding.Mesh:
    """All devices of all processes on one `data` axis: each batch is split along it, parameters
    and optimizer state are replicated, and jit inserts the gradient all-reduce."""
    devices = jax.devices()
    if batch_size % len(devices):
        raise UserError(f"training.batch_size {batch_size} must be a multiple of the {len(devices)} devices")
    return jax.sharding.Mesh(np.array(devices), ("data",))


def to_global(tree: Any, sharding: jax.sharding.Sharding) -> Any:
    """This process's values -> global arrays laid out by `sharding` (its rows of a batch, or a
    full copy of something replicated)."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a global array split (or replicated) along its first axis, in order."""
    shards = {shard.index[0].start or 0: shard.data for shard in x.addressable_shards}
    return np.concatenate([np.asarray(shards[start]) for start in sorted(shards)])


def to_local(tree: Any) -> Any:
    """This process's full copy of replicated global arrays, as numpy."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


# The settings learning_rate reads: a resume that changed one would jump to another point of
# another schedule (a cosine planned over 2,500 steps restarting over 5,000, say).
PLAN_FIELDS = ("lr", "warmup_steps", "total_steps")


def check_plan(metadata: dict, training: TrainingSection, where: Path) -> None:
    """A resumed run keeps the learning-rate plan its latest checkpoint was saved with, unless
    the command says --replan."""
    saved = metadata.get("config", {}).get("training", {})
    changed = {name: saved[name] for name in PLAN_FIELDS if name in saved and saved[name] != getattr(training, name)}
    if changed:
        now = ", ".join(f"training.{name} {value} -> {getattr(training, name)}" for name, value in changed.items())
        keep = " ".join(f"--set training.{name}={value}" for name, value in changed.items())
        raise UserError(f"{where} was saved with a learning-rate plan this config changes ({now}); add "
                        f"`{keep}` to continue as planned, or --replan to follow the new plan from here")


def check_run_dir(run_dir: Path, resume: bool, cfg: LatexOCRConfig | FeatureExtractorConfig, vocab: Vocabulary,
                  training: TrainingSection, replan: bool) -> None:
    """Before any work: a run folder is never overwritten, and a resumed run must have the model
    config and vocabulary its checkpoints were made with, and their learning-rate plan unless replanned."""
    steps = checkpoint_steps(run_dir) if run_dir.is_dir() else []
    if steps and not resume:
        raise UserError(f"{run_dir} already holds a training run; pass --resume to continue it "
                        "or choose another checkpoint folder")
    if steps:
        metadata = read_metadata(run_dir, steps[-1])
        check_compatible(metadata, cfg, vocab, run_dir / str(steps[-1]))
        if not replan:
            check_plan(metadata, training, run_dir / str(steps[-1]))


@dataclasses.dataclass(frozen=True)
class ProcessMemory:
    mappings: int  # memory mappings this process holds
    mapping_limit: int  # the most Linux allows one process (vm.max_map_count)
    resident: int  # bytes of this process in memory
    available: int  # bytes the system could still give (MemAvailable)


def process_memory() -> ProcessMemory | None:
    """This process's memory as Linux reports it, or None where /proc does not tell. Each batch
    shape's compiled training step stays loaded: on CPU a `small` one holds about 1,200 memory
    mappings (XLA maps it kernel by kernel) and 250 MB."""
    try:
        with open("/proc/self/maps") as maps:
            mappings = sum(1 for _ in maps)
        limit = int(Path("/proc/sys/vm/max_map_count").read_text())
        resident = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        meminfo = dict(line.split(":") for line in Path("/proc/meminfo").read_text().splitlines())
        return ProcessMemory(mappings, limit, resident, int(meminfo["MemAvailable"].split()[0]) * 1024)
    except (OSError, ValueError, KeyError):
        return None


def working_memory(step, *args) -> int:
    """The bytes of working memory XLA plans for `step`'s program at these arguments, compiling it
    as its first call would (that call then reuses it); 0 where XLA does not say, `step` is not one
    jitted function, or it runs on an accelerator (whose memory is not the process's). The largest
    bucket's step plans many times a typical one's (docs/RESULTS.md)."""
    lower = getattr(step, "lower", None) if jax.default_backend() == "cpu" else None
    analysis = lower(*args).compile().memory_analysis() if lower else None
    return int(getattr(analysis, "temp_size_in_bytes", 0) or 0)


def room_for_programs(memory: ProcessMemory, costs: Sequence[ProcessMemory], count: int, dropped: int = 0,
                      working: int = 0) -> bool:
    """Whether `count` more compiled programs fit once `dropped` of those loaded are dropped, at the
    median of the costs measured (each program's growth of this process over its first run): in
    memory mappings (past the limit compiling aborts the process) and in memory, keeping free the
    most a first run grew or `working` (at least 2 GiB), the working memory a step may need."""
    if not costs and not working:
        return True
    mappings, resident = (sorted(getattr(cost, name) for cost in costs)[len(costs) // 2] if costs else 0
                          for name in ("mappings", "resident"))
    working = max(2 * 2**30, working, *(cost.resident for cost in costs))
    return (memory.mappings + (count - dropped) * mappings <= memory.mapping_limit
            and (count - dropped) * resident + working <= memory.available)


class LoadedPrograms:
    """The training loop's compiled programs, one per batch shape, and what each cost the process
    on its first run: before a new shape runs, whether dropping them all makes room."""

    def __init__(self):
        self.shapes: dict[tuple, int] = {}  # loaded batch shapes -> their programs' working memory
        self.costs: list[ProcessMemory] = []
        self.clearing_pays = True  # where dropping gives nothing back, clearing again only recompiles
        self.regrowing = False  # the first run after a clear takes back the working memory it freed

    def must_clear(self, memory: ProcessMemory, working: int = 0) -> bool:
        """Whether to drop every loaded program before a new shape whose program needs `working`
        bytes of working memory runs (each loaded one needs its own whenever its shape comes again)."""
        in_use = max(working, *self.shapes.values(), 0)
        return (self.clearing_pays and not room_for_programs(memory, self.costs, 2, working=in_use)
                and room_for_programs(memory, self.costs, 2, dropped=len(self.shapes), working=working))

    def cleared(self, before: ProcessMemory, after: ProcessMemory) -> dict[str, Any]:
        """Forget the dropped programs; what the clear did, for the run's log."""
        self.clearing_pays = room_for_programs(after, self.costs, 2)
        event = dict(programs=len(self.shapes), mappings=before.mappings, available_mb=before.available // 2**20,
                     available_after_mb=after.available // 2**20, clearing_pays=self.clearing_pays,
                     largest_first_run_mb=max((cost.resident for cost in self.costs), default=0) // 2**20,
                     largest_working_mb=max(self.shapes.values(), default=0) // 2**20)
        self.shapes.clear()
        self.regrowing = True
        return event

    def compiled(self, shape: tuple, before: ProcessMemory, after: ProcessMemory, working: int = 0) -> None:
        """A new shape's first run grew the process from `before` to `after`. Right after a clear
        that growth is the working memory coming back, not the program: counted as its cost, it
        left too little room for the next program, so a run cleared again within steps (seen in training)."""
        self.shapes[shape] = working
        if not self.regrowing:
            self.costs.append(ProcessMemory(max(after.mappings - before.mappings, 0), 0,
                                            max(after.resident - before.resident, 0), 0))
        self.regrowing = False


def make_room(programs: LoadedPrograms, train_step, args: tuple, shape: tuple, step: int, log: RunLog,
              run_dir: Path) -> tuple[ProcessMemory, int] | None:
    """Before a batch shape's first training step: drop every loaded program if that makes the
    room it lacks, or stop with a clear error if its working memory cannot fit. Returns the
    process's memory before that first step and the step's working memory (None where /proc does
    not tell), for LoadedPrograms.compiled."""
    before = process_memory()
    if before is None:
        return None
    working = working_memory(train_step, *args)
    if programs.must_clear(before, working):
        # Programs of the shapes in use load again from the compilation cache, in seconds.
        jax.clear_caches()
        return_freed_memory()
        cleared = process_memory() or before
        log.write("programs_cleared", console=False, step=step, **programs.cleared(before, cleared))
        before = cleared
    if working > before.available:
        sizes = " and ".join("x".join(map(str, leaf)) for leaf in shape)
        raise UserError(f"a training batch of {sizes} needs {working / 2**30:.1f} GB of working memory and "
                        f"{before.available / 2**30:.1f} GB are available; lower training.batch_size or leave "
                        "the largest data.bucket_heights, bucket_widths or sequence_buckets out (--resume "
                        f"then continues from the last checkpoint in {run_dir})")
    return before, working


@jax.jit
def copy_tree(tree: Any) -> Any:
    """A copy in fresh buffers: the training step donates the parameters' buffers."""
    return jax.tree.map(jnp.copy, tree)


def restore_run(run_dir: Path, step: int, params: Any, opt_state: Any, averaged: bool,
                sharding: jax.sharding.Sharding) -> tuple[Any, Any, Any]:
    """The parameters, optimizer state and (with averaged) moving average of the weights saved at
    step, shaped and placed like params and opt_state. A run saved without an average (ema_decay
    was 0) starts one from its weights."""
    items = {"params": abstract(params, sharding), "opt_state": abstract(opt_state, sharding)}
    if averaged and (run_dir / str(step) / "ema_params").is_dir():
        items["ema_params"] = items["params"]
    restored = restore_items(run_dir, step, items)
    params, opt_state = restored["params"], restored["opt_state"]
    if not averaged:
        return params, opt_state, None
    return params, opt_state, restored["ema_params"] if "ema_params" in restored else copy_tree(params)


@contextlib.contextmanager
def stop_requests() -> Iterator[threading.Event]:
    """Ctrl-C (SIGINT) or SIGTERM sets the event, so the training loop stops after its current
    step and saves; a second signal acts as usual (stops at once, keeping the last checkpoint)."""
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield requested
        return
    previous = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}

    def request(number, frame):
        requested.set()
        for restored, handler in previous.items():
            signal.signal(restored, handler)

    for number in previous:
        signal.signal(number, request)
    try:
        yield requested
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def run_training(trainee: Trainee, config: Config, run_dir: Path, resume: bool, progress: bool,
                 notes: Sequence[str] = ()) -> dict[str, Any]:
    """The training loop shared by `train` and `pretrain`. Checkpoints: `<run_dir>/<step>`
    (latest, with optimizer state) and `<run_dir>/best/<step>` (parameters only, best
    validation metric). Returns the final summary."""
    from tqdm import tqdm

    training = config.training
    run_dir.mkdir(parents=True, exist_ok=True)
    log = RunLog(run_dir / "train.log")
    for note in notes:
        log.write("data", summary=note)
    mesh = data_parallel_mesh(training.batch_size)
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    trainee.batches.shard(jax.process_index(), jax.process_count())
    optimizer = make_optimizer(training)
    params = to_global(trainee.params, replicated)
    opt_state = to_global(optimizer.init(trainee.params), replicated)
    manager = checkpoint_manager(run_dir, training.keep_checkpoints)
    best_manager = checkpoint_manager(run_dir / "best", 1)
    step, best = 0, None
    if resume and manager.latest_step() is not None:
        step = manager.latest_step()
        params, opt_state, ema = restore_run(run_dir, step, params, opt_state, training.ema_decay > 0, replicated)
        best = read_metadata(run_dir, step).get("best_metric")
    else:
        ema = copy_tree(params) if training.ema_decay else None
    log.write("start", params=count_params(params), batch_size=training.batch_size,
              accum=training.grad_accum_steps, devices=jax.device_count(), processes=jax.process_count(),
              **trainee.start_info)
    if step:
        log.write("resume", step=step)

    train_step = trainee.make_step(optimizer)
    decay = training.ema_decay
    update_average = jax.jit(lambda average, new: jax.tree.map(lambda a, p: a + (1 - decay) * (p - a), average, new))
    base_key = jax.random.PRNGKey(training.seed)
    total_micro_steps = training.total_steps * training.grad_accum_steps
    deadline = time.monotonic() + training.max_minutes * 60 if training.max_minutes else math.inf
    window: list[dict[str, jax.Array]] = []  # step metrics, left on the device until logged
    window_start = time.monotonic()
    last_metrics: dict[str, float] = {}

    def log_window(step: int) -> None:
        """One host transfer per window; a non-finite loss stops training before anything is saved."""
        nonlocal window, window_start
        if not window:
            return
        values = {k: float(np.mean([m[k] for m in to_local(window)])) for k in window[0]}
        if not math.isfinite(values["loss"]):
            raise UserError(f"training diverged by step {step} (loss {values['loss']}); the last checkpoint "
                            f"in {run_dir} is intact; lower training.lr and --resume")
        rate = len(window) * training.batch_size / (time.monotonic() - window_start)
        lr = learning_rate(training, step // training.grad_accum_steps)
        shown = {k: f"{v:.3f}" for k, v in values.items() if k not in ("tokens", "grad_norm")}
        bar.set_postfix(**shown, lr=f"{lr:.2e}", samples_s=f"{rate:.1f}")
        log.write("train", console=False, step=step, **values, lr=lr, samples_per_s=rate)
        window, window_start = [], time.monotonic()

    def save(step: int) -> None:
        if step in manager.all_steps():  # resumed from it, or saved just before an interruption
            return
        extra = {"step": step, "best_metric": best, "config": dataclasses.asdict(config)}
        save_checkpoint(manager, step, params, trainee.metadata(extra), opt_state, ema)

    def validate(step: int) -> None:
        nonlocal best, last_metrics
        if trainee.validate is None:
            return
        # Validation decodes on this process's first device from its own copy of the parameters.
        served = params if ema is None else ema
        last_metrics = trainee.validate(jax.device_put(to_local(served), jax.local_devices()[0]))
        log.write("validate", step=step, **{k: round(v, 3) for k, v in last_metrics.items()})
        if is_better(trainee.maximize, last_metrics[trainee.primary_metric], best):
            best = last_metrics[trainee.primary_metric]
            if step in best_manager.all_steps():  # saved before a crash that came before the latest save
                return
            extra = {"step": step, "metrics": last_metrics, "config": dataclasses.asdict(config)}
            save_checkpoint(best_manager, step, to_storage(served), trainee.metadata(extra))

    bar = tqdm(total=total_micro_steps, initial=step, disable=not progress or not log.writes, dynamic_ncols=True)
    prefetch = concurrent.futures.ThreadPoolExecutor(1)
    stream = trainee.batches.iterate(step, prefetch)
    programs = LoadedPrograms()
    try:
        with stop_requests() as stop:
            while step < total_micro_steps and time.monotonic() < deadline and not stop.is_set():
                local_batch = next(stream)
                shape = tuple(x.shape for x in jax.tree.leaves(local_batch))
                batch = to_global(local_batch, rows)
                key = to_global(jax.random.fold_in(base_key, step), replicated)
                lr = np.float32(learning_rate(training, step // training.grad_accum_steps))
                first_run = None
                if shape not in programs.shapes:
                    first_run = make_room(programs, train_step, (params, opt_state, batch, key, lr), shape, step,
                                          log, run_dir)
                params, opt_state, metrics = train_step(params, opt_state, batch, key, lr)
                if first_run:
                    jax.block_until_ready(metrics)  # a program keeps much of what its first run allocates
                    before, working = first_run
                    programs.compiled(shape, before, process_memory() or before, working)
                step += 1
                if ema is not None and step % training.grad_accum_steps == 0:
                    ema = update_average(ema, params)
                window.append(metrics)
                bar.update(1)
                if step % training.log_every == 0 or step % training.eval_every == 0:
                    log_window(step)
                if step % training.eval_every == 0:
                    validate(step)
                    save(step)
            bar.close()
            log_window(step)
            if stop.is_set():
                log.write("interrupted", step=step)
            elif step % training.eval_every:
                validate(step)
            save(step)
    finally:
        bar.close()
        stream.close()
        prefetch.shutdown(cancel_futures=True)
        # A save still being written in the background is finished, whatever stopped the loop.
        manager.wait_until_finished()
        best_manager.wait_until_finished()
        manager.close()
        best_manager.close()
    summary = {"step": step, "best_metric": best, "metrics": last_metrics, "checkpoint_dir": str(run_dir),
               "interrupted": stop.is_set()}
    log.write("done", **{k: v for k, v in summary.items() if k != "metrics"})
    return summary


def initial_params(model: LatexOCR, training: TrainingSection, vocab: Vocabulary) -> Any:
    """Random parameters, or those of training.init_checkpoint (checked against this model and vocabulary)."""
    if not training.init_checkpoint:
        return init_params(model, training.seed)
    _, params, metadata = restore_model(training.init_checkpoint, LatexOCRConfig)
    # The cell grid shapes no weight: a finer grid starts from a coarser one's stem (model.stem_convolutions).
    check_compatible(metadata, model.cfg, vocab, resolve_path(training.init_checkpoint),
                     may_differ=("cell_height", "cell_width"))
    return params


def ocr_step_factory(model: LatexOCR, config: Config, vocab: Vocabulary):
    """optimizer -> the OCR training step: plain cross-entropy when rl.lambda_rl is 0, else
    CE + REINFORCE, loading the frozen feature extractor first when the reward uses it."""
    rl, training = config.rl, config.training
    if rl.lambda_rl == 0:
        return lambda optimizer: make_train_step(model, optimizer, training.label_smoothing, training.ctc_weight)
    extractor = None
    if rl.extractor_weight > 0:
        extractor = frozen_extractor(config.feature_extractor, model.cfg, vocab)
    return lambda optimizer: make_rl_step(model, optimizer, training.label_smoothing, rl,
                                          config.data.sequence_buckets, extractor)


def frozen_extractor(section: FeatureExtractorSection, cfg: LatexOCRConfig, vocab: Vocabulary) -> tuple[Any, Any]:
    """The reward's (features function, parameters) from feature_extractor.checkpoint_path,
    refusing one that cannot read this model's formulas."""
    advice = ("the REINFORCE reward uses the feature extractor (rl.extractor_weight > 0): make one with "
              "`latexocr.py pretrain`, point feature_extractor.checkpoint_path at it, or set rl.extractor_weight=0")
    try:
        model, params, extractor_vocab = load_feature_extractor(section.checkpoint_path)
    except UserError as error:
        raise UserError(f"{error}; {advice}") from None
    if extractor_vocab.tokens != vocab.tokens:
        raise UserError(f"feature extractor {section.checkpoint_path} was pretrained with another vocabulary "
                        f"({len(extractor_vocab)} tokens vs {len(vocab)} in the configured vocab.json); {advice}")
    if model.cfg.max_seq_len < cfg.max_seq_len:
        raise UserError(f"feature extractor {section.checkpoint_path} reads at most {model.cfg.max_seq_len} tokens, "
                        f"fewer than model.max_seq_len {cfg.max_seq_len}; {advice}")
    return make_features(model, section.pooling), params


def train(config: Config, resume: bool = False, progress: bool = True, replan: bool = False) -> dict[str, Any]:
    """Train the OCR model with cross-entropy from config; returns the final summary. replan: a
    resumed run follows this config's learning-rate plan instead of refusing a change of it."""
    training, data = config.training, config.data
    vocab = load_vocabulary(data.vocab_path)
    cfg = latexocr_config(config, len(vocab))
    run_dir = Path(training.checkpoint_dir).expanduser()
    check_run_dir(run_dir, resume, cfg, vocab, training, replan)
    train_examples, train_report = load_split(data.train_split, data, vocab)
    val_examples, val_report = load_split(data.validate_split, data, vocab)
    if not train_examples:
        raise UserError(f"no usable training examples in {data.train_split}")
    train_set = Dataset(train_examples, data, train_report)
    if not len(train_set):
        raise UserError(f"no readable training images in {data.train_split}")
    val_set = Dataset(val_examples[: training.val_samples], data, val_report)
    val_set = val_set if len(val_set) else None
    model = LatexOCR(cfg)
    # A resumed run's own weights replace these, so the checkpoint it started from may be gone.
    resuming = resume and run_dir.is_dir() and bool(checkpoint_steps(run_dir))
    params = init_params(model, training.seed) if resuming else initial_params(model, training, vocab)
    make_ocr_step = ocr_step_factory(model, config, vocab)
    read_once = dataclasses.replace(config.evaluation, size_factors=())
    predictor = Predictor(LatexOCR(dataclasses.replace(cfg, dtype="float32")), None, vocab, data, read_once)
    teacher_forced = jax.jit(lambda p, images, tokens: predictor.model.apply({"params": p}, images, tokens))

    def validate(params):
        metrics = evaluate_dataset(predictor.with_params(params), val_set, config.evaluation.batch_size)[0]
        return {**metrics, **image_reliance(teacher_forced, params, val_set, config.evaluation.batch_size)}

    trainee = Trainee(
        params=params,
        make_step=make_ocr_step,
        batches=TrainBatches(train_set, training),
        validate=validate if val_set is not None else None,
        primary_metric=config.evaluation.primary_metric,
        maximize=METRIC_DIRECTIONS[config.evaluation.primary_metric] == "max",
        metadata=lambda extra: checkpoint_metadata(cfg, vocab, data, extra),
        start_info={"model": config.model.size, "train_examples": len(train_set),
                    "init": training.init_checkpoint or "random", "lambda_rl": config.rl.lambda_rl})
    return run_training(trainee, config, run_dir, resume, progress,
                        [train_report.summary(), val_report.summary()])


def validation_batches(formulas: list[list[str]], vocab: Vocabulary, data: DataSection, batch_size: int,
                       max_depth: int) -> list[dict[str, np.ndarray]]:
    """Every formula once, in same-bucket batches; short batches are filled with empty rows,
    which have nothing to score."""
    by_bucket: dict[int, list[list[str]]] = collections.defaultdict(list)
    for formula in formulas:
        by_bucket[formula_bucket(formula, data)].append(formula)
    batches = []
    for bucket, members in sorted(by_bucket.items()):
        for start in range(0, len(members), batch_size):
            batch = extractor_inputs(members[start: start + batch_size], vocab, bucket, max_depth)
            missing = batch_size - batch["tokens"].shape[0]
            batches.append({"tokens": np.pad(batch["tokens"], ((0, missing), (0, 0)), constant_values=PAD_ID),
                            "depths": np.pad(batch["depths"], ((0, missing), (0, 0)), constant_values=-1)})
    return batches


def pretrain(config: Config, resume: bool = False, progress: bool = True, replan: bool = False) -> dict[str, Any]:
    """Pretrain the feature extractor (masked-LM + bracket depth) into
    feature_extractor.checkpoint_path; returns the final summary (replan: as for train)."""
    section, training, data = config.feature_extractor, config.training, config.data
    vocab = load_vocabulary(data.vocab_path)
    cfg = feature_extractor_config(config, len(vocab))
    run_dir = Path(section.checkpoint_path).expanduser()
    check_run_dir(run_dir, resume, cfg, vocab, training, replan)
    notes, train_formulas = [], []
    for path in section.train_formulas:
        formulas, unknown = read_formulas(path, vocab)
        train_formulas += formulas
        notes.append(f"{path}: {len(formulas)} training formulas, {unknown} tokens not in the vocabulary (<UNK>)")
    val_formulas, unknown = read_formulas(section.validate_formulas, vocab)
    notes.append(f"{section.validate_formulas}: {len(val_formulas)} validation formulas, {unknown} tokens <UNK>")
    if not train_formulas:
        raise UserError(f"no training formulas in {', '.join(section.train_formulas)}")
    model = FeatureExtractor(cfg)
    val_batches = validation_batches(val_formulas[: training.val_samples], vocab, data,
                                     config.evaluation.batch_size, section.max_bracket_depth)
    scores = jax.jit(lambda p, batch, key: pretraining_losses(model, p, batch, key, section.mask_prob, True))

    def validate(params):
        # The same masks at every validation, so accuracies compare across steps.
        parts = [jax.device_get(scores(params, batch, jax.random.PRNGKey(i))) for i, batch in enumerate(val_batches)]
        total = {k: float(sum(p[k] for p in parts)) for k in ("mlm_correct", "mlm_count", "depth_correct", "depth_count")}
        return {"mlm_accuracy": 100 * total["mlm_correct"] / max(total["mlm_count"], 1),
                "depth_accuracy": 100 * total["depth_correct"] / max(total["depth_count"], 1),
                "mlm_loss": float(np.mean([p["mlm_loss"] for p in parts])),
                "depth_loss": float(np.mean([p["depth_loss"] for p in parts]))}

    trainee = Trainee(
        params=init_extractor_params(model, training.seed),
        make_step=lambda optimizer: make_pretrain_step(model, optimizer, section),
        batches=FormulaBatches(train_formulas, vocab, data, training.batch_size, training.seed,
                               section.max_bracket_depth),
        validate=validate if val_batches else None,
        primary_metric="mlm_accuracy", maximize=True,
        metadata=lambda extra: checkpoint_metadata(cfg, vocab, data, extra),
        start_info={"model": section.size, "train_formulas": len(train_formulas)})
    return run_training(trainee, config, run_dir, resume, progress, notes)


# --- commands ---------------------------------------------------------------------------------

def enable_compilation_cache() -> None:
    """Persist compiled programs so a new process does not recompile the same shapes."""
    directory = cache_directory()
    if directory:
        jax.config.update("jax_compilation_cache_dir", directory)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def command_vocab(args, config: Config) -> int:
    if args.min_count < 1:
        raise UserError("--min-count must be at least 1")
    split = args.split or config.data.train_split
    captions = [caption.split() for caption in split_captions(split)]
    vocab = build_vocabulary(captions, args.min_count)
    out = Path(args.out or config.data.vocab_path)
    write_json_atomic(out, vocab.to_json())
    print(f"wrote {out}: {len(vocab)} tokens ({len(SPECIAL_TOKENS)} special) from {len(captions)} captions")
    return 0


def start_distributed(args) -> None:
    """Join a multi-process run (one process per host, or several on one host) before JAX
    touches any device. The flags default to JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
    JAX_PROCESS_ID; with only the address, JAX finds the rest under SLURM or Open MPI."""
    coordinator = args.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    counts = []
    for value, variable in ((args.num_processes, "JAX_NUM_PROCESSES"), (args.process_id, "JAX_PROCESS_ID")):
        value = os.environ.get(variable) if value is None else value
        try:
            counts.append(None if value is None else int(value))
        except ValueError:
            raise UserError(f"{variable} must be an integer, got {value!r}") from None
    num_processes, process_id = counts
    if coordinator is None:
        if num_processes is not None or process_id is not None:
            raise UserError("a multi-process run needs --coordinator HOST:PORT (process 0's address)")
        return
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise UserError(f"--process-id must be in [0, {num_processes})")
    # CPU devices of different processes talk through gloo; GPUs use NCCL whatever this says.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator, num_processes, process_id)
    except (ValueError, RuntimeError) as error:
        raise UserError(f"could not join the multi-process run at {coordinator}: {error} "
                        "(give --num-processes and --process-id, or run under SLURM or Open MPI)") from None


def finish_training(summary: dict[str, Any]) -> int:
    print(json.dumps(summary))
    if summary["interrupted"]:
        print(f"latexocr: interrupted; saved step {summary['step']} in {summary['checkpoint_dir']}; "
              "continue with --resume", file=sys.stderr)
        return 130
    return 0


def command_train(args, config: Config) -> int:
    start_distributed(args)
    return finish_training(train(config, resume=args.resume, progress=not args.quiet, replan=args.replan))


def command_pretrain(args, config: Config) -> int:
    start_distributed(args)
    return finish_training(pretrain(config, resume=args.resume, progress=not args.quiet, replan=args.replan))


def sample_examples(examples: list[Example], count: int, seed: int) -> list[Example]:
    """count examples drawn at random (the same ones for the same seed and split), in split order."""
    if count >= len(examples):
        return examples
    chosen = np.random.default_rng(seed).choice(len(examples), count, replace=False)
    return [examples[i] for i in sorted(chosen)]


def command_eval(args, config: Config) -> int:
    if not 0 < args.image_scale <= MAX_IMAGE_SCALE:
        raise UserError(f"--image-scale must be in (0, {MAX_IMAGE_SCALE:g}], got {args.image_scale:g}")
    if args.sample is not None and args.sample < 1:
        raise UserError(f"--sample must be at least 1, got {args.sample}")
    evaluation = config.evaluation
    predictor = load_predictor(args.checkpoint or evaluation.checkpoint_path, evaluation, traced_program_dir())
    split_path = getattr(config.data, f"{evaluation.split}_split")
    # Split paths come from the config; image preprocessing from the checkpoint it was trained with.
    paths = dataclasses.replace(predictor.data, image_base_dir=config.data.image_base_dir)
    examples, report = load_split(split_path, paths, predictor.vocab)
    if args.sample is not None:
        examples = sample_examples(examples, args.sample, args.seed)
        report.sampled_from, report.loaded = report.loaded, len(examples)
    dataset = Dataset(examples, predictor.data, report, image_scale=args.image_scale,
                      size_factors=predictor.size_factors)
    print(report.summary(), file=sys.stderr)
    if not dataset.distinct:
        raise UserError(f"no usable examples in {split_path}")
    start = time.perf_counter()
    metrics, examples, hypotheses, readings = evaluate_dataset(predictor, dataset, evaluation.batch_size,
                                                               evaluation.decode_width, progress=not args.quiet)
    seconds = time.perf_counter() - start
    table = format_metrics(metrics)
    chosen = f" (sample of {args.sample}, seed {args.seed})" if args.sample is not None else ""
    scaled = f", images scaled x{args.image_scale:g}" if args.image_scale != 1.0 else ""
    sizes = f" ({readings / dataset.distinct:.2f} sizes read per image)" if predictor.size_factors else ""
    header = (f"{split_path}: {dataset.distinct} images{chosen}{scaled}, {evaluation.describe_decoding()}{sizes}, "
              f"{seconds:.1f} s")
    print(header + "\n" + table)
    out = Path(evaluation.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "evaluate.log").open("a") as file:
        file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {header}\n{table}\n\n")
    predictions = [{"name": ex.name, "reference": detokenize(ex.caption), "prediction": detokenize(hyp),
                    "exact": ex.caption == hyp} for ex, hyp in zip(examples, hypotheses)]
    write_json_atomic(out / "predictions.json", {"metrics": metrics, "predictions": predictions})
    return 0


def decoding_options(args, config: Config) -> Config:
    """`--beam N` and `--length-penalty X` as evaluation config overrides (checked the same way)."""
    options: dict[str, Any] = {}
    if args.beam is not None:
        options.update(generation_method="beam" if args.beam != 1 else "greedy", beam_width=args.beam)
    if args.length_penalty is not None:
        options["length_penalty"] = args.length_penalty
    return apply_overrides(config, {"evaluation": options})


def command_predict(args, config: Config) -> int:
    """One output line per image, in the order given; an image that cannot be read gets an
    error line on stderr and an empty line on stdout, and the exit status is 1."""
    start = time.perf_counter()
    evaluation = decoding_options(args, config).evaluation
    predictor = load_predictor(args.checkpoint or evaluation.checkpoint_path, evaluation, traced_program_dir())
    load_seconds = time.perf_counter() - start
    variants, errors = {}, {}
    for path in args.images:
        try:
            variants[path] = predictor.preprocess(open_image(path), str(path))
        except UserError as error:
            print(f"latexocr: error: {error}", file=sys.stderr)
            errors[path] = str(error)
    decode_start = time.perf_counter()
    results = dict(zip(variants, predictor.read_images(list(variants.values()), evaluation.decode_width)))
    decode_seconds = time.perf_counter() - decode_start
    if args.json:
        answers = [{"image": name, "error": errors[name]} if name in errors else
                   {"image": name, "latex": format_answer(results[name].tokens, args.format), "tokens": results[name].tokens,
                    "score": round(results[name].score, 4), "sizes_read": results[name].sizes_read}
                   for name in args.images]
        print(json.dumps({"load_seconds": round(load_seconds, 3), "decode_seconds": round(decode_seconds, 3),
                          "decoding": evaluation.describe_decoding(), "predictions": answers}, ensure_ascii=False))
    else:
        for name in args.images:
            print(format_answer(results[name].tokens, args.format) if name in results else "")
    return 1 if errors else 0


def command_parser(prog: str, description: str):
    """A parser whose commands each take --config and --set, and `add(name, help)` adding one."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    commands = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_text: str):
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--config", help="YAML config (defaults apply to keys it omits)")
        sub.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                         help="override one config value, e.g. --set training.lr=3e-4 (repeatable)")
        return sub

    return parser, add


def build_parser() -> argparse.ArgumentParser:
    parser, add = command_parser("latexocr.py", __doc__.split("\n\n")[0])

    sub = add("vocab", "build vocab.json from a train split")
    sub.add_argument("--split", help="split JSON (default: data.train_split)")
    sub.add_argument("--out", help="output vocab.json (default: data.vocab_path)")
    sub.add_argument("--min-count", type=int, default=1, help="drop tokens seen fewer times (default 1)")
    sub.set_defaults(run=command_vocab)

    def add_distributed(sub) -> None:
        sub.add_argument("--coordinator", metavar="HOST:PORT", help="multi-process run: process 0's address")
        sub.add_argument("--num-processes", type=int, metavar="N", help="multi-process run: how many processes")
        sub.add_argument("--process-id", type=int, metavar="I", help="multi-process run: this process, 0..N-1")

    def add_training(sub, run_folder: str) -> None:
        sub.add_argument("--resume", action="store_true", help=f"continue the run in {run_folder}")
        sub.add_argument("--replan", action="store_true",
                         help="with --resume: follow this config's learning-rate plan (lr, warmup_steps, total_steps) "
                              "where it differs from the run's, instead of stopping")
        sub.add_argument("--quiet", action="store_true", help="no progress bar")
        add_distributed(sub)

    sub = add("train", "train the OCR model with cross-entropy")
    add_training(sub, "training.checkpoint_dir")
    sub.set_defaults(run=command_train)

    sub = add("pretrain", "pretrain the LaTeX feature extractor (masked-LM + bracket depth)")
    add_training(sub, "feature_extractor.checkpoint_path")
    sub.set_defaults(run=command_pretrain)

    sub = add("eval", "evaluate a checkpoint on a split: BLEU-4, edit distance, exact match, token accuracy")
    sub.add_argument("--checkpoint", help="run or checkpoint directory (default: evaluation.checkpoint_path)")
    sub.add_argument("--quiet", action="store_true", help="no progress bar")
    sub.add_argument("--sample", type=int, metavar="N", help="evaluate N images of the split drawn at random")
    sub.add_argument("--seed", type=int, default=0, help="which images --sample draws (default 0)")
    sub.add_argument("--image-scale", type=float, default=1.0, metavar="X",
                     help="resize every image by X first (Pillow bicubic), to measure robustness to image size")
    sub.set_defaults(run=command_eval)

    sub = add("predict", "print the LaTeX of each image")
    sub.add_argument("images", nargs="+", help="image files")
    sub.add_argument("--checkpoint", help="run or checkpoint directory (default: evaluation.checkpoint_path)")
    sub.add_argument("--beam", type=int, metavar="N",
                     help="beam search with N beams (1 = greedy; default: evaluation.generation_method)")
    sub.add_argument("--length-penalty", type=float, metavar="X",
                     help="beams compare log-probability / length ** X (default: evaluation.length_penalty)")
    sub.add_argument("--json", action="store_true",
                     help="machine-readable output with timings and each answer's length-normalised log-probability")
    sub.add_argument("--format", choices=list(OUTPUT_FORMATS), default="tokens",
                     help="tokens: IM2LATEX-100K's space-separated tokens (default); latex: the same LaTeX as a "
                          "person types it; inline, display: that in $...$ or \\[...\\]")
    sub.set_defaults(run=command_predict)

    return parser


def quiet_abandoned_checkpoint_reads() -> None:
    """After a failed read of a damaged checkpoint, orbax's abandoned asyncio reads report their
    errors as the process ends, hundreds of lines after the one error line that matters. This
    program runs no asyncio code of its own, so those reports are dropped, and so are orbax's warnings
    about an item it cannot read, which the error line names."""
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    logging.getLogger("absl").setLevel(logging.ERROR)
    default_hook = sys.unraisablehook

    def hook(unraisable) -> None:
        abandoned = inspect.iscoroutine(unraisable.object) or (
            isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed")
        if not abandoned:
            default_hook(unraisable)

    sys.unraisablehook = hook


def run_command(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse argv, load the config and run the command; a UserError is one line and exit 2."""
    args = parser.parse_args(argv)
    quiet_abandoned_checkpoint_reads()
    try:
        config = load_config(args.config, args.set)
        enable_compilation_cache()
        return args.run(args, config)
    except UserError as error:
        print(f"latexocr: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("latexocr: interrupted", file=sys.stderr)
        return 130


# Commands of latexocr_tools.py, which an older version of this module ran itself.
TOOL_COMMANDS = ("prepare", "combine", "normalize", "render", "export", "attention", "serve", "bench")


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in TOOL_COMMANDS:
        print(f"latexocr: error: {argv[0]} is a command of latexocr_tools.py: "
              f"python latexocr_tools.py {shlex.join(argv)}", file=sys.stderr)
        return 2
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
