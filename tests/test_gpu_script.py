"""bench/gpu.py (the one-command GPU report): its parsers on canned outputs of the bench scripts, pytest and
the stages; the step list; a step's record (rc, timeout, budget); the JSON report's fields from fake steps;
and a real dry run of a few of its fast steps. The full `--dry-run` takes ~2.5 minutes on 2 CPU cores: not
run here."""

import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import gpu  # noqa: E402

HEADER_FIELDS = {"date", "gpu", "driver", "torch", "cuda", "dry_run"}
STEP_FIELDS = {"name", "command", "rc", "seconds", "figures", "output_tail"}

PYTEST_OUT = """\
============================= test session starts ==============================
collecting ... collected 4 items

tests/test_cuda.py::test_bf16_step_learns PASSED                         [ 25%]
tests/test_cuda.py::test_fp16_step_with_the_scaler_learns FAILED         [ 50%]
tests/test_cuda.py::test_cached_generation_matches_uncached_under_autocast[gpt2] PASSED [ 75%]
tests/test_cuda.py::test_compile_smoke SKIPPED (needs triton)            [100%]

=================== 1 failed, 2 passed, 1 skipped in 41.20s ===================
"""

PRETRAIN_OUT = """\
bench_pretrain: training throughput and MFU
device    cuda
gpu       NVIDIA H200
round 1/3: bfloat16 95 ms/step

matmul peak: (8192, 8192) @ (8192, 8192), median of 3
dtype          GFLOP/s
float32      400,123.4
bfloat16     801,234.5
float16      805,000.0

training: gpt2, 12 layers, 12 heads, width 768, context 1024, vocab 50304, batch 16, 124.48M params, 870.0 MFLOP/token; compile on; median of 3 rounds of 20 steps
dtype        ms/step       tok/s     MFU  MFU (pretrain.py)
bfloat16        95.2     172,100   18.7%              15.1%
MFU: against the measured matmul peak of the row's dtype; MFU (pretrain.py): against model.peak_flops (a 0.5 s 1024-wide matmul)
target: MFU >= 45% of the datasheet peak on an H100: 15.1%, not met

command: python bench/bench_pretrain.py --gpt2-124m
gpu.py peak memory: 12345.6 MiB (cuda max_memory_allocated)
"""

BANDWIDTH_OUT = """\
read bandwidth: 4,100.2 GB/s (best x.sum() over 1024 MiB of fp32, 5 per round)
batch 1, greedy, KV cache: 128 decode steps after an 8-token prompt, median of 3 runs; bf16 = weights in bf16
shape      dtype    params  MB/token  ms/token    tok/s  roofline  achieved
default    fp32       4.3M      17.2      1.87    534.8  238,383.7        0%
gpt2-124m  fp32     124.4M     497.8      3.41    293.3   8,236.5        4%
gpt2-124m  bf16     124.4M     248.9      3.35    298.5  16,473.0        2%
roofline = read bandwidth / bytes per token (tok/s); achieved = tok/s / roofline
target: >= 50% of the roofline at the GPT-2 124M shape: fp32 4%, bf16 2%, not met
"""

PPO_OUT = """\
full: {'rollout_tok_s': 475.6, 'train_tok_s': 262.0, 'step_s': 4.18, 'peak_rss_mb': 615.3}
LoRA r=8: {'rollout_tok_s': 416.9, 'train_tok_s': 325.9, 'step_s': 6.96, 'peak_rss_mb': 540.2}

8 prompts per step, responses up to 24 tokens, 2 timed steps; bfloat16
              step  generate  score  rollout tok/s  train tok/s   peak RSS
full         4.18s       11%     5%            476          262     615 MB
LoRA r=8     6.96s       16%     4%            417          326     540 MB
"""

DPO_OUT = """\
835 world pairs, batch 16; bfloat16
                        pairs/s   π_ref memory  AdamW state
full, cached                  2       0.006 MB     32.52 MB
LoRA r=8, on the fly         27       0.000 MB      0.38 MB
"""


def test_parse_pytest_counts_and_per_test_outcomes():
    f = gpu.parse_pytest(PYTEST_OUT)
    assert f["tests"]["tests/test_cuda.py::test_bf16_step_learns"] == "PASSED"
    assert f["tests"]["tests/test_cuda.py::test_fp16_step_with_the_scaler_learns"] == "FAILED"
    assert f["tests"]["tests/test_cuda.py::test_cached_generation_matches_uncached_under_autocast[gpt2]"] == "PASSED"
    assert f["tests"]["tests/test_cuda.py::test_compile_smoke"] == "SKIPPED"
    assert (f["passed"], f["failed"], f["skipped"]) == (2, 1, 1)
    assert gpu.parse_pytest("6 skipped in 0.1s")["skipped"] == 6
    assert gpu.parse_pytest("")["tests"] == {}


