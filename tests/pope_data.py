"""A tiny POPE split in the exact schema of the Hub's lmms-lab/POPE test parquet files, and an lmms-eval task that
reads it: for the lmms-eval plugin's test and for comparing that plugin with `llava-next eval --task pope`.

The images are the synthetic shapes scenes the demo model was trained on, and the questions POPE-style yes/no
questions about them ("Is there a red circle in the image?"), half of them yes.

    write_pope_parquet(path, n=8, seed=0) -> the rows written (image as PNG bytes)
    write_pope_task(directory, parquet, task="pope_local") -> the task yaml for `lmms-eval --include_path directory`
    write_pope_choice_task(directory, parquet, task="pope_choice") -> the same questions as a multiple-choice task
        (yes / no scored by loglikelihood), which lmms-eval has no POPE variant of
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

# lmms-lab/POPE's features, as the `datasets` library records them in the parquet files' schema metadata
POPE_FEATURES = {
    "id": {"dtype": "string", "_type": "Value"},
    "question_id": {"dtype": "string", "_type": "Value"},
    "question": {"dtype": "string", "_type": "Value"},
    "answer": {"dtype": "string", "_type": "Value"},
    "image_source": {"dtype": "string", "_type": "Value"},
    "image": {"_type": "Image"},
    "category": {"dtype": "string", "_type": "Value"},
}
CATEGORIES = ("adversarial", "popular", "random")


def pope_rows(n: int = 8, seed: int = 0) -> list[dict]:
    """n POPE rows; the image cell is {"bytes": PNG, "path": None} as in the Hub's files."""
    from llava_next.data import synth

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        scene = synth._scene(rng)
        image = synth._draw(scene, rng)
        present = sorted({(s.color, s.kind) for s in scene.shapes})
        if i % 2 == 0:
            color, kind = rng.choice(present)
            answer = "yes"
        else:
            while True:
                color, kind = rng.choice(list(synth.COLORS)), rng.choice(synth.SHAPES)
                if (color, kind) not in present:
                    break
            answer = "no"
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        rows.append({
            "id": str(i),
            "question_id": str(i + 1),
            "question": f"Is there {synth.article(color)} {color} {kind} in the image?",
            "answer": answer,
            "image_source": f"synth_{seed}_{i:06d}",
            "image": {"bytes": buffer.getvalue(), "path": None},
            "category": CATEGORIES[i % len(CATEGORIES)],
        })
    return rows


def write_pope_parquet(path: str | Path, n: int = 8, seed: int = 0) -> list[dict]:
    """Write n rows as one parquet file with the Hub's schema (and its `datasets` feature metadata, so `datasets`
    decodes the image column as images); returns the rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = pope_rows(n, seed)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([(name, image_type if name == "image" else pa.string()) for name in POPE_FEATURES],
                       metadata={"huggingface": json.dumps({"info": {"features": POPE_FEATURES}})})
    table = pa.Table.from_pylist(rows, schema=schema)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return rows


def write_pope_task(directory: str | Path, parquet: str | Path, task: str = "pope_local") -> Path:
    """An lmms-eval task that is lmms-eval's own `pope` (prompt, generation settings, process_results, metrics: the
    yaml is included) reading the local parquet file instead of the Hub."""
    import importlib.util

    # (found without importing lmms_eval.tasks, which turns on PIL's LOAD_TRUNCATED_IMAGES for the whole process)
    pope_yaml = Path(importlib.util.find_spec("lmms_eval").submodule_search_locations[0]) / "tasks" / "pope" / "pope.yaml"
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / f"{task}.yaml"
    out.write_text(
        f"include: {json.dumps(str(pope_yaml))}\n"
        f"task: {task}\n"
        "dataset_path: parquet\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {json.dumps(str(Path(parquet).resolve()))}\n"
    )
    return out


def write_pope_choice_task(directory: str | Path, parquet: str | Path, task: str = "pope_choice") -> Path:
    """The same questions as lmms-eval `multiple_choice`: the choices " yes" and " no" after the question, scored by
    the model's loglikelihood, with lmms-eval's `acc`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / f"{task}.yaml"
    out.write_text(
        f"task: {task}\n"
        "dataset_path: parquet\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {json.dumps(str(Path(parquet).resolve()))}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_visual: !function lmms_eval.tasks.pope.utils.pope_doc_to_visual\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: ["yes", "no"]\n'
        "doc_to_target: answer\n"
        "metric_list:\n"
        "  - metric: acc\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n"
    )
    return out
