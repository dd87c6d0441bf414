"""Tests of the core, latexocr.py; shared fixtures are in conftest.py."""

import collections
import ctypes.util
import dataclasses
import importlib.util
import io
import json
import math
import os
import re
import shutil
import time
from pathlib import Path

import jax
import hypothesis
import hypothesis.strategies as st
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image, ImageDraw

import latexocr as L
from conftest import DATA, OVERFIT_STEPS, ROOT, cli_overrides, png_declaring, run_cli, run_main, tiny_overrides


# --- config -------------------------------------------------------------------------------------

def test_set_overrides_are_typed():
    config = L.load_config(None, ["training.lr=3e-4", "training.bf16=true",
                                  "data.bucket_widths=[128,256]", "model.size=tiny"])
    assert config.training.lr == 3e-4 and config.training.bf16 is True
    assert config.data.bucket_widths == (128, 256) and config.model.size == "tiny"


@pytest.mark.parametrize("option, message", [
    ("training.lrr=1", "unknown config key 'training.lrr'"),
    ("trainer.lr=1", "unknown config section 'trainer'"),
    ("training.batch_size=abc", "training.batch_size"),
    ("training.batch_size=0", "training.batch_size must be positive"),
    ("training.lr=-1", "training.lr must be positive"),
    ("model.size=huge", "model.size must be one of"),
    ("data.bucket_heights=[30]", "data.bucket_heights must be multiples of model.cell_height"),
    ("data.bucket_widths=[100]", "data.bucket_widths of model.cell_width"),
    ("model.cell_height=12", "model.cell_height and model.cell_width must be powers of two"),
    ("model.cell_width=32", "cell_width <= cell_height"),
    ("model.stem_convolutions=3", "model.stem_convolutions must be at least log2(model.cell_height)"),
    ("model.stem_convolutions=-1", "model.stem_convolutions must be at least log2(model.cell_height)"),
    ("training.ctc_weight=-1", "training.ctc_weight must be >= 0"),
    ("data.glyph_height=-1", "data.glyph_height must be >= 0"),
    ("data.bucket_heights=[]", "data.bucket_heights must not be empty"),
    ("training.lr=inf", "config key training.lr: 'inf' is not a valid float"),
    ("training.lr=nan", "config key training.lr: 'nan' is not a valid float"),
    ("training.batch_size=1.5", "config key training.batch_size: '1.5' is not a valid int"),
    ("training.bf16=maybe", "config key training.bf16: 'maybe' is not a valid bool"),
    ("training.seed=-1", "training.seed must be >= 0"),
    ("training.total_steps=10", "training.total_steps must exceed training.warmup_steps"),
    ("data.margin=-2", "data.margin must be >= 0"),
    ("data.bucket_widths=[-128,256]", "must be positive"),
    ("evaluation.beam_width=0", "evaluation.beam_width must be at least 1"),
    ("evaluation.size_factors=[0.5,1]", "evaluation.size_factors must lie in (0, 8], none of them 1"),
    ("evaluation.size_factors=[-0.5]", "evaluation.size_factors must lie in (0, 8]"),
    ("evaluation.size_prior=-0.1", "evaluation.size_prior must be >= 0"),
    ("model.dropout=1", "model.dropout must be in [0, 1)"),
    ("training.enlarge_below=0", "training.enlarge_below must be in (0, 1]"),
    ("training.shrink_share=0", "training.shrink_share must be in (0, 1]"),
    ("rl.baseline=greedy", "rl.baseline must be 'mean' or 'self_critical'"),
])
def test_bad_config_values_are_named(option, message):
    with pytest.raises(L.UserError, match=re.escape(message)):
        L.load_config(None, [option])


@pytest.mark.parametrize("yaml_text, message", [
    ("training:\n  batch_size: [8, 16]\n", "config key training.batch_size: [8, 16] is not a valid int"),
    ("training:\n  batch_size: yes\n", "config key training.batch_size: True is not a valid int"),
    ("data:\n  train_split: {a: 1}\n", "config key data.train_split: {'a': 1} is not a valid str"),
    ("data:\n  bucket_heights: 32\n", "config key data.bucket_heights: 32 is not a valid tuple"),
    ("training: 5\n", "config section 'training' must be a mapping"),
    ("- training\n", "must hold a mapping of sections"),
    ("training:\n  lr: [\n", "is not valid YAML"),
])
def test_bad_config_files_are_named(tmp_path, yaml_text, message):
    path = tmp_path / "config.yaml"
    path.write_text(yaml_text)
    with pytest.raises(L.UserError) as error:
        L.load_config(str(path))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_shipped_configs_load():
    for name in ("train.yaml", "eval.yaml", "pretrain.yaml", "finetune_rl.yaml"):
        L.load_config(str(ROOT / "configs" / name))
    shipped = L.load_config(str(ROOT / "data" / "model" / "config.yaml"))
    metadata = L.read_metadata(ROOT / "data" / "model", L.checkpoint_steps(ROOT / "data" / "model")[-1])
    vocab = L.load_vocabulary(ROOT / shipped.data.vocab_path)
    L.check_compatible(metadata, L.latexocr_config(shipped, len(vocab)), vocab, ROOT / "data" / "model")


@pytest.mark.parametrize("argv, message", [
    (["train", "--config", "{bad}/missing.yaml"], "config file not found"),
    (["train", "--config", "{bad}/unknown_key.yaml"], "unknown config key 'training.learning_rate'"),
    (["eval", "--set", "evaluation.generation_method=sample"], "generation_method must be 'greedy' or 'beam'"),
    (["predict", "{data}/images/1015942522.png", "--beam", "0"], "evaluation.beam_width must be at least 1"),
    (["pretrain", "--set", "feature_extractor.pooling=max"], "feature_extractor.pooling must be 'mean' or 'cls'"),
])
def test_config_errors_of_a_command_give_one_clear_line(argv, message, one_error_line):
    one_error_line(argv, message)


# --- vocabulary and tokenizer -------------------------------------------------------------------

def test_vocabulary_starts_with_special_tokens(vocab):
    assert vocab.tokens[:7] == L.SPECIAL_TOKENS
    assert (vocab.ids["<PAD>"], vocab.ids["<SOS>"], vocab.ids["<EOS>"], vocab.ids["<UNK>"]) == (0, 1, 2, 3)


def test_build_vocabulary_orders_by_frequency_and_applies_min_count():
    vocab = L.build_vocabulary([["b", "a", "a"], ["a", "c", "b"]], min_count=2)
    assert vocab.tokens[7:] == ("a", "b")
    assert vocab.encode(["a", "c"]) == [7, L.UNK_ID]


def test_tokenizer_round_trips_every_training_caption(vocab):
    captions = [e["caption"].split() for e in json.loads((DATA / "train.json").read_text()).values()]
    for tokens in captions:
        assert vocab.tokenize(L.detokenize(tokens)) == tokens


@pytest.mark.parametrize("tokens, latex", [
    ("f _ { \\alpha } ( x ) = \\left( 4 \\operatorname { s i n } ^ { 2 } \\frac { x } { 2 } \\right)",
     "f_{\\alpha}(x)=\\left(4\\operatorname{sin}^{2}\\frac{x}{2}\\right)"),
    ("\\alpha x \\, \\beta 2 \\ y", "\\alpha x\\,\\beta2\\ y"),  # a space only where LaTeX needs one
    ("\\operatorname* { l i m } \\begin{array} { c c } 1 & 2 \\\\ \\end{array}",
     "\\operatorname*{lim}\\begin{array}{cc}1&2\\\\\\end{array}"),
])
def test_compact_latex_hand_worked(tokens, latex):
    assert L.compact_latex(tokens.split()) == latex
    assert L.format_answer(tokens.split(), "tokens") == tokens
    assert L.format_answer(tokens.split(), "inline") == f"${latex}$"
    assert L.format_answer(tokens.split(), "display") == f"\\[{latex}\\]"


def test_compact_latex_tokenizes_back_to_the_caption(vocab):
    """The compact form is the same formula: it splits back into the caption's tokens (a control
    space splits as `\\ `), but for the 2 captions that hold a plain token of several characters
    (`--`, `0.25`), which split into their characters."""
    captions = [e["caption"].split() for e in json.loads((DATA / "train.json").read_text()).values()]
    multi = [tokens for tokens in captions if any(len(t) > 1 and not t.startswith("\\") for t in tokens)]
    assert len(multi) == 2
    for tokens in captions:
        if tokens not in multi:
            assert ["\\" if t == "\\ " else t for t in vocab.tokenize(L.compact_latex(tokens))] == tokens


@pytest.mark.parametrize("raw, tokens", [
    (r"\frac{a}{b}", [r"\frac", "{", "a", "}", "{", "b", "}"]),
    (r"\left(x\right)^2", [r"\left(", "x", r"\right)", "^", "2"]),
    (r"\left\{ a \right.", [r"\left\{", "a", r"\right."]),
    (r"a\leftarrow b", ["a", r"\leftarrow", "b"]),
    (r"\begin{array}{cc}1&2\\\end{array}", [r"\begin{array}", "{", "c", "c", "}", "1", "&", "2", "\\\\", r"\end{array}"]),
    (r"x_{i}\,\alpha", ["x", "_", "{", "i", "}", r"\,", r"\alpha"]),
])
def test_tokenizer_splits_raw_latex(vocab, raw, tokens):
    assert vocab.tokenize(raw) == tokens


def test_decode_stops_at_eos(vocab):
    ids = [L.SOS_ID] + vocab.encode(["x", "+", "y"]) + [L.EOS_ID] + vocab.encode(["z"])
    assert vocab.decode(ids) == ["x", "+", "y"]


@pytest.mark.parametrize("argv, message", [
    (["train", "--set", "data.vocab_path={bad}/none.json"], "vocabulary file not found"),
    (["train", "--set", "data.vocab_path={bad}/broken.json"], "not valid JSON"),
])
def test_vocabulary_errors_of_a_command_give_one_clear_line(argv, message, one_error_line):
    one_error_line(argv, message)


LATEX_PIECES = ["\\frac", "\\alpha", "\\left(", "\\right)", "\\left\\{", "\\right.", "\\begin{array}", "\\end{array}",
                "{", "}", "^", "_", "\\\\", "\\,", "\\", "x", "2", "+", "=", "(", ")", "\\mathrm", "é", "∑", "&"]


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(pieces=st.lists(st.sampled_from(LATEX_PIECES), max_size=30),
                  spaces=st.lists(st.sampled_from(["", " ", "  ", "\t", "\n", "\u00a0", "\u2009"]), max_size=30))
def test_property_tokenizer_loses_nothing_and_round_trips(vocab, pieces, spaces):
    text = "".join(piece + space for piece, space in zip(pieces, spaces + [""] * len(pieces)))
    tokens = vocab.tokenize(text)
    assert "".join(tokens) == "".join(text.split())
    assert vocab.tokenize(L.detokenize(tokens)) == tokens
    known = [t for t in tokens if t in vocab.ids]
    assert vocab.decode(vocab.encode(known) + [L.EOS_ID]) == known


# --- images -------------------------------------------------------------------------------------

def formula_like(width=300, height=80, box=(40, 20, 200, 50), background=255, ink=0, mode="L"):
    image = Image.new(mode, (width, height), background)
    ImageDraw.Draw(image).rectangle(box, fill=ink)
    return image


def test_ink_crop_finds_the_formula():
    ink = L.ink_crop(formula_like(box=(40, 20, 199, 49)))
    assert ink.shape == (30, 160) and ink.min() == 255


def test_preprocess_keeps_aspect_and_uses_a_bucket():
    data = L.DataSection(glyph_height=0)  # a 30 px block would otherwise be read as one large glyph
    canvas = L.preprocess_image(formula_like(box=(0, 0, 299, 29), width=400), data)[0].image
    assert canvas.shape == (64, 512)
    assert canvas.shape[0] % 16 == 0 and canvas.shape[1] % 16 == 0
    rows, cols = np.nonzero(canvas > 0.5)
    assert (rows.max() - rows.min() + 1, cols.max() - cols.min() + 1) == (30, 300)


def test_wide_formula_is_shrunk_not_squashed():
    data = L.DataSection(glyph_height=0)
    canvas = L.preprocess_image(formula_like(width=2000, height=100, box=(0, 0, 1519, 39)), data)[0].image
    rows, cols = np.nonzero(canvas > 0.5)
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert canvas.shape[1] == max(data.bucket_widths)
    assert abs(width / height - 1520 / 40) < 1.5


def scaled_into_range(ink, data):
    return L.scale_into_range(ink, data, L.glyph_height(ink))


def test_tiny_formula_is_scaled_up_to_min_height():
    data = L.DataSection()
    ink = scaled_into_range(L.ink_crop(formula_like(box=(10, 10, 69, 15))), data)
    assert ink.shape == (data.min_ink_height, 120)


def test_glyph_height_follows_the_glyphs_not_the_formula():
    image = Image.new("L", (200, 60), 255)
    draw = ImageDraw.Draw(image)
    for left in range(20, 120, 12):
        draw.rectangle((left, 25, left + 6, 33), fill=0)  # 9 px tall "glyphs"
    draw.rectangle((8, 5, 10, 54), fill=0)  # a tall bracket
    assert L.glyph_height(L.ink_crop(image)) == 9.0


def test_rescale_image_resizes_any_mode_by_the_factor():
    image = formula_like(box=(40, 20, 199, 49))
    assert L.rescale_image(image, 1.0) is image
    half = L.rescale_image(image, 0.5)
    height, width = L.ink_crop(half).shape
    assert half.size == (150, 40) and abs(height - 15) <= 1 and abs(width - 80) <= 1
    assert L.rescale_image(image.convert("P"), 2.0).size == (600, 160)


@pytest.mark.parametrize("scale", [1.5, 2.0])
def test_a_larger_formula_is_brought_to_the_usual_glyph_size(scale):
    with Image.open(DATA / "images" / "159bf72783.png") as image:
        image.load()
    resized = L.rescale_image(image, scale)
    usual = scaled_into_range(L.ink_crop(image), L.DataSection())
    brought = scaled_into_range(L.ink_crop(resized), L.DataSection())
    left_alone = scaled_into_range(L.ink_crop(resized), L.DataSection(glyph_height=0))
    assert abs(brought.shape[0] / usual.shape[0] - 1) < 0.3, (brought.shape, usual.shape)
    assert abs(left_alone.shape[0] / usual.shape[0] - 1) > 0.3, (left_alone.shape, usual.shape)


