"""What every method is made of: a scoring pass, a selection at a budget, and the prefill that
chains the two.

A method turns a request into a :class:`~spec_rag.generation.Prefilled` in two stages:

* ``score(request)`` does the expensive, budget-free work once (the draft's pass, the target's
  prefill with attention recorded) and returns a :class:`ScoredPrompt`;
* ``select(scored, budget, stats)`` cuts what the budget allows from it and returns the
  target's cache ready to decode. It never changes ``scored``, so one scoring serves every
  budget of a sweep.

:class:`CacheMethod` is the shared base of the KV-cache methods: it prefills the prompt (and a
lookahead, if the method writes one) and keeps the top-scored positions per head, written once;
a subclass only says how it scores (its recorder and lookahead) or which positions it keeps.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, ClassVar

import torch

from spec_rag._prompt import (
    DEFAULT_MAX_INPUT_TOKENS,
    Prompt,
    check_fits,
    encode,
    encode_prompt,
    has_tool_structure,
)
from spec_rag.config import PREFILL_CHUNK_SIZE, MethodInfo
from spec_rag.constrained import Guide
from spec_rag.generation import (
    GenerationStats,
    Prefilled,
    Sampler,
    SamplingParams,
    cache_view,
    forward,
    keep_layer_positions,
    new_cache,
)
from spec_rag.scoring import HeadScoreRecorder, LayerHook
from spec_rag.selection import check_kv_capacity, forced_positions, select_kv_positions
from spec_rag.specpc import tool_structure_tokens


@dataclass(frozen=True)
class Models:
    """The models a method runs on, as the engine checked them.

    Attributes:
        shared_vocabulary: draft and target tokenise alike, so token ids pass between them;
            otherwise text is handed over.
        target_eos / draft_eos: the ids that end an answer.
        max_input_tokens: ceiling on a request's prompt tokens (``None``: none); every
            tokenisation of a prompt checks it before any model reads the prompt.
        prefill_chunk_size: a longer prefill runs in chunks of this many tokens (``None``: one
            pass; see :func:`~spec_rag.generation.forward`).
    """

    target: Any
    tokenizer: Any
    draft: Any = None
    draft_tokenizer: Any = None
    shared_vocabulary: bool = False
    target_eos: Sequence[int] = ()
    draft_eos: Sequence[int] = ()
    max_input_tokens: int | None = DEFAULT_MAX_INPUT_TOKENS
    prefill_chunk_size: int | None = PREFILL_CHUNK_SIZE

    def to_target_ids(self, draft_ids: Sequence[int]) -> list[int]:
        """Draft token ids as target token ids (through text when the vocabularies differ)."""
        if self.shared_vocabulary or not draft_ids:
            return list(draft_ids)
        text = self.draft_tokenizer.decode(list(draft_ids), skip_special_tokens=True)
        if not text:
            return []
        ids = encode(self.tokenizer, text, templated=True, max_tokens=self.max_input_tokens)["input_ids"]
        return list(ids.tolist())

    def encode_target(self, prompt: Prompt) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[L]`` target ids of ``prompt``, and ``[L]`` bool of its tool structure (the template's
        text and earlier calls, never evicted; ``None`` for a prompt without tools)."""
        tools = has_tool_structure(prompt)
        enc = encode_prompt(self.tokenizer, prompt, offsets=tools, max_tokens=self.max_input_tokens)
        return enc["input_ids"], tool_structure_tokens(prompt, enc) if tools else None


#: How many of a drafted continuation's first tokens may be written (a grammar's verdict).
AcceptLimit = Callable[[Sequence[int]], int]

#: A fresh :class:`~spec_rag.constrained.Guide` of one request's answer structure on every call
#: (a new grammar state: nothing moves in another's), or ``None`` when the answer is free.
GuideFactory = Callable[[], Guide | None]


