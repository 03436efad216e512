"""`eval ppl`, `eval squad` and `predict` (their modules load MindSpore only when a command runs)."""

from __future__ import annotations

from llama.cli import add_command
from llama.config.schema import DTYPES
from llama.eval.perplexity import evaluate_perplexity
from llama.eval.predict import predict, read_prompts
from llama.eval.squad import evaluate_squad


def _model_arguments(parser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="a converted checkpoint folder, or any checkpoint `convert` reads")
    parser.add_argument("--tokenizer",
                        help="tokenizer.model, tokenizer.json or a folder holding one (default: the checkpoint's)")
    parser.add_argument("--model-config", help="for weights that carry none (a bare MindFormers .ckpt): a name in "
                                               "configs/model, our YAML, HF config.json or a MindFormers YAML")
    parser.add_argument("--dtype", choices=DTYPES,
                        help="weight dtype (default: the checkpoint's); bf16 computes in float32 on CPU")
    parser.add_argument("--adapter", help="a LoRA or prefix-tuning run folder trained on --checkpoint: applied "
                                          "without merging")


def _ppl(args) -> dict:
    return evaluate_perplexity(args.checkpoint, args.data, args.convention, batch_size=args.batch_size,
                               window=args.window, rolling_window=args.rolling_window, lm_eval=not args.no_lm_eval,
                               tokenizer=args.tokenizer, dtype=args.dtype, model_config=args.model_config,
                               adapter=args.adapter)


def _squad(args) -> dict:
    return evaluate_squad(args.checkpoint, args.data, args.output, questions=args.questions,
                          max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, limit=args.limit,
                          worst=args.worst, tokenizer=args.tokenizer, dtype=args.dtype,
                          model_config=args.model_config, adapter=args.adapter, overwrite=args.overwrite)


def _predict(args) -> dict:
    prompts = read_prompts(args.prompts_file) if args.prompts_file else args.prompt
    result = predict(args.checkpoint, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                     top_k=args.top_k, top_p=args.top_p, seed=args.seed, batch_size=args.batch_size,
                     ignore_eos=args.ignore_eos, tokenizer=args.tokenizer, dtype=args.dtype,
                     model_config=args.model_config, adapter=args.adapter, output=args.output,
                     overwrite=args.overwrite)
    if args.output is not None:  # the file has them; keep stdout to the summary
        del result["completions"]
    elif not args.json:  # readable text, one completion per `completion_N` line
        completions = result.pop("completions")
        result.update({f"completion_{i}": c["text"] for i, c in enumerate(completions, 1)})
    return result


def register(subparsers) -> None:
    evaluate = subparsers.add_parser("eval", help="evaluate a checkpoint: perplexity or SQuAD",
                                     description="Evaluate a checkpoint: perplexity (ppl) or SQuAD v1.1 (squad).")
    metrics = evaluate.add_subparsers(dest="metric", metavar="METRIC", required=True)

    ppl = add_command(metrics, "ppl", _ppl, help="perplexity on WikiText-2, MindFormers' or the standard convention")
    _model_arguments(ppl)
    ppl.add_argument("--data", required=True,
                     help="mindformers: a records folder from `preprocess wiki --mode mindformers`; standard: a raw "
                          "WikiText file (e.g. wiki.test.tokens) or a folder from `preprocess wiki --mode standard`")
    ppl.add_argument("--convention", choices=("mindformers", "standard"), default="mindformers")
    ppl.add_argument("--batch-size", type=int, default=1,
                     help="MindFormers' eval batch: ppl_mindformers is the mean of batch means (default 1, as "
                          "pretrain_llama2_7b.yaml)")
    ppl.add_argument("--window", type=int, help="standard: tokens per window (2048 or 4096 in the published "
                                                "tables; default the model's context)")
    ppl.add_argument("--rolling-window", type=int,
                     help="lm-eval word/byte perplexity: rolling window length (default the model's context)")
    ppl.add_argument("--no-lm-eval", action="store_true", help="standard: skip lm-eval's word/byte perplexity")

    squad = add_command(metrics, "squad", _squad,
                        help="SQuAD v1.1 by greedy generation; EM/F1 both officially and as MindFormers' EmF1Metric")
    _model_arguments(squad)
    squad.add_argument("--data", required=True,
                       help="SQuAD v1.1 JSON (dev-v1.1.json) or a folder from `preprocess squad --mode eval`")
    squad.add_argument("--output", required=True,
                       help="folder for predictions.parquet/.jsonl, worst_answers.md and results.json")
    squad.add_argument("--questions", choices=("first", "all"), default="first",
                       help="JSON input: each paragraph's first question (MindFormers' set) or all of them")
    squad.add_argument("--max-new-tokens", type=int, default=20)
    squad.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    squad.add_argument("--limit", type=int, help="only the first N questions")
    squad.add_argument("--worst", type=int, default=10, help="rows in worst_answers.md")
    squad.add_argument("--overwrite", action="store_true", help="replace an existing output folder")

    # `generate` (the model stage's name) and `predict` (the seed's run_llama2_predict.sh) are one command.
    for name in ("predict", "generate"):
        predict = add_command(subparsers, name, _predict,
                              help="complete a batch of prompts with the KV cache (the seed's run_llama2_predict.sh)")
        _model_arguments(predict)
        source = predict.add_mutually_exclusive_group(required=True)
        source.add_argument("--prompt", action="append", help="a prompt (repeatable; \"\" starts from BOS alone)")
        source.add_argument("--prompts-file", help="one prompt per line, or .jsonl with a \"prompt\" field")
        predict.add_argument("--output", help="write the completions here as JSON lines instead of to stdout")
        predict.add_argument("--overwrite", action="store_true", help="replace an existing output file")
        predict.add_argument("--max-new-tokens", type=int, default=64)
        predict.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
        predict.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
        predict.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
        predict.add_argument("--seed", type=int, default=0)
        predict.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (left-padded)")
        predict.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