def test_a_smaller_formula_keeps_its_size():
    with Image.open(DATA / "images" / "159bf72783.png") as image:
        small = L.ink_crop(L.rescale_image(image, 0.75))
    np.testing.assert_array_equal(scaled_into_range(small, L.DataSection()), small)


def test_size_variants_follow_the_glyph_height():
    with Image.open(DATA / "images" / "159bf72783.png") as image:
        image.load()
    data, factors = L.DataSection(), (1.4, 0.7, 0.5)
    usual = L.ink_crop(L.rescale_image(image, 0.7))  # glyphs 8 px: read once, as preprocessed
    assert [v.image.shape for v in L.size_variants(usual, data, factors)] == [scaled_into_range(usual, data).shape]
    large = L.ink_crop(L.rescale_image(image, 2.0))  # glyphs 21 px: also read at 0.7 and 0.5 times
    assert L.glyph_height(large) >= L.SHRINK_FROM_GLYPH
    variants = L.size_variants(large, data, factors)
    np.testing.assert_array_equal(variants[0].image, scaled_into_range(large, data))
    assert [(v.factor, v.image.shape) for v in variants] == [(1.0, variants[0].image.shape), (0.7, (25, 200)), (0.5, (18, 143))]
    small = L.ink_crop(L.rescale_image(image, 0.5))  # glyphs 6 px: also read 1.4 times as large
    assert L.glyph_height(small) <= L.ENLARGE_UP_TO_GLYPH
    assert [(v.factor, v.image.shape) for v in L.size_variants(small, data, factors)][1:] == [(1.4, (13, 99))]
    assert len(L.size_variants(large, data, ())) == 1
    canvases = L.preprocess_image(L.rescale_image(image, 2.0), data, size_factors=factors)
    assert [(c.factor, c.image.shape) for c in canvases] == [(v.factor, L.choose_bucket(v.image.shape, data)) for v in variants]


def test_transparent_and_inverted_images_match_the_plain_one():
    data = L.DataSection()
    plain = L.preprocess_image(formula_like(), data)[0].image
    transparent = Image.new("RGBA", (300, 80), (0, 0, 0, 0))
    ImageDraw.Draw(transparent).rectangle((40, 20, 200, 50), fill=(0, 0, 0, 255))
    inverted = formula_like(background=0, ink=255)
    np.testing.assert_allclose(L.preprocess_image(transparent, data)[0].image, plain)
    np.testing.assert_allclose(L.preprocess_image(inverted, data)[0].image, plain)


def test_blank_image_is_a_user_error():
    with pytest.raises(L.UserError, match="no visible formula"):
        L.preprocess_image(Image.new("L", (100, 40), 255), L.DataSection())


def test_augmentation_keeps_ink_and_is_deterministic():
    ink = L.ink_crop(L.open_image(DATA / "images" / "1015942522.png"))  # 0 = paper, 255 = ink
    a = L.augment_ink(ink, np.random.default_rng(5))
    b = L.augment_ink(ink, np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, L.augment_ink(ink, np.random.default_rng(6)))  # another seed, another look
    # Still paper and ink (contrast is lowered at most to 0.6), and about as much ink: the scale
    # changes its area by 0.56-1.56 times.
    assert a.dtype == np.uint8 and a.min() == 0 and a.max() >= 0.6 * ink.max() - 1
    assert 0.4 < (a > 64).sum() / (ink > 64).sum() < 2.5


def test_shrink_plan_shrinks_a_random_share_and_only_images_seen_small_stop_at_the_ink_height_floor():
    data = L.DataSection()
    factors, enlarged = L.shrink_plan(np.full(400, 40), np.random.default_rng(0), L.TrainingSection(shrink_to=0.5), data)
    shrunk = factors[factors < 1]
    assert 150 <= len(shrunk) <= 250 and shrunk.min() >= 0.5 and factors.max() == 1 and not enlarged.any()
    assert np.quantile(shrunk, 0.25) < 0.65 and np.quantile(shrunk, 0.75) > 0.85  # spread over [0.5, 1)
    again = L.shrink_plan(np.full(400, 40), np.random.default_rng(0), L.TrainingSection(shrink_to=0.5), data)
    np.testing.assert_array_equal(factors, again[0])
    most = L.shrink_plan(np.full(400, 40), np.random.default_rng(0), L.TrainingSection(shrink_to=0.5, shrink_share=0.9), data)[0]
    assert 330 <= (most < 1).sum() <= 390
    # 14 px crops: seen small they stop at 12 px (preprocessing's floor); enlarged back they need not.
    factors, enlarged = L.shrink_plan(np.full(400, 14), np.random.default_rng(0),
                                      L.TrainingSection(shrink_to=0.3, enlarge_back=0.5), data)
    assert factors[~enlarged].min() == pytest.approx(12 / 14) and factors[enlarged].min() < 0.4
    assert 0.25 < enlarged[factors < 1].mean() < 0.75 and not enlarged[factors == 1].any()


def test_shrinking_an_ink_crop_scales_height_width_and_ink_area_by_the_factor():
    ink = L.ink_crop(L.open_image(DATA / "images" / "1015942522.png"))
    for factor in (0.5, 0.63, 0.9):
        a = L.shrink_ink(ink, factor)
        assert a.shape == (round(ink.shape[0] * factor), round(ink.shape[1] * factor)) == L.shrunk_shape(ink.shape, factor)
        assert (a.astype(float).sum() / ink.sum()) == pytest.approx(factor ** 2, rel=0.1)
    assert L.shrink_ink(ink, 1.0) is ink
    blurred = L.shrink_ink(ink, 0.5, enlarge_back=True)  # as size_variants enlarges small glyphs
    assert blurred.shape == ink.shape
    np.testing.assert_array_equal(blurred, L.resize_ink(L.shrink_ink(ink, 0.5), *ink.shape))


def training_batches(dataset: L.Dataset, **shrinking) -> L.TrainBatches:
    return L.TrainBatches(dataset, L.TrainingSection(batch_size=8, augment=False, **shrinking))


def test_training_batches_hold_shrunk_images_in_the_buckets_of_their_shrunk_size(vocab):
    data = L.DataSection(image_base_dir=str(DATA / "images"))
    dataset = L.Dataset(L.load_split(DATA / "validate.json", data, vocab)[0], data)
    stream = training_batches(dataset, shrink_to=0.5)
    batches, factors, enlarged, keys = stream.epoch_plan(0)
    assert 0.3 < np.mean(factors < 1) < 0.7 and not enlarged.any()
    assert np.mean(training_batches(dataset, shrink_to=0.5, shrink_share=0.9).epoch_plan(0)[1] < 1) > 0.75
    for entry, (ink, factor) in enumerate(zip(dataset.inks, factors)):
        assert keys[entry] == L.choose_bucket(L.shrunk_shape(ink.shape, factor), data) + dataset.keys[entry][2:]
        assert keys[entry][0] <= dataset.keys[entry][0] and keys[entry][1] <= dataset.keys[entry][1]
    assert sum(keys[entry] != dataset.keys[entry] for entry in range(len(dataset))) >= 5  # fewer cells
    assert set(np.concatenate(batches)) == set(range(len(dataset)))
    for k in (0, 3):
        batch, rows = stream.make(k), batches[k]
        assert len({keys[entry] for entry in rows}) == 1 and batch["images"].shape[1:3] == keys[rows[0]][:2]
        for image, entry in zip(batch["images"], rows):
            expected = L.place_in_bucket(L.shrink_ink(dataset.inks[entry], factors[entry]), keys[entry][:2], data.margin)
            np.testing.assert_array_equal(image[..., 0], expected)
        np.testing.assert_array_equal(batch["images"], training_batches(dataset, shrink_to=0.5).make(k)["images"])
    assert stream.locate(len(batches)) == (1, 0) and stream.locate(len(batches) - 1) == (0, len(batches) - 1)
    assert training_batches(dataset).epoch_plan(0)[3] == dataset.keys  # no shrinking: the images' own buckets


def test_training_batches_enlarge_back_a_share_of_the_shrunk_images_at_their_own_size(vocab):
    data = L.DataSection(image_base_dir=str(DATA / "images"))
    dataset = L.Dataset(L.load_split(DATA / "validate.json", data, vocab)[0], data)
    stream = training_batches(dataset, shrink_to=0.5, enlarge_back=0.5)
    batches, factors, enlarged, keys = stream.epoch_plan(0)
    # The same images are shrunk as without enlarging, by the same factors unless enlarged back
    # (then they may go below the ink height floor); about half of them are enlarged back.
    seen_small = training_batches(dataset, shrink_to=0.5).epoch_plan(0)[1]
    np.testing.assert_array_equal(factors[~enlarged], seen_small[~enlarged])
    assert (factors[enlarged] <= seen_small[enlarged]).all() and (seen_small[enlarged] < 1).all()
    assert not enlarged[factors == 1].any() and 0.25 < enlarged[factors < 1].mean() < 0.75
    for entry in np.flatnonzero(enlarged):
        assert keys[entry] == dataset.keys[entry]
    k = next(k for k, rows in enumerate(batches) if enlarged[rows].any() and not enlarged[rows].all())
    for image, entry in zip(stream.make(k)["images"], batches[k]):
        expected = L.shrink_ink(dataset.inks[entry], factors[entry], enlarged[entry])
        np.testing.assert_array_equal(image[..., 0], L.place_in_bucket(expected, keys[entry][:2], data.margin))
    assert not training_batches(dataset, shrink_to=0.5, enlarge_back=0.0).epoch_plan(0)[2].any()
    # With enlarge_below, only the images shrunk below it are enlarged back, each of them at share 1.
    _, factors, enlarged, keys = training_batches(dataset, shrink_to=0.5, enlarge_back=1.0, enlarge_below=0.7).epoch_plan(0)
    np.testing.assert_array_equal(factors[~enlarged], seen_small[~enlarged])
    assert (factors < 0.7).any() and ((0.7 <= factors) & (factors < 1)).any()
    np.testing.assert_array_equal(enlarged, factors < 0.7)
    for entry in np.flatnonzero((0.7 <= factors) & (factors < 1)):  # seen small, in their shrunk size's bucket
        shrunk = L.shrunk_shape(dataset.inks[entry].shape, factors[entry])
        assert keys[entry] == L.choose_bucket(shrunk, data) + dataset.keys[entry][2:]


@pytest.mark.parametrize("argv, message", [
    (["predict", "{bad}/missing.png", "--checkpoint", "{run}"], "image not found"),
    (["predict", "{bad}/text.png", "--checkpoint", "{run}"], "cannot read image"),
    (["predict", "{bad}/zero.png", "--checkpoint", "{run}"], "cannot read image"),
    (["predict", "{bad}/truncated.png", "--checkpoint", "{run}"], "cannot read image"),
    (["predict", "{bad}/blank.png", "--checkpoint", "{run}"], "no visible formula"),
])
def test_image_errors_of_a_command_give_one_clear_line(argv, message, one_error_line):
    one_error_line(argv, message)


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(mode=st.sampled_from(["1", "L", "LA", "P", "RGB", "RGBA", "I;16", "CMYK"]),
                  height=st.integers(1, 60), width=st.integers(1, 200), seed=st.integers(0, 2**32 - 1),
                  ink_share=st.floats(0, 1))
