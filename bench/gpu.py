"""
One command, one report, for a CUDA machine lent for a few minutes: runs the CUDA tests, the GPT-2 124M
pretraining throughput (bf16, with and without torch.compile), the world chain with its defaults, DPO/PPO/SFT
steps at bigger shapes, and batch-1 decoding against the memory-bandwidth bound, each as a subprocess with
its own timeout inside one overall budget; writes every figure to one JSON file and prints a table.

  bash bench/gpu.sh                        # on the GPU: installs requirements.txt if torch/tiktoken are missing
  python bench/gpu.py --dry-run            # every step at tiny sizes on the CPU: checks the script runs
  python bench/gpu.py --json report.json --budget 480

The report: {"header": {"date", "gpu", "driver", "torch", "cuda", "dry_run", ...}, "steps": [{"name",
"command", "rc", "seconds", "figures", "output_tail", ...}, ...]}; default path $OUT/gpu_report.json when
$OUT is set, else bench/gpu_report.json. A step that could not be measured has rc null and
figures {"not_measured": reason}.
"""

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAIL_CHARS = 3000
PEAK_TAG = "gpu.py peak memory:"
# SmolLM2-360M (HuggingFaceTB/SmolLM2-360M config.json): what the LoRA SFT figure asks for
SMOLLM2_360M = "32 layers, width 960, 15 heads / 5 KV heads, MLP 2560, vocab 49,152"


# ---------------------------------------------------------------------------- parsing (pure functions)

def _num(s):
    return float(s.replace(",", ""))


def parse_pytest(text):
    """pytest -v output -> {"tests": {nodeid: PASSED|FAILED|SKIPPED|ERROR|...}, "passed": n, ...}."""
    tests = {}
    for m in re.finditer(r"^(\S+::\S+)\s+(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b", text, re.M):
        tests[m.group(1)] = m.group(2)
    figures = {"tests": tests}
    for outcome in ("passed", "failed", "skipped", "error", "errors", "xfailed", "xpassed", "deselected"):
        m = re.findall(rf"(\d+) {outcome}\b", text.splitlines()[-1] if text.strip() else "")
        if m:
            figures["error" if outcome == "errors" else outcome] = int(m[-1])
    for outcome in ("PASSED", "FAILED", "SKIPPED", "ERROR"):  # counts from the per-test lines when no summary
        figures.setdefault(outcome.lower(), sum(v == outcome for v in tests.values()))
    return figures


def parse_peak_memory(text):
    """The line the --with-peak-memory wrapper prints -> {"peak_memory_mib": x, "peak_memory_of": "cuda"|"cpu rss"}."""
    m = re.search(rf"^{re.escape(PEAK_TAG)} ([\d.]+) MiB \((.+)\)", text, re.M)
    return {"peak_memory_mib": float(m.group(1)), "peak_memory_of": m.group(2)} if m else {}


def parse_bench_pretrain(text):
    """bench_pretrain.py's tables -> ms/step, tok/s and both MFUs per training dtype, the matmul peaks."""
    figures = {}
    train = re.search(r"^training: (.+)$", text, re.M)
    if train:
        figures["config"] = train.group(1)
    after = text[train.end():] if train else ""
    for m in re.finditer(r"^(float32|bfloat16|float16)\s+([\d,.]+)\s+([\d,.]+)\s+([\d.]+)%\s+([\d.]+)%", after, re.M):
        figures[m.group(1)] = {"ms_per_step": _num(m.group(2)), "tokens_per_s": _num(m.group(3)),
                               "mfu_vs_measured_peak": float(m.group(4)) / 100,
                               "mfu_vs_datasheet_peak": float(m.group(5)) / 100}
    before = text[:train.start()] if train else text
    peaks = {m.group(1): _num(m.group(2)) for m in
             re.finditer(r"^(float32|bfloat16|float16)\s+([\d,.]+)\s*$", before, re.M)}
    if peaks:
        figures["matmul_peak_gflops"] = peaks
    return _with_target_and_peak(figures, text)


def _with_target_and_peak(figures, text):
    """figures plus the bench's printed target line and the wrapper's peak memory, when there."""
    target = re.search(r"^target: (.+)$", text, re.M)
    if target:
        figures["target"] = target.group(1)
    figures.update(parse_peak_memory(text))
    return figures


