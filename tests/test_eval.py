"""`llava-next eval` on records with several images, and with images that do not decode."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import random_image, smooth_image
from llava_next import cli
from llava_next.eval.vqa import evaluate


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps(records))
    return path


class ImageSpy:
    """The real pipeline, recording the sizes of the images each prompt is given."""

    def __init__(self, pipe):
        self.pipe, self.processor, self.calls = pipe, pipe.processor, []

    def generate(self, prompts, images, **sampling):
        self.calls += [[self.processor.load_image(im).size for im in ims] for ims in images]
        return self.pipe.generate(prompts, images, **sampling)


def test_each_question_gets_the_images_of_its_own_and_earlier_turns(tiny, load_pipeline, tmp_path):
    smooth_image(60, 40, seed=1).save(tmp_path / "first.png")
    smooth_image(30, 50, seed=2).save(tmp_path / "second.png")
    data = _write(tmp_path / "qa.json", [{"id": "two", "image": ["first.png", "second.png"], "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is this?"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "<image>\nAnd this one?"}, {"from": "gpt", "value": "blue"},
        {"from": "human", "value": "Which is larger?"}, {"from": "gpt", "value": "the first"}]}])
    spy = ImageSpy(load_pipeline(tiny("vicuna")))
    result = evaluate(spy, data, max_new_tokens=2)
    assert result.total == 3 and not result.skipped
    assert spy.calls == [[(60, 40)], [(60, 40), (30, 50)], [(60, 40), (30, 50)]]


def test_an_unreadable_image_skips_its_questions_and_is_reported(tiny, tmp_path, capsys):
    smooth_image(60, 40).save(tmp_path / "ok.png")
    (tmp_path / "garbage.png").write_bytes(b"this is no image")
    random_image(80, 60).save(tmp_path / "whole.png")
    (tmp_path / "truncated.png").write_bytes((tmp_path / "whole.png").read_bytes()[:3000])
    question = lambda answer: [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": answer}]
    data = _write(tmp_path / "qa.json", [
        {"id": "good", "image": "ok.png", "types": ["color"], "conversations": question("red")},
        {"id": "bad", "image": "garbage.png", "types": ["color", "shape"],
         "conversations": question("red") + [{"from": "human", "value": "Shape?"}, {"from": "gpt", "value": "circle"}]},
        {"id": "cut", "image": "truncated.png", "types": ["shape"], "conversations": question("square")},
        {"id": "miscounted", "image": ["ok.png", "ok.png"], "types": ["shape"], "conversations": question("square")},
        {"id": "text", "types": ["shape"], "conversations": [{"from": "human", "value": "Hi?"},
                                                              {"from": "gpt", "value": "hello"}]}])
    assert cli.main(["eval", "--model", str(tiny("vicuna")), "--data", str(data), "--max-new-tokens", "2",
                     "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["total"], result["skipped"]) == (2, 4)
    assert {k: (v["total"], v["skipped"]) for k, v in result["by_type"].items()} == {"color": (1, 1), "shape": (1, 3)}
    reported = {r["id"]: r for r in result["skipped_records"]}
    assert set(reported) == {"bad", "cut", "miscounted"}
    assert reported["bad"]["image"] == str(tmp_path / "garbage.png") and reported["bad"]["questions"] == 2
    assert "not an image format" in reported["bad"]["reason"]
    assert reported["cut"]["image"] == str(tmp_path / "truncated.png") and "truncated" in reported["cut"]["reason"]
    assert reported["miscounted"]["reason"] == "1 <image> in its turns but 2 images"

    assert cli.main(["eval", "--model", str(tiny("vicuna")), "--data", str(data), "--max-new-tokens", "2"]) == 0
    table = capsys.readouterr().out
    assert "| type | questions | correct | accuracy | skipped |" in table
    assert "| **all** | 2 |" in table and table.split("| **all** |")[1].splitlines()[0].endswith(" 4 |")
    assert f"- record bad, image {tmp_path / 'garbage.png'}: not an image format" in table


def test_a_run_with_nothing_answered_says_so_and_a_missing_image_folder_is_named(tiny, tmp_path, capsys):
    data = _write(tmp_path / "qa.json", [{"id": "a", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "red"}]}])
    model = str(tiny("vicuna"))
    # the folder is named before the model loads, not every question skipped as missing
    for folder, says in ((tmp_path / "nowhere", "does not exist"), (data, "is not a directory")):
        assert cli.main(["eval", "--model", "/no/such/model", "--data", str(data), "--image-folder", str(folder)]) == 2
        assert f"the image folder {folder} {says}" in capsys.readouterr().err
    # data without images does not need the folder
    text_only = _write(tmp_path / "text.json", [{"id": "t", "conversations": [
        {"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "hello"}]}])
    assert cli.main(["eval", "--model", "demo", "--data", str(text_only), "--image-folder", str(tmp_path / "nowhere"),
                     "--max-new-tokens", "2"]) == 0
    capsys.readouterr()
    # every question skipped (its image is missing): no accuracy, and an error after the table that lists why
    assert cli.main(["eval", "--model", model, "--data", str(data), "--max-new-tokens", "2"]) == 2
    out, err = capsys.readouterr()
    assert "| **all** | 0 | 0 | - | 1 |" in out and "- record a, image" in out
    assert err.strip().endswith("no question was answered: the one question was skipped (the reasons are listed above)")
    assert cli.main(["eval", "--model", model, "--data", str(data), "--max-new-tokens", "2", "--json"]) == 2
    result = json.loads(capsys.readouterr().out)
    assert (result["accuracy"], result["total"], result["skipped"]) == (None, 0, 1)


def test_a_record_with_image_in_an_answer_is_skipped_and_data_without_questions_is_refused(tmp_path, capsys):
    smooth_image(60, 40).save(tmp_path / "ok.png")
    ask = lambda q, a: [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    data = _write(tmp_path / "qa.json", [
        {"id": "tagged", "image": "ok.png",
         "conversations": ask("<image>\nWhat?", "an <image> tag") + ask("Sure?", "yes")},
        {"id": "fine", "image": "ok.png", "conversations": ask("<image>\nWhat?", "red")}])
    assert cli.main(["eval", "--model", "demo", "--data", str(data), "--max-new-tokens", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["total"], result["skipped"]) == (1, 2)  # not the whole run stopped by one record
    assert result["skipped_records"] == [{"id": "tagged", "image": None, "questions": 2,
                                          "reason": "<image> in the text of an answer (a gpt turn)"}]
    for records in ([], [{"id": "q", "conversations": [{"from": "human", "value": "Hi?"}]}]):
        empty = _write(tmp_path / "empty.json", records)  # the model is not loaded for it
        assert cli.main(["eval", "--model", "/no/such/model", "--data", str(empty)]) == 2
        assert "no questions to ask: none of its records has a gpt turn to score" in capsys.readouterr().err
