"""SpecPC: draft-based prompt compression (docs/algorithms.md, "SpecPC").

The draft reads the prompt once (plus a short lookahead); the attention of its last window of
queries scores every prompt token, and only the best-scored tokens, with their neighbours,
reach the target.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from spec_rag._prompt import (
    DEFAULT_MAX_INPUT_TOKENS,
    Prompt,
    Span,
    TrustedPrompt,
    call_argument_spans,
    check_fits,
    check_input_chars,
    check_input_tokens,
    context_window,
    control_token_ids,
    encode_prompt,
    encode_text,
    eos_ids,
    has_tool_structure,
    is_messages,
    prompt_tools,
    render_prompt,
    text_from_spans,
    with_tools,
)
from spec_rag.config import CHUNK_SINK_TOKENS, PREFILL_CHUNK_SIZE, SpecPCConfig
from spec_rag.constrained import Guide
from spec_rag.errors import InvalidInputError
from spec_rag.generation import SamplingParams, decode_tokens, forward, new_cache
from spec_rag.scoring import TokenScoreRecorder, enable_scoring, pool_scores
from spec_rag.selection import select_prompt_tokens

DEFAULT_INSTRUCTION = "Answer the question using the documents below."


def select_tokens(
    scores: torch.Tensor,
    capacity: int,
    config: SpecPCConfig,
    special: torch.Tensor | None = None,
    protected: torch.Tensor | None = None,
) -> torch.Tensor:
    """SpecPC's whole-prompt selection with ``config``'s settings: sorted kept positions.

    Args:
        scores: ``[L]`` smoothed token scores.
        capacity: tokens to keep.
        special: ``[L]`` bool mask of chat-template special tokens; kept when
            ``config.keep_special_tokens`` is on, ignored otherwise.
        protected: ``[L]`` bool mask of tokens always kept (a tool prompt's template text:
            tool definitions, call and result tags), whatever the config says.
    """
    always_keep = special if config.keep_special_tokens else None
    if protected is not None:
        count = int(protected.sum())
        if count > capacity and capacity < scores.numel():
            raise InvalidInputError(
                f"the SpecPC budget ({capacity}) is smaller than the chat template's tool structure "
                f"({count} tokens: tool definitions, call and result tags), which is never cut. "
                f"Raise max_capacity_prompt above {count}."
            )
        always_keep = protected if always_keep is None else always_keep | protected
    return select_prompt_tokens(
        scores,
        capacity,
        window_size=config.window_size,
        neighbor_tokens=config.neighbor_tokens,
        always_keep=always_keep,
    )


def tool_structure_tokens(prompt: Prompt, enc: Mapping[str, Any]) -> torch.Tensor | None:
    """``[L]`` bool: the tokens of a tool prompt SpecPC never cuts (``None`` for other prompts):
    the chat template's own text (tool definitions, call and result tags) and the JSON of the
    assistant's earlier calls, i.e. everything but the message contents and tool results.
    ``enc`` is :func:`encode_prompt`'s output with offsets."""
    if not has_tool_structure(prompt):
        return None
    offsets = enc["offsets"]
    inside = torch.zeros(len(offsets), dtype=torch.bool)
    for start, end in enc["content"]:
        inside |= _tokens_within(offsets, start, end)
    calls = torch.zeros(len(offsets), dtype=torch.bool)
    for start, end in call_argument_spans(enc["text"], prompt):  # type: ignore[arg-type]
        calls |= _tokens_within(offsets, start, end)
    spans = torch.tensor(offsets, dtype=torch.long).reshape(-1, 2)  # [L, 2]
    return (~inside | calls) & (spans[:, 1] > spans[:, 0])


@dataclass
class Compression:
    """A compressed prompt.

    Attributes:
        text: the kept tokens as text, in order (runs of kept tokens are exact substrings).
        input_ids: ``[compressed_tokens]`` kept token ids of the draft's tokenisation.
        kept_positions: ``[compressed_tokens]`` sorted positions kept in the original prompt.
        scores: ``[original_tokens]`` smoothed importance of every prompt token.
        messages: the compressed chat messages, when a chat was compressed.
        lookahead_ids: the draft's lookahead tokens (none when the prompt was scored in chunks:
            no draft pass read the whole prompt).
        chunks: draft passes that scored the prompt (1: whole, as the paper does).
    """

    text: str
    input_ids: torch.Tensor
    kept_positions: torch.Tensor
    scores: torch.Tensor
    original_tokens: int
    compressed_tokens: int
    messages: list[dict[str, Any]] | None = None
    lookahead_ids: list[int] = field(default_factory=list)
    chunks: int = 1

    @property
    def ratio(self) -> float:
        """Kept share of the prompt (1.0 = nothing dropped)."""
        return self.compressed_tokens / max(self.original_tokens, 1)


