"""What the draft-only benchmark scripts share: their sample options, the draft, the samples."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from spec_rag import SpecPC, SpecPCConfig, get_model
from spec_rag.bench import TASKS, EncodedPrompt, Sample, encode_tokens, generate_sample, render_prompt
from spec_rag.models import DEFAULT_DRAFT


def sample_parser(doc: str | None, task: str) -> argparse.ArgumentParser:
    """A parser with the options that pick the benchmark's samples and the draft."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default=task, choices=list(TASKS))
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--indices", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--draft", default=DEFAULT_DRAFT)
    parser.add_argument("--dtype", default="auto")
    return parser


def draft_samples(
    args: argparse.Namespace, config: SpecPCConfig
) -> Iterator[tuple[SpecPC, Sample, EncodedPrompt]]:
    """Load the draft once, then build each chosen sample as the accuracy harness does (sized with
    the draft's tokenizer; the default pair shares one) and encode its prompt."""
    draft, tokenizer = get_model(args.draft, dtype=args.dtype)
    compressor = SpecPC(draft, tokenizer, config)
    for index in args.indices:
        sample = generate_sample(args.task, args.length, args.seed, index, tokenizer)
        yield compressor, sample, encode_tokens(tokenizer, render_prompt(sample, tokenizer))
