"""`ds-eval`: HumanEval / MBPP generation and sandboxed pass@k scoring, and `ds-eval loss`.

    ds-eval humaneval --model EXPORT_DIR --out DIR [--n 200 --temperature 0.8 --top-p 0.95]
                      [--greedy] [--limit K] [--incremental] [--batch-size B] [--max-new-tokens N]
    ds-eval mbpp      ... (the same)
    ds-eval score --problems FILE|humaneval|mbpp --samples samples.jsonl [--k 1,10,100]
                  [--timeout 3] [--workers N] [--incremental]
    ds-eval loss ...  (see `ds-eval loss --help`)
    ds-eval generate  --model EXPORT_DIR --prompt TEXT|- [--greedy] [--max-length 1024]

Scoring runs model-written code: it needs `--allow-code-execution` or
DS_TRAIN_ALLOW_CODE_EXECUTION=1 once per machine. The report is a table and, as its last line,
a JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from eval import generate

log = logging.getLogger("ds-eval")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ds-eval", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("humaneval", "mbpp"):
        gen = sub.add_parser(name, help=f"generate {name} samples from an exported model, then score them")
        gen.add_argument("--model", required=True, help="exported transformers directory")
        gen.add_argument(
            "--out", required=True, help="output directory (samples.jsonl, results, report.json)"
        )
        gen.add_argument("--problems", help="another problems file in the HumanEval or MBPP jsonl format")
        gen.add_argument("--n", type=int, default=200, help="samples per problem (1 with --greedy)")
        gen.add_argument("--temperature", type=float, default=0.8)
        gen.add_argument("--top-p", type=float, default=0.95)
        gen.add_argument("--greedy", action="store_true", help="greedy decoding, one sample per problem")
        gen.add_argument("--limit", type=int, help="only the first K problems")
        gen.add_argument("--batch-size", type=int, default=16)
        gen.add_argument("--max-new-tokens", type=int, default=384)
        gen.add_argument("--seed", type=int, default=0)
        gen.add_argument("--device", help="torch device (default: cuda when present, else cpu)")
        gen.add_argument("--no-score", action="store_true", help="only generate")
        _scoring_arguments(gen)
    score = sub.add_parser("score", help="score a samples file: pass@k over the problems' tests")
    score.add_argument("--problems", required=True, help="problems file, or `humaneval` / `mbpp`")
    score.add_argument("--samples", required=True, help="samples jsonl (task_id, completion)")
    _scoring_arguments(score)
    sub.add_parser("loss", help="held-out loss of a model (see `ds-eval loss --help`)", add_help=False)
    prompt = sub.add_parser("generate", help="complete one function: --prompt TEXT (or -) -> Python source")
    generate.add_prompt_arguments(prompt)
    return parser


def _scoring_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--k", default="1,10,100", help="comma-separated k of pass@k (each k <= n is reported)"
    )
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds per program")
    parser.add_argument("--workers", type=int, help="programs run in parallel (default: CPU count)")
    parser.add_argument("--incremental", action="store_true", help="add the incremental sub-tasks")
    parser.add_argument(
        "--allow-code-execution",
        action="store_true",
        help="agree, once for this machine, to run model-written code in the sandbox",
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
        return run_score(args) if args.command == "score" else run_generate(args)
    except ValueError as err:
        print(f"ds-eval: error: {err}", file=sys.stderr)
        return 2


def _run_loss(argv: list[str]) -> int:
    try:
        from eval import loss  # lazy: pulls in the training stack
    except ImportError as err:
        print(f"ds-eval: error: the loss subcommand is not available ({err})", file=sys.stderr)
        return 2

    parser = argparse.ArgumentParser(prog="ds-eval loss")
    loss.add_arguments(parser)
    return loss.run(parser.parse_args(argv))


def _problems(args: argparse.Namespace, default: str) -> list:
    from eval.incremental import incremental_problems
    from eval.problems import load_benchmark, load_problems

    source = args.problems or default
    problems = load_benchmark(source) if source in ("humaneval", "mbpp") else load_problems(source)
    if getattr(args, "limit", None) is not None:
        if args.limit < 1:
            raise ValueError(f"--limit must be positive, got {args.limit}")
        problems = problems[: args.limit]
    return incremental_problems(problems) if args.incremental else problems


def run_generate(args: argparse.Namespace) -> int:
    """`ds-eval humaneval|mbpp`: generate (resuming), then score unless --no-score."""
    from eval.generate import Generator, Settings, generate_samples
    from eval.passk import parse_ks
    from eval.sandbox import require_opt_in

    settings = Settings(
        n=args.n,
        temperature=args.temperature,
        top_p=args.top_p,
        greedy=args.greedy,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
    )
    _check_settings(settings)
    ks = parse_ks(args.k)
    if not args.no_score:
        require_opt_in(args.allow_code_execution)
    problems = _problems(args, args.command)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    samples = out / "samples.jsonl"
    made = generate_samples(Generator(args.model, args.device), problems, settings, samples)
    log.info("generated %d samples into %s", made, samples)
    return 0 if args.no_score else _score_and_report(problems, samples, ks, args, out / "report.json")


def _check_settings(settings) -> None:
    if settings.n < 1 or settings.batch_size < 1 or settings.max_new_tokens < 1:
        raise ValueError("--n, --batch-size and --max-new-tokens must be positive")
    if not settings.greedy and (settings.temperature <= 0 or not 0 < settings.top_p <= 1):
        raise ValueError("sampling needs --temperature > 0 and 0 < --top-p <= 1 (or use --greedy)")


def run_score(args: argparse.Namespace) -> int:
    """`ds-eval score`: run the samples, print the table and the JSON line."""
    from eval.passk import parse_ks
    from eval.sandbox import require_opt_in

    ks = parse_ks(args.k)
    require_opt_in(args.allow_code_execution)
    samples = Path(args.samples)
    return _score_and_report(
        _problems(args, args.problems), samples, ks, args, samples.parent / "report.json"
    )


def _score_and_report(
    problems: list, samples: Path, ks: list[int], args: argparse.Namespace, report_path: Path
) -> int:
    from eval.sandbox import Limits
    from eval.score import score

    if args.timeout <= 0:
        raise ValueError(f"--timeout must be positive, got {args.timeout}")
    report = score(problems, samples, ks, Limits(timeout=args.timeout), args.workers)
    summary = report.as_json()
    report_path.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    print(report.table())
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
