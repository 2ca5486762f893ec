"""Every case of the hostile-input corpus (tests/hostile_corpus.py): a right answer or a clear error, never a
traceback, a hang, a crash or silently wrong output.

Each case runs under two bounds that say "did not hang, did not blow up", not how fast anything is:
  - time: SIGALRM interrupts a case still running after TIME_LIMIT_S (every case takes well under a second on
    the tiny checkpoints); faulthandler ends the process with every thread's stack if even that does not return
    (a hang inside native code that never comes back to Python);
  - memory: the process's peak resident size may grow by at most MEMORY_LIMIT_MB during a case.
"""

from __future__ import annotations

import faulthandler
import re
import resource
import signal

import pytest

from hostile_corpus import CASES, Case, CliResult, Fails, World
from llava_next.errors import LlavaError

TIME_LIMIT_S = 60
MEMORY_LIMIT_MB = 1024


@pytest.fixture(scope="session")
def world(tiny, tmp_path_factory) -> World:
    # Broken copies are built on first use, inside their first case's bounds: reading a broken file must not hang.
    return World(tiny, tmp_path_factory.mktemp("hostile"))


class Hung(BaseException):
    """Raised in the case by SIGALRM; a BaseException so no `except Exception` in the code under test eats it."""


def _alarm(signum, frame):
    raise Hung()


def run_bounded(case: Case, world: World):
    """(result, exception) of running the case, within the time and memory bounds."""
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    previous = signal.signal(signal.SIGALRM, _alarm)
    faulthandler.dump_traceback_later(3 * TIME_LIMIT_S, exit=True)
    signal.alarm(TIME_LIMIT_S)
    result = error = None
    try:
        result = case.run(world)
    except Hung:
        pytest.fail(f"{case.id}: still running after {TIME_LIMIT_S} s (a hang)", pytrace=False)
    except Exception as e:  # judged below
        error = e
    finally:
        signal.alarm(0)
        faulthandler.cancel_dump_traceback_later()
        signal.signal(signal.SIGALRM, previous)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert grown_mb <= MEMORY_LIMIT_MB, f"{case.id}: peak memory grew by {grown_mb:.0f} MiB"
    return result, error


def _describe(e: BaseException) -> str:
    return f"{type(e).__module__}.{type(e).__name__}: {str(e)[:500]}"


def _require(ok: bool, why: str) -> None:
    """A failed expectation as one readable line (the corpus has hundreds of cases to read through)."""
    if not ok:
        pytest.fail(why, pytrace=False)


def _names_the_problem(expect: Fails, message: str) -> None:
    _require(bool(re.search(expect.match, message, re.IGNORECASE | re.DOTALL)),
             f"the message does not name the problem (want {expect.match!r}): {message[:500]}")


def _check_answer(case: Case, result, world: World) -> None:
    if case.expect.check is None:
        return
    try:
        case.expect.check(result, world)
    except AssertionError as e:
        pytest.fail(f"a wrong answer: {e}", pytrace=False)


def judge_api(case: Case, result, error, world: World) -> None:
    if isinstance(case.expect, Fails):
        _require(error is not None, f"expected an error matching {case.expect.match!r}, got: {str(result)[:300]}")
        _require(isinstance(error, (LlavaError, *case.expect.also)),
                 f"expected a package error (LlavaError), got {_describe(error)}")
        message = str(error).strip()
        _names_the_problem(case.expect, message)
        _require(bool(message) and "\n" not in message, f"not one line: {message[:500]!r}")
        return
    _require(error is None, f"expected an answer, got {_describe(error) if error else ''}")
    _check_answer(case, result, world)


def judge_cli(case: Case, result: CliResult | None, error, world: World) -> None:
    _require(error is None, f"the command line would print a traceback: {_describe(error) if error else ''}")
    _require("Traceback" not in result.err, f"a traceback on stderr: {result.err[-500:]}")
    if isinstance(case.expect, Fails):
        _require(result.code == 2, f"exit code {result.code} (want 2), stdout {result.out[:200]!r}, "
                                   f"stderr {result.err[:300]!r}")
        lines = result.err.strip().splitlines()
        if lines and lines[0].startswith("usage:"):  # argparse: its usage, then one error line
            lines = [line for line in lines if "error:" in line]
        _require(len(lines) == 1 and "error:" in lines[0],
                 f"want one error line on stderr, got {len(lines)}: {result.err[:500]!r}")
        _names_the_problem(case.expect, lines[0])
        return
    _require(result.code == 0, f"exit code {result.code} (want 0), stderr {result.err[:500]!r}")
    _check_answer(case, result, world)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input(case: Case, world: World):
    result, error = run_bounded(case, world)
    if case.via == "cli":
        judge_cli(case, result, error, world)
    else:
        judge_api(case, result, error, world)


def test_the_corpus_is_large_and_covers_every_entry_point():
    assert len(CASES) >= 200
    assert {c.via for c in CASES} == {"load", "processor", "generate", "stream", "cli"}
    assert {c.id.split("-")[0] for c in CASES} == {"options", "prompts", "checkpoints", "images"}
