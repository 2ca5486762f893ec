"""The lmms-eval plugin (llava_next/eval/lmms_plugin.py): lmms-eval's own command line runs our engine on a local
POPE split, and the plugin's loglikelihood, batching and multi-round answers equal direct computations."""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import smooth_image
from pope_data import write_pope_choice_task, write_pope_parquet, write_pope_task

ROOT = Path(__file__).resolve().parent.parent
INSTALL = "pip install -e '.[eval]'"
# what lmms-eval's command line imports on the way to a simple image task (a short list: lmms-eval's own dependency
# list pulls in torchvision, opencv, wandb and more), and filelock 3.x, whose private module lmms-eval 0.7.3 patches
RUNTIME = ("lmms_eval", "accelerate", "datasets", "evaluate", "sacrebleu", "tenacity", "pytablewriter", "loguru",
           "pyarrow", "filelock._api")


def _missing() -> list[str]:
    missing = []
    for name in RUNTIME:
        try:
            found = importlib.util.find_spec(name) is not None
        except ImportError:
            found = False
        if not found:
            missing.append(name)
    return missing


pytestmark = pytest.mark.skipif(bool(_missing()), reason=f"lmms-eval or its runtime dependencies are not installed "
                                                          f"({', '.join(_missing())}): {INSTALL}")


@pytest.fixture(autouse=True)
def _pil_setting_restored():
    """Importing lmms-eval's task modules turns on PIL's LOAD_TRUNCATED_IMAGES process-wide; no test here may leave
    it changed for the tests that run after."""
    from PIL import ImageFile

    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    yield
    changed = ImageFile.LOAD_TRUNCATED_IMAGES != saved
    ImageFile.LOAD_TRUNCATED_IMAGES = saved
    assert not changed, "a test turned on PIL's LOAD_TRUNCATED_IMAGES (an lmms_eval.tasks / api.task import)"


def _registered() -> bool:
    return any(ep.name == "llava_next_pkg" for ep in importlib.metadata.entry_points(group="lmms_eval.models"))


def test_the_entry_point_names_the_model_and_its_class():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    entry = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["lmms_eval.models"]
    assert entry == {"llava_next_pkg": "llava_next.eval.lmms_plugin:manifest"}
    from llava_next.eval.lmms_plugin import LlavaNextLmms, manifest

    m = manifest()
    assert (m.model_id, m.simple_class_path) == ("llava_next_pkg", "llava_next.eval.lmms_plugin.LlavaNextLmms")
    from lmms_eval.api.model import lmms

    assert issubclass(LlavaNextLmms, lmms) and LlavaNextLmms.is_simple


def test_batch_size_and_device_in_model_args_win_over_lmms_evals_own():
    from llava_next.eval.lmms_plugin import LlavaNextLmms

    # lmms-eval's evaluator passes these beside model_args, its --batch_size always (default 1)
    lm = LlavaNextLmms.create_from_arg_string("pretrained=demo,batch_size=4,device=cpu",
                                              {"batch_size": 1, "max_batch_size": None, "device": "cuda:0"})
    assert lm.batch_size == 4 and lm.device == torch.device("cpu")
    assert LlavaNextLmms.create_from_arg_string("pretrained=demo", {"batch_size": 2, "device": None}).batch_size == 2
    # model_args' values arrive as strings: group_size=None is load()'s default (128, or a quantized checkpoint's own)
    for given, groups in (("None", 128), ("32", 32)):
        lm = LlavaNextLmms.create_from_arg_string(f"pretrained=demo,quantize=int4,group_size={given}", {})
        assert lm.pipe.quantization["group_size"] == groups


def test_the_base_package_does_not_import_lmms_eval():
    code = "import sys, llava_next, llava_next.cli, llava_next.eval; assert 'lmms_eval' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


# -- lmms-eval's command line on a local POPE split -------------------------------------------------------------------


