"""A simulated LLM engine, modelled on Dynamo's mocker (`lib/mocker/`): pure and deterministic.

Nothing here does I/O or reads a clock. The adapter calls `submit()` when a request arrives and
`step(now_ms)` to run one forward pass; the pass reports how long it took in simulated
milliseconds, which tokens came out and which KV events happened. Time only exists as the numbers
the caller passes in, so tests drive it with a fake clock and get the same result every time.

Block pool: `capacity` blocks of `block_size` tokens. A block is either *hashed* (a full block with a
sequence hash, shared and reusable by any request with the same prefix) or *anonymous* (reserved by a
sequence for tokens not yet computed, or for its partial tail). Hashed blocks with a reference are
*active*; with none they are *inactive*: still cached, evictable, LRU over leaves first so a shared
prefix outlives the branches hanging off it.
"""

from __future__ import annotations

import heapq
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from schemas.events import RouterEvent, cleared_event, removed_event, stored_event
from schemas.hashing import MmObject, block_mm_hashes, local_block_hashes, mm_block_hash, salt_seed, sequence_hashes

# --- timing model (Dynamo mocker's default polynomial) ---------------------------------------------


def prefill_ms(uncached_tokens: int) -> float:
    """Time of the prefill part of one pass, T = uncached tokens computed in that pass (0 → 0)."""
    if uncached_tokens <= 0:
        return 0.0
    t = float(uncached_tokens)
    return 4.209989e-7 * t * t + 1.518344e-2 * t + 16.50142


def decode_ms(kv_usage: float) -> float:
    """Time of one decode step for the whole batch; p = active KV tokens / KV capacity, clamped to 1."""
    p = min(max(kv_usage, 0.0), 1.0)
    return max(1.0, -25.74 * p * p + 54.01 * p + 5.74)


# --- configuration and outputs -------------------------------------------------------------------


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 64
    kv_blocks: int = 16_384
    max_num_batched_tokens: int = 8_192
    max_num_seqs: int = 256
    watermark: float = 0.01
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.kv_blocks < 1:
            raise ValueError("block_size and kv_blocks must be >= 1")
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be >= 1")
        if not 0.0 <= self.watermark < 1.0:
            raise ValueError("watermark must be in [0, 1)")


@dataclass
class FirstToken:
    request_id: str
    at_ms: float
    queue_ms: float  # from arrival to first admission
    arrival_ms: float = 0.0


@dataclass
class Finished:
    request_id: str
    at_ms: float
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int
    arrival_ms: float
    first_token_ms: float
    preemptions: int


@dataclass
class Rejected:
    request_id: str
    reason: str


@dataclass
class PassResult:
    """One forward pass that started at `start_ms` and ends at `start_ms + duration_ms`."""

    start_ms: float
    duration_ms: float
    prefill_tokens: int
    decode_seqs: int
    first_tokens: list[FirstToken] = field(default_factory=list)
    finished: list[Finished] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    events: list[RouterEvent] = field(default_factory=list)

    @property
    def end_ms(self) -> float:
        return self.start_ms + self.duration_ms


# --- block pool ----------------------------------------------------------------------------------


@dataclass
class _Block:
    seq_hash: int
    tokens_hash: int
    parent: int | None
    refs: int = 0
    children: int = 0
    last_used: int = 0


