"""The round-time benchmark runs end to end on the tiny model and data and prints every part."""

from __future__ import annotations

import time

from benchmarks import round_parts, round_time
from common.run_config import override_text

# The tiny fixture's model and data, with the default run's frozen class-name head.
TINY_KEYS = ("model.path", "data.source", "data.text-column", "data.label-column",
             "data.partitioner", "data.min-test-examples", "lora.r", "lora.alpha")
PARTS = ("load corpus", "launcher: preflight", "server: check_run",
         "server: build model + LoRA + class-name head", "server: tokenize all",
         "server: tokenize the evaluation subset", "client: load + tokenize its partition",
         "client: calibrate σ", "client round", "build model from disk + global adapter",
         "privacy plan", "privatize (Opacus make_private)", "1 DP-SGD steps",
         round_parts.PER_STEP, *round_parts.PHASES.values(), "reply (ε, moved norm, arrays)",
         "server: evaluation (10 examples)", "server: final evaluation (",
         "server: configure round", "server: aggregate + refactorize")


def test_round_time_prints_every_part_for_both_dtypes(tiny_run_config, capsys):
    overrides = override_text({key: tiny_run_config[key] for key in TINY_KEYS})
    start = time.monotonic()
    code = round_time.main(["--repeats", "1", "--local-steps", "1", "--batch-size", "4",
                            "--eval-examples", "10", "--max-length", "16",
                            "--run-config", overrides, "--emulated-bf16", "--skip-imports",
                            "--full-eval", "--markdown"])
    out = capsys.readouterr().out
    assert code == 0
    assert time.monotonic() - start < 50, out
    for part in PARTS:
        assert part in out, f"{part!r} missing from:\n{out}"
    assert "native bfloat16" in out and "avx512_bf16" in out and "torch threads" in out
    assert "per round ≈ 3 × client round (if clients run one after another on 2 cores)" in out
    assert "float32/bfloat16" in out and "not a full one" not in out
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert table and all(line.count("|") == table[0].count("|") for line in table)


def test_import_seconds_times_a_fresh_interpreter():
    assert 0 <= round_parts.import_seconds("json") < 10


def test_cpu_flags_reads_the_flags_line(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n")
    assert round_time.cpu_flags(cpuinfo) == {"avx2": True, "avx512f": False,
                                             "avx512_bf16": True, "amx_tile": False,
                                             "amx_bf16": False}
    assert not any(round_time.cpu_flags(tmp_path / "missing").values())
