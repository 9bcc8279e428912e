"""One trial of the faults of bench/faults.py that found lost work or a traceback (docs/reliability.md, "Fault
injection"): the run is disturbed, recovered as a user would (the same command), and must not lose work -- its
final model bitwise equal to an undisturbed run's, resumed from the newest committed checkpoint -- nor stop with
a traceback. Each fault gets the trial its seed draws, chosen to hit the hard case the bench found (a kill inside
a checkpoint write, a `latest` that is not text...). The bench runs many trials of every fault; the faults left
out here are each tested elsewhere: a second run on a held folder (tests/test_runfolder.py), a truncated
checkpoint and a killed Ray worker (tests/test_train.py), a lost host (tests/test_multihost.py), an unreadable
shard (tests/test_stream.py). All eleven took nine minutes here; these six about five, keeping CI near its
budget."""

import importlib.util
import random
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _load_bench():
    spec = importlib.util.spec_from_file_location("faults", REPO / "bench" / "faults.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["faults"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


faults = _load_bench()

# The seed of each fault's trial (bench/faults.py draws every choice from it; these are seeds of its trials):
SEEDS = {
    "kill_worker": 4078015,  # SIGKILL inside checkpoint 8's write: after the folder's rename, before `latest`
    "corrupt_latest": 6814003,  # `latest` holding bytes that are not UTF-8
    "usr1_term": 9728001,  # USR1, USR1 0.2 s apart
    "disk_full": 37001,  # a 4 MiB disk
    "storage_503": 321000,  # 503 for 10 s while a shard is being read
    "kill_driver": 4066000,  # the driver SIGKILLed mid-run, then the same command at once
}
LOCAL = ["kill_worker", "corrupt_latest", "usr1_term", "disk_full", "storage_503"]
RAY = ["kill_driver"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return faults.Bench(tmp_path_factory.mktemp("faults"))


def _trial(bench, fault: str):
    try:
        outcome = faults.FAULTS[fault](bench, random.Random(SEEDS[fault]))
    except PermissionError as e:  # a tmpfs or network namespaces need root
        pytest.skip(str(e))
    print(f"{fault}: {outcome.kind}: {outcome.note}")
    # The fault must have struck: a run that ended first, or a server that refused nothing, tests nothing.
    missed = ("ended before the signals", "the run ended first", "(0 requests refused)")
    assert not any(m in outcome.note for m in missed), outcome.note
    return outcome


@pytest.mark.parametrize("fault", LOCAL)
def test_a_local_run_disturbed_loses_no_work_and_says_why_it_stopped(bench, fault):
    outcome = _trial(bench, fault)
    assert outcome.kind in ("equal", "clear_error"), outcome.note  # no lost work, no traceback


@pytest.mark.parametrize("fault", RAY)
def test_a_ray_run_disturbed_loses_no_work(bench, fault):
    outcome = _trial(bench, fault)
    assert outcome.kind != "lost_work", outcome.note


def test_the_table_counts_each_outcome(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(f"intro\n{faults.BEGIN}\nold\n{faults.END}\nafter\n")
    tally = faults.Tally(trials=2, counts={"equal": 1, "clear_error": 1, "unclear_error": 0, "lost_work": 0})
    tally.notes = ["a | b"]
    faults.write_doc(doc, faults.table({"two_runs": tally}))
    text = doc.read_text()
    assert text.startswith(f"intro\n{faults.BEGIN}\n| fault | trials |") and text.endswith(f"{faults.END}\nafter\n")
    assert "| `two_runs` | 2 | 1 | 1 | 0 | 0 | a / b |" in text and "old" not in text