@dataclass
class DocumentCompression:
    """What SpecPC kept of one input document.

    ``score`` is the importance of the document's best token (after smoothing), scaled so the
    best document is 1.0: documents with higher scores receive their tokens first.
    """

    index: int
    text: str
    score: float
    original_tokens: int
    kept_tokens: int

    @property
    def ratio(self) -> float:
        return self.kept_tokens / max(self.original_tokens, 1)


def starting_layer(config: SpecPCConfig, model: Any) -> int:
    return min(config.starting_layer_index, int(model.config.num_hidden_layers) - 1)


@torch.inference_mode()
def draft_pass(
    model: Any,
    input_ids: torch.Tensor,
    *,
    lookahead_tokens: int,
    eos_token_ids: Sequence[int],
    recorder: TokenScoreRecorder | None = None,
    guide: Guide | None = None,
    prefill_chunk_size: int | None = None,
) -> list[int]:
    """The draft prefills ``input_ids`` (``[L]``) and greedily writes ``lookahead_tokens`` tokens.

    With a recorder, the window queries of the prefill and every lookahead token's query are
    scored against the prompt. Returns the lookahead token ids (shorter if EOS came first).

    ``guide`` (a fresh one, used up here) makes the draft write its lookahead under the answer's
    grammar, as the target will write the answer: each step's logits are masked (rows past the
    grammar's vocabulary, a padded embedding's, are forbidden), and the lookahead ends once the
    grammar is complete. Its grammar masks token ids, so it must be compiled for the draft's
    own vocabulary (the target's, when the two share it).

    ``prefill_chunk_size`` runs a longer prefill in chunks (see :func:`~spec_rag.generation.forward`).
    """
    cache = new_cache(model)
    length = input_ids.numel()
    chunk = prefill_chunk_size
    logits = forward(model, input_ids[None], cache, recorder=recorder, prefill_chunk_size=chunk)[-1]
    params = SamplingParams(max_new_tokens=lookahead_tokens)
    return list(
        decode_tokens(
            model,
            cache,
            logits,
            next_position=length,
            params=params,
            eos_token_ids=eos_token_ids,
            recorder=recorder,
            feed_last=recorder is not None,
            guide=guide,
        )
    )