def test_property_preprocessing_never_crashes_and_gives_a_bucket(mode, height, width, seed, ink_share):
    rng = np.random.default_rng(seed)
    ink = rng.random((height, width)) < ink_share
    pixels = np.where(ink, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    data = L.DataSection()
    try:
        canvas = L.preprocess_image(image, data)[0].image
    except L.UserError as error:
        assert "no visible formula" in str(error)
        return
    assert canvas.shape[0] in data.bucket_heights and canvas.shape[1] in data.bucket_widths
    assert canvas.dtype == np.float32 and 0.0 <= canvas.min() and canvas.max() <= 1.0 and canvas.max() > 0


# --- data ---------------------------------------------------------------------------------------

def test_sample_splits_load_with_reports(vocab):
    data = L.DataSection(image_base_dir=str(DATA / "images"))
    counts = {}
    for split in L.SPLITS:
        examples, report = L.load_split(DATA / f"{split}.json", data, vocab)
        counts[split] = len(examples)
        assert not report.skipped
    assert counts == {"train": 897, "validate": 85, "test": 100}


def test_bad_split_entries_are_skipped_and_counted_by_reason(tmp_path, vocab):
    images = tmp_path / "images"
    images.mkdir()
    shutil.copyfile(DATA / "images" / "1015942522.png", images / "good.png")
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    Image.new("L", (50, 20), 255).save(images / "blank.png")
    good = '{"img_path": "good.png", "caption": "x + \\\\notinvocab", "caption_len": 3}'
    split = tmp_path / "split.json"
    split.write_text("{" + ", ".join([
        f'"a.png": {good}',
        '"a.png": {"img_path": "other.png", "caption": "y", "caption_len": 1}',  # the same name again
        '"list.png": [1, 2]',
        '"number.png": {"img_path": "good.png", "caption": 5, "caption_len": 1}',
        '"path_number.png": {"img_path": 7, "caption": "x", "caption_len": 1}',
        '"nokeys.png": {"caption": "x"}',
        '"empty.png": {"img_path": "good.png", "caption": "  ", "caption_len": 0}',
        '"gone.png": {"img_path": "gone.png", "caption": "x", "caption_len": 1}',
        f'"long.png": {{"img_path": "good.png", "caption": "{"x " * 300}", "caption_len": 300}}',
        '"corrupt.png": {"img_path": "corrupt.png", "caption": "x", "caption_len": 1}',
        '"blank.png": {"img_path": "blank.png", "caption": "x", "caption_len": 1}',
    ]) + "}")
    data = L.DataSection(image_base_dir=str(images))
    examples, report = L.load_split(split, data, vocab)
    dataset = L.Dataset(examples, data, report)
    assert [e.name for e in dataset.examples] == ["a.png"] and report.loaded == 1
    assert report.unknown_tokens == 1
    assert dict(report.skipped) == {
        "image name given again, first entry kept": ["a.png"],
        "entry lacks img_path or caption strings": ["list.png", "number.png", "path_number.png", "nokeys.png"],
        "empty caption": ["empty.png"], "image file missing": ["gone.png"],
        "caption longer than 254 tokens": ["long.png"],
        "image unreadable or blank": ["corrupt.png", "blank.png"]}
    assert "skipped 2 (image unreadable or blank: corrupt.png, blank.png)" in report.summary()
    with pytest.raises(L.UserError, match="corrupt.png"):
        L.Dataset(examples[1:2], data)


def test_epoch_batches_are_full_same_shape_and_reproducible(vocab):
    data = L.DataSection(image_base_dir=str(DATA / "images"))
    examples, _ = L.load_split(DATA / "validate.json", data, vocab)
    dataset = L.Dataset(examples, data)
    first = dataset.epoch_batches(8, seed=3, epoch=1)
    assert all(len(b) == 8 and len({dataset.keys[i] for i in b}) == 1 for b in first)
    assert all((a == b).all() for a, b in zip(first, dataset.epoch_batches(8, seed=3, epoch=1)))
    assert set(np.concatenate(first)) == set(range(len(dataset)))
    batch = dataset.batch(first[0])
    height, width, length = dataset.keys[first[0][0]]
    assert batch["images"].shape == (8, height, width, 1) and batch["tokens"].shape == (8, length)
    assert (batch["tokens"][:, 0] == L.SOS_ID).all()


@pytest.mark.parametrize("argv, message", [
    (["train", "--set", "data.train_split={bad}/broken.json", "--set", "training.checkpoint_dir={bad}/r1"],
     "not valid JSON"),
    (["train", "--set", "data.train_split={bad}/list.json", "--set", "training.checkpoint_dir={bad}/r2"],
     "must map image names"),
    (["train", "--set", "data.train_split={bad}/gone.json", "--set", "training.checkpoint_dir={bad}/r3"],
     "split file not found"),
    (["eval", "--checkpoint", "{run}", "--set", "data.test_split={bad}/broken.json"], "not valid JSON"),
])
def test_split_file_errors_of_a_command_give_one_clear_line(argv, message, one_error_line):
    one_error_line(argv, message)


@pytest.fixture(scope="module")
def bad_split_run(tmp_path_factory, eight_examples):
    """`train` on the eight images plus bad entries: it must skip them, say so, and train."""
    folder = tmp_path_factory.mktemp("bad_split")
    entries = json.loads(eight_examples.read_text())
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    entries["corrupt.png"] = {"img_path": str(folder / "corrupt.png"), "caption": "x", "caption_len": 1}
    entries["missing.png"] = {"img_path": "missing.png", "caption": "x", "caption_len": 1}
    entries["empty.png"] = {"img_path": next(iter(entries.values()))["img_path"], "caption": "", "caption_len": 0}
    split = folder / "split.json"
    split.write_text(json.dumps(entries))
    run_dir = folder / "run"
    settings = dict(total_steps=2, warmup_steps=1, eval_every=2, log_every=1)
    L.train(L.apply_overrides(L.Config(), tiny_overrides(run_dir, split, **settings)), progress=False)
    return run_dir, split


def test_train_logs_what_it_skipped(bad_split_run):
    run_dir, _ = bad_split_run
    summaries = [json.loads(line)["summary"] for line in (run_dir / "train.log").read_text().splitlines()
                 if json.loads(line)["event"] == "data"]
    assert "8 examples" in summaries[0]
    for reason in ("skipped 1 (empty caption: empty.png)", "skipped 1 (image file missing: missing.png)",
                   "skipped 1 (image unreadable or blank: corrupt.png)"):
        assert reason in summaries[0]
    assert L.checkpoint_steps(run_dir) == [2]


# --- models and decoding ------------------------------------------------------------------------

def test_blockwise_attention_gives_the_same_values_and_gradients_as_attention_at_once():
    """Training's blockwise self-attention (queries padded to whole blocks) against the weights
    computed at once, with a key mask as the feature extractor's (its memory: docs/RESULTS.md, Speed)."""
    q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (2, 10, 3, 4)) for i in range(3))
    keys = (jnp.arange(10) < 8)[None, None, None, :]

    def at_once(q, k, v):
        return jnp.einsum("bhqk,bkhd->bqhd", L.attention_weights(q, k, keys), v)

    def blockwise(q, k, v):
        return L.blockwise_attention(q, k, v, keys, 4)

    np.testing.assert_allclose(blockwise(q, k, v), at_once(q, k, v), rtol=1e-6, atol=1e-6)
    loss = lambda f: lambda *qkv: (f(*qkv) ** 2).sum()  # noqa: E731
    for got, want in zip(jax.grad(loss(blockwise), (0, 1, 2))(q, k, v), jax.grad(loss(at_once), (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_the_encoder_attends_blockwise_only_in_training_and_only_over_many_cells(monkeypatch):
    calls = []
    monkeypatch.setattr(L, "blockwise_attention", lambda *args: calls.append(args[0].shape) or args[2])
    block = L.EncoderBlock(L.FeatureExtractorConfig(vocab_size=10, dim=8, layers=1, heads=2, mlp_dim=16,
                                                    max_seq_len=8, max_bracket_depth=2))
    for length, deterministic in ((L.BLOCKWISE_ABOVE + 1, False), (L.BLOCKWISE_ABOVE + 1, True), (L.BLOCKWISE_ABOVE, False)):
        x = jnp.ones((1, length, 8))
        variables = block.init(jax.random.PRNGKey(0), x, True)
        block.apply(variables, x, deterministic, rngs={"dropout": jax.random.PRNGKey(1)})
    assert calls == [(1, L.BLOCKWISE_ABOVE + 1, 2, 4)]


def test_cached_decoding_equals_full_causal_forward(tiny_model):
    model, params = tiny_model
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.random((2, 32, 128, 1), np.float32))
    tokens = jnp.asarray(rng.integers(7, model.cfg.vocab_size, (2, 12)), jnp.int32)
    variables = {"params": params}
    full = model.apply(variables, images, tokens)
    memory = model.apply(variables, images, method=L.LatexOCR.encode)
    cross_kv = model.apply(variables, memory, method=L.LatexOCR.cross_keys_values)
    cache = L.init_cache(model.cfg, 2)
    for position in range(tokens.shape[1]):
        logits, cache = model.apply(variables, tokens[:, position], jnp.int32(position), cache, cross_kv,
                                    method=L.LatexOCR.decode_step)
        np.testing.assert_allclose(logits, full[:, position], atol=1e-4)


def test_decoder_is_causal(tiny_model):
    model, params = tiny_model
    images = jnp.ones((1, 32, 128, 1))
    tokens = jnp.arange(8)[None] + 7

    def logits_at_3(t):
        return np.asarray(model.apply({"params": params}, images, t)[0, 3])

    np.testing.assert_allclose(logits_at_3(tokens.at[0, 5].set(20)), logits_at_3(tokens), atol=1e-5)
    assert np.abs(logits_at_3(tokens.at[0, 2].set(20)) - logits_at_3(tokens)).max() > 1e-3


def test_greedy_decoding_agrees_with_full_forward_argmax(tiny_model):
    """The random tiny model never emits <EOS>, so this runs to max_seq_len through every
    lengthening of the cache (64, 128, 256)."""
    model, params = tiny_model
    images = jnp.asarray(np.random.default_rng(1).random((2, 32, 128, 1), np.float32))
    decoded, log_prob = jax.jit(lambda p, x: L.greedy_decode(model, p, x))(params, images)
    assert np.all(np.asarray(decoded) != L.PAD_ID)
    logits = model.apply({"params": params}, images, decoded[:, :-1])
    np.testing.assert_array_equal(np.asarray(jnp.argmax(logits, -1)), np.asarray(decoded[:, 1:]))
    expected = jnp.take_along_axis(jax.nn.log_softmax(logits), decoded[:, 1:, None], 2).sum((1, 2))
    np.testing.assert_allclose(log_prob, expected, rtol=1e-4)


def test_beam_scores_hold_across_cache_segments(tiny_model):
    model, params = tiny_model
    images = jnp.asarray(np.random.default_rng(1).random((2, 32, 128, 1), np.float32))
    tokens, scores = jax.jit(lambda x: L.beam_search(model, params, x, 2, 0.7))(images)
    for image, row, score in zip(images, np.asarray(tokens), np.asarray(scores)):
        assert teacher_forced_score(model, params, image, row) == pytest.approx(float(score), abs=1e-4)


@pytest.fixture(scope="module")
def decoders(ending_model):
    model, params, _ = ending_model
    greedy = jax.jit(lambda x: L.greedy_decode(model, params, x))
    beam = jax.jit(lambda x, width: L.beam_search(model, params, x, width, 0.7), static_argnums=1)
    return greedy, beam


def teacher_forced_score(model, params, image, tokens, length_penalty=0.7):
    """Length-normalised log-probability of a decoded row [max_seq_len], from one full causal
    forward pass over the padded row (later <PAD> inputs cannot change earlier logits)."""
    logits = jax.jit(model.apply)({"params": params}, image[None], jnp.asarray(tokens[None, :-1]))[0]
    targets = jnp.asarray(tokens[1:])
    per_token = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[:, None], 1)[:, 0]
    length = int(np.sum(tokens[1:] != L.PAD_ID))
    return float(jnp.sum(jnp.where(targets != L.PAD_ID, per_token, 0.0))) / length ** length_penalty


def test_beam_width_one_is_greedy(ending_model, decoders):
    _, _, images = ending_model
    greedy, beam = decoders
    np.testing.assert_array_equal(beam(images, 1)[0], greedy(images)[0])


@pytest.mark.parametrize("width", [2, 3, 5])
def test_beam_never_scores_below_greedy_and_reports_true_scores(ending_model, decoders, width):
    model, params, images = ending_model
    greedy, beam = decoders
    greedy_tokens, greedy_log_prob = greedy(images)
    greedy_scores = L.length_normalised(greedy_log_prob, L.sequence_lengths(greedy_tokens), 0.7)
    tokens, scores = beam(images, width)
    assert np.all(np.asarray(scores) >= np.asarray(greedy_scores) - 1e-5)
    assert np.any(np.asarray(scores) > np.asarray(greedy_scores) + 1e-3)
    for image, row, score in zip(images, np.asarray(tokens), np.asarray(scores)):  # ended or cut off alike
        assert teacher_forced_score(model, params, image, row) == pytest.approx(float(score), abs=1e-4)


def test_finished_beams_are_not_extended(ending_model, decoders):
    """After <EOS> only <PAD> follows: a hypothesis that finished keeps exactly the score of its
    own tokens (checked above) while other beams run on."""
    _, _, images = ending_model
    _, beam = decoders
    for row in np.asarray(beam(images, 3)[0]):
        end = list(row).index(L.EOS_ID)
        assert np.all(row[end + 1:] == L.PAD_ID)


def test_beam_batch_equals_one_by_one(ending_model, decoders):
    _, _, images = ending_model
    _, beam = decoders
    tokens, scores = beam(images, 3)
    for i in range(4):
        one_tokens, one_score = beam(images[i:i + 1], 3)
        np.testing.assert_array_equal(one_tokens[0], tokens[i])
        assert float(one_score[0]) == pytest.approx(float(scores[i]), abs=1e-5)


def test_sampling_follows_the_model_distribution(ending_model, decoders):
    model, params, images = ending_model
    greedy, _ = decoders
    rows = jnp.repeat(images[:1], 300, axis=0)
    sample = jax.jit(lambda key, t: L.sample_decode(model, params, rows, key, t))
    tokens, log_prob = sample(jax.random.PRNGKey(1), 1.0)
    np.testing.assert_array_equal(tokens, sample(jax.random.PRNGKey(1), 1.0)[0])
    first = jax.nn.softmax(model.apply({"params": params}, images[:1], jnp.asarray([[L.SOS_ID]]))[0, 0])
    for token in (int(jnp.argmax(first)), L.EOS_ID):
        p, n = float(first[token]), rows.shape[0]
        assert abs(float(np.mean(np.asarray(tokens[:, 1]) == token)) - p) < 4 * math.sqrt(p * (1 - p) / n)
    row = np.asarray(tokens[0])
    if L.EOS_ID in row:
        expected = teacher_forced_score(model, params, images[0], row, length_penalty=0.0)
        assert expected == pytest.approx(float(log_prob[0]), abs=1e-3)
    cold, _ = sample(jax.random.PRNGKey(2), 1e-3)
    np.testing.assert_array_equal(cold[:1], greedy(images[:1])[0])


# --- metrics ------------------------------------------------------------------------------------

REFS = [["a", "b", "c", "d"], ["x", "y"]]
HYPS = [["a", "c", "d"], ["x", "y"]]


def test_edit_distance_hand_worked():
    # pair 1: one deletion over max length 4 = 0.25; pair 2: 0; mean x100 = 12.5
    assert L.edit_distance(REFS, HYPS) == pytest.approx(12.5)


def test_token_accuracy_hand_worked():
    # pair 1: a=a, b!=c, c!=d -> 1 of min(4, 3) = 3; pair 2: 2 of 2 -> (1 + 2) / (3 + 2)
    assert L.token_accuracy(REFS, HYPS) == pytest.approx(60.0)


def test_exact_match_hand_worked():
    assert L.exact_match(REFS, HYPS) == pytest.approx(50.0)


def test_bleu_hand_worked():
    # n-gram precisions 4/5, 3/4, 2/3, 1/2, brevity penalty 1: (0.2) ** (1/4) = 0.66874
    assert L.bleu4([["a", "b", "c", "d", "e"]], [["a", "b", "c", "d", "f"]]) == pytest.approx(66.874, abs=1e-3)
    assert L.bleu4([["a", "b", "c", "d"]], [["a", "b", "c", "d"]]) == pytest.approx(100.0)


def test_error_kinds_sorts_answers_by_what_separates_them(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("error_kinds", Path(__file__).parent / "scripts" / "error_kinds.py")
    kinds = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kinds)
    reference = "x = { a + b } \\, .".split()
    cases = [("x = { a + b } \\, .", "exact"), ("x = { a + b } .", "spacing only"),
             ("x = a + b \\, .", "braces only"), ("x = a + b .", "spacing and braces only"),
             ("x = { a - b } \\, .", "one other token"), ("y = { a - b } \\, .", "two other tokens"),
             ("y = a - c", "more")]
    for prediction, kind in cases:
        assert kinds.error_kind(reference, prediction.split()) == kind, prediction
    rows = [{"reference": " ".join(reference), "prediction": p} for p, _ in cases + cases[:1]]
    (tmp_path / "predictions.json").write_text(json.dumps({"predictions": rows}))
    kinds.main(str(tmp_path / "predictions.json"))
    assert "exact                          2  25.00 %" in capsys.readouterr().out


token_lists = st.lists(st.lists(st.sampled_from(["x", "y", "{", "}", "^", "2", "\\frac"]), max_size=12),
                       min_size=1, max_size=6)


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(references=token_lists, hypotheses=token_lists)
def test_property_metrics_stay_in_range(references, hypotheses):
    hypotheses = (hypotheses * len(references))[: len(references)]
    metrics = L.compute_metrics(references, hypotheses)
    assert all(0.0 <= value <= 100.0 for value in metrics.values()), metrics
    for reference, hypothesis_ in zip(references, hypotheses):
        assert 0.0 <= L.sentence_bleu4(reference, hypothesis_) <= 1.0
        assert 0.0 <= L.edit_similarity(reference, hypothesis_) <= 1.0
    same = L.compute_metrics(references, references)
    assert same["edit_distance"] == 0.0 and same["exact_match"] == 100.0
    assert all(L.sentence_bleu4(r, r) == 1.0 for r in references)


# --- training, checkpoints, resume --------------------------------------------------------------

def final_params(run_dir, step):
    metadata = L.read_metadata(run_dir, step)
    target = L.abstract(jax.eval_shape(lambda: L.init_params(L.LatexOCR(L.network_config_from_metadata(metadata, run_dir)), 0)))
    return L.restore_items(run_dir, step, {"params": target})["params"]


def distance(a, b):
    """Global L2 norm of a - b over every parameter."""
    return float(np.sqrt(sum(jax.tree.leaves(jax.tree.map(
        lambda x, y: np.sum(np.square(np.asarray(x, np.float64) - np.asarray(y, np.float64))), a, b)))))


def test_tiny_model_overfits_eight_real_images_and_decodes_them_exactly(overfit_run, eight_examples, vocab):
    run_dir, summary = overfit_run
    assert summary["step"] == OVERFIT_STEPS
    predictor = L.load_predictor(str(run_dir))
    examples, _ = L.load_split(eight_examples, L.DataSection(image_base_dir=str(DATA / "images")), vocab)
    canvases = [L.preprocess_image(L.open_image(e.image_path), predictor.data)[0].image for e in examples]
    predictions = [tokens for tokens, _ in predictor.predict_images(canvases)]
    assert predictions == [e.caption for e in examples]
    assert summary["metrics"]["exact_match"] == 100.0
    # It reads its images: given another example's image, its loss rises (0.43 nats per token seen).
    assert summary["metrics"]["image_gain"] > 0.2, summary["metrics"]


def test_reading_at_several_sizes_keeps_the_best_answer(overfit_run, eight_examples, vocab):
    """Every size read (confident_score 0), the answer kept is the best by score + size_prior x
    log2(factor), whatever the order; the other sizes are read only when the first answer scores
    at most confident_score."""
    run_dir, _ = overfit_run
    predictor = L.load_predictor(str(run_dir), L.EvaluationSection(confident_score=0.0))
    examples, _ = L.load_split(eight_examples, L.DataSection(image_base_dir=str(DATA / "images")), vocab)
    image = L.open_image(examples[0].image_path)
    scales = (1.0, 0.6, 1.7)
    canvases = [L.SizedImage(scale, L.preprocess_image(L.rescale_image(image, scale), predictor.data)[0].image)
                for scale in scales]
    answers = predictor.predict_images([canvas.image for canvas in canvases])
    kept = {}
    for prior in (0.0, 0.2, 50.0):
        predictor.size_prior = prior
        best = int(np.argmax([score + prior * math.log2(scale) for (_, score), scale in zip(answers, scales)]))
        for order in ([0, 1, 2], [2, 1, 0]):
            [reading] = predictor.read_images([[canvases[i] for i in order]])
            assert order[reading.variant] == best and reading.sizes_read == 3
            assert reading.tokens == answers[best][0] and reading.score == pytest.approx(answers[best][1], abs=1e-5)
        kept[prior] = best
    assert kept[0.0] != kept[50.0] == 2  # a strong prior keeps the largest reading over the best-scored
    assert answers[0][0] == examples[0].caption
    predictor.size_prior = 0.0
    enlarged_first = [canvases[i] for i in (2, 1, 0)]
    predictor.confident_score = answers[2][1] + 1e-3
    assert predictor.read_images([enlarged_first])[0].sizes_read == 3
    predictor.confident_score = answers[2][1] - 1e-3
    [reading] = predictor.read_images([enlarged_first])
    assert (reading.variant, reading.sizes_read, reading.tokens) == (0, 1, answers[2][0])


def test_traced_programs_are_stored_and_read_back(overfit_run, eight_examples, vocab, tmp_path, monkeypatch, capsys):
    """With a program_dir, init and each decoder are traced once and stored; a new process (here
    a new predictor, with exporting refused) reads them back, marking them as in use, and answers
    the same; a stored program that does not read back is traced again and replaced, and storing
    it deletes programs unused for UNUSED_PROGRAM_DAYS."""
    run_dir, _ = overfit_run
    plain = L.load_predictor(str(run_dir))
    examples, _ = L.load_split(eight_examples, L.DataSection(image_base_dir=str(DATA / "images")), vocab)
    canvas = L.preprocess_image(L.open_image(examples[0].image_path), plain.data)[0].image[None, ..., None]

    def answers(predictor):
        return [(tokens, scores.tolist()) for tokens, scores in (predictor.decode_batch(canvas, w) for w in (1, 2))]

    def stored_predictor():
        model, params, _ = L.restore_model(str(run_dir), L.LatexOCRConfig, tmp_path)
        return L.Predictor(model, params, plain.vocab, plain.data, program_dir=tmp_path)

    expected = answers(plain)
    assert expected[0][0] == [examples[0].caption]
    assert answers(stored_predictor()) == expected
    stored = sorted(tmp_path.iterdir())
    assert sorted(p.name.split("-")[0] for p in stored) == ["decoder", "decoder", "encoder", "init"]
    long_unused = time.time() - (L.UNUSED_PROGRAM_DAYS + 1) * 86400
    older_version = tmp_path / "decoder-of-an-older-version.bin"
    older_version.write_bytes(b"a program no version reads any more")
    for path in [*stored, older_version]:
        os.utime(path, (long_unused, long_unused))
    with monkeypatch.context() as refused:
        refused.setattr(jax.export, "export", lambda *a, **k: pytest.fail("traced again"))
        assert answers(stored_predictor()) == expected
    assert all(path.stat().st_mtime > long_unused + 86400 for path in stored) and older_version.exists()
    broken = stored[0]
    broken.write_bytes(b"half a program")
    assert answers(stored_predictor()) == expected
    assert f"traced program {broken} is unreadable" in capsys.readouterr().err
    assert broken.stat().st_size > 1000 and sorted(tmp_path.iterdir()) == stored


def test_program_names_follow_the_source_imported_not_the_file_now(tmp_path, monkeypatch):
    """A long-running process (serve) names the programs it traces by the source it runs, even
    after a newer version is installed over its file."""
    before = L.program_path(tmp_path, "decoder", 1)
    monkeypatch.setattr(L.Path, "read_bytes", lambda self: b"a newer version of latexocr.py")
    assert L.program_path(tmp_path, "decoder", 1) == before
    assert L.program_path(tmp_path, "decoder", 2) != before


def test_images_of_every_shape_share_one_decoder_and_read_as_alone(overfit_run, eight_examples, vocab, tmp_path):
    """predict_images pads each image's memory to a common length, the padding masked: images of
    several bucket shapes then decode through one decoder per batch size and beam width, and
    each answers as it does decoded alone at its own memory length."""
    run_dir, _ = overfit_run
    model, params, _ = L.restore_model(str(run_dir), L.LatexOCRConfig, tmp_path)
    plain = L.load_predictor(str(run_dir))
    predictor = L.Predictor(model, params, plain.vocab, plain.data, program_dir=tmp_path)
    examples, _ = L.load_split(eight_examples, L.DataSection(image_base_dir=str(DATA / "images")), vocab)
    canvases = [L.preprocess_image(L.rescale_image(L.open_image(e.image_path), scale), predictor.data)[0].image
                for e in examples for scale in (1.0, 0.6, 1.7)]
    shapes = {canvas.shape for canvas in canvases}
    assert len(shapes) >= 3
    for width in (1, 2):
        alone = [plain.decode_memory(plain.encode(canvas[None, ..., None]), width) for canvas in canvases]
        together = predictor.predict_images(canvases, width, batch_size=32)
        assert [tokens for tokens, _ in together] == [tokens[0] for tokens, _ in alone]
        np.testing.assert_allclose([score for _, score in together], [scores[0] for _, scores in alone], atol=1e-4)
    kinds = collections.Counter(path.name.split("-")[0] for path in tmp_path.iterdir())
    assert kinds == {"init": 1, "encoder": len(shapes), "decoder": 2}


def test_evaluation_over_size_variants_scores_each_image_once(overfit_run, eight_examples, vocab):
    run_dir, _ = overfit_run
    predictor = L.load_predictor(str(run_dir))
    data = L.DataSection(image_base_dir=str(DATA / "images"))
    examples, _ = L.load_split(eight_examples, data, vocab)
    # At twice the size every image's glyphs call for the 0.5 variant, close to the image as memorised
    # (measured: 7 of 8 read exactly over the variants, 1 of 8 from the usual preprocessing alone).
    plain = L.Dataset(examples, predictor.data, image_scale=2.0)
    varied = L.Dataset(examples, predictor.data, image_scale=2.0, size_factors=(0.5,))
    assert len(plain) == plain.distinct == varied.distinct == 8 and len(varied) == 16
    assert varied.owners == [i // 2 for i in range(16)]
    assert varied.variants == [i % 2 for i in range(16)] and varied.factors == [1.0, 0.5] * 8
    plain_metrics, _, _, plain_readings = L.evaluate_dataset(predictor, plain, 8)
    predictor.confident_score, predictor.size_prior = 0.0, 0.0  # by score alone (the prior suits real models)
    metrics, kept, answers, readings = L.evaluate_dataset(predictor, varied, 8)
    assert [e.name for e in kept] == [e.name for e in examples] and len(answers) == 8
    assert (plain_readings, readings) == (8, 16)
    assert metrics["exact_match"] >= 75.0 and plain_metrics["exact_match"] <= 25.0, (metrics, plain_metrics)
    # Confident of every first answer, it reads each image once, as without size variants.
    predictor.confident_score = -1e9
    assert L.evaluate_dataset(predictor, varied, 8)[::3] == (plain_metrics, 8)


def test_image_reliance_tells_a_reader_from_a_decoder_that_ignores_the_image(eight_examples, vocab):
    """A stub that predicts the same tokens whatever the image gains nothing from the right
    image; a stub that finds its caption through the image (each image's mean ink picks the
    caption) loses nats when shown another example's image."""
    data = L.DataSection(image_base_dir=str(DATA / "images"))
    examples, _ = L.load_split(eight_examples, data, vocab)
    dataset = L.Dataset(examples, data)
    language_model = jax.jit(lambda p, images, tokens: jax.nn.one_hot(tokens, len(vocab)) * p)
    reliance = L.image_reliance(language_model, 3.0, dataset, 8)
    assert reliance["image_gain"] == 0.0 and reliance["val_loss"] > 0
    batch = dataset.batch(np.asarray(max(dataset.groups().values(), key=len)[:8]))
    means = jnp.asarray(batch["images"].mean(axis=(1, 2, 3)))
    captions = jnp.asarray(batch["tokens"][:, 1:])

    def reader(p, images, tokens):
        row = jnp.argmin(jnp.abs(images.mean(axis=(1, 2, 3))[:, None] - means[None]), axis=1)
        return jax.nn.one_hot(captions[row], len(vocab)) * p

    assert len(set(np.asarray(means).tolist())) == 8  # the images tell the captions apart
    reliance = L.image_reliance(jax.jit(reader), 3.0, dataset, 8)
    assert reliance["image_gain"] > 1.0


def test_training_log_and_best_checkpoint_written(overfit_run):
    run_dir, _ = overfit_run
    events = [json.loads(line)["event"] for line in (run_dir / "train.log").read_text().splitlines()]
    assert {"data", "start", "train", "validate", "done"} <= set(events)
    assert L.checkpoint_steps(run_dir / "best") == [OVERFIT_STEPS]
    meta = json.loads((run_dir / "best" / str(OVERFIT_STEPS) / "meta" / "metadata").read_text())
    assert meta["model"]["dim"] == 64 and meta["vocab"][:7] == list(L.SPECIAL_TOKENS)


def test_resume_equals_uninterrupted_run_weights_and_average(tmp_path, eight_examples, vocab):
    """A run resumed from step 2 (beside a save that crashed half-way) ends with exactly the weights
    and weight average of an uninterrupted one, shrinking and augmentation included. With
    ema_decay 0.5 the average after each step is the mean of the last average and the new weights,
    starting from the initial ones; the best checkpoint holds the average, the latest both."""
    settings = dict(total_steps=4, warmup_steps=1, eval_every=1, keep_checkpoints=4, augment=True, shrink_to=0.5,
                    ema_decay=0.5)
    straight = tmp_path / "straight"
    L.train(L.apply_overrides(L.Config(), tiny_overrides(straight, eight_examples, **settings)), progress=False)
    model = L.LatexOCR(L.network_config_from_metadata(L.read_metadata(straight, 4), straight))
    shapes = L.abstract(L.init_params(model, 0))
    average = L.init_params(model, 0)
    for step in range(1, 5):
        stored = L.restore_items(straight, step, {"params": shapes, "ema_params": shapes})
        average = jax.tree.map(lambda a, p: (a + p) / 2, average, stored["params"])
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), stored["ema_params"], average)
    best_step = L.checkpoint_steps(straight / "best")[-1]
    best = L.restore_items(straight / "best", best_step, {"params": shapes})["params"]
    expected = L.restore_items(straight, best_step, {"ema_params": shapes})["ema_params"]
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, np.asarray(y, np.float16).astype(np.float32)),
                 best, expected)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "2", resumed / "2")
    (resumed / "2.orbax-checkpoint-tmp-1").mkdir()  # a save that crashed half-way is ignored
    # The checkpoint a run started from may be gone by the time it resumes: its own weights are used.
    moved_away = dict(settings, init_checkpoint=str(tmp_path / "moved_away"))
    summary = L.train(L.apply_overrides(L.Config(), tiny_overrides(resumed, eight_examples, **moved_away)),
                      resume=True, progress=False)
    assert summary["step"] == 4
    both = {"params": shapes, "ema_params": shapes}
    jax.tree.map(np.testing.assert_array_equal, L.restore_items(resumed, 4, both), L.restore_items(straight, 4, both))


