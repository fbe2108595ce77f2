"""The boolean environment variables: one rule (tf_fastattn/_env.py), the
words it accepts in any case, a clear refusal of any other, and each
variable taking effect through it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tf_fastattn import _env


@pytest.mark.parametrize("name", list(_env.FLAGS))
@pytest.mark.parametrize("raw,expected", [("0", False), ("1", True), ("false", False), ("TRUE", True),
                                          ("No", False), ("yes", True), ("OFF", False), ("on", True),
                                          (" off ", False)])
def test_accepted_words(monkeypatch, name, raw, expected):
    monkeypatch.setenv(name, raw)
    assert _env.flag(name) is expected


@pytest.mark.parametrize("name", list(_env.FLAGS))
def test_unset_or_empty_is_the_default(monkeypatch, name):
    monkeypatch.delenv(name, raising=False)
    assert _env.flag(name) is _env.FLAGS[name][0]
    monkeypatch.setenv(name, "")
    assert _env.flag(name) is _env.FLAGS[name][0]


@pytest.mark.parametrize("raw", ["maybe", "2", "enable", "-1", "tru"])
def test_other_words_are_refused_by_name(monkeypatch, raw):
    monkeypatch.setenv("TF_FASTATTN_CPU_AMX", raw)
    with pytest.raises(ValueError, match=f"TF_FASTATTN_CPU_AMX={raw!r} is not a boolean: expected one of 0"):
        _env.check_flags()


def _run(code, **env):
    full = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **env)
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=300)


def test_import_refuses_a_bad_word_and_honours_false():
    bad = _run("import tf_fastattn", TF_FASTATTN_DISABLE_XLA="sometimes")
    assert bad.returncode != 0
    assert "ValueError: environment variable TF_FASTATTN_DISABLE_XLA='sometimes' is not a boolean" in bad.stderr
    # "false" used to disable XLA (any value but 0 did); "ON" did not disable the ops.
    code = ("import tf_fastattn; from tf_fastattn import _loader; s = _loader.state(); "
            "print('OPS', s['reason']); print('XLA', s.get('xla_reason'))")
    res = _run(code, TF_FASTATTN_DISABLE_XLA="false")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "XLA disabled by" not in res.stdout, res.stdout
    res = _run(code, TF_FASTATTN_DISABLE_OPS="ON")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "OPS disabled by TF_FASTATTN_DISABLE_OPS" in res.stdout, res.stdout