@dataclass
class Request:
    """One prompt to prefill.

    Attributes:
        prompt: a string fed as-is, or chat messages.
        max_new_tokens: the answer's length; SpecKV's default lookahead length.
        stats: filled in by the stages with what they cost.
        lookahead: target token ids of a lookahead already written (by SpecKV-PC's draft pass,
            or by a caller that ran the draft itself); ``None`` lets the method write its own.
        greedy: the answer is decoded greedily, so a verified lookahead may open it.
        sampler: a sampled answer's own sampler (its random generator), which the decoding goes
            on drawing from: the verified lookahead is drawn from it too (see
            :func:`verified_length`), so a sampled answer may open with it as well. ``None``:
            greedy, or a sampled answer whose tokens the scoring does not draw.
        accept: under constrained decoding, how many of the verified lookahead's first tokens
            the grammar allows in a row (``None``: all of them).
        guide: under constrained decoding, the answer's structure (see :data:`GuideFactory`):
            the draft writes its lookahead under it (:func:`lookahead_guide`) and the
            verification compares the draft's tokens with the target's constrained greedy
            choice (``None``: the answer is free).
    """

    prompt: Prompt
    max_new_tokens: int
    stats: GenerationStats = field(default_factory=GenerationStats)
    lookahead: list[int] | None = None
    greedy: bool = False
    accept: AcceptLimit | None = None
    guide: GuideFactory | None = None
    sampler: Sampler | None = None


def lookahead_guide(models: Models, request: Request) -> Guide | None:
    """A fresh guide for the draft's lookahead of ``request``: its answer's grammar, so the draft
    writes what the target may write, or ``None``.

    Only a draft that shares the target's vocabulary is guided: the grammar is compiled for the
    target's tokenizer and masks its token ids. A draft with another vocabulary writes its
    lookahead unconstrained; the verification and ``Request.accept`` still keep only the prefix
    the grammar allows, so such a lookahead is accepted less often on constrained answers.
    """
    if request.guide is None or not models.shared_vocabulary:
        return None
    return request.guide()


@dataclass
class ScoredPrompt:
    """The budget-free result of a method's scoring pass; ``select`` cuts it to a budget.

    Attributes:
        method: the method that scored it.
        stats: what scoring cost; every answer selected from it counts this cost as its own.
        lookahead: target token ids of the draft's lookahead (empty when none was written).
        tools: the tools the prompt was rendered with (``None``: none).
        answer_format: the answer's structure the lookahead was drafted under, as the engine's
            keywords (``tool_choice``, ``response_format``, ``constraint``); empty: none given.
    """

    method: str
    stats: GenerationStats
    lookahead: list[int] = field(default_factory=list)
    tools: list[dict[str, Any]] | None = None
    answer_format: dict[str, Any] = field(default_factory=dict)


@dataclass
class ScoredCache(ScoredPrompt):
    """A target prefill kept whole, with one score per (layer, KV head, prompt position).

    Attributes:
        length: ``L``, prompt tokens the target prefilled; decoding continues at position ``L``.
        cache: the target's cache of the prompt and lookahead (``L + n`` entries, ``C + n`` per
            head when ``cut``); selecting never changes it.
        logits: ``[vocab]`` after the last prompt token.
        accepted: ``k``, the lookahead's first tokens the target's own greedy choice agreed with
            (0 unless the method verifies its lookahead); with ``sampled``, the first tokens the
            target's own draws agreed with.
        sampled: ``accepted`` was drawn by a sampled answer's sampler (``Request.sampler``), so
            it opens that answer only (decoded on with the same sampler); greedy answers from
            this scoring accept nothing.
        verified_logits: ``[vocab]`` after prompt + those ``k`` tokens (``logits`` when ``k`` is 0).
        head_scores: layer -> ``[kv_heads, L]`` window (and lookahead) attention; ``None`` when
            the method scores nothing (full, StreamingLLM), the budget held the prompt whole, or
            the prefill already cut the cache.
        cut: the budget ``C`` the prefill already cut every layer to, each layer right after its
            scores were known, so the whole prompt's cache never existed at once (scored for one
            budget only); the cache then holds ``C`` prompt entries per head, then the lookahead's.
        window: the last ``window`` positions are always kept.
        protected: ``[L]`` bool, the prompt's tool structure (template text, earlier calls), kept
            in every layer and head at every budget; ``None`` for a prompt without tools.
    """

    length: int = 0
    cache: Any = None
    logits: torch.Tensor | None = None
    accepted: int = 0
    sampled: bool = False
    verified_logits: torch.Tensor | None = None
    head_scores: dict[int, torch.Tensor] | None = None
    window: int = 0
    cut: int | None = None
    protected: torch.Tensor | None = None