def parse_bench_generate_bandwidth(text):
    """bench_generate.py --part bandwidth -> read GB/s and, per shape and dtype, tok/s, roofline, fraction."""
    figures = {}
    m = re.search(r"^read bandwidth: ([\d,.]+) GB/s", text, re.M)
    if m:
        figures["read_bandwidth_gb_s"] = _num(m.group(1))
    rows = r"^(\S+)\s+(fp32|bf16)\s+([\d.]+[MBK]?)\s+([\d,.]+)\s+([\d,.]+)\s+([\d,.]+)\s+([\d,.]+)\s+(\d+)%"
    for m in re.finditer(rows, text, re.M):
        figures[f"{m.group(1)} {m.group(2)}"] = {
            "params": m.group(3), "mb_per_token": _num(m.group(4)), "ms_per_token": _num(m.group(5)),
            "tokens_per_s": _num(m.group(6)), "roofline_tokens_per_s": _num(m.group(7)),
            "fraction_of_roofline": int(m.group(8)) / 100}
    return _with_target_and_peak(figures, text)


def parse_table_rows(text):
    """The rows of a bench table: "name  12.3  45%  0.38 MB ..." with the name possibly holding spaces and
    commas (ended by two spaces) -> {name: [cells]}; plain numbers become floats, cells with units stay strings."""
    rows = {}
    skip = ("round", "date", "platform", "cpu", "torch", "device", "command", "gpu", "#", "batch", "target")
    for line in text.splitlines():
        m = re.match(r"^(\S.*?)\s{2,}(\S.*)$", line)
        if not m or line.startswith(skip) or ":" in m.group(1):
            continue
        cells = re.findall(r"(?<![\w.])[\d,]*\.?\d+(?:%|x|s| MB| GB| MiB)?(?![\w.])", m.group(2))
        if cells:
            rows[m.group(1).strip()] = [_num(c) if re.fullmatch(r"[\d,]*\.?\d+", c) else c for c in cells]
    return rows


def parse_settings(text):
    """bench_ppo.py's "name: {python dict}" lines -> {name: dict}."""
    import ast
    settings = {}
    for m in re.finditer(r"^(\S[^:\n]*): (\{.*\})\s*$", text, re.M):
        try:
            settings[m.group(1)] = ast.literal_eval(m.group(2))
        except (ValueError, SyntaxError):
            pass
    return settings


def parse_bench_table(text):
    """bench_dpo.py / bench_ppo.py / bench_sft.py: every numeric table row, plus the peak memory line."""
    figures = {"rows": parse_table_rows(text)}
    settings = parse_settings(text)
    if settings:
        figures["settings"] = settings
    figures.update(parse_peak_memory(text))
    return figures


def parse_stage(text, out_dir=None):
    """A world-chain stage: its last "world:" line, its eval.json if written, the last logged step."""
    figures = {}
    lines = re.findall(r"(?:^|[ |])world: (.+)$", text, re.M)
    if lines:
        figures["world"] = lines[-1].strip()
    done = re.findall(r"^done: (.+)$", text, re.M)
    if done:
        figures["done"] = done[-1].strip()
    if out_dir and os.path.exists(os.path.join(out_dir, "eval.json")):
        try:
            with open(os.path.join(out_dir, "eval.json")) as f:
                metrics = json.load(f)
            figures["eval"] = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}
        except (OSError, ValueError) as e:
            figures["eval"] = f"unreadable: {e}"
    return figures


PARSERS = {"pytest": parse_pytest, "pretrain": parse_bench_pretrain, "bandwidth": parse_bench_generate_bandwidth,
           "table": parse_bench_table, "stage": parse_stage}


# ---------------------------------------------------------------------------- the steps

