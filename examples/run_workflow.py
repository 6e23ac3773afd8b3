"""The seed's entry point: run the content pipeline through the Python client and print what each step produced.

Needs Redis and at least one worker that imports ``examples.content_pipeline``::

    export ORCH_IMPORTS=examples.content_pipeline
    orchestrator worker &                    # or: celery -A workers worker
    python examples/run_workflow.py "Redis streams"

``orchestrator demo`` does all of it, workers and Redis included, in one command.
"""

from __future__ import annotations

import json
import sys

from examples.content_pipeline import demo_pipeline
from orchestrator import Client


def main(topic: str) -> int:
    """Submit, wait, print; exit 0 when the run succeeded."""
    client = Client()
    run_id = client.submit(demo_pipeline, {"topic": topic})
    print(f"run {run_id} submitted; waiting …")
    view = client.wait(run_id, timeout=300)
    for name, step in view["steps"].items():
        output = step["output"]
        shown = output["text"][:120] + "…" if isinstance(output, dict) and "text" in output else json.dumps(output)
        print(f"{name:18} {step['status']:10} attempts={step['attempts']}  {shown}")
    print(f"run {view['status']}" + (f": {view['error']}" if view["error"] else ""))
    return 0 if view["status"] == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "How Celery chords work"))