class BlockPool:
    """Hashed + anonymous block accounting with LRU-leaves-first eviction of inactive blocks.

    Eviction candidates live in a heap keyed by (last_used, order) with lazy invalidation: an entry
    is only acted on if the block still exists, is inactive, is a leaf and was not touched since.
    """

    def __init__(self, capacity: int, on_evict: Callable[[list[int]], None]) -> None:
        self.capacity = capacity
        self.blocks: dict[int, _Block] = {}
        self.anonymous = 0
        self.active_hashed = 0
        self._heap: list[tuple[int, int, int]] = []
        self._order = 0
        self._tick = 0
        self._on_evict = on_evict
        self.evictions = 0

    # accounting
    @property
    def used(self) -> int:
        return len(self.blocks) + self.anonymous

    @property
    def free(self) -> int:
        return self.capacity - self.used

    @property
    def inactive(self) -> int:
        return len(self.blocks) - self.active_hashed

    @property
    def active(self) -> int:
        """Blocks held by running sequences (hashed with a reference, plus anonymous)."""
        return self.active_hashed + self.anonymous

    def tick(self) -> int:
        self._tick += 1
        return self._tick

    def contains(self, seq_hash: int) -> bool:
        return seq_hash in self.blocks

    def prefix_hits(self, hashes: Sequence[int]) -> int:
        n = 0
        for h in hashes:
            if h not in self.blocks:
                break
            n += 1
        return n

    def _push_candidate(self, block: _Block) -> None:
        self._order += 1
        heapq.heappush(self._heap, (block.last_used, self._order, block.seq_hash))

    def ref(self, seq_hash: int) -> None:
        block = self.blocks[seq_hash]
        if block.refs == 0:
            self.active_hashed += 1
        block.refs += 1
        block.last_used = self._tick

    def unref(self, seq_hash: int) -> None:
        block = self.blocks[seq_hash]
        if block.refs <= 0:
            raise AssertionError(f"unref of unreferenced block {seq_hash}")
        block.refs -= 1
        block.last_used = self._tick
        if block.refs == 0:
            self.active_hashed -= 1
            if block.children == 0:
                self._push_candidate(block)

    def insert(self, seq_hash: int, tokens_hash: int, parent: int | None) -> None:
        """Register a newly computed full block, referenced once. Needs no free slot: the caller
        converts one of its anonymous blocks (see `promote`)."""
        block = _Block(seq_hash, tokens_hash, parent, refs=1, last_used=self._tick)
        self.blocks[seq_hash] = block
        self.active_hashed += 1
        if parent is not None and parent in self.blocks:
            self.blocks[parent].children += 1

    def reserve(self, n: int) -> bool:
        """Take `n` anonymous blocks, evicting inactive blocks as needed; all or nothing."""
        if n <= 0:
            return True
        if self.capacity - self.used + self.inactive < n:
            return False
        shortfall = n - self.free
        evicted: list[int] = []
        while shortfall > 0:
            h = self._evict_one()
            if h is None:  # cannot happen: inactive blocks always include an evictable leaf
                break
            evicted.append(h)
            shortfall -= 1
        if evicted:
            self._on_evict(evicted)
        if self.free < n:
            return False
        self.anonymous += n
        return True

    def release_anonymous(self, n: int) -> None:
        if n > self.anonymous:
            raise AssertionError("releasing more anonymous blocks than reserved")
        self.anonymous -= n

    def _evict_one(self) -> int | None:
        while self._heap:
            last_used, _, h = heapq.heappop(self._heap)
            block = self.blocks.get(h)
            if block is None or block.refs or block.children or block.last_used != last_used:
                continue
            del self.blocks[h]
            self.evictions += 1
            if block.parent is not None:
                parent = self.blocks.get(block.parent)
                if parent is not None:
                    parent.children -= 1
                    if parent.children == 0 and parent.refs == 0:
                        self._push_candidate(parent)
            return h
        return None

    def check(self) -> None:
        """Invariants (tests call this after every step)."""
        assert self.anonymous >= 0, "negative anonymous blocks"
        assert 0 <= self.active_hashed <= len(self.blocks), "active hashed out of range"
        assert self.used <= self.capacity, f"over capacity: {self.used} > {self.capacity}"
        assert self.active_hashed == sum(1 for b in self.blocks.values() if b.refs > 0)
        for b in self.blocks.values():
            assert b.refs >= 0 and b.children >= 0


# --- sequences -----------------------------------------------------------------------------------


def generated_token(seed: int, position: int) -> int:
    """Deterministic stand-in for the token a model would generate at `position`."""
    return ((seed * 6364136223846793005 + position * 1442695040888963407) >> 17) % 32_000