class Method:
    """A compression method: how it scores a prompt and what it keeps at a budget.

    Subclasses set ``info`` (through their config class) and implement :meth:`score` and
    :meth:`select`; :meth:`prefill` chains them for one request.
    """

    info: ClassVar[MethodInfo]

    def __init__(self, config: Any, models: Models) -> None:
        self.config = config
        self.models = models

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def budget(self) -> int | None:
        """The config's budget (``None``: nothing to cut)."""
        return None if self.config is None else int(self.config.budget)

    def check_budget(self, budget: int | None) -> int | None:
        """``budget`` validated against the config (``None``: the config's own)."""
        if budget is None or self.config is None:
            return self.budget
        return int(self.config.with_budget(budget).budget)

    def score(self, request: Request, budget: int | None = None) -> ScoredPrompt:
        """The budget-free work. ``budget``, when given, is the only budget the scores will
        serve, so a prompt that fits it whole need not be scored."""
        raise NotImplementedError

    def select(
        self,
        scored: ScoredPrompt,
        budget: int | None,
        stats: GenerationStats,
        *,
        greedy: bool = False,
        accept: AcceptLimit | None = None,
    ) -> Prefilled:
        """The target's cache at ``budget`` (``None``: the config's), from ``scored``.
        ``greedy``: the answer is decoded greedily (a verified lookahead may then open it);
        ``accept``: how many verified tokens a grammar allows (``None``: all)."""
        raise NotImplementedError

    def accepts(self, scored: ScoredPrompt) -> bool:
        """Whether :meth:`select` can answer from ``scored`` (its own method's, by default)."""
        return scored.method == self.name

    def prefill(self, request: Request) -> Prefilled:
        budget = self.budget
        return self.select(
            self.score(request, budget), budget, request.stats, greedy=request.greedy, accept=request.accept
        )