def test_parse_bench_pretrain():
    f = gpu.parse_bench_pretrain(PRETRAIN_OUT)
    assert f["bfloat16"] == {"ms_per_step": 95.2, "tokens_per_s": 172100.0, "mfu_vs_measured_peak": pytest.approx(0.187),
                             "mfu_vs_datasheet_peak": pytest.approx(0.151)}
    assert "float32" not in f  # the matmul peak table is not a training row
    assert f["matmul_peak_gflops"] == {"float32": 400123.4, "bfloat16": 801234.5, "float16": 805000.0}
    assert f["config"].startswith("gpt2, 12 layers") and "not met" in f["target"]
    assert f["peak_memory_mib"] == 12345.6 and f["peak_memory_of"] == "cuda max_memory_allocated"


def test_parse_bench_generate_bandwidth():
    f = gpu.parse_bench_generate_bandwidth(BANDWIDTH_OUT)
    assert f["read_bandwidth_gb_s"] == 4100.2
    assert f["gpt2-124m bf16"]["tokens_per_s"] == 298.5 and f["gpt2-124m bf16"]["roofline_tokens_per_s"] == 16473.0
    assert f["gpt2-124m fp32"]["fraction_of_roofline"] == 0.04 and f["default fp32"]["params"] == "4.3M"


def test_parse_bench_tables():
    ppo = gpu.parse_bench_table(PPO_OUT)
    assert ppo["settings"]["LoRA r=8"]["train_tok_s"] == 325.9
    assert ppo["rows"]["full"] == ["4.18s", "11%", "5%", 476.0, 262.0, "615 MB"]
    dpo = gpu.parse_bench_table(DPO_OUT)
    assert dpo["rows"]["LoRA r=8, on the fly"] == [27.0, "0.000 MB", "0.38 MB"]
    assert "835 world pairs, batch 16; bfloat16" not in dpo["rows"]


def test_parse_stage_reads_the_world_line_and_eval_json(tmp_path):
    (tmp_path / "eval.json").write_text(json.dumps({"completion": 0.5, "answer": 0.25, "per_country": [1, 2]}))
    text = ("world: completion 0.0% | answer 0.0%\nstep 10\ndone: step 800, val loss 1.2345\n"
            "world: completion 50.0% | answer 25.0% (a base model)\n")
    f = gpu.parse_stage(text, str(tmp_path))
    assert f["world"] == "completion 50.0% | answer 25.0% (a base model)"
    assert f["done"] == "step 800, val loss 1.2345"
    assert f["eval"] == {"completion": 0.5, "answer": 0.25}  # scalars only
    assert gpu.parse_stage("nothing", str(tmp_path / "missing")) == {}


def test_tail_keeps_the_last_state_of_progress_bars():
    assert gpu.tail("a\nbar 1%\rbar 50%\rbar 100%\r\nend") == "a\nbar 100%\nend"
    assert gpu.tail("x" * 5000, 10) == "x" * 10


@pytest.mark.parametrize("dry_run", [True, False])
def test_build_steps_covers_every_part_of_the_report(dry_run):
    steps = gpu.build_steps(dry_run, "/tmp/t", python="python")
    names = [s["name"] for s in steps]
    assert names[0] == "pytest tests/test_cuda.py"
    for stage in ("pretrain", "sft", "reward", "dpo", "ppo"):
        assert f"world chain: {stage}" in names
    assert sum("pretrain throughput" in n for n in names) == 2
    assert any("compile" in n and "no compile" not in n for n in names) and any("no compile" in n for n in names)
    assert any("bandwidth" in n for n in names) and any("PPO" in n for n in names)
    assert any("DPO" in n for n in names) and any("SmolLM2-360M" in n for n in names)
    for s in steps:
        assert s["parser"] in gpu.PARSERS
        assert s.get("not_measured") or (s["command"] and s["timeout"] > 0)
    commands = [" ".join(s["command"]) for s in steps]
    if dry_run:
        assert all("--device cuda" not in c for c in commands)
        assert all("--quick" in c for c in commands if "bench/bench_" in c)
        chain = [c for c, n in zip(commands, names) if n.startswith("world chain: ") and "prepare.py" not in c]
        assert len(chain) == 5 and all("/tmp/t/world/" in c and "--max-steps 2" in c for c in chain)
    else:
        assert any("--gpt2-124m" in c for c in commands)
        assert all("--quick" not in c for c in commands)
        chain = [c for c, n in zip(commands, names) if n.startswith("world chain")]
        assert all("--max-steps" not in c for c in chain)  # the defaults