def test_room_for_programs_at_their_median_cost_keeping_the_largest_first_run_free():
    MB, GB = 2**20, 2**30
    # five programs that grew the process by 250 MB, one whose first run (the largest batch shape's
    # activations) grew it by 5 GB: a median program costs 250 MB, and 5 GB stay free for working
    costs = [L.ProcessMemory(1200, 0, 250 * MB, 0)] * 5 + [L.ProcessMemory(1300, 0, 5 * GB, 0)]
    assert L.room_for_programs(L.ProcessMemory(3000, 262_144, 8 * GB, 0), [], 2)  # nothing measured yet
    plenty = L.ProcessMemory(3000, 262_144, 8 * GB, 11 * GB)
    assert L.room_for_programs(plenty, costs, 2)  # 2 x 250 MB + 5 GB <= 11 GB
    short = L.ProcessMemory(3000, 262_144, 8 * GB, 5 * GB)
    assert not L.room_for_programs(short, costs, 2)  # 5.5 GB > 5 GB
    assert not L.room_for_programs(short, costs, 2, dropped=1)  # dropping one frees too little: 5.25 GB
    assert L.room_for_programs(short, costs, 2, dropped=4)  # dropping four does: 4.5 GB
    crowded = L.ProcessMemory(260_000, 262_144, 8 * GB, 11 * GB)
    assert not L.room_for_programs(crowded, costs, 2)  # 260,000 + 2 x 1,200 mappings > 262,144
    assert L.room_for_programs(crowded, costs, 2, dropped=1)