@dataclass(eq=False)  # identity semantics: membership tests must not compare prompts
class SeqState:
    request_id: str
    prompt: list[int]
    max_tokens: int
    arrival_ms: float
    hash_seed: int
    gen_seed: int
    # block index → the sorted mm hashes of the prompt's multimodal objects in it (docs/protocol.md §6)
    mm_blocks: dict[int, list[int]] = field(default_factory=dict)
    generated: int = 0
    computed: int = 0  # tokens whose KV exists (incl. cached prefix) in the current admission
    target: int = 0  # tokens to prefill in the current admission (prompt + generated so far)
    held: list[int] = field(default_factory=list)  # hashed blocks referenced, in order
    local_hashes: list[int] = field(default_factory=list)
    seq_hashes: list[int] = field(default_factory=list)
    anonymous: int = 0
    prompt_cached: int | None = None
    first_admit_ms: float | None = None
    first_token_ms: float | None = None
    preemptions: int = 0
    admitted_order: int = 0

    @property
    def context_len(self) -> int:
        return len(self.prompt) + self.generated

    @property
    def prefilling(self) -> bool:
        return self.computed < self.target

    def token_at(self, pos: int) -> int:
        if pos < len(self.prompt):
            return self.prompt[pos]
        return generated_token(self.gen_seed, pos)

    def tokens(self, start: int, end: int) -> list[int]:
        n = len(self.prompt)
        if end <= n:
            return self.prompt[start:end]
        return [self.token_at(p) for p in range(start, end)]

    def ensure_hashes(self, n_blocks: int, block_size: int) -> None:
        """Extend local/sequence hashes to cover `n_blocks` full blocks of the context."""
        have = len(self.local_hashes)
        if have >= n_blocks:
            return
        new_local = local_block_hashes(self.tokens(have * block_size, n_blocks * block_size), block_size, self.hash_seed)
        for b, mm in self.mm_blocks.items():
            if have <= b < n_blocks:
                new_local[b - have] = mm_block_hash(self.tokens(b * block_size, (b + 1) * block_size), self.hash_seed, mm)
        self.local_hashes.extend(new_local)
        self.seq_hashes.extend(_chain_from(self.seq_hashes[-1] if self.seq_hashes else None, new_local))


def _chain_from(prev: int | None, local: Sequence[int]) -> list[int]:
    # sequence_hashes treats its first element as the root, so prepend the known parent and drop it.
    return sequence_hashes(local) if prev is None else sequence_hashes([prev, *local])[1:]


# --- the engine ----------------------------------------------------------------------------------


@dataclass
class EngineStats:
    requests: int = 0
    finished: int = 0
    rejected: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    preemptions: int = 0
    passes: int = 0
    busy_ms: float = 0.0
    events: int = 0