class CacheMethod(Method):
    """Prefill the whole prompt (plus the method's lookahead), then keep per layer and KV head
    the ``C`` positions :meth:`positions` picks (default: the top-scored ones, window included).

    Subclasses override :meth:`recorder` and :meth:`write_lookahead` to score, or
    :meth:`positions` to keep positions chosen otherwise.
    """

    def recorder(self, length: int) -> HeadScoreRecorder | LayerHook | None:
        """What records the scores during the prefill (``None``: nothing is scored; a
        :class:`LayerHook` scores nothing but lets a one-budget prefill cut each layer)."""
        return None

    def cuts_in_forward(self) -> bool:
        """Whether :meth:`cut_layer` keeps what :meth:`positions` would (so a one-budget prefill
        may cut each layer inside the forward); true unless a subclass picks positions otherwise."""
        return type(self).positions is CacheMethod.positions

    def write_lookahead(self, request: Request, ids: torch.Tensor) -> list[int]:
        """Target ids appended to the prompt in the scoring prefill (their queries count)."""
        return []

    def window(self, length: int) -> int:
        return min(int(getattr(self.config, "window_size", 0)), length)

    def score(self, request: Request, budget: int | None = None) -> ScoredCache:
        ids, protected = self.models.encode_target(request.prompt)
        request.stats.prompt_tokens = ids.numel()
        return self.score_ids(request, ids, budget, protected=protected)

    def score_ids(
        self,
        request: Request,
        ids: torch.Tensor,
        budget: int | None = None,
        *,
        protected: torch.Tensor | None = None,
    ) -> ScoredCache:
        """:meth:`score` of a prompt already in target ids ``[L]``; ``protected`` (``[L]`` bool):
        its tool structure, never evicted (``None``: none)."""
        stats = request.stats
        length = ids.numel()
        check_fits(self.models.target, length, role="target", lookahead=len(request.lookahead or []))
        if budget is not None and budget < length:
            self.check_kept(length, budget, protected)  # before any forward
        stats.target_prefill_tokens = length
        scoring = budget is None or budget < length
        recorder = self.recorder(length) if scoring else None
        lookahead = self.write_lookahead(request, ids) if recorder is not None else []
        if recorder is not None:
            stats.lookahead_tokens = len(lookahead)
        full_ids = torch.cat([ids, torch.tensor(lookahead, dtype=torch.long)])  # [L + n]
        cache = new_cache(self.models.target)
        # One budget to serve: cut each layer inside the forward, as soon as its scores are known.
        cut = budget if recorder is not None and self.cuts_in_forward() else None
        if cut is not None:
            assert recorder is not None
            recorder.on_layer = partial(self.cut_layer, cache, length, cut, protected=protected)
        t0 = time.perf_counter()
        # The target's next-token logits after x, x y_0, ..., x y_<n: positions L - 1 .. L + n - 1.
        rows = forward(
            self.models.target,
            full_ids[None],
            cache,
            recorder=recorder,
            logits_to_keep=len(lookahead) + 1,
            prefill_chunk_size=self.models.prefill_chunk_size,
        )  # [n + 1, vocab]
        accepted = 0
        sampler = request.sampler if request.sampler is not None and not request.sampler.greedy else None
        if getattr(self.config, "verify_lookahead", False):
            guide = request.guide() if request.guide is not None else None  # fresh: used up here
            accepted = verified_length(rows, lookahead, guide, sampler=sampler)
        logits = rows[0].clone()  # a copy, not a view: the other rows are freed
        verified_logits = rows[accepted].clone() if accepted else logits
        del rows
        stats.target_prefill_s += time.perf_counter() - t0
        recorded = isinstance(recorder, HeadScoreRecorder) and cut is None
        head_scores = recorder.per_layer if recorded else None  # type: ignore[union-attr]
        return ScoredCache(
            method=self.name,
            stats=replace(stats),
            lookahead=lookahead,
            length=length,
            cache=cache,
            logits=logits,
            accepted=accepted,
            sampled=sampler is not None,
            verified_logits=verified_logits,
            head_scores=head_scores,
            window=self.window(length),
            cut=cut,
            protected=protected,
        )

    def forced(self, length: int, protected: torch.Tensor | None) -> tuple[torch.Tensor, str]:
        """``[F]`` prompt positions kept at every budget (the window and the ``[L]`` bool
        ``protected`` tool structure), and what they are, in words."""
        window = self.window(length)
        forced = forced_positions(length, last=window, protected=protected)
        return forced, f"the last {window} positions (window_size)"

    def check_kept(self, length: int, budget: int, protected: torch.Tensor | None) -> None:
        """A clear error when ``budget`` cannot hold what is never evicted. Only tool prompts
        (``protected`` given) are checked: without tool structure the selection is as it was."""
        if protected is not None:
            forced, kept = self.forced(length, protected)
            check_kv_capacity(budget, forced.numel(), protected, kept=kept, method=self.name)

    def cut_layer(
        self,
        cache: Any,
        length: int,
        budget: int,
        layer: int,
        scores: torch.Tensor | None,
        *,
        protected: torch.Tensor | None = None,
    ) -> None:
        """Keep ``budget`` prompt entries per head of ``layer``'s cache (chosen from its ``[kv_heads,
        L]`` ``scores``, the ``protected`` ``[L]`` positions always) and every lookahead entry after them."""
        assert scores is not None
        kept = select_kv_positions(
            scores,
            length,
            budget,
            window_size=self.window(length),
            kernel_size=self.config.kernel_size,
            pool_type=self.config.pool_type,
            protected=protected,
        )  # [kv_heads, C]
        entry = cache.layers[layer]
        lookahead = torch.arange(length, entry.keys.shape[2], device=kept.device)  # [n]
        keep_layer_positions(entry, torch.cat([kept, lookahead.expand(kept.shape[0], -1)], dim=-1))

    def positions(self, scored: ScoredCache, budget: int) -> torch.Tensor:
        """``[layers, kv_heads, C]`` sorted positions to keep (``budget < scored.length``)."""
        if scored.head_scores is None:
            raise ValueError(f"{self.name} at budget {budget} needs scores; score without a budget.")
        return torch.stack(
            [
                select_kv_positions(
                    scored.head_scores[layer],
                    scored.length,
                    budget,
                    window_size=scored.window,
                    kernel_size=self.config.kernel_size,
                    pool_type=self.config.pool_type,
                    protected=scored.protected,
                )
                for layer in range(len(scored.cache.layers))
            ]
        )

    def select(
        self,
        scored: ScoredPrompt,
        budget: int | None,
        stats: GenerationStats,
        *,
        greedy: bool = False,
        accept: AcceptLimit | None = None,
    ) -> Prefilled:
        """Keep the positions :meth:`positions` picks; for an answer the verified lookahead opens
        (a greedy one, or the sampled one that drew it: :attr:`ScoredCache.sampled`) also its
        entries (at their true positions ``L .. L + k - 1``).

        ``accept`` (a grammar) may allow only the first ``j < k`` verified tokens: the target's
        constrained choice after them is not the draft's, so only their entries are kept and the
        target's logits after them come from one forward of the ``j``-th token."""
        assert isinstance(scored, ScoredCache) and scored.logits is not None
        t0 = time.perf_counter()
        length = scored.length
        # A greedy verification opens greedy answers; a drawn one the sampled answer it was drawn for.
        verified = scored.accepted if greedy != scored.sampled else 0
        allowed = verified if accept is None or not verified else accept(scored.lookahead[:verified])
        allowed = min(allowed, verified)
        refeed = 0 < allowed < verified  # the logits after the allowed prefix were not kept
        keep = allowed - 1 if refeed else allowed  # lookahead entries taken from the scoring cache
        accepted = torch.arange(length, length + keep)  # [k]
        prompt_entries = length
        if scored.cut is not None:
            if budget != scored.cut:
                raise ValueError(
                    f"this {scored.method} scoring was cut to budget {scored.cut} in its prefill; "
                    "score without a budget to answer at others."
                )
            prompt_entries = scored.cut
        if scored.cut is None and budget is not None and budget < length:
            self.check_kept(length, budget, scored.protected)
            positions: torch.Tensor | None = self.positions(scored, budget)
            assert positions is not None
            if positions.dim() == 1:  # [C], every head
                positions = torch.cat([positions, accepted])
            else:  # [layers, kv_heads, C]
                positions = torch.cat([positions, accepted.expand(*positions.shape[:-1], keep)], dim=-1)
        elif scored.cache.get_seq_length() > prompt_entries + keep:
            positions = torch.arange(prompt_entries + keep)  # drop the rest of the lookahead's entries
        else:
            positions = None
        cache = cache_view(scored.cache, positions)
        stats.kv_cache_tokens = int(cache.get_seq_length()) - keep
        logits = scored.verified_logits if keep == verified and keep else scored.logits
        if refeed:
            last = torch.tensor([[scored.lookahead[allowed - 1]]])  # [1, 1]
            logits = forward(self.models.target, last, cache, position_start=length + keep)[-1]
        stats.target_prefill_s += time.perf_counter() - t0
        stats.lookahead_accepted = allowed
        assert logits is not None
        return Prefilled(
            cache,
            logits,
            length + allowed,
            {"lookahead": scored.lookahead},
            accepted=scored.lookahead[:allowed],
        )