def test_the_first_run_after_a_clear_is_not_counted_as_a_program_cost():
    """Seen in training: a clear handed 14 GB back to the system and the next step's first run took
    most of it back at once. Counted as that program's cost, that growth became the working memory
    to keep free, and the run cleared again 60 steps later with 26 programs loaded and 14 GB free."""
    MB, GB = 2**20, 2**30
    memory = lambda resident, available: L.ProcessMemory(5000, 262_144, resident, available)  # noqa: E731
    programs = L.LoadedPrograms()
    programs.compiled("first", memory(2 * GB, 20 * GB), memory(3 * GB, 19 * GB))  # 1 GB: params and working
    for shape in ("a", "b"):
        programs.compiled(shape, memory(3 * GB, 19 * GB), memory(3 * GB + 250 * MB, 19 * GB - 250 * MB))
    tight = memory(20 * GB, int(2.3 * GB))  # 2 x 250 MB + 2 GiB free wanted; dropping three gives it
    assert programs.must_clear(tight)
    event = programs.cleared(tight, memory(6 * GB, 16 * GB))
    assert event["programs"] == 3 and event["clearing_pays"] and not programs.shapes
    regrown = memory(18 * GB, 4 * GB)
    programs.compiled("c", memory(6 * GB, 16 * GB), regrown)  # 12 GB more after its first run
    for shape in ("d", "e", "f", "g"):
        programs.compiled(shape, regrown, memory(18 * GB + 250 * MB, 4 * GB - 250 * MB))
    assert [cost.resident for cost in programs.costs] == [GB] + [250 * MB] * 6
    later = memory(11 * GB, int(12.2 * GB))  # the regrowth was handed back again by now
    assert not programs.must_clear(later)
    counted = programs.costs + [L.ProcessMemory(0, 0, 12 * GB, 0)]
    assert not L.room_for_programs(later, counted, 2) and L.room_for_programs(later, counted, 2, dropped=5)


def test_a_new_shape_whose_program_needs_more_working_memory_than_is_free_clears_first():
    """Seen in training: a batch of the largest bucket planned 14 GB of working memory, far more than
    any first run had grown the process, and with 12 GB in loaded programs the system killed the run."""
    MB, GB = 2**20, 2**30
    memory = lambda resident, available: L.ProcessMemory(50_000, 262_144, resident, available)  # noqa: E731
    programs = L.LoadedPrograms()
    for shape in range(40):
        programs.compiled(shape, memory(3 * GB, 20 * GB), memory(3 * GB + 300 * MB, 20 * GB - 300 * MB), GB)
    now = memory(15 * GB, 9 * GB)
    assert not programs.must_clear(now, GB)  # 2 x 300 MB + 2 GiB kept free fit in 9 GB
    assert programs.must_clear(now, 14 * GB)  # 14 GB do not; dropping the 40 programs (12 GB) makes room
    programs.compiled("largest", now, now, 14 * GB)
    assert programs.must_clear(now, GB)  # the largest shape needs its 14 GB again whenever it comes
    assert programs.cleared(now, memory(3 * GB, 21 * GB))["largest_working_mb"] == 14 * 1024
    assert not programs.must_clear(memory(3 * GB, 21 * GB), 14 * GB)


def test_working_memory_is_what_xla_plans_for_a_step_and_grows_with_the_batch_shape(tiny_model):
    model, params = tiny_model
    optimizer = L.make_optimizer(L.TrainingSection())
    step = L.make_train_step(model, optimizer, 0.0, 0.5)

    def planned(height, width, length):
        batch = {"images": jnp.zeros((8, height, width, 1)), "tokens": jnp.ones((8, length), jnp.int32)}
        return L.working_memory(step, params, optimizer.init(params), batch, jax.random.PRNGKey(0), np.float32(1e-3))

    assert 0 < planned(32, 256, 48) < planned(64, 512, 96)
    assert L.working_memory(lambda *args: None, params) == 0  # not one jitted function: XLA is not asked


def two_shape_config(tmp_path, run_dir, examples, total_steps):
    """A tiny run without validation whose batches come in two shapes: shrinking puts some of the
    eight images (one bucket as they are) in a smaller bucket."""
    settings = dict(total_steps=total_steps, warmup_steps=1, eval_every=100, shrink_to=0.5)
    no_validation = tmp_path / "empty.json"
    no_validation.write_text("{}")
    overrides = tiny_overrides(run_dir, examples, **settings)
    return L.apply_overrides(L.Config(), {**overrides, "data": {**overrides["data"], "validate_split": no_validation}})


def test_training_clears_compiled_programs_before_memory_runs_out_and_ends_as_without(tmp_path, monkeypatch,
                                                                                      eight_examples):
    """Each batch shape's compiled program stays loaded, holding memory mappings (past vm.max_map_count
    compiling aborts the process) and memory. Faked here: a program takes 4,000 of 10,000 mappings,
    so before a second shape is compiled the first is dropped; the run ends with the weights of one
    that never had to drop anything."""
    loaded, reads = {"programs": 0}, {"before": True}

    def fake_memory():  # reads alternate: before a new shape's first step, then after it
        if not reads["before"]:
            loaded["programs"] += 1
        reads["before"] = not reads["before"]
        return L.ProcessMemory(1000 + 4000 * loaded["programs"], 10_000, 2**20, 2**40)

    clear_caches, cleared = jax.clear_caches, []

    def counted_clear():
        cleared.append(loaded["programs"])
        loaded["programs"], reads["before"] = 0, True
        clear_caches()

    def config(run_dir):
        return two_shape_config(tmp_path, run_dir, eight_examples, total_steps=3)

    monkeypatch.setattr(L, "process_memory", fake_memory)
    monkeypatch.setattr(jax, "clear_caches", counted_clear)
    dropping = tmp_path / "dropping"
    assert L.train(config(dropping), progress=False)["step"] == 3
    assert cleared and set(cleared) == {1}
    events = [json.loads(line) for line in (dropping / "train.log").read_text().splitlines()]
    assert [e["programs"] for e in events if e["event"] == "programs_cleared"] == [1] * len(cleared)
    monkeypatch.setattr(L, "process_memory", lambda: None)  # where /proc does not tell, nothing is checked
    straight = tmp_path / "straight"
    L.train(config(straight), progress=False)
    model = L.LatexOCR(L.network_config_from_metadata(L.read_metadata(straight, 3), straight))
    both = {"params": L.abstract(L.init_params(model, 0))}
    jax.tree.map(np.testing.assert_array_equal, L.restore_items(dropping, 3, both), L.restore_items(straight, 3, both))


def test_training_stops_clearing_programs_when_clearing_gives_no_memory_back(tmp_path, monkeypatch, eight_examples):
    """Where the allocator keeps what dropped programs freed, the system's available memory stays as
    low after a clear, and clearing at every new shape would only recompile. Faked here: each program
    grows the process by 300 MB, 2.5 GB stay available whatever happens, and the run clears once."""
    MB = 2**20
    loaded, reads, new_shapes = {"programs": 0}, {"before": True}, []

    def fake_memory():  # reads alternate, before a new shape's first step and after it, but for one after a clear
        if reads.pop("cleared", False):
            pass
        elif reads["before"]:
            new_shapes.append(loaded["programs"])
            reads["before"] = False
        else:
            loaded["programs"] += 1
            reads["before"] = True
        return L.ProcessMemory(1000, 10**6, (1 + loaded["programs"]) * 300 * MB, 2560 * MB)

    cleared = []

    def counted_clear():
        cleared.append(loaded["programs"])
        loaded["programs"], reads["cleared"] = 0, True

    monkeypatch.setattr(L, "process_memory", fake_memory)
    monkeypatch.setattr(jax, "clear_caches", counted_clear)
    run_dir = tmp_path / "run"
    assert L.train(two_shape_config(tmp_path, run_dir, eight_examples, total_steps=12), progress=False)["step"] == 12
    assert len(new_shapes) >= 3  # the check ran again after the clear, which kept every later program
    assert cleared == [1]
    events = [json.loads(line) for line in (run_dir / "train.log").read_text().splitlines()]
    [event] = [e for e in events if e["event"] == "programs_cleared"]
    assert event["available_mb"] == event["available_after_mb"] == 2560 and not event["clearing_pays"]


def test_training_stops_in_one_line_before_a_batch_that_needs_more_memory_than_there_is(tmp_path, monkeypatch,
                                                                                      eight_examples):
    GB = 2**30
    monkeypatch.setattr(L, "process_memory", lambda: L.ProcessMemory(1000, 10**6, GB, 4 * GB))
    monkeypatch.setattr(L, "working_memory", lambda step, *args: 6 * GB)
    run_dir = tmp_path / "run"
    with pytest.raises(L.UserError) as error:
        L.train(two_shape_config(tmp_path, run_dir, eight_examples, total_steps=2), progress=False)
    message = str(error.value)
    assert "needs 6.0 GB of working memory and 4.0 GB are available" in message and "\n" not in message
    assert "training.batch_size" in message and str(run_dir) in message


def test_return_freed_memory_shrinks_the_process():
    """glibc keeps freed small blocks for reuse; malloc_trim hands whole free pages back, which is
    what lets a clear of compiled programs show in the system's available memory."""
    if not Path("/proc/self/statm").exists() or not ctypes.util.find_library("c"):
        pytest.skip("needs Linux's /proc and glibc")
    # 160 MB, written (calloc's untouched pages are not resident), in 64 KB blocks below glibc's
    # mmap threshold: trim frees whole pages only, so 8 KB holes gave back as little as 40 MB.
    blocks = [b"\1" * (64 * 1024) for _ in range(2_500)]
    del blocks[::2]  # every other block freed: the heap cannot shrink from its top
    held = L.process_memory().resident
    L.return_freed_memory()
    assert held - L.process_memory().resident >= 50 * 2**20
    del blocks


def test_gradient_accumulation_of_a_repeated_batch_equals_one_step(tiny_model, vocab):
    model, params = tiny_model
    data = L.DataSection(image_base_dir=str(DATA / "images"))
    examples, _ = L.load_split(DATA / "validate.json", data, vocab)
    dataset = L.Dataset(examples, data)
    batch = dataset.batch(dataset.epoch_batches(4, 0, 0)[0])
    single, accumulated = L.make_optimizer(L.TrainingSection()), L.make_optimizer(L.TrainingSection(grad_accum_steps=2))
    copy = lambda tree: jax.tree.map(jnp.array, tree)  # noqa: E731  (steps donate their inputs)
    key = jax.random.PRNGKey(0)
    one, _, _ = L.make_train_step(model, single, 0.0, 0.5)(copy(params), single.init(params), batch, key, 1e-3)
    step = L.make_train_step(model, accumulated, 0.0, 0.5)
    two, state, _ = step(copy(params), accumulated.init(params), batch, key, 1e-3)
    jax.tree.map(np.testing.assert_array_equal, two, params)  # no update before the k-th micro-step
    two, _, _ = step(two, state, batch, key, 1e-3)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), one, two)


def test_learning_rate_warms_up_then_decays_by_a_cosine_to_one_percent():
    training = L.TrainingSection(lr=1e-3, warmup_steps=10, total_steps=110)
    rates = [L.learning_rate(training, update) for update in (0, 5, 10, 60, 110, 500)]
    # Halfway through the decay the cosine is 0.5: 1e-3 * (0.01 + 0.99 * 0.5).
    assert rates == pytest.approx([0.0, 5e-4, 1e-3, 1e-3 * 0.505, 1e-5, 1e-5])


