"""The standard benchmarks, by their lmms-eval names: one module each, imported when asked for."""

from __future__ import annotations

import importlib

from .base import Sample, Skip, Task, TaskDataError

# task name -> the module under llava_next.eval.tasks that defines it as TASK
TASK_MODULES = {
    "vqav2_val": "vqav2",
    "textvqa_val": "textvqa",
    "docvqa_val": "docvqa",
    "chartqa": "chartqa",
    "gqa": "gqa",
    "pope": "pope",
    "mme": "mme",
    "scienceqa_img": "scienceqa",
    "mmbench_en_dev": "mmbench",
    "ai2d": "ai2d",
    "mmmu_val": "mmmu",
}


def get_task(name: str) -> Task:
    if name not in TASK_MODULES:
        raise TaskDataError(f"unknown task {name!r}; the tasks are: {', '.join(TASK_MODULES)} (and, without --task, "
                            "exact match on LLaVA-format data)")
    return importlib.import_module(f"{__name__}.{TASK_MODULES[name]}").TASK


__all__ = ["Sample", "Skip", "Task", "TaskDataError", "TASK_MODULES", "get_task"]