def verified_length(
    logits: torch.Tensor,
    lookahead: Sequence[int],
    guide: Guide | None = None,
    *,
    sampler: Sampler | None = None,
) -> int:
    """``k``: how many of the lookahead's first tokens the target's own choice agrees with.

    ``logits`` is ``[n + 1, vocab]``, the target's logits after the prompt and each lookahead
    prefix (full cache). Greedy decoding with the full cache would write ``y_0 .. y_{k-1}`` and
    then ``argmax(logits[k])``: those ``k + 1`` tokens need no decode step of their own.

    ``sampler`` (a sampled answer's): the target's choice at each position is drawn from it, as
    sampled decoding with the full cache would draw it, and the draft's token is accepted while
    the draw equals it. For a draft's fixed lookahead this is the speculative-sampling rule
    (``y_j`` kept with probability ``p(y_j)``, and otherwise a token from ``p`` without ``y_j``),
    so the answer has the target's own distribution. The draw that disagreed is taken back
    (:meth:`~spec_rag.generation.Sampler.restore`): the decoding draws it again from
    ``logits[k]`` with the same sampler, so a seeded answer's first ``k + 1`` tokens are those
    of full-cache sampling with that seed.

    ``guide`` (a fresh one of the answer's grammar, used up here): the choice compared is the
    constrained one, made from each row masked by the grammar after ``y_<i``, as constrained
    decoding makes it; the count stops where the grammar is complete.
    """
    if not lookahead:
        return 0
    if guide is None and (sampler is None or sampler.greedy):
        choice = logits[: len(lookahead)].argmax(dim=-1).cpu()  # [n]
        agree = choice == torch.tensor(lookahead, dtype=choice.dtype)  # [n]
        return int(agree.long().cumprod(dim=0).sum())
    choose = sampler if sampler is not None else Sampler(SamplingParams())  # greedy: argmax
    agreed = 0
    for row, token in zip(logits, lookahead, strict=False):  # row: [vocab]
        if guide is not None:
            row = guide.mask_logits(row)
            if not bool(torch.isfinite(row[int(token)])):
                break  # the grammar forbids the draft's token: nothing to draw
        state = choose.state()
        if choose(row) != int(token):
            choose.restore(state)  # the decoding draws this position again, the same way
            break
        agreed += 1
        if guide is not None:
            guide.advance(int(token))
            if guide.is_finished:
                break
    return agreed