def build_steps(dry_run, tmp, python=sys.executable):
    """The steps in order of priority (the budget runs out on the last ones first): dicts with name, command,
    timeout (s), parser, and optionally out_dir (a chain stage's) or not_measured (a reason: not run)."""
    wrap = [python, "bench/gpu.py", "--with-peak-memory"]
    quick = ["--quick"] if dry_run else []
    cpu = ["--device", "cpu"] if dry_run else ["--device", "cuda"]
    steps = [dict(name="pytest tests/test_cuda.py", parser="pytest", timeout=180,
                  command=[python, "-m", "pytest", "tests/test_cuda.py", "-v", "-rs", "-p", "no:cacheprovider"])]
    if dry_run:  # the GPT-2 124M shape cannot run on a CPU in seconds: --quick's shapes, with and without compile
        steps.append(dict(name="pretrain throughput, compile", parser="pretrain", timeout=120,
                          command=wrap + ["bench/bench_pretrain.py", "--quick", "--compile", "--steps", "1",
                                          "--repeats", "1", "--warmup", "1"] + cpu))
        steps.append(dict(name="pretrain throughput, no compile", parser="pretrain", timeout=60,
                          command=wrap + ["bench/bench_pretrain.py", "--quick", "--steps", "1", "--repeats", "1"] + cpu))
    else:
        steps.append(dict(name="pretrain throughput GPT-2 124M bf16, compile", parser="pretrain", timeout=180,
                          command=wrap + ["bench/bench_pretrain.py", "--gpt2-124m", "--matmul-size", "8192"] + cpu))
        # --gpt2-124m implies --compile; the same shape spelled out runs without it (fp32 and bf16 rows)
        steps.append(dict(name="pretrain throughput GPT-2 124M, no compile", parser="pretrain", timeout=120,
                          command=wrap + ["bench/bench_pretrain.py", "--family", "gpt2", "--n-layer", "12",
                                          "--n-head", "12", "--n-embd", "768", "--block-size", "1024",
                                          "--steps", "10", "--warmup", "2", "--matmul-size", "8192"] + cpu))
    steps.append(dict(name="decode batch 1 vs bandwidth", parser="bandwidth", timeout=90,
                      command=wrap + ["bench/bench_generate.py", "--part", "bandwidth"] + quick + cpu))
    # the world chain with its defaults (default data, model, steps); the dry run: a few steps of a tiny model
    tiny = dict(pretrain=["--max-steps", "2", "--n-layer", "2", "--n-head", "2", "--n-embd", "64",
                          "--block-size", "64", "--batch-size", "4", "--eval-every", "2", "--eval-batches", "1",
                          "--warmup-steps", "1", "--log-every", "1"],
                sft=["--max-steps", "2", "--batch-size", "4", "--eval-every", "2", "--warmup-steps", "1", "--log-every", "1"],
                # a tiny untrained policy's own answers all tie (no comparisons): the world's preference pairs
                reward=["--data", os.path.join("data", "world", "prefs.jsonl"), "--offset-prompts", "16",
                        "--max-steps", "2", "--batch-size", "4", "--eval-every", "2", "--warmup-steps", "1", "--log-every", "1"],
                dpo=["--max-steps", "2", "--batch-size", "4", "--eval-every", "2", "--warmup-steps", "1", "--log-every", "1"],
                ppo=["--max-steps", "2", "--batch-size", "4", "--eval-every", "2", "--warmup-steps", "1", "--log-every", "1"])
    if dry_run:  # a 40-country world (as tests/test_pipeline.py's) so that each stage's world evaluation is short
        w = f"{tmp}/world"
        steps.append(dict(name="world chain: tiny world (dry run)", parser="stage", timeout=60, out_dir=w,
                          command=[python, "prepare.py", "world", "--out", w, "--n-countries", "40", "--heldout", "10",
                                   "--invented", "10", "--pref-invented", "60"]))
        for stage, extra in (("pretrain", ["--data", f"{w}/pretrain.jsonl"]), ("sft", ["--data", f"{w}/sft.jsonl"]),
                             ("reward", ["--prompts", f"{w}/prompts.jsonl"]), ("dpo", ["--data", f"{w}/prefs.jsonl"]),
                             ("ppo", ["--prompts", f"{w}/prompts.jsonl"])):
            tiny[stage] += extra
        tiny["reward"][1] = f"{w}/prefs.jsonl"
    links = dict(pretrain=[], sft=["--init-from", f"{tmp}/pretrain"], reward=["--init-from", f"{tmp}/sft"],
                 dpo=["--init-from", f"{tmp}/sft"], ppo=["--policy", f"{tmp}/sft", "--reward-model", f"{tmp}/reward"])
    system = ["--device", "cpu", "--dtype", "float32"] if dry_run else ["--device", "cuda"]
    for stage in ("pretrain", "sft", "reward", "dpo", "ppo"):
        steps.append(dict(name=f"world chain: {stage}", parser="stage", timeout=120 if dry_run else 150,
                          out_dir=f"{tmp}/{stage}", needs=None if stage == "pretrain" else
                          {"sft": "pretrain", "reward": "sft", "dpo": "sft", "ppo": "reward"}[stage],
                          command=[python, f"{stage}.py", "--out", f"{tmp}/{stage}"] + links[stage]
                          + (tiny[stage] if dry_run else []) + system))
    gpt2 = ["--n-layer", "12", "--n-head", "12", "--n-embd", "768", "--block-size", "1024", "--vocab-size", "50304"]
    steps.append(dict(name="PPO step GPT-2 124M", parser="table", timeout=120,
                      command=wrap + ["bench/bench_ppo.py"] + (["--quick"] if dry_run else gpt2 + ["--steps", "4"]) + cpu))
    steps.append(dict(name="DPO step GPT-2 124M", parser="table", command=[],
                      not_measured="bench_dpo.py has no shape flags (its model is pretrain.py's default shape, "
                                   "hard-coded); its default-shape run is the next step"))
    steps.append(dict(name="DPO step, bench_dpo.py default shape", parser="table", timeout=90,
                      command=wrap + ["bench/bench_dpo.py"] + (["--quick", "--batch-size", "4", "--steps", "1"]
                                                              if dry_run else ["--repeats", "2"]) + cpu))
    steps.append(dict(name="LoRA SFT SmolLM2-360M", parser="table", command=[],
                      not_measured=f"bench_sft.py has no modern/GQA shape flags ({SMOLLM2_360M}); only --gpt2 124m|355m: "
                                   "GPT-2 355M (24 layers, width 1024) is measured instead in the next step"))
    steps.append(dict(name="full vs LoRA SFT GPT-2 355M", parser="table", timeout=120,
                      command=wrap + ["bench/bench_sft.py"] + (["--quick"] if dry_run else ["--gpt2", "355m"])
                      + (["--device", "cpu"] if dry_run else ["--device", "cuda"])))
    return steps