def test_a_new_learning_rate_schedule_compiles_the_same_training_step(tiny_model):
    """The rate is an argument of the step, so runs with another lr, warmup or length (each new
    phase) load the programs a previous run compiled instead of compiling every batch shape again."""
    model, params = tiny_model
    batch = {"images": np.ones((2, 32, 128, 1), np.float32),
             "tokens": L.token_array([np.array([7, 8, 9]), np.array([10])], 6)}
    programs = []
    for training in (L.TrainingSection(), L.TrainingSection(lr=3e-5, warmup_steps=7, total_steps=99)):
        optimizer = L.make_optimizer(training)
        step = L.make_train_step(model, optimizer, training.label_smoothing, training.ctc_weight)
        lowered = step.lower(params, optimizer.init(params), batch, jax.random.PRNGKey(0),
                             np.float32(L.learning_rate(training, 3)))
        programs.append(lowered.as_text())
    assert programs[0] == programs[1]


def test_ctc_loss_hand_worked():
    # Uniform logits over 9 classes, 2 cells: "a" is read as "a a", "a -", "- a" (- = blank):
    # 3 of the 81 paths, so the loss is ln 27 per token. The second row needs 3 cells and is left out.
    a, b = 7, 8
    targets = jnp.array([[a, L.EOS_ID, L.PAD_ID], [a, b, a]])
    loss, rows = L.ctc_loss(jnp.zeros((2, 2, 9)), targets)
    assert float(loss) == pytest.approx(np.log(27), rel=1e-5)
    assert float(rows) == 0.5


def test_train_step_adds_weighted_ctc_and_skips_it_at_weight_zero(tiny_model):
    model, params = tiny_model
    optimizer = L.make_optimizer(L.TrainingSection())
    batch = {"images": np.ones((2, 32, 128, 1), np.float32),
             "tokens": L.token_array([np.array([7, 8, 9]), np.array([10])], 6)}
    copy = lambda tree: jax.tree.map(jnp.array, tree)  # noqa: E731  (steps donate their inputs)
    metrics = {weight: L.make_train_step(model, optimizer, 0.0, weight)(
        copy(params), optimizer.init(params), batch, jax.random.PRNGKey(0), 5e-4)[2] for weight in (0.0, 0.5)}
    assert "ctc" not in metrics[0.0] and float(metrics[0.0]["loss"]) == pytest.approx(float(metrics[0.0]["ce"]))
    assert float(metrics[0.5]["ce"]) == pytest.approx(float(metrics[0.0]["ce"]), rel=1e-5)
    assert float(metrics[0.5]["loss"]) == pytest.approx(float(metrics[0.5]["ce"]) + 0.5 * float(metrics[0.5]["ctc"]),
                                                        rel=1e-5)


