"""Helpers for testing code built on spec-rag without downloading a model.

Tiny random-initialised decoders and a real byte-level BPE tokenizer trained offline (in about
a second) on Python's own language reference, so every code path of the library, and of a
pipeline built on it, runs in a unit test on a CPU. The answers are gibberish; the shapes,
cache surgery, stop handling and threading are real.

    >>> from spec_rag.testing import tiny_model, tiny_tokenizer
    >>> tokenizer = tiny_tokenizer()
    >>> target, draft = tiny_model(tokenizer, seed=1, layers=3), tiny_model(tokenizer, seed=2)

The package's own tests and its integrations' tests use these helpers, as should yours.
"""

from __future__ import annotations

import functools
import os
import pydoc_data.topics
from collections.abc import Mapping
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

__all__ = [
    "ARCHS",
    "AURORA_ANSWER",
    "AURORA_QUESTION",
    "CHATML",
    "NASTY_TEXTS",
    "TOOLS_CHATML",
    "TOWN_DOCUMENTS",
    "corpus_text",
    "run_notebook",
    "tiny_model",
    "tiny_tokenizer",
    "tiny_tools_tokenizer",
    "watch_layer_reads",
]

#: A minimal ChatML template, as Qwen and SmolLM2 use.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

#: A ChatML template with tools, tool calls and tool results written as Qwen2.5's template
#: writes them (newlines after a block tag are written as expressions: chat templates render with
#: ``trim_blocks``) (``<tools>`` in the system turn, ``<tool_call>`` JSON blocks, ``<tool_response>``).
TOOLS_CHATML = (
    "{% if tools %}<|im_start|>system\n"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% else %}You are a helpful "
    "assistant.{% endif %}{{ '\\n' }}\n# Tools\n\nYou may call one or more functions to assist with the user "
    "query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>"
    "{% for tool in tools %}{{ '\\n' }}{{ tool | tojson }}{% endfor %}{{ '\\n' }}</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:"
    '\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
    "{% elif messages[0]['role'] == 'system' %}<|im_start|>system\n{{ messages[0]['content'] }}"
    "<|im_end|>\n{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'user' or (message.role == 'system' and not loop.first) or "
    "(message.role == 'assistant' and not message.tool_calls) %}"
    "<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
    "{% elif message.role == 'assistant' %}<|im_start|>assistant"
    "{% if message.content %}{{ '\\n' }}{{ message.content }}{% endif %}"
    "{% for tool_call in message.tool_calls %}"
    "{% if tool_call.function is defined %}{% set tool_call = tool_call.function %}{% endif %}"
    '{{ "\\n" }}<tool_call>\n{"name": "{{ tool_call.name }}", '
    '"arguments": {{ tool_call.arguments | tojson }}}'
    "\n</tool_call>{% endfor %}<|im_end|>\n"
    "{% elif message.role == 'tool' %}"
    "{% if loop.index0 == 0 or messages[loop.index0 - 1].role != 'tool' %}<|im_start|>user{% endif %}"
    "{{ '\\n' }}<tool_response>\n{{ message.content }}\n</tool_response>"
    "{% if loop.last or messages[loop.index0 + 1].role != 'tool' %}<|im_end|>\n{% endif %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

#: Architectures :func:`tiny_model` builds (all full attention, as spec-rag requires).
ARCHS: dict[str, tuple[Any, Any]] = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}

#: Eight short documents about a fictional town; the first holds the fact AURORA_QUESTION asks for.
TOWN_DOCUMENTS = [
    "The Aurora vault sits beneath the old observatory on Hill Street. It was dug in 1902 to keep "
    "the observatory's star charts safe from fire and damp. Guards patrol the corridor outside it "
    "every night, and a logbook records each visit. The access code for the Aurora vault is 7319. "
    "Only the curator and her deputy may open it, and the code is changed after every inspection.",
    "The observatory on Hill Street was built in 1887 by a society of amateur astronomers. Its "
    "copper dome was restored in 1990 and still opens on every clear night. The main telescope is "
    "a refractor with a lens thirty centimetres wide. School groups visit on Tuesday mornings, "
    "and the society gives public talks on the first Friday of each month.",
    "The city library lends telescopes to its members. Borrowers must return them within two "
    "weeks, and late returns cost one coin per day. Each telescope comes with a star map, a red "
    "torch and a short guide. The library also keeps a reading room for astronomy books on the "
    "second floor, open until eight in the evening.",
    "The harbour ferry leaves every hour from Pier 4. The crossing to the island takes forty "
    "minutes, and bicycles travel free on weekdays. In winter the first ferry leaves at seven, in "
    "summer at six. Tickets can be bought on board, and children under five travel free all year "
    "round.",
    "The botanical garden grows over three hundred kinds of fern. Its glasshouse is heated in "
    "winter and closes at dusk. Volunteers lead tours on Saturday afternoons, starting at the "
    "fountain by the main gate. The garden shop sells seeds, tools and a guide to the ferns of "
    "the region.",
    "The annual lantern festival fills the old town square each autumn. Families float paper "
    "lanterns on the river at midnight, and bands play on a stage near the fountain. Food stalls "
    "sell roasted chestnuts and hot cider. The festival ends with fireworks over the harbour on "
    "the final night.",
    "The mountain railway climbs to the summit station in twenty minutes. Trains stop running "
    "when the wind is strong, and the line closes for maintenance every March. From the summit, "
    "walkers can follow a marked path back down to the valley in about three hours.",
    "The museum of clocks keeps a water clock from the twelfth century. Visitors may wind the "
    "great pendulum clock on Sundays under the eye of a guide. The museum workshop repairs old "
    "watches for the public, and a small cafe on the ground floor serves tea and cakes.",
]
#: Text a retriever may hand over: empty, blank, emoji, right-to-left, combining marks, control
#: characters, a byte-order mark and zero-width space, one long run. For property-based tests.
NASTY_TEXTS = [
    "",
    "   \n\t ",
    "emoji 🤖🔥 and flags 🇩🇪",
    "עברית ومرحبا mixed RTL",
    "e\u0301\u0302\u0303 combining marks",
    "NUL\x00byte and \x07 bell",
    "\ufeff BOM and zero\u200bwidth",
    "x" * 3000,
]
AURORA_QUESTION = "What is the access code for the Aurora vault?"
AURORA_ANSWER = "7319"