def tail(text, n=TAIL_CHARS):
    text = re.sub(r"[^\n]*\r(?!\n)", "", text.replace("\r\n", "\n"))  # progress bars: keep what each line ended as
    return text[-n:]


def run_step(step, deadline, env=None):
    """Runs one step (a subprocess, its timeout cut to what the budget has left) -> its record."""
    record = dict(name=step["name"], command=" ".join(step["command"]), rc=None, seconds=0.0, figures={},
                  output_tail="")
    if step.get("not_measured"):
        record["figures"] = {"not_measured": step["not_measured"]}
        return record
    left = deadline - time.monotonic()
    if left < 10:
        record["figures"] = {"not_measured": f"skipped: the overall budget was spent ({left:.0f} s left)"}
        return record
    timeout = min(step["timeout"], left)
    record["timeout"] = round(timeout, 1)
    t0 = time.monotonic()
    try:
        proc = subprocess.run(step["command"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              timeout=timeout)  # bytes: text mode would turn progress bars' \r into lines
        out, record["rc"] = proc.stdout.decode(errors="replace"), proc.returncode
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace")
        record["rc"] = "timeout"
    except OSError as e:
        out, record["rc"] = str(e), "error"
    record["seconds"] = round(time.monotonic() - t0, 2)
    record["output_tail"] = tail(out)
    try:
        parser = PARSERS[step["parser"]]
        record["figures"] = parser(out, step["out_dir"]) if step["parser"] == "stage" else parser(out)
    except Exception as e:  # a figure that does not parse must not lose the others
        record["figures"] = {"parse_error": repr(e)}
    return record


def header(dry_run, budget):
    h = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), gpu="cpu",
             driver=None, torch=None, cuda=None, dry_run=dry_run, budget_s=budget, python=sys.version.split()[0])
    try:
        import torch
        h["torch"], h["cuda"] = torch.__version__, torch.version.cuda
        if torch.cuda.is_available():
            h["gpu"] = torch.cuda.get_device_name(0)
    except Exception as e:  # torch missing: every step will say why
        h["torch"] = f"not importable: {e}"
    if shutil.which("nvidia-smi"):
        try:
            h["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,name,memory.total",
                                          "--format=csv,noheader"], capture_output=True, text=True,
                                         timeout=20).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            pass
    return h