@pytest.mark.parametrize("cell_height", [16, 8])
def test_encoder_gives_one_vector_per_cell_and_a_finer_grid_takes_the_same_weights(tiny_model, cell_height):
    model, params = tiny_model
    model = L.LatexOCR(dataclasses.replace(model.cfg, cell_height=cell_height))
    images = jnp.zeros((1, 32, 128, 1))
    memory = model.apply({"params": params}, images, method=L.LatexOCR.encode)
    assert memory.shape == (1, (32 // cell_height) * (128 // 8), model.cfg.dim)
    _, ctc_logits = model.apply({"params": params}, images, jnp.zeros((1, 3), jnp.int32),
                                method=L.LatexOCR.logits_and_ctc_logits)
    assert ctc_logits.shape == (1, memory.shape[1], model.cfg.vocab_size)


def test_bf16_compute_trains_with_float32_parameters(vocab):
    cfg = L.latexocr_config(L.load_config(None, ["model.size=tiny", "training.bf16=true"]), len(vocab))
    assert cfg.dtype == "bfloat16"
    model = L.LatexOCR(cfg)
    params = L.init_params(model, 0)
    optimizer = L.make_optimizer(L.TrainingSection())
    batch = {"images": np.ones((2, 32, 128, 1), np.float32),
             "tokens": L.token_array([np.array([7, 8, 9]), np.array([10])], 6)}
    new_params, _, metrics = L.make_train_step(model, optimizer, 0.1, 0.5)(
        params, optimizer.init(params), batch, jax.random.PRNGKey(0), 5e-4)
    assert np.isfinite(float(metrics["loss"]))
    assert {x.dtype for x in jax.tree.leaves(new_params)} == {np.dtype("float32")}


@pytest.mark.parametrize("argv, message", [
    (["predict", "{data}/images/1015942522.png", "--checkpoint", "{bad}/nowhere"], "checkpoint not found"),
    (["predict", "{data}/images/1015942522.png", "--checkpoint", "{bad}"], "no checkpoint steps"),
    (["train", "--resume", "--set", "training.checkpoint_dir={run}", "--set", "data.vocab_path={bad}/vocab.json",
      "--set", "model.size=tiny", "--set", "model.dropout=0"], "another vocabulary"),
    (["train", "--resume", "--set", "training.checkpoint_dir={run}"], "another model config"),
    (["train", "--set", "training.checkpoint_dir={run}"], "already holds a training run"),
    (["train", "--resume", "--set", "training.checkpoint_dir={run}", "--set", "model.size=tiny", "--set", "model.dropout=0",
      "--set", "training.lr=0.003", "--set", "training.warmup_steps=10"],
     "plan this config changes (training.total_steps 300 -> 20000); add `--set training.total_steps=300`"),
    (["train", "--set", "training.init_checkpoint={run}", "--set", "training.checkpoint_dir={bad}/r4"],
     "was made with another model config (dim: checkpoint 64 vs config 256"),
    (["train", "--set", "training.init_checkpoint={run}", "--set", "training.checkpoint_dir={bad}/r6",
      "--set", "model.size=tiny", "--set", "model.dropout=0", "--set", "model.cell_height=8",
      "--set", "model.stem_convolutions=3"],
     "was made with another model config (stem_convolutions: checkpoint 4 vs config 3)"),
    (["train", "--set", "training.init_checkpoint={run}", "--set", "training.checkpoint_dir={bad}/r5",
      "--set", "data.vocab_path={bad}/vocab.json", "--set", "model.size=tiny", "--set", "model.dropout=0"],
     "another vocabulary"),
])
def test_checkpoint_and_run_folder_errors_give_one_clear_line(argv, message, one_error_line):
    one_error_line(argv, message)


def test_nan_loss_stops_training_and_keeps_the_last_checkpoint(bad_split_run, capsys):
    run_dir, split = bad_split_run
    overrides = tiny_overrides(run_dir, split, total_steps=6, warmup_steps=1, eval_every=2, log_every=1, lr=1e38)
    code, _, err = run_main(["train", "--resume", "--replan", "--quiet", *cli_overrides(overrides)], capsys)
    assert code == 2 and "training diverged by step" in err and "Traceback" not in err
    assert L.checkpoint_steps(run_dir) == [2]
    params = final_params(run_dir, 2)
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(params))


def test_a_finer_grid_starts_from_a_coarser_models_weights_and_reads_its_images(overfit_run, eight_examples, tmp_path):
    """8 px high cells from the 16 px model (same stem, last convolution at stride 1): the images it
    memorised are read again after 10 steps (a tiny model from scratch reads none by then)."""
    overrides = tiny_overrides(tmp_path / "fine", eight_examples, total_steps=10, warmup_steps=2, eval_every=10,
                               init_checkpoint=str(overfit_run[0]))
    config = L.apply_overrides(L.Config(), {**overrides, "model": {**overrides["model"], "cell_height": 8}})
    summary = L.train(config, progress=False)
    assert summary["metrics"]["exact_match"] >= 75, summary["metrics"]


def test_checkpoints_saved_before_stem_convolutions_have_one_per_halving_of_the_cell_height():
    fields = dict(vocab_size=10, dim=64, encoder_layers=1, decoder_layers=1, heads=2, mlp_dim=128, cell_width=8,
                  max_seq_len=32)
    for cell_height, convolutions in [(16, 4), (8, 3)]:
        metadata = {"kind": "ocr", "model": dict(fields, cell_height=cell_height)}
        assert L.network_config_from_metadata(metadata, Path("old")).stem_convolutions == convolutions


def test_checkpoints_load_without_unpickling(overfit_run, monkeypatch):
    import pickle

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint load unpickled something")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(np, "load", refuse)
    run_dir, _ = overfit_run
    predictor = L.load_predictor(str(run_dir))
    assert L.count_params(predictor.params) > 0


def test_damaged_or_tampered_checkpoints_are_refused_in_one_line(overfit_run, tmp_path, capsys):
    run_dir, _ = overfit_run
    image = DATA / "images" / "1015942522.png"

    def damaged(change):
        copy = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        shutil.copytree(run_dir / "best", copy)
        where = copy / str(L.checkpoint_steps(copy)[-1])
        change(where)
        code, _, err = run_main(["predict", image, "--checkpoint", copy], capsys)
        assert code == 2 and err.count("\n") == 1 and str(where) in err, err
        return err

    def edit_metadata(where, **changes):
        metadata = json.loads((where / "meta" / "metadata").read_text())
        metadata["model"].update(changes.get("model", {}))
        metadata.update({k: v for k, v in changes.items() if k != "model"})
        (where / "meta" / "metadata").write_text(json.dumps(metadata))

    def truncate_largest_data_file(where):
        largest = max((p for p in (where / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        largest.write_bytes(largest.read_bytes()[:100])

    assert "is stored with shape" in damaged(lambda w: edit_metadata(w, model={"dim": 32}))
    assert "another network design (unknown model settings: patch_size)" in damaged(lambda w: edit_metadata(w, model={"patch_size": 8}))
    assert "do not match the checksum saved with them" in damaged(lambda w: edit_metadata(w, params_sha256="0" * 64))
    assert "is damaged or incomplete" in damaged(truncate_largest_data_file)
    assert "no readable metadata" in damaged(lambda w: (w / "meta" / "metadata").write_text("{broken"))
    assert "has no readable params" in damaged(lambda w: (w / "params" / "_METADATA").unlink())


def training_command(run_dir, split, cache, total_steps, *flags):
    overrides = tiny_overrides(run_dir, split, total_steps=total_steps, warmup_steps=2, eval_every=4, log_every=1,
                               val_samples=2, keep_checkpoints=2)
    return run_cli(["train", "--quiet", *flags, *cli_overrides(overrides)],
                   {"LATEXOCR_CACHE_DIR": str(cache), "JAX_DISABLE_MOST_OPTIMIZATIONS": "true"})


def logged_since_start(run_dir, event):
    """The complete records of one event written by the latest process of a run (those after its
    last `start` record; a line being written is left out)."""
    text = (run_dir / "train.log").read_text() if (run_dir / "train.log").exists() else ""
    records = [json.loads(line) for line in text.split("\n")[:-1]]
    starts = [i for i, record in enumerate(records) if record["event"] == "start"]
    return [record for record in records[starts[-1] + 1:] if record["event"] == event] if starts else []


def saving(run_dir):
    return [p.name for p in run_dir.iterdir() if ".orbax-checkpoint-tmp" in p.name]


def wait_for(condition, process, timeout=240, every=0.002):
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(every)


def test_training_survives_sigint_and_sigkill_at_any_point(tmp_path, eight_examples):
    """Ctrl-C saves the current step and exits 130; SIGKILL (during a checkpoint save, or a random
    number of steps after the resume) loses at most the steps since the last complete checkpoint;
    every resume starts from the latest complete one and the run ends where it should. More
    kills: LATEXOCR_KILL_TRIALS=N (and LATEXOCR_KILL_SEED)."""
    import signal

    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    process = training_command(run_dir, eight_examples, cache, 100_000)
    wait_for(lambda: any(r["step"] >= 5 for r in logged_since_start(run_dir, "train")), process, every=0.05)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    stopped = json.loads(out.splitlines()[-1])["step"]
    assert process.returncode == 130 and f"interrupted; saved step {stopped}" in err
    assert L.checkpoint_steps(run_dir)[-1] == stopped
    assert logged_since_start(run_dir, "interrupted")[-1]["step"] == stopped

    rng = np.random.default_rng(int(os.environ.get("LATEXOCR_KILL_SEED", "0")))
    for trial in range(int(os.environ.get("LATEXOCR_KILL_TRIALS", "2"))):
        before = L.checkpoint_steps(run_dir)[-1]
        starts = (run_dir / "train.log").read_text().count('"event": "start"')
        process = training_command(run_dir, eight_examples, cache, 100_000, "--resume")
        wait_for(lambda: (run_dir / "train.log").read_text().count('"event": "start"') > starts
                 and logged_since_start(run_dir, "train"), process, every=0.01)
        assert logged_since_start(run_dir, "resume")[-1]["step"] == before
        if trial % 2 == 0:
            wait_for(lambda: saving(run_dir), process)
            moment = "while a checkpoint was being written"
        else:
            steps = int(rng.integers(1, 9))
            wait_for(lambda: logged_since_start(run_dir, "train")[-1]["step"] >= before + steps, process, every=0.005)
            moment = f"{steps} steps after resuming"
        complete = L.checkpoint_steps(run_dir)[-1]
        process.kill()
        process.communicate()
        after = L.checkpoint_steps(run_dir)[-1]
        print(f"kill {trial + 1}, {moment}: resumed from {before}, last logged step "
              f"{logged_since_start(run_dir, 'train')[-1]['step']}, latest complete checkpoint {complete} at the kill, "
              f"{after} after it; half-written: {saving(run_dir) or 'none'}")
        assert after >= complete
        final_params(run_dir, after)  # the latest complete checkpoint restores

    # A resume that would change the run's learning-rate plan is refused, unless --replan says so.
    latest = L.checkpoint_steps(run_dir)[-1]
    process = training_command(run_dir, eight_examples, cache, latest + 4, "--resume")
    _, err = process.communicate(timeout=120)
    assert process.returncode == 2 and "add `--set training.total_steps=100000` to continue as planned" in err
    process = training_command(run_dir, eight_examples, cache, latest + 4, "--resume", "--replan")
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    assert json.loads(out.splitlines()[-1])["step"] == latest + 4
    replanned = L.TrainingSection(lr=3e-3, warmup_steps=2, total_steps=latest + 4)
    assert logged_since_start(run_dir, "train")[-1]["lr"] == pytest.approx(L.learning_rate(replanned, latest + 4))
    assert logged_since_start(run_dir, "resume")[-1]["step"] == latest
    assert L.checkpoint_steps(run_dir)[-1] == latest + 4
    assert not saving(run_dir)  # what a killed save left is removed when the run resumes


# --- commands -----------------------------------------------------------------------------------

def test_cli_vocab(tmp_path, capsys):
    code, out, _ = run_main(["vocab", "--out", tmp_path / "vocab.json"], capsys)
    assert code == 0
    assert json.loads((tmp_path / "vocab.json").read_text()) == json.loads((DATA / "vocab.json").read_text())


def test_cli_train_eval_predict(overfit_run, eight_examples, tmp_path, capsys, vocab):
    run_dir, _ = overfit_run
    code, out, _ = run_main(["eval", "--checkpoint", run_dir, "--quiet",
                             "--set", f"data.test_split={eight_examples}",
                             "--set", f"evaluation.output_dir={tmp_path / 'results'}"], capsys)
    assert code == 0 and "exact match %" in out
    saved = json.loads((tmp_path / "results" / "predictions.json").read_text())
    assert saved["metrics"]["exact_match"] == 100.0 and len(saved["predictions"]) == 8
    assert (tmp_path / "results" / "evaluate.log").read_text().count("BLEU-4") == 1

    entries = json.loads(eight_examples.read_text())
    images = [DATA / "images" / e["img_path"] for e in entries.values()][:2]
    code, out, _ = run_main(["predict", *images, "--checkpoint", run_dir], capsys)
    assert code == 0 and out.splitlines() == [e["caption"] for e in list(entries.values())[:2]]
    code, out, _ = run_main(["predict", images[0], "--checkpoint", run_dir, "--json"], capsys)
    result = json.loads(out)
    assert result["predictions"][0]["latex"] == list(entries.values())[0]["caption"]
    assert result["decode_seconds"] >= 0

    code, out, _ = run_main(["train", "--quiet", *sum((["--set", f"{s}.{k}={v}"] for s, values in tiny_overrides(
        tmp_path / "cli_run", eight_examples, total_steps=2, warmup_steps=1, eval_every=2).items()
        for k, v in values.items()), [])], capsys)
    assert code == 0 and json.loads(out.splitlines()[-1])["step"] == 2


def test_cli_eval_of_a_sample_at_another_image_scale(overfit_run, eight_examples, tmp_path, capsys):
    run_dir, _ = overfit_run
    names = {}
    for scale in ("1", "0.5"):
        code, out, err = run_main(["eval", "--checkpoint", run_dir, "--quiet", "--sample", 3, "--seed", 4,
                                   "--image-scale", scale, "--set", f"data.test_split={eight_examples}",
                                   "--set", f"evaluation.output_dir={tmp_path / scale}"], capsys)
        assert code == 0 and "3 images (sample of 3, seed 4)" in out
        assert "3 examples (a sample of the 8 loaded)" in err
        saved = json.loads((tmp_path / scale / "predictions.json").read_text())
        names[scale] = [p["name"] for p in saved["predictions"]]
    assert "images scaled x0.5" in out
    assert names["1"] == names["0.5"] and set(names["1"]) < set(json.loads(eight_examples.read_text()))
    assert saved["metrics"]["exact_match"] < 100.0  # memorised at their own size, not at half of it


def test_cli_beam_search_predicts_and_evaluates(overfit_run, eight_examples, tmp_path, capsys):
    run_dir, _ = overfit_run
    entries = list(json.loads(eight_examples.read_text()).values())
    images = [DATA / "images" / e["img_path"] for e in entries[:3]]
    code, out, _ = run_main(["predict", *images, "--checkpoint", run_dir, "--beam", 3, "--json"], capsys)
    result = json.loads(out)
    assert code == 0 and result["decoding"] == "beam 3, length penalty 0.7, size factors 2 0.7 0.5 below score -0.5 with size prior 0.2"
    assert [p["latex"] for p in result["predictions"]] == [e["caption"] for e in entries[:3]]
    # Memorised, each first answer is confident (scores near 0), so no other size is read.
    assert all(L.EvaluationSection().confident_score < p["score"] <= 0 and p["sizes_read"] == 1 for p in result["predictions"])
    code, out, _ = run_main(["eval", "--checkpoint", run_dir, "--quiet", "--set", f"data.test_split={eight_examples}",
                             "--set", "evaluation.generation_method=beam", "--set", "evaluation.beam_width=2",
                             "--set", f"evaluation.output_dir={tmp_path}"], capsys)
    assert code == 0 and "beam 2, length penalty 0.7" in out
    assert json.loads((tmp_path / "predictions.json").read_text())["metrics"]["exact_match"] == 100.0


def test_predictor_reads_paths_bytes_images_and_arrays_alike(overfit_run, eight_examples, capsys):
    run_dir, _ = overfit_run
    entries = list(json.loads(eight_examples.read_text()).values())[:2]
    paths = [DATA / "images" / e["img_path"] for e in entries]
    predictor = L.load_predictor(str(run_dir))
    sources = [str(paths[0]), paths[1].read_bytes(), Image.open(paths[0]), np.asarray(Image.open(paths[1]).convert("RGB"))]
    assert [r.tokens for r in predictor.read(sources)] == [e["caption"].split() for e in entries * 2]
    with pytest.raises(L.UserError, match="cannot read image number 0"):
        predictor.read([b"not an image"])
    code, out, _ = run_main(["predict", paths[0], "--checkpoint", run_dir, "--format", "display"], capsys)
    assert code == 0 and out == f"\\[{L.compact_latex(entries[0]['caption'].split())}\\]\n"


def test_predict_uses_the_shipped_default_model(capsys):
    """The README's first command: the shipped model reads these two sample test images exactly."""
    captions = {entry["img_path"]: entry["caption"] for entry in json.loads((DATA / "test.json").read_text()).values()}
    names = ["6596750444.png", "25765b9391.png"]
    code, out, err = run_main(["predict", *(DATA / "images" / name for name in names), "--json"], capsys)
    assert code == 0, err
    predictions = json.loads(out)["predictions"]
    assert [p["latex"] for p in predictions] == [captions[name] for name in names]
    assert all(p["latex"] == " ".join(p["tokens"]) for p in predictions)


def test_readme_python_example_runs(capsys, monkeypatch):
    """The README's "From Python" block, run as written: the shipped model reads both images."""
    block = re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL).group(1)
    monkeypatch.chdir(ROOT)
    exec(compile(block, "README.md", "exec"), {})
    captions = {e["img_path"]: e["caption"] for e in json.loads((DATA / "test.json").read_text()).values()}
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    for line in lines[:2]:
        path, rest = line.split(" ", 1)
        assert rest.rsplit(" ", 1)[0] == captions[Path(path).name]
    assert lines[2] == f"\\[{L.compact_latex(captions['159bf72783.png'].split())}\\]"


def test_the_shipped_default_model_reads_the_image():
    """On 32 held-out sample test images, the teacher-forced loss of their captions rises by more
    than a nat per token when each is shown another one's image: a language model of LaTeX that
    ignored the image would score 0 (the model measured 2.36 on real IM2LATEX-100K val images)."""
    predictor = L.load_predictor(str(ROOT / "data" / "model"))
    data = dataclasses.replace(predictor.data, image_base_dir=str(DATA / "images"))
    examples, _ = L.load_split(DATA / "test.json", data, predictor.vocab)
    dataset = L.Dataset(examples, data)
    logits = jax.jit(lambda p, images, tokens: predictor.model.apply({"params": p}, images, tokens))
    reliance = L.image_reliance(logits, predictor.params, dataset, 32)
    assert reliance["image_gain"] > 1.0, reliance


@pytest.mark.parametrize("argv, message", [
    (["eval", "--image-scale", "0"], "--image-scale must be in (0, 8]"),
    (["eval", "--checkpoint", "{run}", "--sample", "0"], "--sample must be at least 1"),
    (["serve", "--port", "8001"], "serve is a command of latexocr_tools.py: python latexocr_tools.py serve --port 8001"),
    (["render", "my formulas.txt", "out"], "python latexocr_tools.py render 'my formulas.txt' out"),
])
def test_bad_command_options_give_one_clear_line(argv, message, one_error_line):
    one_error_line(argv, message)


def test_predict_reports_bad_files_and_still_answers_good_ones(bad_files, overfit_run, eight_examples, capsys):
    run_dir, _ = overfit_run
    entry = next(iter(json.loads(eight_examples.read_text()).values()))
    code, out, err = run_main(["predict", bad_files / "text.png", DATA / "images" / entry["img_path"],
                               "--checkpoint", run_dir], capsys)
    assert code == 1
    assert out.split("\n") == ["", entry["caption"], ""]  # one line per image given, empty for the bad one
    assert err.count("latexocr: error:") == 1


@pytest.fixture(scope="module")
def hostile_images(tmp_path_factory, eight_examples):
    """Odd and hostile image files, with what `predict` must do with each: ("caption",) decode to
    the memorised caption of the formula they show, ("answer",) give some LaTeX, ("error", text)
    refuse with a message holding text."""
    from PIL import ImageOps

    folder = tmp_path_factory.mktemp("hostile")
    entry = next(iter(json.loads(eight_examples.read_text()).values()))
    original = DATA / "images" / entry["img_path"]
    gray = Image.open(original).convert("L")
    ink = ImageOps.invert(gray)
    black = Image.new("L", gray.size, 0)
    rng = np.random.default_rng(0)
    files = {
        "zero_bytes.png": (b"", ("error", "cannot read image")),
        "text_file.png": (b"this is not an image\n", ("error", "not an image in a format Pillow reads")),
        "truncated.png": (original.read_bytes()[: original.stat().st_size // 2], ("error", "cannot read image")),
        "declares_20000x20000.png": (png_declaring(20000, 20000), ("error", "over the 50,000,000 pixel limit")),
        "one_pixel.png": (Image.new("L", (1, 1), 255), ("error", "no visible formula")),
        "sixteen_bit.png": (Image.fromarray(np.asarray(gray, np.uint16) * 257), ("caption",)),
        "palette.png": (gray.convert("RGB").quantize(16), ("caption",)),
        "cmyk.jpg": (gray.convert("CMYK"), ("caption",)),
        "transparent_background.png": (Image.merge("RGBA", [black, black, black, ink]), ("caption",)),
        "white_on_black.png": (ink, ("caption",)),
        "gray_with_alpha.png": (Image.merge("LA", [gray, Image.new("L", gray.size, 255)]), ("caption",)),
        "animated.gif": ([gray, Image.new("L", gray.size, 255)], ("caption",)),
        "noisy_photo.png": (Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)), ("answer",)),
        "very_wide.png": (Image.fromarray(np.tile(np.asarray(gray), (1, 12))), ("answer",)),
        "multi_line.png": (Image.fromarray(np.vstack([np.asarray(gray)] * 3)), ("answer",)),
    }
    buffer = io.BytesIO()
    gray.save(buffer, "JPEG")
    files["truncated.jpg"] = (buffer.getvalue()[: len(buffer.getvalue()) // 2], ("error", "cannot read image"))
    expected = {}
    for name, (content, outcome) in files.items():
        path = folder / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, list):
            content[0].save(path, save_all=True, append_images=content[1:], duration=100, loop=0)
        else:
            content.save(path, quality=95) if name.endswith(".jpg") else content.save(path)
        expected[path] = outcome
    return expected, entry["caption"]


def test_predict_answers_or_refuses_each_hostile_image_and_goes_on(hostile_images, overfit_run, capsys):
    expected, caption = hostile_images
    run_dir, _ = overfit_run
    paths = list(expected)
    code, out, err = run_main(["predict", *paths, "--checkpoint", run_dir, "--json"], capsys)
    assert code == 1 and "Traceback" not in err
    answers = json.loads(out)["predictions"]
    assert [a["image"] for a in answers] == [str(p) for p in paths]
    errors = [line for line in err.splitlines() if line.startswith("latexocr: error:")]
    refused = [p for p, outcome in expected.items() if outcome[0] == "error"]
    assert len(errors) == len(refused)
    for path, answer in zip(paths, answers):
        outcome = expected[path]
        if outcome[0] == "error":
            assert outcome[1] in answer["error"] and str(path) in answer["error"], answer
            assert sum(str(path) in line for line in errors) == 1
        elif outcome[0] == "caption":
            assert answer["latex"] == caption, path.name
        else:
            assert answer["tokens"], path.name
    code, out, _ = run_main(["predict", *paths, "--checkpoint", run_dir], capsys)
    lines = out.split("\n")[:-1]
    assert code == 1 and len(lines) == len(paths)
    assert [line == "" for line in lines] == [expected[p][0] == "error" for p in paths]


# --- feature extractor pretraining -------------------------------------------------------------

@pytest.mark.parametrize("formula, cap, depths", [
    (r"\frac { a } { b ^ { 2 } }", 8, [0, 0, 1, 0, 0, 1, 1, 1, 2, 1, 0]),
    (r"\left( x + \left[ y \right] \right) \rightarrow z", 8, [0, 1, 1, 1, 2, 1, 0, 0, 0]),
    (r"\left\{ a \right. \leftarrow b", 8, [0, 1, 0, 0, 0]),
    (r"} } a { { b", 8, [0, 0, 0, 0, 1, 2]),
    (r"{ { { x } } }", 2, [0, 1, 2, 2, 2, 1, 0]),
    (r"\{ a \}", 8, [0, 0, 0]),
])
def test_bracket_depths_hand_worked(formula, cap, depths):
    assert L.bracket_depths(formula.split(), cap) == depths


def test_extractor_inputs_frame_and_score_only_formula_tokens(vocab):
    batch = L.extractor_inputs([["{", "x", "}"]], vocab, 8, 8)
    assert batch["tokens"][0].tolist() == [L.CLS_ID, *vocab.encode(["{", "x", "}"]), L.SEP_ID, 0, 0, 0]
    assert batch["depths"][0].tolist() == [-1, 0, 1, 0, -1, -1, -1, -1]


def test_mask_tokens_follows_the_80_10_10_rule():
    tokens = jnp.asarray(np.random.default_rng(0).integers(7, 200, (200, 100)), jnp.int32)
    tokens = tokens.at[:, 0].set(L.CLS_ID).at[:, 60].set(L.SEP_ID).at[:, 61:].set(L.PAD_ID)
    inputs, chosen = L.mask_tokens(jax.random.PRNGKey(0), tokens, 200, 0.15)
    inputs, chosen, tokens = np.asarray(inputs), np.asarray(chosen), np.asarray(tokens)
    assert not chosen[:, [0, 60]].any() and not chosen[:, 61:].any()
    assert chosen[:, 1:60].mean() == pytest.approx(0.15, abs=0.01)
    masked, kept = inputs[chosen] == L.MASK_ID, inputs[chosen] == tokens[chosen]
    assert masked.mean() == pytest.approx(0.8, abs=0.02)
    assert kept.mean() == pytest.approx(0.1, abs=0.02)
    assert np.all(inputs[~chosen] == tokens[~chosen])


@pytest.fixture(scope="module")
def pretrained_extractor(tmp_path_factory):
    """A tiny extractor pretrained through `pretrain` on 64 real training formulas."""
    folder = tmp_path_factory.mktemp("pretrain")
    captions = [e["caption"] for e in json.loads((DATA / "train.json").read_text()).values()][:64]
    corpus = folder / "formulas.txt"
    corpus.write_text("\n".join(captions))
    config = L.apply_overrides(L.Config(), {
        "feature_extractor": {"size": "tiny", "dropout": 0.0, "checkpoint_path": str(folder / "run"),
                              "train_formulas": [str(corpus)], "validate_formulas": str(corpus)},
        "training": {"batch_size": 16, "lr": 3e-3, "warmup_steps": 20, "total_steps": 300, "eval_every": 300,
                     "val_samples": 64}})
    return folder / "run", L.pretrain(config, progress=False), captions


def test_pretraining_beats_the_frequency_baselines(pretrained_extractor):
    _, summary, captions = pretrained_extractor
    tokens = collections.Counter(t for caption in captions for t in caption.split())
    depths = collections.Counter(d for caption in captions for d in L.bracket_depths(caption.split(), 8))
    most_frequent_token = 100 * max(tokens.values()) / sum(tokens.values())  # 17 % here; uniform: 0.3 %
    most_frequent_depth = 100 * max(depths.values()) / sum(depths.values())  # 49 % here
    assert summary["metrics"]["mlm_accuracy"] > 1.5 * most_frequent_token
    assert summary["metrics"]["depth_accuracy"] > most_frequent_depth + 25


def test_extractor_features_rank_identical_edited_unrelated(pretrained_extractor, vocab):
    run_dir, _, captions = pretrained_extractor
    model, params, saved_vocab = L.load_feature_extractor(str(run_dir))
    assert saved_vocab.tokens == vocab.tokens
    features = L.make_features(model, "mean")
    for i in range(6):
        formula = captions[i].split()
        edited = list(formula)
        edited[len(edited) // 2] = "x" if edited[len(edited) // 2] != "x" else "y"
        rows = L.extractor_inputs([formula, formula, edited, captions[i + 30].split()], vocab, 256, 8)["tokens"]
        f = features(params, jnp.asarray(rows))
        same, edit, unrelated = np.asarray(L.cosine_similarity(f[:1], f[1:]))
        assert same == pytest.approx(1.0, abs=1e-5)
        assert unrelated < edit < same - 1e-5  # float32 noise on `same` is ~1e-7


def test_cls_pooling_returns_the_first_position(pretrained_extractor, vocab):
    run_dir, _, captions = pretrained_extractor
    model, params, _ = L.load_feature_extractor(str(run_dir))
    rows = jnp.asarray(L.extractor_inputs([captions[0].split()], vocab, 96, 8)["tokens"])
    np.testing.assert_allclose(L.extractor_features(model, params, rows, "cls"), model.apply({"params": params}, rows)[:, 0])


@pytest.mark.parametrize("argv, message", [
    (["pretrain", "--set", "feature_extractor.train_formulas=[{bad}/none.txt]",
      "--set", "feature_extractor.checkpoint_path={bad}/p1"], "formula file not found"),
    (["pretrain", "--set", "feature_extractor.checkpoint_path={run}"], "already holds a training run"),
])
def test_pretrain_errors_give_one_clear_line(argv, message, one_error_line):
    one_error_line(argv, message)


# --- REINFORCE ----------------------------------------------------------------------------------

def test_text_rewards_hand_worked():
    rl = L.RLSection(bleu_weight=0.5, edit_weight=0.25, exact_match_bonus=2.0)
    references, hypotheses = [[7, 8, 9, 10], [11, 12]], [[7, 9, 10], [11, 12]]
    partial, exact = L.text_rewards(rl, references, hypotheses)
    assert exact == pytest.approx(0.5 * 1.0 + 0.25 * 1.0 + 2.0)
    assert partial == pytest.approx(0.5 * L.sentence_bleu4(references[0], hypotheses[0]) + 0.25 * 0.75)
    assert 0 < L.sentence_bleu4(references[0], hypotheses[0]) < 1  # smoothed: no 4-gram, still above 0
    assert L.sentence_bleu4([7, 8, 9], []) == 0.0 and L.sentence_bleu4([], []) == 1.0
    assert L.formula_ids(np.array([L.SOS_ID, 7, 8, L.EOS_ID, L.PAD_ID])) == [7, 8]


def test_rl_gradient_equals_hand_computed_on_a_toy_case():
    """d/dz of mean_b(-A_b * sum_t log softmax(z_bt)[y_bt]) is -A_b / B * (onehot(y_bt) - softmax(z_bt))
    at every scored position, and 0 after the sequence ended."""
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 5)), jnp.float32)
    targets = jnp.array([[7 % 5, 3, L.EOS_ID], [4, L.EOS_ID, L.PAD_ID]])
    advantages = jnp.array([0.5, -2.0])
    grad = jax.grad(lambda z: L.reinforce_loss(L.sequence_log_probs(z, targets), advantages))(logits)
    probs = jax.nn.softmax(logits)
    expected = -advantages[:, None, None] / 2 * (jax.nn.one_hot(targets, 5) - probs)
    expected = expected * (targets != L.PAD_ID)[..., None]
    np.testing.assert_allclose(grad, expected, atol=1e-6)
    assert np.all(np.asarray(grad[1, 2]) == 0)


def test_rl_update_raises_the_probability_of_samples_above_the_baseline(tiny_model):
    """The original's REINFORCE term had no gradient; ours moves log p(sample) with the advantage's sign."""
    model, params = tiny_model
    images = jnp.asarray(np.random.default_rng(2).random((2, 32, 128, 1), np.float32))
    samples = jnp.array([[L.SOS_ID, 9, 12, 15, L.EOS_ID], [L.SOS_ID, 20, 8, L.EOS_ID, L.PAD_ID]])

    def log_probs(p):
        return L.sequence_log_probs(model.apply({"params": p}, images, samples[:, :-1]), samples[:, 1:])

    advantages = jnp.array([1.0, -1.0])
    grads = jax.grad(lambda p: L.reinforce_loss(log_probs(p), advantages))(params)
    assert float(optax.tree.norm(grads)) > 0
    stepped = jax.tree.map(lambda p, g: p - 0.05 * g, params, grads)
    before, after = np.asarray(log_probs(params)), np.asarray(log_probs(stepped))
    assert after[0] > before[0] and after[1] < before[1]


@pytest.fixture(scope="module")
def eight_batch(eight_examples, vocab):
    data = L.DataSection(image_base_dir=str(DATA / "images"))
    dataset = L.Dataset(L.load_split(eight_examples, data, vocab)[0], data)
    mesh = L.data_parallel_mesh(8)
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    return L.to_global(dataset.batch(np.arange(8)), rows)


def test_rl_step_with_lambda_zero_is_the_cross_entropy_step(tiny_model, eight_batch):
    model, params = tiny_model
    optimizer = L.make_optimizer(L.TrainingSection())
    copy = lambda tree: jax.tree.map(jnp.array, tree)  # noqa: E731  (steps donate their inputs)
    key = jax.random.PRNGKey(3)
    rl = L.RLSection(lambda_rl=0.0, extractor_weight=0.0, edit_weight=1.0)
    ce_params, _, ce_metrics = L.make_train_step(model, optimizer, 0.1, 0.0)(
        copy(params), optimizer.init(params), eight_batch, key, 1e-3)
    rl_params, _, rl_metrics = L.make_rl_step(model, optimizer, 0.1, rl, (48, 96, 160, 256))(
        copy(params), optimizer.init(params), eight_batch, key, 1e-3)
    assert float(rl_metrics["loss"]) == pytest.approx(float(ce_metrics["loss"]), abs=1e-6)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), ce_params, rl_params)
    assert not np.allclose(ce_params["head"]["bias"], params["head"]["bias"])


