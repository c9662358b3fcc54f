"""A step in a fresh process: JSON in, the last stdout line's JSON out, the child's error in the exception."""

import pytest

from compress.worker import run_worker

CHILD = '''
import sys
from compress.worker import serve

def double(x, fail=False):
    print("progress noise on stdout")
    if fail:
        print("the reason", file=sys.stderr)
        raise SystemExit(3)
    return {"doubled": 2 * x}

serve(double)
'''


@pytest.fixture
def child_module(tmp_path, monkeypatch):
    (tmp_path / "child_worker.py").write_text(CHILD)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    return "child_worker"


def test_result_is_the_last_json_line(child_module):
    assert run_worker(child_module, {"x": 21}, "the doubling worker") == {"doubled": 42}


def test_a_failing_child_names_itself_and_its_reason(child_module):
    with pytest.raises(RuntimeError, match=r"(?s)the doubling worker failed \(exit 3\): .*the reason"):
        run_worker(child_module, {"x": 1, "fail": True}, "the doubling worker")
