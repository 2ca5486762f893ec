"""Training: labels per template family, validation, runs whose loss falls, resume, FSDP, saving, LoRA, parts."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import llava_next
from conftest import random_image, reference_model, smooth_image
from llava_next.checkpoint import CheckpointError
from llava_next.data import synth
from llava_next.data.records import DataError, Record, read_records
from llava_next.data.tokenizer import texts_of, train_tokenizer
from llava_next.prompt import ChatTemplate, builtin_template
from llava_next.train.build import ScratchSizes, build_from_parts, build_scratch
from llava_next.train.recipe import RecipeError, read_recipe
from llava_next.train.samples import IGNORE_INDEX, SampleEncoder, validate
from llava_next.train.trainer import epoch_batches, train

REPO = Path(__file__).resolve().parent.parent

CONVERSATION = [
    ("system", "Be brief."),
    ("user", "<image>\nWhat is the first one?"),
    ("assistant", "The first is red."),
    ("user", "And the other?"),
    ("assistant", "Blue."),
]


def labelled_runs(sample, tokenizer) -> list[str]:
    """The label-carrying stretches of a sample, decoded with their special tokens."""
    runs, current = [], []
    for token, label in zip(sample.input_ids, sample.labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run, skip_special_tokens=False) for run in runs]


@pytest.mark.parametrize("name,expected", [
    ("vicuna", ["The first is red.</s>", "Blue.</s>"]),  # the template writes no EOS: one is appended, and trained
    ("mistral", ["The first is red.</s>", "Blue.</s>"]),
    ("yi", ["The first is red.<|im_end|>", "Blue.<|im_end|>"]),
    ("qwen2", ["\nThe first is red.<|im_end|>", "\nBlue.<|im_end|>"]),
    ("llama3", ["\nThe first is red.<|eot_id|>", "\nBlue.<|eot_id|>"]),
])
def test_loss_is_only_on_the_replies_and_their_end_of_turn_token(name, expected, tiny, load_pipeline, tmp_path):
    pipe = load_pipeline(tiny(name))
    image = tmp_path / "a.png"
    smooth_image(120, 80).save(image)
    turns = CONVERSATION if name != "mistral" else CONVERSATION  # the mistral template has a system branch too
    record = Record("r1", [image], list(turns))
    encoder = SampleEncoder(pipe.processor, pipe.engine.eos_token_ids, "chat", 4096)
    sample = encoder.encode(record, [(80, 120)])
    assert labelled_runs(sample, pipe.processor.tokenizer) == expected
    # the ids are what inference would see for the same conversation (plus the appended EOS for vicuna)
    text = pipe.processor.chat_template.render(record.messages(), add_generation_prompt=False).text
    ids = pipe.processor(text, [str(image)])["input_ids"][0].tolist()
    eos = pipe.engine.eos_token_ids[0]
    appended = [i for i, (a, b) in enumerate(zip(sample.input_ids, ids + [None] * 9)) if a != b]
    if name == "vicuna":
        assert [t for t in sample.input_ids if t != eos] == [t for t in ids if t != eos]
    else:
        assert sample.input_ids == ids and not appended
    image_positions = [i for i, t in enumerate(sample.input_ids) if t == pipe.config.image_token_id]
    assert len(image_positions) == pipe.processor.image_tokens((80, 120))
    assert all(sample.labels[i] == IGNORE_INDEX for i in image_positions)


def test_plain_format_trains_the_caption_and_eos_only(tiny, load_pipeline, tmp_path):
    pipe = load_pipeline(tiny("vicuna"))
    image = tmp_path / "a.png"
    smooth_image(50, 50).save(image)
    record = Record("c1", [image], [("user", "<image>"), ("assistant", "a red circle")])
    sample = SampleEncoder(pipe.processor, pipe.engine.eos_token_ids, "plain", 4096).encode(record, [(50, 50)])
    assert labelled_runs(sample, pipe.processor.tokenizer) == ["a red circle</s>"]
    assert sample.input_ids[0] == pipe.processor.tokenizer.bos_token_id and sample.labels[0] == IGNORE_INDEX


def test_unalignable_template_is_an_error_naming_the_sample(tiny, load_pipeline, tmp_path):
    pipe = load_pipeline(tiny("vicuna"))
    odd = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'][-1]['text'] }}\n{% endfor %}"
           "{% if add_generation_prompt %}assistant says:{% endif %}")
    processor = type(pipe.processor)(pipe.processor.tokenizer, pipe.processor.image_processor,
                                     ChatTemplate(odd, "test", {}), pipe.config)
    encoder = SampleEncoder(processor, pipe.engine.eos_token_ids, "chat", 4096)
    with pytest.raises(DataError, match="record odd-7: the chat template .* does not render reply 0"):
        encoder.encode(Record("odd-7", [], [("user", "hi"), ("assistant", "hello")]), [])


def _write_records(path: Path, records: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in records))  # JSON lines
    return path


def test_bad_records_are_dropped_with_their_reasons_and_too_many_fail(tiny, load_pipeline, tmp_path):
    pipe = load_pipeline(tiny("vicuna"))
    smooth_image(60, 40).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    good = {"id": "good", "image": "ok.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A thing."}]}
    records = [good, {**good, "id": "text-only", "image": None,
                      "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
               {**good, "id": "gone", "image": "missing.png"},
               {**good, "id": "broken", "image": "broken.png"},
               {**good, "id": "no-placeholder", "conversations": [{"from": "human", "value": "What?"},
                                                                  {"from": "gpt", "value": "A thing."}]},
               {**good, "id": "empty", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                         {"from": "gpt", "value": "  "}]},
               {**good, "id": "long", "conversations": [{"from": "human", "value": "<image>\n" + "word " * 3000},
                                                        {"from": "gpt", "value": "ok"}]}]
    data = _write_records(tmp_path / "data.jsonl", records)
    encoder = SampleEncoder(pipe.processor, pipe.engine.eos_token_ids, "chat", 2000)
    report = validate(read_records(data), encoder, max_bad_fraction=0.9)
    assert [s.id for s in report.samples] == ["good", "text-only"]
    assert dict(report.dropped) == {
        "missing image": ["gone"], "unreadable image": ["broken"], "image count mismatch": ["no-placeholder"],
        "empty reply": ["empty"], "longer than max_length 2000 with its image tokens (answer would be cut off)": ["long"]}
    with pytest.raises(DataError, match=r"5 of 7 records \(71.4%\) are unusable, more than the allowed 10.0%"):
        validate(read_records(data), encoder, max_bad_fraction=0.1)


def _image_files(folder: Path) -> dict[str, Path]:
    """Images of every kind validation meets: formats, modes, EXIF orientations, and broken files."""
    from PIL import Image

    base = random_image(70, 40)
    files = {}
    for name, image, options in [("rgb.png", base, {}), ("rgba.png", random_image(70, 40, mode="RGBA"), {}),
                                 ("gray.png", random_image(70, 40, mode="L"), {}), ("photo.jpg", base, {}),
                                 ("anim.gif", base, {}), ("pic.webp", base, {}), ("pic.bmp", base, {})]:
        files[name] = folder / name
        image.save(files[name], **options)
    for orientation in (3, 6, 8):  # upside down (no swap), and the two quarter turns (width and height swap)
        exif = Image.Exif()
        exif[0x0112] = orientation
        for ext in ("jpg", "png"):
            files[f"turned{orientation}.{ext}"] = folder / f"turned{orientation}.{ext}"
            base.save(files[f"turned{orientation}.{ext}"], exif=exif.tobytes())
    for ext in ("jpg", "png"):
        data = files[f"turned6.{ext}" if ext == "jpg" else "rgb.png"].read_bytes()
        files[f"cut.{ext}"] = folder / f"cut.{ext}"
        files[f"cut.{ext}"].write_bytes(data[: len(data) * 2 // 3])
    files["garbage.png"] = folder / "garbage.png"
    files["garbage.png"].write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    files["missing.jpg"] = folder / "missing.jpg"
    return files


def test_image_size_from_the_header_agrees_with_decoding_in_size_and_errors(tmp_path):
    from llava_next.image import ImageError, ImageLimits, decode_image, image_size

    files = _image_files(tmp_path)
    outcomes = {}
    for name, path in files.items():
        results = []
        for read in (lambda p: decode_image(p).size[::-1], image_size):
            try:
                results.append(read(path))
            except ImageError as e:
                results.append(str(e).split(": ", 1)[1].split(" (")[0])
        assert results[0] == results[1], name
        outcomes[name] = results[1]
    assert outcomes["turned6.jpg"] == outcomes["turned8.png"] == (70, 40) and outcomes["turned3.jpg"] == (40, 70)
    assert outcomes["cut.jpg"] == outcomes["cut.png"] == "the image data is truncated or corrupt"
    assert outcomes["missing.jpg"] == "no such image file"
    with pytest.raises(ImageError, match="pixels is over the limit of 1000"):
        image_size(files["photo.jpg"], ImageLimits(max_pixels=1000))


def test_validation_reads_image_sizes_without_decoding_every_pixel(tiny, load_pipeline, tmp_path, monkeypatch):
    from PIL import ImageFile

    files = _image_files(tmp_path)
    names = ["rgb.png", "rgba.png", "photo.jpg", "turned6.jpg", "cut.png", "cut.jpg"]
    data = _write_records(tmp_path / "data.jsonl", [
        {"id": name, "image": name, "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                       {"from": "gpt", "value": "A thing."}]} for name in names])
    full_decodes = []  # (format, size) of every decode of all the pixels
    load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda im: (full_decodes.append((im.format, im.size))
                                                                   if im.size == (70, 40) else None, load(im))[1])
    pipe = load_pipeline(tiny("vicuna"))
    report = validate(read_records(data), SampleEncoder(pipe.processor, pipe.engine.eos_token_ids, "chat", 100_000),
                      max_bad_fraction=1.0)
    assert full_decodes == []  # PNG: chunk checksums only; JPEG: decoded at 1/8 scale
    assert {s.id: s.image_sizes for s in report.samples} == {
        "rgb.png": [(40, 70)], "rgba.png": [(40, 70)], "photo.jpg": [(40, 70)], "turned6.jpg": [(70, 40)]}
    assert dict(report.dropped) == {"unreadable image": ["cut.png", "cut.jpg"]}


def test_grouped_batches_never_mix_modalities_and_cover_the_epoch():
    lengths = [10, -5, 30, -7, 12, 8, -20, 40, -3, 15, -9, 22] * 4  # 28 with images, 20 text-only
    batches = epoch_batches(lengths, 4, seed=3, epoch=0, grouped=True)
    assert all(len({l > 0 for l in (lengths[i] for i in b)}) == 1 for b in batches)
    seen = [i for b in batches for i in b]
    assert len(seen) == len(set(seen)) == 48
    # an incomplete last batch of either kind waits for the next epoch
    assert sum(map(len, epoch_batches(lengths + [5, 6, -1], 4, seed=3, epoch=0, grouped=True))) == 48
    assert batches == epoch_batches(lengths, 4, seed=3, epoch=0, grouped=True)
    assert batches != epoch_batches(lengths, 4, seed=3, epoch=1, grouped=True)


# -- runs ------------------------------------------------------------------------------------------------------------

TINY_SIZES = dict(vision_hidden=32, vision_layers=2, vision_heads=2, vision_intermediate=64, text_hidden=64,
                  text_layers=2, text_heads=2, text_kv_heads=1, text_intermediate=128, max_position_embeddings=512)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """A small synthetic data set and a tokenizer trained on it."""
    root = tmp_path_factory.mktemp("shapes")
    synth.generate(root, 48, seed=5, turns=2)
    train_tokenizer(texts_of([root / "captions.json", root / "qa.json"], builtin_template("vicuna")), root / "tok", 200)
    return root


def recipe_for(shapes: Path, out: Path, stage: str = "chat", **train):
    overrides = [f"model.init=scratch", f"model.tokenizer={shapes / 'tok'}", "model.chat_template=vicuna",
                 f"data.path={shapes / ('captions.json' if stage == 'plain' else 'qa.json')}", f"data.format={stage}",
                 "data.max_length=256", f"train.output_dir={out}", "train.batch_size=4", "train.log_every=1",
                 "train.lr={projector: 0.003, vision: 0.003, language: 0.003}", "train.warmup_ratio=0"]
    overrides += [f"model.scratch.{k}={v}" for k, v in TINY_SIZES.items()]
    overrides += [f"train.{k}={v}" for k, v in train.items()]
    return read_recipe(None, overrides)


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("stage", ["plain", "chat"])
def test_training_lowers_the_loss(stage, shapes, tmp_path):
    run = train(recipe_for(shapes, tmp_path / stage, stage, max_steps=30), progress=False)
    curve = losses(run)
    assert len(curve) == 30
    assert sum(curve[-5:]) / 5 < 0.7 * sum(curve[:5]) / 5


def test_saved_model_loads_here_and_in_transformers_with_equal_logits(shapes, tmp_path):
    run = train(recipe_for(shapes, tmp_path / "run", max_steps=3), progress=False)
    pipe = llava_next.load(run, progress=False)
    reference = reference_model(run)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the circle?"}]}]
    image = smooth_image(90, 50)
    inputs, _ = pipe.prepare(messages, [image])
    with torch.no_grad():
        ours = pipe.model(**inputs)
        theirs = reference(**inputs).logits
    assert ((ours - theirs).abs().max() / theirs.abs().max()).item() < 1e-4
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(run)
    expected = processor(text=pipe.processor.apply_chat_template(messages), images=[image], return_tensors="pt")
    assert torch.equal(expected["input_ids"], inputs["input_ids"])
    assert torch.equal(expected["pixel_values"], inputs["pixel_values"])


def _final_state(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "model.safetensors"))


def test_resume_reaches_the_same_result_as_an_uninterrupted_run(shapes, tmp_path):
    whole = train(recipe_for(shapes, tmp_path / "whole", max_steps=6), progress=False)
    recipe = recipe_for(shapes, tmp_path / "parts", max_steps=6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(recipe, progress=False, stop_after=3)
    assert not [w for w in caught if "torch.distributed" in str(w.message)]  # one process is no news to print
    assert not (tmp_path / "parts" / "model.safetensors").exists()
    assert (tmp_path / "parts" / "checkpoints" / "step-0000003" / "trainer_state.json").exists()
    with pytest.raises(CheckpointError, match="is a training run that has not finished .* --resume latest"):
        llava_next.load(tmp_path / "parts", progress=False)  # e.g. the next stage's model.path
    train(recipe_for(shapes, tmp_path / "parts", max_steps=6), resume="latest", progress=False)
    assert losses(tmp_path / "parts") == losses(whole)
    a, b = _final_state(whole), _final_state(tmp_path / "parts")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_resumed_with_more_steps_and_another_rate_takes_them_from_its_next_step(shapes, tmp_path):
    from llava_next.train.trainer import learning_rate_factor

    run = tmp_path / "run"
    train(recipe_for(shapes, run, max_steps=2, save_every=1, warmup_ratio=0.5), progress=False)
    faster = recipe_for(shapes, run, max_steps=4, warmup_ratio=0.5)
    faster.train.lr = {"projector": 0.01, "vision": 0.002, "language": 0.004}
    train(faster, resume="latest", progress=False)
    rates = [json.loads(line)["lr"] for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert len(rates) == 4
    for step in (2, 3):  # (0-based: the resumed steps, at the 4-step schedule's factors and the new rates)
        factor = learning_rate_factor(step, 4, 2, 0.0)
        assert factor > 0 and rates[step] == pytest.approx({part: lr * factor for part, lr in faster.train.lr.items()})


@pytest.mark.parametrize("keep, kept", [(2, [2, 3]), (0, []), (None, [1, 2, 3])], ids=["2", "0", "null"])
def test_keep_checkpoints_keeps_the_newest_that_many_none_or_all(keep, kept, shapes, tmp_path):
    keep_text = "null" if keep is None else keep
    run = train(recipe_for(shapes, tmp_path / "run", max_steps=3, save_every=1, keep_checkpoints=keep_text),
                progress=False)
    steps = sorted(int(p.name.removeprefix("step-")) for p in (run / "checkpoints").glob("step-*"))
    assert steps == kept
    assert (run / "model.safetensors").exists()  # the final model is saved whatever is kept
    with pytest.raises(RecipeError, match="train.keep_checkpoints must be a count"):
        recipe_for(shapes, tmp_path / "bad", keep_checkpoints=-1)


def _torchrun(args: list[str], cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                             "--standalone", "-m", "llava_next.cli", "train", *args],
                            cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


def _recipe_args(shapes: Path, out: Path, **train) -> list[str]:
    recipe = recipe_for(shapes, out, **train)
    path = out.parent / f"{out.name}.yaml"
    import yaml

    path.write_text(yaml.safe_dump(recipe.to_dict()))
    return ["--config", str(path)]


def test_two_process_fsdp_matches_one_process_and_resumes_sharded(shapes, tmp_path):
    # one process: 4 samples per micro-step, 2 micro-steps; two processes: 2 + 2 samples each: the same global batch
    single = train(recipe_for(shapes, tmp_path / "single", max_steps=4, batch_size=4, grad_accum=2), progress=False)
    _torchrun(_recipe_args(shapes, tmp_path / "fsdp", max_steps=4, batch_size=2, grad_accum=2), tmp_path)
    one, two = losses(single), losses(tmp_path / "fsdp")
    assert len(two) == 4
    assert max(abs(a - b) / a for a, b in zip(one, two)) < 1e-4
    a, b = _final_state(single), _final_state(tmp_path / "fsdp")
    assert all(torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-5) for k in a)
    # interrupted after 2 steps and resumed from its sharded checkpoint: the same as straight through
    args = _recipe_args(shapes, tmp_path / "fsdp_resumed", max_steps=4, batch_size=2, grad_accum=2, save_every=2)
    _torchrun(args + ["--max-steps", "4"], tmp_path)
    resumed_dir = tmp_path / "fsdp_resumed"
    (resumed_dir / "model.safetensors").unlink()
    (resumed_dir / "train_log.jsonl").write_text("\n".join((resumed_dir / "train_log.jsonl").read_text().splitlines()[:2]) + "\n")
    for step in (resumed_dir / "checkpoints").glob("step-0000004"):
        import shutil

        shutil.rmtree(step)
    _torchrun(args + ["--resume", "latest"], tmp_path)
    assert losses(resumed_dir) == losses(tmp_path / "fsdp_resumed")
    c = _final_state(resumed_dir)
    assert all(torch.allclose(b[k], c[k], rtol=1e-5, atol=1e-7) for k in b)


def test_lora_merged_and_adapter_give_the_same_model(shapes, tmp_path):
    base = train(recipe_for(shapes, tmp_path / "base", max_steps=2), progress=False)
    lora = ["model.init=llava", f"model.path={base}", f"data.path={shapes / 'qa.json'}", "data.max_length=256",
            "train.tune=[language]", "train.lr={language: 0.01}", "train.lora.r=4", "train.max_steps=4",
            "train.batch_size=4", "train.warmup_ratio=0", "train.lora.dropout=0"]
    merged = train(read_recipe(None, lora + [f"train.output_dir={tmp_path / 'merged'}"]), progress=False)
    adapter = train(read_recipe(None, lora + [f"train.output_dir={tmp_path / 'adapter'}", "train.lora.merge=false"]),
                    progress=False)
    assert (adapter / "adapter_model.safetensors").exists() and not (adapter / "model.safetensors").exists()
    pipes = [llava_next.load(p, progress=False) for p in (base, merged, adapter)]
    inputs, _ = pipes[0].prepare([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]}],
                                 [smooth_image(64, 40)])
    with torch.no_grad():
        logits = [p.model(**inputs) for p in pipes]
    assert not torch.allclose(logits[0], logits[1])  # LoRA changed the model
    assert torch.allclose(logits[1], logits[2], rtol=1e-5, atol=1e-5)  # merged on save == adapter merged on load
    assert torch.equal(pipes[0].model.vision_tower.pre_layrnorm.weight, pipes[1].model.vision_tower.pre_layrnorm.weight)


def test_build_from_a_clip_and_a_language_model_checkpoint(tmp_path, tiny, shapes):
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                     image_size=56, patch_size=14)).save_pretrained(tmp_path / "clip")
    language_dir = tmp_path / "lm"
    vocab_source = tiny("vicuna")  # a llama-style tokenizer, without <image> this time
    tok = json.loads((vocab_source / "tokenizer.json").read_text())
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] not in ("<image>", "<pad>")]
    for t in ("<image>", "<pad>"):
        tok["model"]["vocab"].pop(t, None)
    vocab = len(tok["model"]["vocab"])
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096))
    lm.save_pretrained(language_dir)
    (language_dir / "tokenizer.json").write_text(json.dumps(tok))
    (language_dir / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                                    "unk_token": "<unk>"}))
    pipe = build_from_parts(str(tmp_path / "clip"), str(language_dir))
    tokenizer = pipe.processor.tokenizer
    assert tokenizer.image_token_id == vocab and tokenizer.pad_token_id == vocab + 1
    assert pipe.config.text.vocab_size == 64 * -(-(vocab + 2) // 64)
    embed = pipe.model.language_model.embed_tokens.weight
    assert torch.equal(embed[:vocab], lm.model.embed_tokens.weight)
    assert torch.allclose(embed[vocab:], lm.model.embed_tokens.weight.mean(0).expand(embed.shape[0] - vocab, -1))
    assert pipe.config.image_grid_pinpoints[0] == (56, 112) and pipe.config.vision.image_size == 56
    out = pipe.save(tmp_path / "built")
    reloaded = llava_next.load(out, progress=False)
    assert torch.equal(reloaded.model.checkpoint_weights()["language_model.layers.1.mlp.up_proj.weight"],
                       lm.model.layers[1].mlp.up_proj.weight)
    ref = reference_model(out)
    inputs, _ = reloaded.prepare([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}],
                                 [smooth_image(100, 60)])
    with torch.no_grad():
        assert ((reloaded.model(**inputs) - ref(**inputs).logits).abs().max() < 1e-4)


def test_recipe_errors_are_clear(tmp_path):
    with pytest.raises(RecipeError, match="unknown key.*in train: lerning_rate"):
        read_recipe(None, ["model.path=x", "data.path=d.json", "train.lerning_rate=1"])
    with pytest.raises(RecipeError, match="model.init=parts needs model.vision"):
        read_recipe(None, ["model.init=parts", "data.path=d.json"])
    with pytest.raises(RecipeError, match="train.lr names visoin; the parts are projector, vision, language"):
        read_recipe(None, ["model.path=x", "data.path=d.json", "train.lr.visoin=1e-4"])
    with pytest.raises(RecipeError, match="train.lr.vision must be a non-negative number, not 'fast'"):
        read_recipe(None, ["model.path=x", "data.path=d.json", "train.lr.vision=fast"])


@pytest.mark.parametrize("override,says", [
    ("train.batch_size=abc", "train.batch_size must be a whole number, not 'abc'"),
    ("train.batch_size=2.5", "train.batch_size must be a whole number, not 2.5"),
    ("train.max_grad_norm=abc", "train.max_grad_norm must be a number, not 'abc'"),
    ("train.betas=abc", "train.betas must be a list of 2 numbers, not 'abc'"),
    ("train.gradient_checkpointing=maybe", "train.gradient_checkpointing must be true or false, not 'maybe'"),
    ("train.lr=0.001", "train.lr must be a mapping of part to learning rate (e.g. train.lr.projector=1e-3), not 0.001"),
    ("train.lora.r=x", "train.lora.r must be a whole number, not 'x'"),
    ("model.scratch.pinpoints=[[1,x]]", "model.scratch.pinpoints must be a list of lists of whole numbers"),
    ("train.keep_checkpoints=x", "train.keep_checkpoints must be a whole number or null, not 'x'"),
    ("train.epochs=0", "train.epochs must be above 0, not 0"),
    ("train.max_steps=0", "train.max_steps must be at least 1, not 0"),
    ("train.warmup_ratio=5", "train.warmup_ratio must be in [0, 1], not 5"),
    ("data.max_bad_fraction=-0.5", "data.max_bad_fraction must be in [0, 1], not -0.5"),
    ("train.betas=[1,0.999]", "train.betas[0] must be in [0, 1), not 1"),
    ("train.lora.r=-4", "train.lora.r must be at least 0, not -4"),
    ("train.lora.dropout=1.5", "train.lora.dropout must be in [0, 1), not 1.5"),
    ("model.scratch.text_layers=0", "model.scratch.text_layers must be at least 1, not 0"),
    ("data=my.json", "data must be a mapping of keys, not 'my.json'"),
    ("train.save_dtype=int8", "train.save_dtype must be one of float32, bfloat16, float16, fp32, bf16, fp16"),
    ("train=5", "train must be a mapping of keys, not 5"),
])
def test_recipe_values_of_the_wrong_type_or_range_are_named_before_anything_runs(override, says):
    with pytest.raises(RecipeError) as raised:
        read_recipe(None, ["model.path=x", "data.path=d.json", override])
    assert says in str(raised.value)
    # a section left empty in YAML ("data:") is an empty one, which the flags fill
    assert read_recipe(None, ["model.path=x", "data=", "data.path=d.json"]).data.path == ["d.json"]
    # (the command line's own overrides go through a key the user set to a value: named, not a TypeError)
    with pytest.raises(RecipeError, match="override 'train.output_dir=o': train is 5, not a mapping"):
        read_recipe(None, ["model.path=x", "data.path=d.json", "train=5", "train.output_dir=o"])


def test_learning_rates_in_exponent_notation_are_numbers(tmp_path):
    # YAML 1.1 reads 1e-3 (no dot) as a string, in files and in --set alike
    path = tmp_path / "r.yaml"
    path.write_text("model: {path: x}\ndata: {path: d.json}\ntrain: {lr: {projector: 2e-5, vision: 2e-6, language: 1E-5}}\n")
    recipe = read_recipe(path, ["train.lr.vision=3e-6", "train.weight_decay=1e-2"])
    assert recipe.train.lr == {"projector": 2e-5, "vision": 3e-6, "language": 1e-5}
    assert recipe.train.weight_decay == 0.01 and recipe.model.path == "x"
    # setting one learning rate keeps the defaults of the others
    recipe = read_recipe(None, ["model.path=x", "data.path=d.json", "train.lr.vision=1e-4"])
    assert recipe.train.lr == {"projector": 1e-5, "vision": 1e-4, "language": 1e-5}


def test_saved_recipe_reads_back_the_same_and_lists_only_what_the_run_used(tmp_path):
    import yaml

    for init in (["model.init=scratch", "model.tokenizer=tok"], ["model.path=x"]):
        recipe = read_recipe(None, [*init, "data.path=d.json", "train.lr.vision=1e-4"])
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        assert read_recipe(path) == recipe
        assert ("scratch" in yaml.safe_load(path.read_text())["model"]) == (recipe.model.init == "scratch")


def test_synthetic_data_is_deterministic_and_varied(tmp_path):
    a = synth.generate(tmp_path / "a", 40, seed=9, turns=3)
    b = synth.generate(tmp_path / "b", 40, seed=9, turns=3)
    assert a == b and set(a) == set(synth.QUESTION_TYPES)
    qa = json.loads((tmp_path / "a" / "qa.json").read_text())
    assert qa == json.loads((tmp_path / "b" / "qa.json").read_text())
    from PIL import Image

    sizes = {Image.open(tmp_path / "a" / r["image"]).size for r in qa}
    assert len(sizes) > 20 and any(w > 2 * h for w, h in sizes) and any(h > 2 * w for w, h in sizes)
    records = read_records(tmp_path / "a" / "qa.json")
    assert all(len(r.types) == 3 and r.turns[0][1].startswith("<image>\n") for r in records)


def test_synthetic_scenes_keep_shapes_apart_inside_the_image_and_use_every_count():
    import random

    rng = random.Random(0)
    counts = collections.Counter()
    for _ in range(400):
        scene = synth._scene(rng)
        counts[len(scene.shapes)] += 1
        assert 32 <= scene.width <= 96 and 32 <= scene.height <= 96 and scene.width * scene.height <= 4096
        for i, a in enumerate(scene.shapes):
            assert a.size <= a.cx <= scene.width - a.size and a.size <= a.cy <= scene.height - a.size
            for b in scene.shapes[i + 1 :]:
                assert max(abs(a.cx - b.cx), abs(a.cy - b.cy)) > a.size + b.size, "two shapes' boxes overlap"
        assert len({s.kind for s in scene.shapes}) == len({s.color for s in scene.shapes}) == len(scene.shapes)
    # the drawn counts follow the stated mix (1: 1/6, 2: 1/3, 3: 1/3, 4: 1/6), crowded sizes do not skew it
    assert set(counts) == {1, 2, 3, 4} and 40 <= counts[4] <= 100 and 90 <= counts[3] <= 180


def test_gradient_checkpointing_gives_the_same_gradients(shapes, tmp_path):
    from llava_next.train.trainer import Collator, make_pipeline, load_samples, Processes

    recipe = recipe_for(shapes, tmp_path / "gc")
    pipe = make_pipeline(recipe)
    samples = load_samples(recipe, pipe, Processes(), log=lambda *a: None)[:3]
    batch = Collator(pipe)(samples)
    labels = batch.pop("labels")
    grads = []
    for checkpointing in (False, True):
        pipe.model.zero_grad()
        pipe.model.train()
        pipe.model.language_model.gradient_checkpointing = checkpointing
        pipe.model.vision_tower.gradient_checkpointing = checkpointing
        logits = pipe.model(**batch)
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()).backward()
        grads.append({n: p.grad.clone() for n, p in pipe.model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 20
    assert all(torch.allclose(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-7) for n in grads[0])


def test_bf16_autocast_run(shapes, tmp_path):
    run = train(recipe_for(shapes, tmp_path / "bf16", max_steps=12, precision="bf16"), progress=False)
    curve = losses(run)
    assert all(l == l for l in curve) and curve[-1] < curve[0]
    assert llava_next.load(run, progress=False).model.lm_head.weight.dtype == torch.float32  # master weights


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_are_valid(path):
    recipe = read_recipe(path)
    assert recipe.train.output_dir and recipe.data.path


def test_data_synth_and_eval_commands(shapes, tmp_path, capsys):
    from llava_next import cli

    assert cli.main(["data", "synth", "--out", str(tmp_path / "d"), "--n", "6", "--seed", "3"]) == 0
    assert "wrote 6 images" in capsys.readouterr().out
    run = train(recipe_for(shapes, tmp_path / "m", max_steps=2), progress=False)
    capsys.readouterr()
    predictions = tmp_path / "predictions.jsonl"
    assert cli.main(["eval", "--model", str(run), "--data", str(tmp_path / "d" / "qa.json"), "--json",
                     "--predictions", str(predictions)]) == 0
    result = json.loads(capsys.readouterr().out)
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert result["total"] == len(rows) == 6
    assert result["correct"] == sum(r["correct"] for r in rows)
    from llava_next.eval.vqa import normalize_answer

    assert all(r["correct"] == (normalize_answer(r["prediction"]) == normalize_answer(r["answer"])) for r in rows)
    assert normalize_answer("  Red. ") == "red" and normalize_answer("two  words!") == "two words"


def test_train_flags_are_taken_as_the_strings_they_are(monkeypatch):
    # a flag's value is a path or a name; read as YAML, 2024-05-01 would be a date, 1e5 a number, "#2" a comment
    import llava_next.train.trainer as trainer
    from llava_next import cli

    ran = []
    monkeypatch.setattr(trainer, "train", lambda recipe, **options: ran.append(recipe))
    assert cli.main(["train", "--model", "1e5", "--data", "data: x.json", "--output-dir", "runs/2024-05-01 #2",
                     "--max-steps", "3"]) == 0
    (recipe,) = ran
    assert (recipe.model.path, recipe.data.path, recipe.train.output_dir, recipe.train.max_steps) == (
        "1e5", ["data: x.json"], "runs/2024-05-01 #2", 3)