def test_extractor_reward_with_self_critical_baseline_steps(tiny_model, eight_batch, pretrained_extractor):
    model, params = tiny_model
    extractor, extractor_params, _ = L.load_feature_extractor(str(pretrained_extractor[0]))
    optimizer = L.make_optimizer(L.TrainingSection())
    rl = L.RLSection(lambda_rl=1.0, baseline="self_critical", exact_match_bonus=1.0)
    step = L.make_rl_step(model, optimizer, 0.1, rl, (48, 96, 160, 256),
                          (L.make_features(extractor, "mean"), extractor_params))
    _, _, metrics = step(jax.tree.map(jnp.array, params), optimizer.init(params), eight_batch, jax.random.PRNGKey(0),
                         1e-3)
    assert {"ce_loss", "rl_loss", "reward", "exact"} <= set(metrics)
    assert -1.0 <= float(metrics["reward"]) <= 2.0 and float(metrics["exact"]) == 0.0
    assert np.isfinite(float(metrics["rl_loss"])) and float(metrics["rl_loss"]) != 0.0


def test_rl_only_training_raises_the_mean_reward(tmp_path, eight_examples):
    """REINFORCE alone (no cross-entropy) from a random tiny model, rewarded by edit similarity."""
    overrides = tiny_overrides(tmp_path / "rl", eight_examples, total_steps=40, eval_every=40, log_every=5)
    overrides["model"]["max_seq_len"] = 64
    overrides["data"]["sequence_buckets"] = [48, 64]
    overrides["rl"] = {"lambda_rl": 1.0, "ce_weight": 0.0, "extractor_weight": 0.0, "edit_weight": 1.0,
                       "exact_match_bonus": 0.0}
    L.train(L.apply_overrides(L.Config(), overrides), progress=False)
    log = [json.loads(line) for line in (tmp_path / "rl" / "train.log").read_text().splitlines()]
    rewards = [event["reward"] for event in log if event["event"] == "train"]
    assert len(rewards) == 8 and "ce_loss" not in log[-3]
    assert np.mean(rewards[-3:]) > 2 * rewards[0]


def test_rl_refuses_a_missing_or_mismatched_extractor(tmp_path, eight_examples, overfit_run, pretrained_extractor):
    def attempt(**changes):
        overrides = tiny_overrides(tmp_path / "never", eight_examples, total_steps=20)
        overrides["rl"] = {"lambda_rl": 1.0}
        for key, value in changes.items():
            section, name = key.split("__")
            overrides.setdefault(section, {})[name] = value
        with pytest.raises(L.UserError) as error:
            L.train(L.apply_overrides(L.Config(), overrides), progress=False)
        assert not (tmp_path / "never").exists()
        return str(error.value)

    assert "pretrain" in attempt(feature_extractor__checkpoint_path=str(tmp_path / "missing"))
    assert "the OCR model, not of the feature extractor" in attempt(feature_extractor__checkpoint_path=str(overfit_run[0]))
    assert "reads at most 256 tokens" in attempt(feature_extractor__checkpoint_path=str(pretrained_extractor[0]),
                                                 model__max_seq_len=320)


# --- data-parallel training ---------------------------------------------------------------------

def test_two_devices_and_two_processes_train_like_one_device(tmp_path, eight_examples):
    """The same global batch of 8 (augmented) for 3 steps: in this process on one device, in a
    process with 2 forced host devices, and in two processes joined by jax.distributed."""
    def overrides(name):
        return tiny_overrides(tmp_path / name, eight_examples, total_steps=3, warmup_steps=1, eval_every=3, augment=True)

    one = L.train(L.apply_overrides(L.Config(), overrides("one")), progress=False)
    assert one["step"] == 3
    two_devices = run_cli(["train", "--quiet", *cli_overrides(overrides("two_devices"))],
                          {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    port = 20000 + os.getpid() % 20000
    processes = [run_cli(["train", "--quiet", "--coordinator", f"127.0.0.1:{port}", "--num-processes", 2,
                          "--process-id", i, *cli_overrides(overrides("two_processes"))]) for i in range(2)]
    for process in [two_devices, *processes]:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
        assert json.loads(out.splitlines()[-1])["step"] == 3
    reference = final_params(tmp_path / "one", 3)
    moved = distance(reference, L.init_params(L.LatexOCR(L.network_config_from_metadata(
        L.read_metadata(tmp_path / "one", 3), tmp_path)), 0))
    # Splitting the batch only reorders float32 sums, and Adam magnifies such rounding in weights
    # whose gradient is near zero, so an absolute bound depends on the CPU (1.1e-4 on one machine,
    # under 1e-4 on another). Relative to how far the parameters moved, rounding came to 1.7e-4;
    # a gradient from other rows (a broken all-reduce) flips the sign of Adam's early updates in
    # many weights, a difference of the order of the movement itself.
    for name in ("two_devices", "two_processes"):
        assert distance(final_params(tmp_path / name, 3), reference) < 1e-2 * moved
    log = [json.loads(line) for line in (tmp_path / "two_processes" / "train.log").read_text().splitlines()]
    start = next(event for event in log if event["event"] == "start")
    assert (start["devices"], start["processes"]) == (2, 2)
    assert [event["event"] for event in log].count("done") == 1  # only process 0 writes


@pytest.mark.parametrize("argv, message", [
    (["train", "--coordinator", "127.0.0.1:1234"], "could not join the multi-process run at 127.0.0.1:1234"),
    (["train", "--num-processes", "2", "--process-id", "0"], "needs --coordinator"),
    (["train", "--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "2"],
     "--process-id must be in [0, 2)"),
])
def test_multi_process_errors_give_one_clear_line(argv, message, one_error_line):
    one_error_line(argv, message)
