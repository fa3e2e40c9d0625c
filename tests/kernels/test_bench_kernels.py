"""experiments/bench_kernels.py runs end to end at its tiny size on CPU (kernels interpreted), so the GPU run is one
command away; rows appear for every implementation that can run here and none for the GPU-only ones."""

import importlib.util
import pathlib
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "bench_kernels.py"


def _bench_kernels():
    if str(SCRIPT.parent) not in sys.path:  # its sibling bench_ops, as when run as a script
        sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("bench_kernels", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tables(text: str) -> list[list[list[str]]]:
    """The markdown tables of ``text``: rows of stripped cells, header first."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            if not line.startswith("|---"):
                current.append([cell.strip() for cell in line.split("|")[1:-1]])
        elif current:
            tables.append(current)
            current = []
    return tables


def test_tiny_run_checks_the_kernels_and_prints_a_row_per_runnable_implementation(capsys):
    _bench_kernels().main(["--tiny", "--ops=gla,softmax_attn", "--impls=pallas,chunked,cudnn,fla"])
    check, timings, targets = _tables(capsys.readouterr().out)
    assert [row[0] for row in check[1:]] == ["gla", "softmax_attn"]
    errors = [[float(e) for e in row[1].split(",")] for row in check[1:]]
    assert [len(e) for e in errors] == [5, 4]  # o and each input's gradient
    assert max(max(e) for e in errors) <= 1e-5
    header, body = timings[0], timings[1:]
    assert header[:4] == ["op", "impl", "D", "T"]
    assert sorted((r[0], r[1]) for r in body) == [
        ("gla", "chunked"), ("gla", "pallas"), ("softmax_attn", "chunked"), ("softmax_attn", "pallas")]
    for row in body:
        assert (row[2], row[3]) == ("16", "64")
        assert float(row[4]) > 0 and float(row[5]) > 0
    assert targets == [["op", "D", "T", "reference", "reference / Pallas (fwd+bwd)", "target", "met"]]  # no fla, cudnn


def test_unknown_names_are_refused():
    bench = _bench_kernels()
    with pytest.raises(ValueError, match="--ops: unknown op 'retnet'"):
        bench.main(["--tiny", "--ops=retnet"])
    with pytest.raises(ValueError, match="--impls: unknown implementation 'xla'"):
        bench.main(["--tiny", "--impls=xla"])