def headline(record):
    """One short line of a step's main figures, for the table."""
    f = record["figures"]
    if "not_measured" in f:
        return "not measured: " + f["not_measured"]
    if "parse_error" in f:
        return "parse error: " + f["parse_error"]
    parts = []
    if "tests" in f:
        parts.append(", ".join(f"{f[k]} {k}" for k in ("passed", "failed", "skipped", "error") if f.get(k)))
    for dtype in ("bfloat16", "float32"):
        if isinstance(f.get(dtype), dict):
            d = f[dtype]
            parts.append(f"{dtype} {d['tokens_per_s']:,.0f} tok/s MFU {d['mfu_vs_datasheet_peak']:.1%}")
    if "read_bandwidth_gb_s" in f:
        parts.append(f"{f['read_bandwidth_gb_s']:,.0f} GB/s")
        for key in ("gpt2-124m bf16", "gpt2-124m fp32"):
            if key in f:
                parts.append(f"{key} {f[key]['tokens_per_s']:,.0f} tok/s = {f[key]['fraction_of_roofline']:.0%} of roofline")
    if "world" in f:
        parts.append(f["world"][:90])
    elif "done" in f:
        parts.append(f["done"][:90])
    if "rows" in f:
        parts.append(f"{len(f['rows'])} table rows")
    if "peak_memory_mib" in f:
        parts.append(f"peak {f['peak_memory_mib']:,.0f} MiB ({f['peak_memory_of']})")
    return "; ".join(p for p in parts if p)


def format_table(report):
    h = report["header"]
    lines = [f"gpu.py report {h['date']}: gpu {h['gpu']}, driver {h['driver']}, torch {h['torch']}, "
             f"cuda {h['cuda']}, dry run {h['dry_run']}",
             f"{'step':<42}{'rc':>8}{'s':>8}  figures"]
    for r in report["steps"]:
        lines.append(f"{r['name'][:42]:<42}{str(r['rc']):>8}{r['seconds']:>8.1f}  {headline(r)}")
    lines.append(f"total {report['total_seconds']:.0f} s; JSON: {report.get('path', '')}")
    return "\n".join(lines)


def default_json_path():
    return os.path.join(os.environ["OUT"], "gpu_report.json") if os.environ.get("OUT") \
        else os.path.join(ROOT, "bench", "gpu_report.json")


def write_report(path, report):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=1)
    os.replace(path + ".tmp", path)


def with_peak_memory(argv):
    """Runs a bench script in this process (runpy) and prints its peak memory after it, however it ends."""
    import runpy
    script = argv[0]
    sys.argv = [script] + argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        try:
            import torch
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                print(f"{PEAK_TAG} {torch.cuda.max_memory_allocated() / 2**20:.1f} MiB (cuda max_memory_allocated)",
                      flush=True)
            else:
                import resource
                print(f"{PEAK_TAG} {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f} MiB (cpu max rss)",
                      flush=True)
        except Exception as e:
            print(f"{PEAK_TAG} unknown ({e})", flush=True)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--with-peak-memory"]:
        return with_peak_memory(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="every step at tiny sizes on the CPU (checks the script)")
    p.add_argument("--json", default="", help="report path ('' = $OUT/gpu_report.json if $OUT is set, else bench/gpu_report.json)")
    p.add_argument("--budget", type=float, default=480, help="seconds for all steps together; each step's timeout is cut to what is left")
    p.add_argument("--only", nargs="*", default=None, help="run only the steps whose name contains one of these")
    args = p.parse_args(argv)
    path = args.json or default_json_path()
    t0 = time.monotonic()
    deadline = t0 + args.budget
    tmp = tempfile.mkdtemp(prefix="gpu_report_")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # tests/test_cuda.py skips, the benches take the CPU
    report = dict(header=header(args.dry_run, args.budget), steps=[], path=path, total_seconds=0.0)
    try:
        for step in build_steps(args.dry_run, tmp):
            if args.only is not None and not any(s in step["name"] for s in args.only):
                continue
            needs = step.get("needs")
            done = {r["name"]: r for r in report["steps"]}
            if needs and done.get(f"world chain: {needs}", {}).get("rc") != 0:
                record = dict(name=step["name"], command=" ".join(step["command"]), rc=None, seconds=0.0,
                              figures={"not_measured": f"the {needs} stage it starts from did not finish"},
                              output_tail="")
            else:
                print(f"[{time.monotonic() - t0:6.0f} s] {step['name']} ...", flush=True)
                record = run_step(step, deadline, env)
            report["steps"].append(record)
            report["total_seconds"] = round(time.monotonic() - t0, 1)
            write_report(path, report)  # after every step: a later hang or kill loses nothing
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report["total_seconds"] = round(time.monotonic() - t0, 1)
    write_report(path, report)
    print(format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
