"""experiments/bench_kernels.py runs end to end at its tiny size on CPU (kernels interpreted), so the GPU run is one
command away; rows appear for every implementation that can run here and none for the GPU-only ones."""

import importlib.util
import pathlib

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "bench_kernels.py"


def _bench_kernels():
    spec = importlib.util.spec_from_file_location("bench_kernels", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_prints_a_row_per_runnable_implementation(capsys):
    _bench_kernels().main(["--tiny", "--ops=gla,softmax_attn", "--impls=pallas,chunked,cudnn,fla"])
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
    header, body = rows[0], rows[1:]
    assert [c.strip() for c in header[:4]] == ["op", "impl", "D", "T"]
    assert sorted((r[0].strip(), r[1].strip()) for r in body) == [
        ("gla", "chunked"), ("gla", "pallas"), ("softmax_attn", "chunked"), ("softmax_attn", "pallas")]
    for row in body:
        assert (row[2].strip(), row[3].strip()) == ("16", "64")
        assert float(row[4]) > 0 and float(row[5]) > 0


def test_unknown_names_are_refused():
    bench = _bench_kernels()
    with pytest.raises(ValueError, match="--ops: unknown op 'retnet'"):
        bench.main(["--tiny", "--ops=retnet"])
    with pytest.raises(ValueError, match="--impls: unknown implementation 'xla'"):
        bench.main(["--tiny", "--impls=xla"])
