"""Fixtures and helpers shared by test_latexocr.py and test_latexocr_tools.py."""

import atexit
import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# Tests compile with optimizations off and the same tiny programs again and again: they share a
# compile cache of their own (in this process and the commands they start), never the user's.
TEST_CACHE = tempfile.mkdtemp(prefix="latexocr-test-cache-")
atexit.register(shutil.rmtree, TEST_CACHE, ignore_errors=True)
os.environ["LATEXOCR_CACHE_DIR"] = TEST_CACHE

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import latexocr as L

jax.config.update("jax_disable_most_optimizations", True)
L.enable_compilation_cache()

ROOT = Path(__file__).resolve().parent
DATA = ROOT / "data"
SHARED = ROOT.parent / "shared" / "data" / "im2latex100k"
OVERFIT_STEPS = 300


def tiny_overrides(run_dir, split, **training):
    return {
        "data": {"train_split": str(split), "validate_split": str(split), "image_base_dir": str(DATA / "images")},
        "model": {"size": "tiny", "dropout": 0.0},
        "training": {"checkpoint_dir": str(run_dir), "batch_size": 8, "lr": 3e-3, "warmup_steps": 10,
                     "label_smoothing": 0.0, "augment": False, "val_samples": 8, **training},
    }


def run_main(argv, capsys):
    code = L.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def cli_overrides(overrides):
    return sum((["--set", f"{section}.{key}={value}"] for section, values in overrides.items()
                for key, value in values.items()), [])


def run_cli(args, env=None):
    return subprocess.Popen([sys.executable, str(ROOT / "latexocr.py"), *map(str, args)], env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="session")
def vocab():
    return L.load_vocabulary(DATA / "vocab.json")


@pytest.fixture(scope="session")
def eight_examples(tmp_path_factory):
    """Eight real training images of one bucket shape, written as their own split file."""
    data = L.DataSection(image_base_dir=str(DATA / "images"))
    entries = json.loads((DATA / "train.json").read_text())
    examples, _ = L.load_split(DATA / "train.json", data, L.load_vocabulary(DATA / "vocab.json"))
    dataset = L.Dataset(examples, data)
    members = dataset.groups()[(32, 256, 48)][:8]
    split = tmp_path_factory.mktemp("split") / "eight.json"
    split.write_text(json.dumps({dataset.examples[i].name: entries[dataset.examples[i].name] for i in members}))
    return split


@pytest.fixture(scope="session")
def overfit_run(tmp_path_factory, eight_examples):
    """A tiny model trained through `train` until it has memorised eight real images."""
    run_dir = tmp_path_factory.mktemp("overfit") / "run"
    config = L.apply_overrides(L.Config(), tiny_overrides(
        run_dir, eight_examples, total_steps=OVERFIT_STEPS, eval_every=OVERFIT_STEPS))
    summary = L.train(config, progress=False)
    return run_dir, summary


@pytest.fixture(scope="session")
def bad_files(tmp_path_factory):
    """Broken images, split, vocabulary and config files for the error-path tests."""
    folder = tmp_path_factory.mktemp("bad")
    (folder / "text.png").write_text("not an image")
    (folder / "zero.png").write_bytes(b"")
    good = (DATA / "images" / "1015942522.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    Image.new("L", (120, 40), 255).save(folder / "blank.png")
    (folder / "broken.json").write_text("{not json")
    (folder / "list.json").write_text("[1, 2]")
    (folder / "unknown_key.yaml").write_text("training:\n  learning_rate: 0.1\n")
    shuffled = json.loads((DATA / "vocab.json").read_text())
    shuffled["x"], shuffled["y"] = shuffled["y"], shuffled["x"]
    (folder / "vocab.json").write_text(json.dumps(shuffled))
    return folder


@pytest.fixture
def one_error_line(bad_files, overfit_run, capsys):
    """check(argv, message): the command (argv's {bad}, {run} and {data} filled in) exits non-zero
    with one `latexocr: error:` line holding message, and no traceback."""
    def check(argv, message):
        argv = [a.format(bad=bad_files, run=overfit_run[0], data=DATA) for a in argv]
        code, _, err = run_main(argv, capsys)
        assert code != 0
        assert "Traceback" not in err
        errors = [line for line in err.splitlines() if line.startswith("latexocr: error:")]
        assert len(errors) == 1 and message in errors[0], err
    return check


@pytest.fixture(scope="session")
def tiny_model(vocab):
    cfg = L.latexocr_config(L.load_config(None, ["model.size=tiny"]), len(vocab))
    model = L.LatexOCR(cfg)
    return model, L.init_params(model, 0)


@pytest.fixture(scope="session")
def ending_model(tiny_model):
    """The random tiny model with <EOS> made likelier, so that its sequences end within the 32
    positions it is cut to (to keep it quick)."""
    model, params = tiny_model
    head = {**params["head"], "bias": params["head"]["bias"].at[L.EOS_ID].add(3.0)}
    short = L.LatexOCR(dataclasses.replace(model.cfg, max_seq_len=32))
    images = jnp.asarray(np.random.default_rng(0).random((8, 32, 128, 1), np.float32))
    return short, {**params, "head": head, "position_embed": params["position_embed"][:32]}, images


@pytest.fixture(scope="session")
def eight_images(eight_examples):
    entries = json.loads(eight_examples.read_text())
    return [((DATA / "images" / e["img_path"]).read_bytes(), e["caption"]) for e in entries.values()]


def png_declaring(width, height):
    """A PNG whose header claims width x height pixels (its pixel data is a 1x1 image's)."""
    import struct
    import zlib

    buffer = io.BytesIO()
    Image.new("L", (1, 1), 255).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    header = b"IHDR" + struct.pack(">II", width, height) + bytes(data[24:29])
    data[12:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(header))
    return bytes(data)