class SpecPC:
    """Draft-based prompt compressor.

    Args:
        model: the draft, any Hugging Face decoder with full attention in every layer.
        tokenizer: the draft's tokenizer (a fast tokenizer: character offsets are needed).
        config: :class:`SpecPCConfig`; defaults are the paper's.
        max_input_tokens: ceiling on a request's prompt tokens (``None``: none but the draft's
            context window); a larger request raises :class:`~spec_rag.errors.InputTooLargeError`
            before the draft reads it.
        prefill_chunk_size: the draft reads a longer prompt in chunks of this many tokens, on
            one cache (the same scores up to rounding, smaller activations); ``None``: one pass.
            Not to be confused with ``config.chunk_size``: separate passes, for prompts longer
            than the draft's window.

    Retrieved text is untrusted: documents, the query and message contents are tokenised with
    special tokens split, so only the chat template emits control tokens (and only those are
    kept by ``keep_special_tokens``); see :class:`~spec_rag._prompt.TrustedPrompt` to opt out.
    One instance may be used from several threads at once.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        config: SpecPCConfig | None = None,
        *,
        max_input_tokens: int | None = DEFAULT_MAX_INPUT_TOKENS,
        prefill_chunk_size: int | None = PREFILL_CHUNK_SIZE,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or SpecPCConfig()
        self.max_input_tokens = max_input_tokens
        self.prefill_chunk_size = prefill_chunk_size
        if not getattr(tokenizer, "is_fast", False):
            raise InvalidInputError(
                "SpecPC needs a fast tokenizer (character offsets map kept tokens back to text); "
                "load the tokenizer with use_fast=True."
            )
        enable_scoring(model)
        self._eos = eos_ids(model, tokenizer)
        # Safe encoding leaves control tokens only where the template put them, so these are the
        # template's tokens (every special token, where a caller marked its text trusted).
        self._special = set(control_token_ids(tokenizer))

    # -- scoring ---------------------------------------------------------------------------
    def chunk_limit(self) -> int | None:
        """The longest sequence one draft pass reads: ``chunk_size``, at most the draft's window
        (``None``: no limit)."""
        limits = [x for x in (self.config.chunk_size, context_window(self.model)) if x is not None]
        return min(limits) if limits else None

    def chunk_slices(self, length: int, lookahead_tokens: int | None = None) -> list[tuple[int, int]]:
        """The ``[start, end)`` slice of each chunk of a prompt of ``length`` tokens scored with
        ``lookahead_tokens`` (default: the config's); empty when one draft pass reads it whole.

        Chunk ``i`` is ``prompt[:sinks] + prompt[start_i:end_i] + prompt[-w:]``: the prompt's
        first tokens, one slice of the rest, and the window (the question). Every chunk is
        ``chunk_limit() - lookahead`` tokens long; slices overlap by ``chunk_overlap`` (at most
        half a slice) and the last one ends where the window begins, so together they cover
        every token.
        """
        cfg = self.config
        n = cfg.lookahead_tokens if lookahead_tokens is None else lookahead_tokens
        limit = self.chunk_limit()
        if limit is None or length + n <= limit:
            return []
        return self._slices(length, n, limit)

    def scoring_slices(
        self, length: int, lookahead_tokens: int | None = None, generate_tokens: int | None = None
    ) -> list[tuple[int, int]]:
        """The chunk slices :meth:`score_tokens` reads with these arguments (empty: one pass).

        Whether to chunk is decided with the whole pass's lookahead (``generate_tokens``, at
        least ``lookahead_tokens``), but a chunk's pass writes at most the config's own
        lookahead, so its slices are sized for that: fewer, longer chunks."""
        cfg = self.config
        n = cfg.lookahead_tokens if lookahead_tokens is None else lookahead_tokens
        total = n if generate_tokens is None else max(generate_tokens, n)
        limit = self.chunk_limit()
        # chunk_slices also refuses, before any draft work, a lookahead that leaves no room
        if limit is None or not self.chunk_slices(length, total):
            return []
        return self._slices(length, min(n, cfg.lookahead_tokens), limit)

    def _slices(self, length: int, n: int, limit: int) -> list[tuple[int, int]]:
        """Chunk slices of a ``length``-token prompt, each chunk ``limit - n`` tokens at most."""
        cfg = self.config
        window = min(cfg.window_size, length) or 1
        sinks = min(CHUNK_SINK_TOKENS, length - window)
        span = limit - n - window - sinks  # prompt tokens a chunk adds
        if span <= 0:
            raise InvalidInputError(
                f"a chunk of {limit} tokens has no room for prompt tokens after the window ({window}), "
                f"the lookahead ({n}) and {sinks} sink tokens: raise chunk_size (at most the draft's "
                "window), or lower window_size or the lookahead."
            )
        overlap = min(cfg.chunk_overlap, span // 2)
        end = length - window
        if end - sinks <= span:  # one chunk holds it all (it fits a shorter lookahead only)
            return [(sinks, end)]
        starts = [*range(sinks, end - span, span - overlap), end - span]
        return [(start, start + span) for start in starts]

    def score_tokens(
        self,
        input_ids: torch.Tensor,
        *,
        lookahead_tokens: int | None = None,
        generate_tokens: int | None = None,
        guide: Guide | None = None,
    ) -> tuple[torch.Tensor, list[int]]:
        """Raw (unsmoothed) importance of every token of ``input_ids`` ``[L]``, and the lookahead.

        ``generate_tokens`` (at least ``lookahead_tokens``) lets the same pass write a longer
        lookahead than it scores, e.g. for SpecKV: scores use the first ``lookahead_tokens``
        queries only, so they equal a pass that writes no more.

        ``guide`` (a fresh one, for the draft's vocabulary) writes the lookahead under the
        answer's grammar (see :func:`draft_pass`).

        A prompt longer than :meth:`chunk_limit` is scored in chunks (:meth:`chunk_slices`);
        no pass then reads the whole prompt, so no lookahead is returned (and ``guide`` is unused).
        Each chunk's pass scores with the config's own ``lookahead_tokens``, not a longer
        ``lookahead_tokens`` argument: a chunk's lookahead is never the answer (it is written
        without the rest of the prompt), and one decode step per lookahead token and chunk is
        what made SpecKV-PC's chunked scoring cost (see docs/results.md, "On a GPU").
        """
        cfg = self.config
        n = cfg.lookahead_tokens if lookahead_tokens is None else lookahead_tokens
        total = n if generate_tokens is None else max(generate_tokens, n)
        slices = self.scoring_slices(input_ids.numel(), n, total)
        if slices:
            return self.score_chunks(input_ids, slices, min(n, cfg.lookahead_tokens)), []
        length = input_ids.numel()
        check_fits(self.model, length, role="draft", lookahead=total)
        recorder = self._recorder(length, n)
        lookahead = draft_pass(
            self.model,
            input_ids,
            lookahead_tokens=total,
            eos_token_ids=self._eos,
            recorder=recorder,
            guide=guide,
            prefill_chunk_size=self.prefill_chunk_size,
        )
        return recorder.scores().cpu(), lookahead

    def _recorder(self, length: int, lookahead_tokens: int) -> TokenScoreRecorder:
        """Scores of the last ``window_size`` queries of a ``length``-token pass and the
        lookahead's ``lookahead_tokens`` queries after them."""
        cfg = self.config
        window = min(cfg.window_size, length) or 1
        return TokenScoreRecorder(
            length - window,
            length,
            layers=range(starting_layer(cfg, self.model), int(self.model.config.num_hidden_layers)),
            reduction=cfg.reduction_type,
            weighted_query=cfg.weighted_query,
            window_end=length + lookahead_tokens,
        )

    def score_chunks(
        self,
        input_ids: torch.Tensor,
        slices: Sequence[tuple[int, int]],
        lookahead_tokens: int,
        *,
        normalise: bool = False,
    ) -> torch.Tensor:
        """``[L]`` raw scores of ``input_ids`` ``[L]`` from one draft pass per chunk (``slices``,
        see :meth:`chunk_slices`), merged by the maximum over the chunks that hold a token.
        Each pass's cache is freed before the next; only the ``[L]`` merge is kept.

        ``normalise`` divides each chunk's scores by their maximum over its slice first (the
        measurements in docs/results.md chose the plain maximum).
        """
        cfg = self.config
        length = input_ids.numel()
        window = min(cfg.window_size, length) or 1
        sinks = min(CHUNK_SINK_TOKENS, length - window)
        fixed = torch.cat([torch.arange(sinks), torch.arange(length - window, length)])  # [sinks + w]
        merged = torch.zeros(length)  # [L]
        for start, end in slices:
            positions = torch.cat([fixed[:sinks], torch.arange(start, end), fixed[sinks:]])  # [K]
            recorder = self._recorder(positions.numel(), lookahead_tokens)
            draft_pass(
                self.model,
                input_ids[positions],
                lookahead_tokens=lookahead_tokens,
                eos_token_ids=self._eos,
                recorder=recorder,
                prefill_chunk_size=self.prefill_chunk_size,
            )
            scores = recorder.scores().float().cpu()  # [K]
            if normalise:
                scores = scores / scores[sinks : sinks + end - start].max().clamp_min(1e-12)
            merged[positions] = torch.maximum(merged[positions], scores)
        return merged

    def _special_mask(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """Which tokens are special (``select_tokens`` decides whether that counts)."""
        if not self._special:
            return None
        return torch.isin(input_ids, torch.tensor(sorted(self._special)))

    # -- whole prompts ---------------------------------------------------------------------
    def compress(self, prompt: Prompt, *, max_capacity_prompt: int | None = None) -> Compression:
        """Compress a prompt: a string (fed as-is) or chat messages (the draft's chat template).

        A chat with tools, tool calls or tool results keeps its template's text whole (tool
        definitions, call and result tags): only message contents, tool results included, are cut."""
        enc = encode_prompt(self.tokenizer, prompt, offsets=True, max_tokens=self.max_input_tokens)
        protected = tool_structure_tokens(prompt, enc)
        compression = self.compress_encoded(
            enc["text"],
            enc["input_ids"],
            enc["offsets"],
            max_capacity_prompt=max_capacity_prompt,
            protected=protected,
        )
        if is_messages(prompt):
            compression.messages = self._compressed_messages(
                prompt,  # type: ignore[arg-type]
                enc["text"],
                enc["offsets"],
                compression.kept_positions,
            )
        return compression

    def compress_encoded(
        self,
        text: str,
        input_ids: torch.Tensor,
        offsets: Sequence[tuple[int, int]],
        *,
        max_capacity_prompt: int | None = None,
        lookahead_tokens: int | None = None,
        protected: torch.Tensor | None = None,
    ) -> Compression:
        """Compress an already tokenised prompt (``input_ids`` ``[L]`` with character ``offsets``);
        ``protected`` (``[L]`` bool) tokens are always kept."""
        cfg = self.config
        capacity = check_capacity(
            cfg.max_capacity_prompt if max_capacity_prompt is None else max_capacity_prompt, cfg.window_size
        )
        check_input_tokens(input_ids.numel(), self.max_input_tokens)
        raw, lookahead = self.score_tokens(input_ids, lookahead_tokens=lookahead_tokens)
        chunks = len(self.scoring_slices(input_ids.numel(), lookahead_tokens)) or 1
        return self.cut(
            text,
            input_ids,
            offsets,
            self.smooth(raw),
            capacity,
            lookahead=lookahead,
            protected=protected,
            chunks=chunks,
        )

    def smooth(self, scores: torch.Tensor) -> torch.Tensor:
        """``[L]`` raw token scores pooled with the config's kernel (what selection ranks)."""
        return pool_scores(scores, self.config.kernel_size, self.config.pool_type)

    def cut(
        self,
        text: str,
        input_ids: torch.Tensor,
        offsets: Sequence[tuple[int, int]],
        scores: torch.Tensor,
        capacity: int,
        *,
        lookahead: Sequence[int] = (),
        protected: torch.Tensor | None = None,
        chunks: int = 1,
    ) -> Compression:
        """The prompt kept at ``capacity`` from smoothed ``scores`` (``[L]``): one scoring pass
        (:meth:`score_tokens`, :meth:`smooth`) serves every budget. ``protected`` (``[L]``
        bool) tokens are always kept."""
        capacity = check_capacity(capacity, self.config.window_size)
        kept = select_tokens(scores, capacity, self.config, self._special_mask(input_ids), protected)
        return Compression(
            text=text_from_spans(text, offsets, kept.tolist()),
            input_ids=input_ids[kept],
            kept_positions=kept,
            scores=scores,
            original_tokens=input_ids.numel(),
            compressed_tokens=kept.numel(),
            lookahead_ids=list(lookahead),
            chunks=chunks,
        )

    @staticmethod
    def _compressed_messages(
        messages: Sequence[Mapping[str, Any]],
        text: str,
        offsets: Sequence[tuple[int, int]],
        kept: torch.Tensor,
    ) -> list[dict[str, Any]]:
        kept_set = set(kept.tolist())
        out: list[dict[str, Any]] = []
        cursor = 0
        for message in messages:
            content = str(message.get("content") or "")
            start = text.find(content, cursor) if content else -1
            if start < 0:
                out.append(dict(message))
                continue
            end = start + len(content)
            cursor = end
            inside = torch.nonzero(_tokens_within(offsets, start, end)).flatten().tolist()
            chosen = [i for i in inside if i in kept_set]
            kept_content = text_from_spans(text, offsets, chosen).strip()
            if isinstance(message.get("content"), TrustedPrompt):  # trusted stays trusted once cut
                kept_content = TrustedPrompt(kept_content)
            out.append({**message, "content": kept_content})
        return with_tools(out, prompt_tools(messages))

    # -- documents -------------------------------------------------------------------------
    def compress_documents(
        self,
        query: str,
        documents: Sequence[str],
        *,
        instruction: str = DEFAULT_INSTRUCTION,
        max_capacity_prompt: int | None = None,
        max_document_tokens: int | None = None,
        target_tokenizer: Any = None,
    ) -> list[DocumentCompression]:
        """Compress retrieved documents for ``query`` under one whole-prompt budget.

        The prompt ``[instruction] [doc 1] ... [doc m] [question]`` is scored once; the
        instruction, document headers and question are always kept and count against the
        budget, and the documents share the rest by score. ``max_document_tokens`` instead
        budgets the documents alone: they share that many tokens, the fixed parts come on top.
        Returns one entry per input document, in input order (``kept_tokens == 0`` where
        nothing was worth keeping). Empty and whitespace-only documents stay out of the prompt,
        so they take no budget, and come back as they are with ``original_tokens == 0``.

        ``target_tokenizer`` (a tokenizer object, e.g. a served model's) counts the documents in
        that tokenizer instead of the draft's: with ``max_document_tokens=N`` the kept texts,
        each tokenised by ``target_tokenizer``, hold at most ``N`` tokens together, and
        ``original_tokens`` / ``kept_tokens`` are its counts. The draft still scores in its own
        tokens; the selection keeps the most draft tokens whose text fits the target's count.
        """
        if not isinstance(query, str) or not query.strip():
            raise InvalidInputError("the query is empty; SpecPC scores documents by what they say about it.")
        if isinstance(documents, str):
            raise InvalidInputError("documents must be a list of strings, not one string.")
        documents = [str(d) for d in documents]
        present = [i for i, d in enumerate(documents) if d.strip()]
        if len(present) < len(documents):
            out = [DocumentCompression(i, d, 0.0, 0, 0) for i, d in enumerate(documents)]
            parts = self.compress_documents(
                query,
                [documents[i] for i in present],
                instruction=instruction,
                max_capacity_prompt=max_capacity_prompt,
                max_document_tokens=max_document_tokens,
                target_tokenizer=target_tokenizer,
            )
            for i, part in zip(present, parts, strict=True):
                out[i] = replace(part, index=i)
            return out
        if not documents:
            return []
        if target_tokenizer is not None and max_document_tokens is None:
            raise InvalidInputError(
                "target_tokenizer counts the documents' tokens in the served model's tokenizer; pass "
                "max_document_tokens=N (the served side's template, instruction and question come on top)."
            )
        check_input_chars(sum(map(len, documents)) + len(query) + len(instruction), self.max_input_tokens)
        text, spans, content = self._document_prompt(query, documents, instruction)
        enc = encode_text(
            self.tokenizer,
            text,
            content,
            add_special_tokens=not getattr(self.tokenizer, "chat_template", None),
            offsets=True,
            max_tokens=self.max_input_tokens,
        )
        input_ids, offsets = enc["input_ids"], enc["offsets"]
        length = input_ids.numel()
        owner = torch.full((length,), -1, dtype=torch.long)  # document index of each token, -1 = protected
        for i, (start, end) in enumerate(spans):
            owner[_tokens_within(offsets, start, end)] = i
        in_docs = owner >= 0
        protected = int((~in_docs).sum())
        capacity = self.config.max_capacity_prompt if max_capacity_prompt is None else max_capacity_prompt
        if max_document_tokens is not None:
            if max_capacity_prompt is not None or max_document_tokens <= 0:
                raise InvalidInputError(
                    "pass a positive max_document_tokens or max_capacity_prompt, not both "
                    f"(got {max_document_tokens} and {max_capacity_prompt})."
                )
            capacity = protected + max_document_tokens
        if capacity <= 0:
            raise InvalidInputError(f"max_capacity_prompt must be positive (got {capacity}).")
        if capacity <= protected and capacity < length:
            raise InvalidInputError(
                f"max_capacity_prompt ({capacity}) leaves no room for documents: the instruction, "
                f"headers and question alone take {protected} tokens. Raise the budget above {protected}."
            )
        raw, _ = self.score_tokens(input_ids)
        # Smooth inside each document: neither protected tokens (template, attention sinks) nor a
        # neighbouring document may lend its scores to a document's tokens.
        scores = torch.zeros_like(raw)
        for i in range(len(documents)):
            positions = torch.nonzero(owner == i).flatten()
            if positions.numel():
                scores[positions] = self.smooth(raw[positions])

        def select(capacity: int) -> torch.Tensor:
            return select_prompt_tokens(
                scores,
                capacity,
                window_size=0,
                neighbor_tokens=self.config.neighbor_tokens,
                always_keep=~in_docs,
                candidates=in_docs,
                segments=owner,
            )

        def kept_texts(kept: torch.Tensor) -> list[str]:
            kept_owner = owner[kept]
            return [
                text_from_spans(text, offsets, kept[kept_owner == i].tolist()).strip()
                for i in range(len(documents))
            ]

        if target_tokenizer is None:
            kept = select(capacity)
            texts = kept_texts(kept)
            kept_counts = [int((owner[kept] == i).sum()) for i in range(len(documents))]
            original_counts = [int((owner == i).sum()) for i in range(len(documents))]
        else:
            assert max_document_tokens is not None  # checked above
            original_counts = count_tokens(
                target_tokenizer, [d.strip() for d in documents]
            )  # as kept texts are
            texts, kept_counts = _fit_target_budget(
                select, kept_texts, target_tokenizer, max_document_tokens, protected, length
            )
        # A document ranks by its best token, as the selection does.
        peaks = [
            float(scores[owner == i].max()) if bool((owner == i).any()) else 0.0
            for i in range(len(documents))
        ]
        top = max(peaks) or 1.0
        return [
            DocumentCompression(
                index=i,
                text=texts[i],
                score=peaks[i] / top,
                original_tokens=original_counts[i],
                kept_tokens=kept_counts[i],
            )
            for i in range(len(documents))
        ]

    def _document_prompt(
        self, query: str, documents: Sequence[str], instruction: str
    ) -> tuple[str, list[Span], list[Span]]:
        """The assembled RAG prompt, each document's character span in it, and the spans of its
        untrusted content (instruction, documents and question: all but the chat template)."""
        parts = [instruction.strip(), ""] if instruction.strip() else []
        body = "\n".join(parts)
        spans_in_body: list[tuple[int, int]] = []
        for i, doc in enumerate(documents):
            body += f"Document [{i + 1}]\n"
            spans_in_body.append((len(body), len(body) + len(doc)))
            body += doc + "\n\n"
        body += f"Question: {query.strip()}"
        text, content = render_prompt(self.tokenizer, [{"role": "user", "content": body}])
        shift = text.find(body)
        if shift < 0:
            raise InvalidInputError(
                "the draft's chat template rewrites message text; cannot locate documents."
            )
        return text, [(s + shift, e + shift) for s, e in spans_in_body], content


def count_tokens(tokenizer: Any, texts: Sequence[str]) -> list[int]:
    """Tokens of each text in ``tokenizer`` as content (no BOS/EOS added); ``""`` counts 0."""
    if not texts:
        return []
    ids = tokenizer(list(texts), add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return [len(row) if text else 0 for row, text in zip(ids, texts, strict=True)]


def _fit_target_budget(
    select: Callable[[int], torch.Tensor],
    kept_texts: Callable[[torch.Tensor], list[str]],
    tokenizer: Any,
    budget: int,
    low: int,
    high: int,
) -> tuple[list[str], list[int]]:
    """The documents' kept texts and their ``tokenizer`` counts at the largest draft capacity in
    ``[low, high]`` whose texts hold at most ``budget`` tokens of ``tokenizer`` together.

    ``select(c)`` keeps the first ``c`` positions of one priority order, so a larger capacity
    keeps a superset and the count grows with it (up to how runs re-tokenise where they join):
    a bisection over capacities finds the largest that fits, and only fitting capacities are
    ever returned. ``select(low)`` keeps no document token.
    """
    texts = kept_texts(select(high))
    counts = count_tokens(tokenizer, texts)
    if sum(counts) <= budget:
        return texts, counts
    best_texts, best_counts = kept_texts(select(low)), [0] * len(texts)
    high -= 1
    while low < high:
        middle = (low + high + 1) // 2
        texts = kept_texts(select(middle))
        counts = count_tokens(tokenizer, texts)
        if sum(counts) <= budget:
            low, best_texts, best_counts = middle, texts, counts
        else:
            high = middle - 1
    return best_texts, best_counts


def _tokens_within(offsets: Sequence[tuple[int, int]], start: int, end: int) -> torch.Tensor:
    """``[L]`` bool: tokens whose characters lie inside ``[start, end)`` (empty tokens excluded)."""
    spans = torch.tensor(offsets, dtype=torch.long).reshape(-1, 2)  # [L, 2]
    return (spans[:, 1] > spans[:, 0]) & (spans[:, 0] >= start) & (spans[:, 1] <= end)


def check_capacity(capacity: int, window_size: int) -> int:
    if capacity <= 0:
        raise InvalidInputError(f"max_capacity_prompt must be positive (got {capacity}).")
    if capacity < window_size:
        raise InvalidInputError(
            f"max_capacity_prompt ({capacity}) is smaller than window_size ({window_size}); the last "
            "window_size tokens (the question) are always kept. Raise the budget or lower window_size."
        )
    return capacity