def corpus_text(limit: int = 400_000) -> str:
    """Python's language reference (``pydoc_data.topics``): text every Python install ships."""
    return "\n\n".join(pydoc_data.topics.topics.values())[:limit]


@functools.cache
def tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A fast byte-level BPE tokenizer with ChatML special tokens and chat template.

    Cached per ``vocab_size``; two sizes give two different vocabularies (for draft/target
    pairs that must hand text over rather than token ids).
    """
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = corpus_text(200_000)
    backend.train_from_iterator([text[i : i + 2000] for i in range(0, len(text), 2000)], trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHATML
    return tokenizer


@functools.cache
def tiny_tools_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """:func:`tiny_tokenizer` with a tool-calling chat template (:data:`TOOLS_CHATML`) and, as in
    Qwen2.5, ``<tool_call>`` and ``</tool_call>`` as added tokens that are not special."""
    base = tiny_tokenizer(vocab_size)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(base.backend_tokenizer.to_str()),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.add_tokens(["<tool_call>", "</tool_call>"], special_tokens=False)
    tokenizer.chat_template = TOOLS_CHATML
    return tokenizer


def tiny_model(
    tokenizer: PreTrainedTokenizerFast,
    *,
    arch: str = "qwen2",
    seed: int = 0,
    layers: int = 2,
    **overrides: Any,
) -> Any:
    """A random-initialised decoder of ``arch`` (hidden size 64, 4 query and 2 KV heads) in eval
    mode, sized to ``tokenizer``. ``overrides`` go to the model's config.

    The output layer is sharpened so greedy choices are well separated: the same seed gives the
    same answers run after run, which tests of caching and threading rely on.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose from: {', '.join(ARCHS)}")
    config_cls, model_cls = ARCHS[arch]
    fields: dict[str, Any] = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    if arch == "mistral":
        fields["sliding_window"] = None
    if arch == "qwen3":
        fields["head_dim"] = 16
    fields.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**fields)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def watch_layer_reads(model: Any) -> tuple[list[int], Any]:
    """How many tokens each call of ``model``'s first decoder layer reads, as it runs: a list,
    filled by a forward hook, and the hook's handle (``handle.remove()`` stops it). A chunked
    prefill shows as several calls, decoding as calls of one token."""
    reads: list[int] = []
    projection = model.model.layers[0].self_attn.q_proj
    handle = projection.register_forward_hook(lambda module, args, out: reads.append(args[0].shape[1]))
    return reads, handle


def run_notebook(
    path: str | os.PathLike[str],
    workdir: str | os.PathLike[str],
    env: Mapping[str, str] | None = None,
    timeout: int = 600,
) -> list[str]:
    """Run the notebook at ``path`` top to bottom and return each code cell's stdout, in order.

    The kernel is this very interpreter (a ``python3`` kernel spec written under ``workdir``, so
    a user-level spec pointing at another Python cannot take the run), started in ``workdir``
    with ``env`` added to this process's environment; the notebook file is left as it is.
    ``timeout``: seconds a cell may run. Needs ``nbformat``, ``nbclient`` and ``ipykernel``
    (the ``test`` extra).

        >>> env = {"SPEC_RAG_COOKBOOK_DRAFT": "smollm2-135m-instruct"}
        >>> outputs = run_notebook("cookbooks/langchain_rag.ipynb", tmp_path, env)
    """
    import json
    import sys
    from pathlib import Path

    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    kernels = Path(workdir) / "jupyter-kernels"
    (kernels / "python3").mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    spec = {"argv": argv, "display_name": "Python 3", "language": "python"}
    (kernels / "python3" / "kernel.json").write_text(json.dumps(spec))
    manager = KernelManager(
        kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)])
    )
    notebook = nbformat.read(Path(path), as_version=4)
    client = NotebookClient(
        notebook, km=manager, timeout=timeout, resources={"metadata": {"path": str(workdir)}}
    )
    client.execute(env={**os.environ, **(env or {})})
    return [
        "".join(o.text for o in cell.get("outputs", []) if o.output_type == "stream" and o.name == "stdout")
        for cell in notebook.cells
        if cell.cell_type == "code"
    ]
