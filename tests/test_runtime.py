"""lipmargin.runtime: the allocator setting the command line makes at start."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lipmargin import cli


def _in_fresh_process(code: str, env_extra: dict[str, str]) -> str:
    env = dict(os.environ, **env_extra)
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


CODE = (
    "from lipmargin import runtime; print(runtime.allocator()); print(runtime.steady_allocator())"
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_steady_allocator_on_glibc_and_opt_out():
    before, after = _in_fresh_process(CODE, {}).splitlines()
    assert before == "default"
    assert "mmap above 32 MiB" in after
    # LIPMARGIN_ALLOCATOR=default leaves the C library's settings alone
    assert _in_fresh_process(CODE, {"LIPMARGIN_ALLOCATOR": "default"}).splitlines() == [
        "default",
        "default",
    ]


def test_command_line_sets_it(monkeypatch, tmp_path, capsys):
    calls = []
    monkeypatch.setattr(cli, "steady_allocator", lambda: calls.append(1) or "x")
    assert cli.main(["certify", str(tmp_path / "no-such-run")]) == 2
    assert calls == [1]
    assert "error" in capsys.readouterr().err