def test_lmms_eval_command_line_runs_our_engine_on_pope(tmp_path):
    if not _registered():
        pytest.skip(f"the installed llava-next metadata has no lmms_eval.models entry point: {INSTALL} (entry points "
                    "are read from the installed metadata)")
    parquet = tmp_path / "data" / "test.parquet"
    rows = write_pope_parquet(parquet, n=8)
    write_pope_task(tmp_path / "tasks", parquet, task="pope_local")
    write_pope_choice_task(tmp_path / "tasks", parquet, task="pope_choice")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets"), "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "lmms_eval", "--model", "llava_next_pkg",
               "--model_args", "pretrained=demo,dtype=float32", "--tasks", "pope_local,pope_choice",
               "--include_path", str(tmp_path / "tasks"), "--batch_size", "4", "--output_path", str(tmp_path / "out"),
               "--log_samples"]
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    [results_file] = glob.glob(str(tmp_path / "out" / "*" / "*_results.json"))
    results = json.loads(Path(results_file).read_text())["results"]

    def samples(task):
        [path] = glob.glob(str(tmp_path / "out" / "*" / f"*_samples_{task}.jsonl"))
        logged = sorted((json.loads(line) for line in open(path)), key=lambda s: s["doc_id"])
        assert [s["doc_id"] for s in logged] == list(range(len(rows)))
        return logged

    import llava_next

    pipe = llava_next.load("demo", dtype="float32", progress=False)
    images = [[Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB")] for row in rows]
    truth = [row["answer"] for row in rows]

    # pope: lmms-eval's prompt; the plugin's answers are our engine's for the same prompts and images
    prompts = [row["question"] + "\nAnswer the question using a single word or phrase." for row in rows]
    expected = [g.text for g in pipe.generate([_messages(p, 1) for p in prompts], images, max_new_tokens=128,
                                              temperature=0)]
    logged = samples("pope_local")
    assert [s["input"] for s in logged] == prompts
    assert [s["filtered_resps"] for s in logged] == expected
    # and the scores are POPE's, computed from those answers
    pairs = list(zip([text.lower().strip() for text in expected], truth))
    tp = sum(p == "yes" and t == "yes" for p, t in pairs)
    fp = sum(p == "yes" and t == "no" for p, t in pairs)
    fn = sum(p == "no" and t == "yes" for p, t in pairs)
    precision = tp / (tp + fp) if tp + fp else 0
    recall = tp / (tp + fn) if tp + fn else 0
    want = {"pope_accuracy": sum(p == t for p, t in pairs) / len(pairs), "pope_precision": precision,
            "pope_recall": recall, "pope_f1_score": 2 * precision * recall / (precision + recall) if precision + recall else 0,
            "pope_yes_ratio": truth.count("yes") / len(truth)}
    assert {name: results["pope_local"][f"{name},none"] for name in want} == pytest.approx(want)
    # and `llava-next eval --task pope` on the same parquet: the same predictions, the same scores
    from llava_next.eval.runner import run_task

    ours = run_task(pipe, "pope", parquet, tmp_path / "ours", batch_size=4)
    predicted = [json.loads(line) for line in (tmp_path / "ours" / "predictions.jsonl").read_text().splitlines()]
    assert [p["prompt"] for p in predicted] == [s["input"] for s in logged]
    assert [p["prediction"] for p in predicted] == [s["filtered_resps"] for s in logged]
    assert ours.metrics == pytest.approx({name: results["pope_local"][f"{name},none"] for name in ours.metrics})
    assert set(ours.metrics) == set(want)

    # pope_choice: each choice's loss (mean negative log-likelihood, lmms-eval's convention) is ours, and lmms-eval's
    # accuracy picks the choice of least loss
    losses = [[_loss(*_direct_loglikelihood(pipe, row["question"], choice, ims)[:2]) for choice in (" yes", " no")]
              for row, ims in zip(rows, images)]
    logged = samples("pope_choice")
    assert all(len(s["filtered_resps"]) == 2 for s in logged)
    assert [float(ll) for s in logged for ll, _ in s["filtered_resps"]] == \
        pytest.approx([loss for pair in losses for loss in pair], rel=1e-4, abs=1e-4)
    picked = ["yes" if yes < no else "no" for yes, no in losses]
    assert results["pope_choice"]["acc,none"] == pytest.approx(sum(p == t for p, t in zip(picked, truth)) / len(rows))


# -- the plugin in this process, on a tiny float32 checkpoint ---------------------------------------------------------


@pytest.fixture(scope="module")
def plugin(tiny):
    from llava_next.eval.lmms_plugin import LlavaNextLmms

    lm = LlavaNextLmms(pretrained=str(tiny("vicuna")), dtype="float32", batch_size=3)
    docs = [
        {"images": [smooth_image(60, 40, seed=1)]},
        {"images": [smooth_image(30, 50, seed=2), smooth_image(50, 50, seed=3)]},
        {"images": []},
        {"images": [smooth_image(80, 30, seed=4)]},
    ]
    lm.task_dict = {"t": {"test": docs}}
    return lm


def _instance(kind: str, arguments: tuple, doc_id: int = 0):
    from lmms_eval.api.instance import Instance

    return Instance(request_type=kind, arguments=arguments, idx=0, metadata={"task": "t", "doc_id": doc_id, "repeats": 1})


def _visuals(doc):
    return doc["images"]


def _messages(text: str, n_images: int) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}]


