"""Every numeric option is checked for finiteness and range: one line naming it, exit status 2."""

import pytest

from margin_ext.train.__main__ import main


@pytest.mark.parametrize("flag, value", [
    ("--lr", "inf"), ("--lr", "nan"), ("--lr", "0"), ("--lr", "-0.1"),
    ("--lr-gamma", "-0.5"), ("--lr-gamma", "0"), ("--lr-gamma", "nan"),
    ("--lr-power", "-1"), ("--lr-power", "inf"),
    ("--momentum", "nan"), ("--momentum", "-5"), ("--momentum", "1"),
    ("--weight-decay", "-1"), ("--weight-decay", "inf"),
    ("--clip-grad", "nan"), ("--clip-grad", "-1"),
    ("--dropout", "nan"), ("--dropout", "1"),
    ("--sample-rate", "nan"), ("--sample-rate", "0"), ("--sample-rate", "1.5"),
    ("--warmup-epochs", "-1"), ("--warmup-epochs", "nan"), ("--warmup-steps", "-1"),
    ("--margin-m", "nan"), ("--margin-m", "inf"), ("--scale", "nan"), ("--scale", "-64"),
    ("--batch-size", "0"), ("--epochs", "0"), ("--steps", "-3"), ("--val-every", "-1"),
    ("--num-images", "0"), ("--num-classes", "0"), ("--checkpoint-every", "-1"),
    ("--keep-checkpoints", "0"), ("--log-every", "0"), ("--num-workers", "-1"),
])
def test_bad_numbers_are_refused_in_one_line(flag, value, tmp_path, capsys):
    assert main([flag, value, "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("margin-ext-train: error:")
    assert flag in err and value.lstrip("-") in err.lower()
    assert not (tmp_path / "run").exists()  # refused before anything is created


def test_triton_backend_on_the_cpu_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert main(["--backend", "triton", "--device", "cpu", "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--backend triton" in err and "Traceback" not in err