def test_run_step_records_rc_seconds_figures_and_timeouts():
    far = time.monotonic() + 100
    ok = gpu.run_step(dict(name="ok", parser="pytest", timeout=30, command=[sys.executable, "-c",
                                                                            "print('2 passed in 0.1s')"]), far)
    assert STEP_FIELDS <= set(ok) and ok["rc"] == 0 and ok["figures"]["passed"] == 2 and "2 passed" in ok["output_tail"]
    slow = gpu.run_step(dict(name="hang", parser="table", timeout=1, command=[sys.executable, "-c",
                                                                            "print('started', flush=True); import time; time.sleep(30)"]), far)
    assert slow["rc"] == "timeout" and slow["seconds"] < 10 and "started" in slow["output_tail"]
    spent = gpu.run_step(dict(name="late", parser="table", timeout=30, command=["true"]), time.monotonic() + 1)
    assert spent["rc"] is None and "budget" in spent["figures"]["not_measured"]
    skipped = gpu.run_step(dict(name="n/a", parser="table", command=[], not_measured="no flags"), far)
    assert STEP_FIELDS <= set(skipped) and skipped["figures"] == {"not_measured": "no flags"}


def test_report_has_every_field(tmp_path, monkeypatch, capsys):
    """main() on canned steps: the JSON at $OUT/gpu_report.json, the header's and every step's fields, a
    chain stage skipped when the one it starts from failed, and the printed table."""
    def fake_steps(dry_run, tmp, python=sys.executable):
        echo = lambda text: [sys.executable, "-c", f"print({text!r})"]  # noqa: E731
        return [dict(name="pytest tests/test_cuda.py", parser="pytest", timeout=30, command=echo(PYTEST_OUT)),
                dict(name="pretrain throughput, compile", parser="pretrain", timeout=30, command=echo(PRETRAIN_OUT)),
                dict(name="decode batch 1 vs bandwidth", parser="bandwidth", timeout=30, command=echo(BANDWIDTH_OUT)),
                dict(name="world chain: pretrain", parser="stage", timeout=30, out_dir=str(tmp_path / "none"),
                     command=[sys.executable, "-c", "import sys; print('world: completion 1.0%'); sys.exit(3)"]),
                dict(name="world chain: sft", parser="stage", timeout=30, out_dir="", needs="pretrain",
                     command=echo("never run")),
                dict(name="DPO step GPT-2 124M", parser="table", command=[], not_measured="no shape flags")]
    monkeypatch.setattr(gpu, "build_steps", fake_steps)
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu.main(["--dry-run"]) == 0
    report = json.loads((tmp_path / "gpu_report.json").read_text())
    assert HEADER_FIELDS <= set(report["header"]) and report["header"]["dry_run"] is True
    assert report["header"]["gpu"]  # a device name or "cpu"
    steps = {s["name"]: s for s in report["steps"]}
    assert len(steps) == 6 and all(STEP_FIELDS <= set(s) for s in steps.values())
    assert steps["pytest tests/test_cuda.py"]["figures"]["failed"] == 1
    assert steps["pretrain throughput, compile"]["figures"]["bfloat16"]["tokens_per_s"] == 172100.0
    assert steps["decode batch 1 vs bandwidth"]["figures"]["read_bandwidth_gb_s"] == 4100.2
    assert steps["world chain: pretrain"]["rc"] == 3 and steps["world chain: pretrain"]["figures"]["world"]
    assert steps["world chain: sft"]["rc"] is None and "did not finish" in steps["world chain: sft"]["figures"]["not_measured"]
    assert steps["DPO step GPT-2 124M"]["figures"] == {"not_measured": "no shape flags"}
    table = capsys.readouterr().out
    assert "172,100 tok/s" in table and "not measured: no shape flags" in table


@pytest.mark.slow
def test_dry_run_of_the_fast_steps(tmp_path):
    """The real script on its fast steps (~15 s): the CUDA tests (skipped here), decoding vs bandwidth, and a
    step that is not measured; --json PATH."""
    path = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "bench/gpu.py", "--dry-run", "--json", str(path), "--only", "pytest",
                           "decode", "DPO step GPT-2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(path.read_text())
    assert HEADER_FIELDS <= set(report["header"]) and report["header"]["dry_run"] is True
    steps = {s["name"]: s for s in report["steps"]}
    assert set(steps) == {"pytest tests/test_cuda.py", "decode batch 1 vs bandwidth", "DPO step GPT-2 124M"}
    assert all(STEP_FIELDS <= set(s) for s in steps.values())
    assert steps["pytest tests/test_cuda.py"]["rc"] == 0 and steps["pytest tests/test_cuda.py"]["figures"]["skipped"] >= 1
    decode = steps["decode batch 1 vs bandwidth"]
    assert decode["rc"] == 0 and decode["figures"]["read_bandwidth_gb_s"] > 0
    assert decode["figures"]["gpt2-124m bf16"]["tokens_per_s"] > 0 and decode["figures"]["peak_memory_mib"] > 0
    assert "gpu.py report" in proc.stdout