def _direct_loglikelihood(pipe, context: str, continuation: str, images) -> tuple[float, int, bool]:
    """One request, no padding: the whole sequence's float32 logits, the continuation's tokens scored ->
    (their summed log-probability, how many, whether each is the argmax)."""
    prompt = pipe.processor.apply_chat_template(_messages(context, len(images)))
    whole = pipe.processor(prompt + continuation, images)
    n_prompt = pipe.processor(prompt, images)["input_ids"].shape[1]
    ids = whole["input_ids"][0]
    assert ids[:n_prompt].tolist() == pipe.processor(prompt, images)["input_ids"][0].tolist()
    with torch.inference_mode():
        logits = pipe.model(**whole)[0].float()
    logprobs = torch.log_softmax(logits[n_prompt - 1 : -1], dim=-1)
    targets = ids[n_prompt:]
    return (float(logprobs.gather(-1, targets[:, None]).sum()), len(targets),
            bool((logprobs.argmax(-1) == targets).all()))


def _loss(total: float, n: int) -> float:
    """What lmms-eval's models return as a loglikelihood: the mean negative log-likelihood per token."""
    return -total / n


def _greedy_continuation(pipe, context: str, images) -> str:
    """Text whose tokens after the prompt are exactly the model's first greedy tokens (as many as re-encode)."""
    prompt = pipe.processor.apply_chat_template(_messages(context, len(images)))
    tokens = pipe.generate(_messages(context, len(images)), images, max_new_tokens=3, temperature=0).token_ids
    prompt_ids = pipe.processor(prompt, images)["input_ids"][0].tolist()
    for k in (3, 2, 1):
        text = pipe.processor.tokenizer.decode(tokens[:k])
        for candidate in (text, " " + text):
            if pipe.processor(prompt + candidate, images)["input_ids"][0].tolist() == prompt_ids + tokens[:k]:
                return candidate
    pytest.fail(f"no text re-encodes to the greedy tokens {tokens}")


