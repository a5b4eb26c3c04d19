"""A worker leaves its start-up objects out of garbage collection and times every collection
(media_pipeline/collector.py)."""

import json
import re
import subprocess
import sys

from tests.harness import REPO_ROOT, ScopeServer
from tests.test_metrics import scrape, value

# A fresh interpreter: freezing the test process itself would keep what the tests after this one drop.
FREEZE_SCRIPT = """
import gc, json, weakref
from media_pipeline.collector import freeze_start_up_objects, observe_pauses
from prometheus_client import REGISTRY

class Node:
    pass

def cycle():
    node = Node()
    node.self = node
    return node

kept = [cycle() for _ in range(50_000)]  # start-up objects, alive as long as the process
dropped = weakref.ref(cycle())  # garbage already, waiting for a collection
tracked_before = len(gc.get_objects())
frozen = freeze_start_up_objects()
observe_pauses()
late = weakref.ref(cycle())  # garbage made after the freeze
gc.collect()
print(json.dumps({
    "tracked_before": tracked_before, "frozen": frozen, "tracked_after": len(gc.get_objects()),
    "dropped_collected": dropped() is None, "late_collected": late() is None,
    "full_collections_timed": REGISTRY.get_sample_value("scope_gc_pause_seconds_count", {"generation": "2"}),
}))
"""


def test_freezing_collects_first_then_leaves_what_lives_out_of_later_collections():
    run = subprocess.run([sys.executable, "-c", FREEZE_SCRIPT], cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=60, check=True)
    result = json.loads(run.stdout)
    assert result["dropped_collected"], "garbage from before the freeze was collected, not frozen"
    assert result["frozen"] >= 50_000, result  # the kept nodes, and what the interpreter holds
    assert result["tracked_after"] < result["tracked_before"] / 10, result
    assert result["late_collected"], "garbage made after the freeze is still collected"
    assert result["full_collections_timed"] == 1, "the one full collection after observe_pauses() was timed"


def test_a_started_worker_leaves_its_start_up_objects_out_and_times_collections(embedded_server: ScopeServer):
    started = re.search(r"(\d+) start-up objects left out of garbage collection", embedded_server.log_text())
    assert started is not None, "the worker logs what it froze when it starts"
    # Django, torch, aiortc and the pipelines: hundreds of thousands in a started worker.
    assert int(started.group(1)) >= 100_000
    samples = scrape(embedded_server, "staff")
    assert value(samples, "scope_gc_pause_seconds_count", generation="0") > 0
    for generation in "12":
        assert value(samples, "scope_gc_pause_seconds_count", generation=generation) is not None