class Engine:
    """vLLM-style continuous batching over a `BlockPool` (as Dynamo's mocker runs it)."""

    def __init__(self, config: EngineConfig, worker_id: int = 0, dp_rank: int = 0, first_event_id: int = 0) -> None:
        self.cfg = config
        self.worker_id = worker_id
        self.dp_rank = dp_rank
        self.pool = BlockPool(config.kv_blocks, self._on_evict)
        self.waiting: deque[SeqState] = deque()
        self.running: list[SeqState] = []
        self.stats = EngineStats()
        self._events: list[RouterEvent] = []
        # A restarted worker with the same id must not reuse old event ids (the router would drop
        # them as duplicates), so the adapter passes a clock-derived first id.
        self._next_event_id = first_event_id
        self._admissions = 0
        self._known: set[str] = set()

    # -- inputs
    def submit(
        self,
        request_id: str,
        prompt: list[int],
        max_tokens: int,
        now_ms: float,
        lora_name: str | None = None,
        cache_salt: str | None = None,
        multimodal: Sequence[MmObject] | None = None,
    ) -> Rejected | None:
        """Queue a request; returns a rejection when it can never run on this engine."""
        bs = self.cfg.block_size
        if request_id in self._known:
            return Rejected(request_id, "duplicate request_id")
        if not prompt:
            return Rejected(request_id, "empty prompt")
        if max_tokens < 1:
            return Rejected(request_id, "max_tokens must be >= 1")
        need = -(-(len(prompt) + max_tokens) // bs)
        if need > self.admission_limit():
            self.stats.rejected += 1
            return Rejected(request_id, f"prompt+output needs {need} blocks, engine admits at most {self.admission_limit()}")
        seed = salt_seed(lora_name, cache_salt)
        seq = SeqState(request_id, list(prompt), max_tokens, now_ms, hash_seed=seed, gen_seed=_stable_seed(request_id))
        if multimodal:  # the prompt's objects salt its blocks as the router hashes them
            seq.mm_blocks = block_mm_hashes(multimodal, bs, len(prompt))
        self._known.add(request_id)
        self.waiting.append(seq)
        self.stats.requests += 1
        return None

    def admission_limit(self) -> int:
        return int((1.0 - self.cfg.watermark) * self.cfg.kv_blocks)

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def kv_usage(self) -> float:
        """Active KV tokens of the running batch over total KV tokens (decode model's p)."""
        tokens = sum(s.computed for s in self.running)
        return tokens / (self.cfg.kv_blocks * self.cfg.block_size)

    def drain_events(self) -> list[RouterEvent]:
        out, self._events = self._events, []
        return out

    # -- events
    def _event_id(self) -> int:
        eid = self._next_event_id
        self._next_event_id += 1
        self.stats.events += 1
        return eid

    def announce_cleared(self) -> None:
        """Emit a `cleared` event: the router forgets whatever a previous incarnation stored."""
        self._events.append(cleared_event(self.worker_id, self._event_id(), self.dp_rank))

    def _on_evict(self, hashes: list[int]) -> None:
        last = self._events[-1] if self._events else None
        if last is not None and last.kind == "removed":
            last.event.data.removed.block_hashes.extend(hashes)  # type: ignore[union-attr]
            return
        self._events.append(removed_event(self.worker_id, self._event_id(), list(hashes), self.dp_rank))

    def _emit_stored(self, run: list[tuple[int, int]], parent: int | None) -> None:
        if run:
            self._events.append(stored_event(self.worker_id, self._event_id(), run, parent, self.dp_rank))

    # -- the forward pass
    def step(self, now_ms: float) -> PassResult:
        """Run one forward pass starting at `now_ms` (no-op result when idle): vLLM-v1's order,
        one phase each, sharing the pass's token budget (docs/simulation.md, "Scheduler loop")."""
        self.pool.tick()
        result = PassResult(start_ms=now_ms, duration_ms=0.0, prefill_tokens=0, decode_seqs=0)
        budget = self.cfg.max_num_batched_tokens
        decoded, budget = self._decode_phase(budget)  # 1.
        chunks, budget = self._prefill_phase(budget)  # 2.
        self._admission_phase(now_ms, budget, chunks)  # 3.
        prefill_tokens = sum(n for _, n in chunks)
        if prefill_tokens == 0 and not decoded:
            result.events = self.drain_events()
            return result
        duration = prefill_ms(prefill_tokens) + (decode_ms(self.kv_usage()) if decoded else 0.0)
        result.duration_ms = duration
        result.prefill_tokens = prefill_tokens
        result.decode_seqs = len(decoded)
        self._progress_phase(chunks, decoded, now_ms + duration, result)  # 4.
        self.stats.passes += 1
        self.stats.busy_ms += duration
        result.events = self.drain_events()
        return result

    def _decode_phase(self, budget: int) -> tuple[list[SeqState], int]:
        """1. One token for every running sequence whose prefill is done, oldest first; a sequence
        that needs a new block and finds none preempts the newest running one (LIFO)."""
        decoded: list[SeqState] = []
        for seq in sorted((s for s in self.running if not s.prefilling), key=lambda s: s.admitted_order):
            if seq not in self.running or budget <= 0:
                continue  # preempted by an older sequence of this phase, or no budget left
            if not self._grow_for_decode(seq):
                continue
            decoded.append(seq)
            budget -= 1
        return decoded, budget

    def _prefill_phase(self, budget: int) -> tuple[list[tuple[SeqState, int]], int]:
        """2. The rest of the budget continues chunked prefills of running sequences, oldest first."""
        chunks: list[tuple[SeqState, int]] = []
        for seq in sorted((s for s in self.running if s.prefilling), key=lambda s: s.admitted_order):
            if budget <= 0:
                break
            n = min(seq.target - seq.computed, budget)
            chunks.append((seq, n))
            budget -= n
        return chunks, budget

    def _admission_phase(self, now_ms: float, budget: int, chunks: list[tuple[SeqState, int]]) -> None:
        """3. Admit waiting requests in order while `max_num_seqs`, the token budget (the last one
        may be split: chunked prefill) and the KV watermark hold; their first chunks join `chunks`."""
        limit = self.admission_limit()
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
            seq = self.waiting[0]
            total_blocks = -(-(seq.context_len + 1) // self.cfg.block_size)
            if self.pool.active + total_blocks > limit:
                break
            self.waiting.popleft()
            n = self._admit(seq, now_ms, budget)
            if n is None:  # could not reserve blocks; keep order and wait
                self.waiting.appendleft(seq)
                break
            if n:
                chunks.append((seq, n))
                budget -= n

    def _progress_phase(
        self, chunks: list[tuple[SeqState, int]], decoded: list[SeqState], end: float, result: PassResult
    ) -> None:
        """4. At the pass's end: prefill progress (newly full blocks become cached and are announced;
        a finished prompt produces its first token), then every decoded sequence's token."""
        for seq, n in chunks:
            seq.computed += n
            self._promote_full_blocks(seq)
            if not seq.prefilling:
                self._emit_token(seq, end, result)
        for seq in decoded:
            seq.computed += 1  # the token produced last pass now has KV
            self._promote_full_blocks(seq)
            self._emit_token(seq, end, result)

    def _admit(self, seq: SeqState, now_ms: float, budget: int) -> int | None:
        """Reference cached prefix blocks, reserve the rest; returns tokens to prefill this pass."""
        bs = self.cfg.block_size
        target = seq.context_len
        full = target // bs
        seq.ensure_hashes(full, bs)
        hits = self.pool.prefix_hits(seq.seq_hashes[:full]) if self.cfg.enable_prefix_caching else 0
        for h in seq.seq_hashes[:hits]:
            self.pool.ref(h)
        need = -(-target // bs) - hits
        if not self.pool.reserve(need):
            for h in seq.seq_hashes[:hits]:
                self.pool.unref(h)
            return None
        seq.held = list(seq.seq_hashes[:hits])
        seq.anonymous = need
        # at least one token is always computed, to produce logits
        seq.computed = min(hits * bs, target - 1)
        seq.target = target
        self._admissions += 1
        seq.admitted_order = self._admissions
        if seq.prompt_cached is None:
            seq.prompt_cached = seq.computed
            seq.first_admit_ms = now_ms
            self.stats.prompt_tokens += len(seq.prompt)
            self.stats.cached_tokens += seq.computed
        self.running.append(seq)
        return min(target - seq.computed, budget)

    def _grow_for_decode(self, seq: SeqState) -> bool:
        """Make room for one more token; preempt the newest running sequences until it fits."""
        bs = self.cfg.block_size
        capacity_tokens = (len(seq.held) + seq.anonymous) * bs
        if seq.computed + 1 <= capacity_tokens:
            return True
        while not self.pool.reserve(1):
            victim = max(self.running, key=lambda s: s.admitted_order)
            self._preempt(victim)
            if victim is seq:
                return False
        seq.anonymous += 1
        return True

    def _preempt(self, seq: SeqState) -> None:
        self._release(seq)
        self.running.remove(seq)
        seq.computed = 0
        seq.target = 0
        seq.preemptions += 1
        self.stats.preemptions += 1
        self.waiting.appendleft(seq)

    def _release(self, seq: SeqState) -> None:
        # release leaves first so eviction order keeps the prefix
        for h in reversed(seq.held):
            self.pool.unref(h)
        self.pool.release_anonymous(seq.anonymous)
        seq.held = []
        seq.anonymous = 0

    def _promote_full_blocks(self, seq: SeqState) -> None:
        """Turn anonymous blocks whose tokens are now all computed into hashed, cached blocks."""
        bs = self.cfg.block_size
        full = seq.computed // bs
        if full <= len(seq.held):
            return
        seq.ensure_hashes(full, bs)
        run: list[tuple[int, int]] = []
        run_parent: int | None = None
        for i in range(len(seq.held), full):
            h = seq.seq_hashes[i]
            parent = seq.seq_hashes[i - 1] if i else None
            seq.anonymous -= 1
            self.pool.release_anonymous(1)
            if self.pool.contains(h):
                # computed concurrently by another sequence: share it, no event
                self.pool.ref(h)
                self._emit_stored(run, run_parent)
                run = []
            else:
                self.pool.insert(h, seq.local_hashes[i], parent)
                if not run:
                    run_parent = parent
                run.append((h, seq.local_hashes[i]))
            seq.held.append(h)
        self._emit_stored(run, run_parent)

    def _emit_token(self, seq: SeqState, at_ms: float, result: PassResult, count: int = 1) -> None:
        seq.generated += count
        seq.target = max(seq.target, seq.computed)
        self.stats.output_tokens += count
        if seq.first_token_ms is None:
            seq.first_token_ms = at_ms
            queue = (seq.first_admit_ms or seq.arrival_ms) - seq.arrival_ms
            result.first_tokens.append(FirstToken(seq.request_id, at_ms, queue, seq.arrival_ms))
        if seq.generated >= seq.max_tokens:
            self._release(seq)
            self.running.remove(seq)
            self._known.discard(seq.request_id)
            self.stats.finished += 1
            result.finished.append(
                Finished(
                    request_id=seq.request_id,
                    at_ms=at_ms,
                    prompt_tokens=len(seq.prompt),
                    cached_tokens=seq.prompt_cached or 0,
                    output_tokens=seq.generated,
                    arrival_ms=seq.arrival_ms,
                    first_token_ms=seq.first_token_ms,
                    preemptions=seq.preemptions,
                )
            )

    # -- fused decode: several pure-decode passes in one call, same outcome as stepping one by one
    def plan_decode(self, max_steps: int) -> list[float] | None:
        """Cumulative durations (ms) of the next passes when they are pure decode, else None.

        Pure decode = nothing waiting, nothing prefilling. The plan stops before any sequence
        would finish, so completions always land on the last pass of a commit. The adapter sleeps
        through the plan and commits only the passes that ended before a new request arrived.
        """
        if self.waiting or not self.running or len(self.running) > self.cfg.max_num_batched_tokens:
            return None
        if any(s.prefilling for s in self.running):
            return None
        k = min(max_steps, min(s.max_tokens - s.generated for s in self.running))
        if k < 2:
            return None
        n = len(self.running)
        cap = self.cfg.kv_blocks * self.cfg.block_size
        tokens = sum(s.computed for s in self.running)
        out: list[float] = []
        acc = 0.0
        for i in range(k):
            acc += decode_ms((tokens + i * n) / cap)
            out.append(acc)
        return out

    def commit_decode(self, now_ms: float, plan: list[float], steps: int) -> PassResult | None:
        """Apply the first `steps` passes of `plan`; None (nothing changed) when blocks are short,
        in which case the caller falls back to `step()` which handles preemption."""
        if steps < 1 or steps > len(plan):
            raise ValueError("steps out of range of the plan")
        bs = self.cfg.block_size
        needs = [max(0, -(-(s.computed + steps) // bs) - len(s.held) - s.anonymous) for s in self.running]
        if not self.pool.reserve(sum(needs)):
            return None
        self.pool.tick()
        duration = plan[steps - 1]
        result = PassResult(start_ms=now_ms, duration_ms=duration, prefill_tokens=0, decode_seqs=len(self.running))
        end = now_ms + duration
        for seq, need in zip(list(self.running), needs, strict=True):
            seq.anonymous += need
            seq.computed += steps
            self._promote_full_blocks(seq)
            self._emit_token(seq, end, result, steps)
        self.stats.passes += steps
        self.stats.busy_ms += duration
        result.events = self.drain_events()
        return result

    # -- views
    def cached_blocks(self) -> dict[int, int | None]:
        """seq hash → parent of every hashed block (active or inactive): what the router should see."""
        return {h: b.parent for h, b in self.pool.blocks.items()}

    def status(self) -> dict[str, int | float]:
        s = self.stats
        return {
            "waiting": len(self.waiting),
            "running": len(self.running),
            "kv_used_blocks": self.pool.used,
            "kv_active_blocks": self.pool.active,
            "kv_inactive_blocks": self.pool.inactive,
            "kv_total_blocks": self.pool.capacity,
            "requests": s.requests,
            "finished": s.finished,
            "prompt_tokens": s.prompt_tokens,
            "cached_tokens": s.cached_tokens,
            "preemptions": s.preemptions,
            "evictions": self.pool.evictions,
        }


def _stable_seed(text: str) -> int:
    # Python's hash() is salted per process; use a fixed hash so runs are reproducible.
    return zlib.crc32(text.encode())


def output_token_ids(request_id: str, prompt_len: int, start: int, end: int) -> list[int]:
    """The stand-in ids the engine generates for outputs `start..end` of a request (what a client
    of the HTTP front sees as the completion)."""
    seed = _stable_seed(request_id)
    return [generated_token(seed, prompt_len + i) for i in range(start, end)]


__all__ = [
    "BlockPool",
    "Engine",
    "EngineConfig",
    "Finished",
    "FirstToken",
    "PassResult",
    "Rejected",
    "decode_ms",
    "output_token_ids",
    "prefill_ms",
]