def test_loglikelihood_equals_a_direct_computation(plugin):
    pipe, docs = plugin.pipe, plugin.task_dict["t"]["test"]
    greedy = _greedy_continuation(pipe, "What is shown in this image?", docs[0]["images"])
    cases = [  # (context, continuation, doc id)
        ("What is shown in this image?", greedy, 0),
        ("What is shown in this image?", " A red stop sign.", 0),
        ("How many squares are there?", " three", 1),
        ("Is there a green star?", " Yes", 2),
        ("<image>\nWhat color is the circle?", " blue", 3),  # lmms-eval's own <image> is removed from the text
    ]
    requests = [_instance("loglikelihood", (c, cont, _visuals, d, "t", "test"), d) for c, cont, d in cases]
    got = _as_the_evaluator_sees_them(plugin.loglikelihood(requests))
    want = [_direct_loglikelihood(pipe, c.removeprefix("<image>\n"), cont, docs[d]["images"]) for c, cont, d in cases]
    assert [g[1] for g in got] == [w[2] for w in want]
    assert got[0][1] is True and not all(g[1] for g in got)
    assert [g[0] for g in got] == pytest.approx([_loss(*w[:2]) for w in want], rel=1e-4, abs=1e-4)
    # the plain log-probabilities, for callers of the plugin's own API
    items = [(c, cont, docs[d]["images"]) for c, cont, d in cases]
    scored = plugin.score(items)
    assert [n for _, n, _ in scored] == [w[1] for w in want]
    assert [total for total, _, _ in scored] == pytest.approx([w[0] for w in want], rel=1e-4, abs=1e-4)

    # the unconditional requests of acc_mutual_info: (context, continuation) only, no images
    [(loss, _)] = _as_the_evaluator_sees_them(plugin.loglikelihood([_instance("loglikelihood", ("", " yes"))]))
    assert loss == pytest.approx(_loss(*_direct_loglikelihood(pipe, "", " yes", [])[:2]), rel=1e-4, abs=1e-4)


def _as_the_evaluator_sees_them(outputs):
    from lmms_eval.api.instance import unwrap_generation_output

    return [unwrap_generation_output(o)[0] for o in outputs]


def test_generate_until_batches_by_settings_and_keeps_request_order(plugin):
    pipe, docs = plugin.pipe, plugin.task_dict["t"]["test"]
    short, long_ = {"max_new_tokens": 2, "temperature": 0, "do_sample": False}, {"max_new_tokens": 5, "until": ["."]}
    asks = [("What is shown?", short, 0), ("Describe it.", long_, 1), ("Is there a star?", short, 2),
            ("<image>\nHow many?", long_, 3), ("What color?", short, 3)]
    requests = [_instance("generate_until", (c, dict(g), _visuals, d, "t", "test"), d) for c, g, d in asks]
    got = plugin.generate_until(requests)
    want = [pipe.generate(_messages(c.removeprefix("<image>\n"), len(docs[d]["images"])), docs[d]["images"],
                          max_new_tokens=g["max_new_tokens"], temperature=0, stop=g.get("until", [])).text
            for c, g, d in asks]
    assert got == want


def test_multi_round_asks_each_round_the_task_gives(plugin):
    pipe, docs = plugin.pipe, plugin.task_dict["t"]["test"]
    rounds = {0: 2, 3: 3}  # doc id -> rounds

    def doc_to_text(doc, previous_output=None, round_idx=None, previous_round_info=None):
        doc_id = next(i for i, d in enumerate(docs) if d is doc)
        if round_idx >= rounds[doc_id]:
            return None, None, True, previous_output, None
        return doc["images"], f"Round {round_idx}: what else?", False, previous_output, {"round": round_idx}

    gen = {"max_new_tokens": 3}
    requests = [_instance("generate_until_multi_round", ("First: what is it?", dict(gen), _visuals, doc_to_text, d,
                                                         "t", "test"), d) for d in rounds]
    got = plugin.generate_until_multi_round(requests)
    for answers, d in zip(got, rounds):
        texts = ["First: what is it?"] + [f"Round {r}: what else?" for r in range(1, rounds[d])]
        images = docs[d]["images"]
        assert answers == [pipe.generate(_messages(t, len(images)), images, max_new_tokens=3, temperature=0).text
                           for t in texts]
