"""Adaptive speculation: before each cycle of a generation, choose which levels run (or plain decoding), gamma and
draft_gamma, so as to maximise expected tokens per second under costs and acceptance measured online.

One controller serves one sequence's generation. The chain tells it what happened (`observe_pass`,
`observe_verification`, `observe_overhead`), asks it what to do next (`plan`), and, while a level drafts,
whether to draft one more token (`should_continue`). It measures nothing itself: every time comes from the caller.

Per cycle (one top verification, or one plain decoding step) the chain calls:
    plan = controller.plan(len(context), lookup_has_match)    # runs plan.levels with plan.gammas
    controller.observe_pass(level, rows, seconds)              # every pass, the top's too; lookup: per proposal
    controller.should_continue(level, k, q)                    # optional, after each drafted token; stop on False
    controller.observe_verification(drafter, drafted, accepted, drafter_probs)   # every verification
    controller.observe_overhead(level, seconds)                # time outside passes caused by a level (optional)
    controller.observe_cycle(seconds)                          # the cycle's wall time, plan to plan (optional)

Names. The top is the target on its full cache (`top`, "target"). Below it run at most two levels: a bottom
(prompt lookup "ngram", or a draft model; a hybrid bottom lists both kinds and uses one per cycle) and a middle
(the target on a sparse view, e.g. "target-retrieval"). A cycle's structure is the tuple of levels it runs below
the top, bottom to top: () plain decoding, (D,) a lone drafter D -> top, (B, M) bottom -> middle -> top.

Measurements.
- Cost of a pass of level L carrying r rows: t_L(r) = a_L + b_L * r, fitted by exponentially weighted least
  squares (each new pass multiplies old weights by `cost_decay`, so recent passes dominate as the context grows),
  regularised by a small penalty kappa * (b - rho * a)^2 that pulls the slope toward a prior fraction rho of the
  intercept when the rows seen do not identify it (e.g. only plain decoding ran). Before a level's first pass its
  cost is a prior ratio of the top's one-row cost. A lookup level's "pass" is one proposal of r tokens.
- Fixed cost per cycle of using a level (e.g. a retrieval view's re-selection): `observe_overhead`, averaged with
  the same decay over the cycles the level ran.
- Time of a cycle outside every pass and overhead (sampling, verification, bookkeeping: more per cycle for a
  deeper structure): the cycle's wall time (`observe_cycle`) minus what the passes and overheads took,
  averaged per structure with the same decay, and added to that structure's cycles.
- Evidence that sat unused (a level or a drafter not run for a while, e.g. while speculation was off) is also
  aged by `stale_decay` per idle cycle (down to a floor of 25%) when new evidence arrives, so a probe's fresh
  result outweighs a stale record; the aging is applied only then, so estimates never drift back to the priors
  on their own.
- Acceptance of drafter D under verifier V at draft position i (conditional on positions < i accepted): decayed
  Beta counts per position (each verification multiplies old counts by `acceptance_decay`), shrunk toward the
  pair's pooled rate, which is itself shrunk toward a prior: a_i = (k_i + w * pooled) / (n_i + w). Also counts
  per bin of the drafter's own probability of the drafted token (calibration c(q), shrunk toward the pooled
  rate), used to stop drafting; they decay slower (0.995 per verification), a drafter's calibration being a
  steadier property than its acceptance on the current text.

Expected-value model (A_D(g) = sum_{i<=g} prod_{j<=i} a_j: expected accepted tokens of g drafts; T = top cost):
- plain: 1 token per T(1).
- D -> top, gamma g: tokens 1 + A_DT(g); seconds draft_D(g) + T(g + 1), where draft_D(g) = g * t_D(1) for a model
  (one pass per token) and t_D(g) for lookup (one proposal).
- B -> M -> top, gamma g, draft_gamma d: the middle gathers in steps; a step costs s = draft_B(d) + t_M(d + 1)
  and yields Y = 1 + (accepted of d) tokens, P(Y = k + 1) = prod_{j<=k} a_j * (1 - a_{k+1}) (k < d), P(Y = d + 1)
  = prod_{j<=d} a_j, with a = a_BM. It stops once it has >= g tokens. With the renewal probabilities r(0) = 1,
  r(n) = sum_y r(n - y) P(Y = y) (the chance the gathered count ever equals n), the expected number of steps is
  N = sum_{n<g} r(n) and the gathered count G in [g, g + d] has P(G = m) = sum_{n<g} r(n) P(Y = m - n). The top
  verifies the G tokens: tokens 1 + E[A_MT(G)], seconds N * s + T(E[G] + 1).
Each option's seconds include the overheads of the levels it runs. A cycle ends with exactly one top pass.

Choice. plan() evaluates the whole grid (structures x gammas x draft_gammas, at most ~100 options) and takes the
best expected tokens per second (exploitation), plain decoding unless the best speculative option promises more
than (1 + plain_margin) times its speed (the estimates err, and an error toward speculation costs a slower
generation than plain decoding), except:
- warm-up: each available structure runs once (a probe with gamma <= probe_gamma, draft_gamma <= 2) before the
  controller trusts its priors;
- scheduled probes: every >= probe_every cycles, the structure whose measurements are stalest runs once (capped
  like warm-up), but only when a probe budget allows: non-probe cycles earn probe_budget * their seconds, a probe
  spends what it lost against the best option (seconds - tokens / best tokens per second). So probes cost at most
  ~probe_budget of the time in the long run (warm-up aside), and plain decoding is chosen when nothing pays;
- a probe of a speculative structure that yielded more tokens than expected is repeated next cycle (at most 8
  in a row, while the budget is in debt by less than 2 plain steps): a drafter that got good is found in a few
  cycles rather than one probe per interval.

Stopping to draft (like llama.cpp's --draft-p-min, but derived): while level D drafts for V, after its k-th token
with its own probability q, the chance that all k drafts survive is estimated as S = prod c(q_j). Drafting one more
token pays when S * a_{k+1} * value_V >= cost, where cost = one more draft (t_D(1) for a model, b_D for lookup, the
middle's seconds per gathered token for a middle) plus one more verifier row (b_V), and value_V = seconds per token
at V under the plan (the plan's seconds per token for the top, the middle's seconds per gathered token for the
middle). So the threshold on S is cost / (value_V * a_{k+1}): it rises when drafting or verifying rows gets dearer
and falls when the tokens it saves get dearer. The token just drafted is always kept: the rule only decides
whether to draft the NEXT one, from the drafter's own outputs and past outcomes, so the output stays exactly the
target's distribution (dropping a drafted token because of its own probability would bias sampling).
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

TOP = "target"
LOOKUP = "ngram"
# upper edges of the drafter-probability bins (the last bin is [0.99, 1])
BIN_EDGES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
PROBE_DRAFT_GAMMA = 2  # draft_gamma cap of warm-up and scheduled probes
CREDIT_STEPS = 10.0  # cap of the probe credit, in plain decoding steps
STREAK_PROBES = 8  # a probe that yielded more tokens than expected is repeated at most this many times in a row,
STREAK_DEBT_STEPS = 2.0  # while the probe credit is above minus this many plain decoding steps
AGE_FLOOR = 0.25  # stale evidence keeps at least this weight when new evidence arrives


def default_prior_acceptance(level: str) -> float:
    """Acceptance assumed before any verification of `level`'s drafts (the target on a sparse view agrees
    often; prompt lookup is hit or miss; a small draft model in between)."""
    if level == LOOKUP:
        return 0.5
    return 0.8 if level.startswith("target") else 0.6


def default_prior_cost(level: str, row_slope: float = 0.1) -> tuple[float, float]:
    """(cost of a one-row pass relative to the top's, slope per extra row relative to the intercept) assumed
    before `level`'s first pass: a view of the target reads all weights (~0.6 of a full step at 16K on this
    CPU); a small draft model ~0.15; lookup almost nothing. The slope is the kernels' (see Controller):
    0.1 means 7 rows cost 1.6 steps."""
    if level == LOOKUP:
        return 0.01, 0.0
    if level == TOP:
        return 1.0, row_slope
    return (0.6, row_slope) if level.startswith("target") else (0.15, row_slope)


@dataclass(frozen=True)
class Plan:
    """What a cycle runs: `levels` below the top, bottom to top (() is plain decoding); `gamma` tokens gathered
    per top verification by the level just below the top; `draft_gamma` tokens the bottom drafts per middle step
    (three levels only, else 0); whether the cycle is a probe; the expected tokens per second it was chosen for."""

    levels: tuple[str, ...] = ()
    gamma: int = 0
    draft_gamma: int = 0
    probe: bool = False
    expected_tokens_per_s: float = 0.0

    @property
    def plain(self) -> bool:
        return not self.levels

    @property
    def bottom(self) -> str | None:
        """The lowest level that runs (the kind of bottom, for a hybrid), or None for plain decoding."""
        return self.levels[0] if self.levels else None

    @property
    def gammas(self) -> list[int]:
        """Tokens per call of each running level, bottom to top, as `Chain` takes them."""
        return [self.draft_gamma, self.gamma][-len(self.levels):] if self.levels else []


class PassCost:
    """seconds = a + b * rows of one level's passes: exponentially weighted least squares, with a penalty
    kappa * (b - rho * a)^2 that fixes the slope when the rows observed do not."""

    def __init__(self, prior_ratio: float, prior_slope: float, decay: float, kappa: float = 1.0) -> None:
        self.prior_ratio, self.rho, self.decay, self.kappa = prior_ratio, prior_slope, decay, kappa
        self.s0 = self.s1 = self.s2 = self.t0 = self.t1 = 0.0
        self.passes = 0
        self.version = 0  # bumped by every observation: caches of what depends on it compare it
        self._line: tuple[float, float] | None = None

    def observe(self, rows: int, seconds: float, age: float = 1.0) -> None:
        """age: an extra factor on the old weights (< 1 when they are stale)."""
        d = self.decay * age
        self.version += 1
        self.s0 = self.s0 * d + 1.0
        self.s1 = self.s1 * d + rows
        self.s2 = self.s2 * d + rows * rows
        self.t0 = self.t0 * d + seconds
        self.t1 = self.t1 * d + rows * seconds
        self.passes += 1
        self._line = None

    def line(self) -> tuple[float, float] | None:
        """(a, b), both >= 0, or None before the first pass."""
        if not self.passes:
            return None
        if self._line is None:
            k, r = self.kappa, self.rho
            a11, a12, a22 = self.s0 + k * r * r, self.s1 - k * r, self.s2 + k
            det = a11 * a22 - a12 * a12
            a = (a22 * self.t0 - a12 * self.t1) / det
            b = (a11 * self.t1 - a12 * self.t0) / det
            if b < 0:
                a, b = self.t0 / self.s0, 0.0
            if a < 0:
                a, b = 0.0, self.t1 / self.s1
            self._line = (a, b)
        return self._line


class Acceptance:
    """One drafter under one verifier: acceptance per draft position (decayed Beta counts shrunk toward the
    pooled rate) and per bin of the drafter's own probability (calibration)."""

    def __init__(self, prior: float, positions: int, decay: float, calibration_decay: float = 0.995,
                 weight: float = 2.0) -> None:
        self.prior, self.decay, self.calibration_decay, self.weight = prior, decay, calibration_decay, weight
        self.hits = [0.0] * positions
        self.seen = [0.0] * positions
        self.bin_hits = [0.0] * (len(BIN_EDGES) + 1)
        self.bin_seen = [0.0] * (len(BIN_EDGES) + 1)
        self.verifications = 0
        self.version = 0
        self._rates: list[float] | None = None
        self._prefix: list[float] | None = None

    def observe(self, drafted: int, accepted: int, drafter_probs: Sequence[float] | None, age: float = 1.0) -> None:
        """age: an extra factor on the old counts (< 1 when they are stale)."""
        for counts, d in ((self.hits, self.decay), (self.seen, self.decay), (self.bin_hits, self.calibration_decay),
                          (self.bin_seen, self.calibration_decay)):
            d *= age
            for i in range(len(counts)):
                counts[i] *= d
        judged = min(drafted, accepted + 1)  # positions after the first rejection were not judged
        for i in range(min(judged, len(self.seen))):
            self.seen[i] += 1.0
            if i < accepted:
                self.hits[i] += 1.0
        if drafter_probs is not None:
            for i, q in enumerate(drafter_probs[:judged]):
                b = bisect_right(BIN_EDGES, q)
                self.bin_seen[b] += 1.0
                if i < accepted:
                    self.bin_hits[b] += 1.0
        self.verifications += 1
        self.version += 1
        self._rates = self._prefix = None

    def pooled(self) -> float:
        return (sum(self.hits) + self.weight * self.prior) / (sum(self.seen) + self.weight)

    def rates(self) -> list[float]:
        """a_1, a_2, ...: acceptance at each position given the earlier ones were accepted."""
        if self._rates is None:
            pooled, w = self.pooled(), self.weight
            self._rates = [(h + w * pooled) / (n + w) for h, n in zip(self.hits, self.seen)]
        return self._rates

    def prefix(self) -> list[float]:
        """A(g) for g = 0..positions: expected accepted tokens of g drafts."""
        if self._prefix is None:
            out, survive = [0.0], 1.0
            for a in self.rates():
                survive *= a
                out.append(out[-1] + survive)
            self._prefix = out
        return self._prefix

    def calibrated(self, drafter_prob: float) -> float:
        """Chance a draft with this drafter probability is accepted (pooled rate until its bin has data)."""
        b = bisect_right(BIN_EDGES, drafter_prob)
        return (self.bin_hits[b] + self.weight * self.pooled()) / (self.bin_seen[b] + self.weight)


# one option of the grid: (gamma, draft_gamma, expected tokens, expected seconds) per cycle
Option = tuple[int, int, float, float]


class Controller:
    """Chooses each cycle's structure, gamma and draft_gamma for one sequence's generation (see the module).

    levels: the chain's levels below the top, bottom to top, as the chain names them: ("ngram",
    "target-retrieval"), ("target-retrieval",), ("draft",) ...; the bottom entry may be a tuple of alternative
    kinds for a hybrid bottom: (("ngram", "draft"), "target-retrieval").
    gammas, draft_gammas: the grid of tokens per top verification and per middle step.
    probe_every: fewest cycles between scheduled probes; probe_budget: fraction of time probes may lose;
    probe_gamma: largest gamma of a warm-up or scheduled probe.
    prior_acceptance, prior_cost: overrides of default_prior_acceptance / default_prior_cost per level name.
    row_slope: the prior cost of each extra row of a pass relative to one row, until a level's own passes of
    several row counts show it (it differs by an order of magnitude between kernels).
    warmup: run every structure once first (else start from the priors' best and leave the others to the
    budgeted probes, which try a structure never run before any other). hysteresis: keep the last cycle's
    option while its expected tokens per second is within this fraction of the best's. plain_margin: the
    fraction by which speculation must beat plain decoding's expected speed to be chosen over it.
    """

    def __init__(
        self,
        levels: Sequence[str | Sequence[str]],
        gammas: Sequence[int] = range(1, 9),
        draft_gammas: Sequence[int] = range(1, 5),
        probe_every: int = 16,
        *,
        probe_budget: float = 0.02,
        probe_gamma: int = 4,
        top: str = TOP,
        lookup: str = LOOKUP,
        prior_acceptance: dict[str, float] | None = None,
        prior_cost: dict[str, tuple[float, float]] | None = None,
        row_slope: float = 0.1,
        cost_decay: float = 0.97,
        acceptance_decay: float = 0.98,
        stale_decay: float = 0.98,
        warmup: bool = True,
        hysteresis: float = 0.0,
        plain_margin: float = 0.0,
    ) -> None:
        if len(levels) > 2:
            raise ValueError("at most two levels below the top: a bottom and a middle")
        self.gammas = tuple(sorted(set(gammas)))
        self.draft_gammas = tuple(sorted(set(draft_gammas)))
        if not self.gammas or self.gammas[0] < 1 or not self.draft_gammas or self.draft_gammas[0] < 1:
            raise ValueError("gammas and draft_gammas are integers >= 1")
        if probe_every < 1 or not 0 <= probe_budget < 1:
            raise ValueError("probe_every >= 1 and probe_budget in [0, 1)")
        if not 0 <= plain_margin < 1:
            raise ValueError("plain_margin in [0, 1)")
        if row_slope < 0:
            raise ValueError("row_slope >= 0")
        self.plain_margin = plain_margin
        self.top, self.lookup = top, lookup
        self.probe_every, self.probe_budget, self.probe_gamma = probe_every, probe_budget, probe_gamma
        self.cost_decay, self.stale_decay = cost_decay, stale_decay
        self.warmup, self.hysteresis = warmup, hysteresis
        bottoms: tuple[str, ...] = ()
        self.middle: str | None = None
        if levels:
            first = levels[0]
            bottoms = (first,) if isinstance(first, str) else tuple(first)
        if len(levels) == 2:
            middle = levels[1]
            if not isinstance(middle, str):
                raise ValueError("only the bottom may have alternative kinds")
            self.middle = middle
        self.bottoms = bottoms
        names = [top, *bottoms] + ([self.middle] if self.middle else [])
        if len(set(names)) != len(names):
            raise ValueError(f"level names must differ: {names}")

        self.structures: list[tuple[str, ...]] = [()] + [(b,) for b in bottoms]
        if self.middle:
            self.structures += [(self.middle,)] + [(b, self.middle) for b in bottoms]
        positions = self.gammas[-1] + self.draft_gammas[-1]
        prior_acceptance, prior_cost = prior_acceptance or {}, prior_cost or {}
        self._costs = {
            n: PassCost(*prior_cost.get(n, default_prior_cost(n, row_slope)), decay=cost_decay) for n in names
        }
        self._overhead = dict.fromkeys(names, 0.0)
        # seconds per cycle outside passes and overheads: decayed sums of seconds and of weights, per structure
        self._outside = {structure: [0.0, 0.0] for structure in self.structures}
        self._cycle_wall: float | None = None
        self._shapes: dict[tuple[str, ...], tuple[Any, list[tuple[int, int, float, float, float]]]] = {}
        self._gatherings: dict[tuple[str, str], tuple[Any, list[Any]]] = {}
        self._acceptance: dict[tuple[str, str], Acceptance] = {}
        for s in self.structures:
            for pair in _pairs(s, top):
                prior = prior_acceptance.get(pair[0], default_prior_acceptance(pair[0]))
                self._acceptance[pair] = Acceptance(prior, positions, acceptance_decay)

        # the cycle in progress
        self.cycle = 0
        self.current: Plan | None = None
        self._warmup = False
        self._exploit_tps = 0.0
        self._probe_expected = 0.0  # tokens the last probe was expected to yield
        self._last_tokens = 0  # tokens the last cycle yielded
        self._streak = 0  # probes in a row
        self._cycle_seconds = 0.0
        self._cycle_tokens = 0
        self._cycle_overhead: dict[str, float] = {}
        self._verifier: dict[str, str] = {}
        self._thresholds: dict[str, list[float]] = {}
        self._survive: dict[str, float] = {}
        self._per_call: dict[str, int] = {}
        # probing
        self.credit = 0.0
        self._last_probe = -(10**9)
        self._last_seen: dict[Any, int] = {}  # "plain" or (drafter, verifier) -> cycle last observed
        self._observed: dict[Any, int] = {}  # level or (drafter, verifier) -> cycle of its last observation
        self._ran: set[tuple[str, ...]] = set()
        # figures for report()
        self.context_len = 0
        self.sequences = 1
        self._runs: dict[tuple[str, ...], int] = {}
        self._histogram: dict[tuple[str, ...], dict[str, dict[int, int]]] = {}
        self._probes = 0
        self._stops: dict[str, int] = {}

    # -- observations ------------------------------------------------------------------------------------------
    def observe_pass(self, level: str, rows: int, seconds: float) -> None:
        """One forward pass of `level` over `rows` rows took `seconds` (a lookup level: one proposal of `rows`
        tokens). Call it for every pass, the top's included."""
        if rows < 1 or seconds < 0:
            raise ValueError(f"a pass has >= 1 rows and >= 0 seconds, got {rows} rows, {seconds} s")
        self._cost(level).observe(rows, seconds, self._age(level))
        self._cycle_seconds += seconds
        if level == self.top and rows == 1:
            self._last_seen["plain"] = self.cycle

    def observe_overhead(self, level: str, seconds: float) -> None:
        """Time spent this cycle because `level` runs, outside its passes (e.g. re-selecting a retrieval view)."""
        self._cost(level)
        self._cycle_overhead[level] = self._cycle_overhead.get(level, 0.0) + seconds
        self._cycle_seconds += seconds

    def observe_cycle(self, seconds: float) -> None:
        """The cycle just run took `seconds` of wall time, from before its plan() to after its last pass and
        the bookkeeping that follows."""
        if seconds < 0:
            raise ValueError(f"a cycle takes >= 0 seconds, got {seconds}")
        self._cycle_wall = seconds

    def observe_verification(self, level: str, drafted: int, accepted: int,
                             drafter_probs: Sequence[float] | None = None, verifier: str | None = None) -> None:
        """The level above verified `drafted` of `level`'s tokens and accepted the first `accepted`.
        drafter_probs: `level`'s own probability of each drafted token (the same quantity later passed to
        should_continue). verifier: the level that verified; by default the one above `level` in the plan."""
        if not 0 <= accepted <= drafted:
            raise ValueError(f"accepted must be in [0, drafted], got {accepted} of {drafted}")
        verifier = verifier or self._verifier.get(level)
        if verifier is None or (level, verifier) not in self._acceptance:
            raise ValueError(f"no verification of {level!r} by {verifier!r} in this controller's structures")
        if verifier == self.top:
            self._cycle_tokens += accepted + 1
        if drafted:
            self._acceptance[(level, verifier)].observe(drafted, accepted, drafter_probs, self._age((level, verifier)))
            self._last_seen[(level, verifier)] = self.cycle

    def _age(self, estimate: str | tuple[str, str]) -> float:
        """Extra decay of an estimate's old evidence for the cycles it sat unused: stale_decay per cycle
        beyond the last, applied when it is observed again (so estimates never drift back to the priors on
        their own, which would run unbudgeted probes)."""
        last = self._observed.get(estimate, self.cycle)
        self._observed[estimate] = self.cycle
        return max(AGE_FLOOR, self.stale_decay ** max(0, self.cycle - last - 1))

    # -- estimates ---------------------------------------------------------------------------------------------
    def _cost(self, level: str) -> PassCost:
        try:
            return self._costs[level]
        except KeyError:
            raise ValueError(f"unknown level {level!r}; levels are {', '.join(self._costs)}") from None

    def line(self, level: str) -> tuple[float, float]:
        """(a, b) of level's pass cost a + b * rows, in seconds (priors scaled by the top's one-row cost before
        the level's first pass; 1.0 stands for that cost before the top's first pass)."""
        cost = self._cost(level)
        fitted = cost.line()
        if fitted is not None:
            return fitted
        unit = 1.0
        if level != self.top:
            top_a, top_b = self.line(self.top)
            unit = top_a + top_b
        a = cost.prior_ratio * unit / (1 + cost.rho)
        return a, cost.rho * a

    def cost(self, level: str, rows: int) -> float:
        """Expected seconds of a pass of `level` over `rows` rows."""
        a, b = self.line(level)
        return a + b * rows

    def outside(self, structure: tuple[str, ...]) -> float:
        """Expected seconds of a cycle of `structure` outside its passes and levels' overheads (0 until a cycle
        of it is reported by observe_cycle)."""
        total, weight = self._outside.get(tuple(structure), (0.0, 0.0))
        return total / weight if weight else 0.0

    def acceptance(self, drafter: str, verifier: str | None = None) -> list[float]:
        """Estimated acceptance per draft position of `drafter` under `verifier` (default: the top)."""
        return list(self._acceptance[(drafter, verifier or self.top)].rates())

    def _draft_seconds(self, level: str, tokens: int) -> float:
        a, b = self.line(level)
        return a + b * tokens if level == self.lookup else tokens * (a + b)

    def _shape(self, structure: tuple[str, ...]) -> list[tuple[int, int, float, float, float]]:
        """(gamma, draft_gamma, expected tokens, expected seconds below the top, expected top rows) of each
        option of `structure`, recomputed only when an estimate it depends on has changed."""
        levels = [self._costs[n] for n in structure]
        key = (tuple(c.version for c in levels),
               tuple(self._acceptance[p].version for p in _pairs(structure, self.top)),
               tuple(self._overhead[n] for n in structure),
               self._costs[self.top].version if any(not c.passes for c in levels) else 0)
        cached = self._shapes.get(structure)
        if cached is not None and cached[0] == key:
            return cached[1]
        over = sum(self._overhead[n] for n in structure)
        shape: list[tuple[int, int, float, float, float]] = []
        if not structure:
            shape.append((0, 0, 1.0, 0.0, 1.0))
        elif len(structure) == 1:
            d = structure[0]
            e = self._acceptance[(d, self.top)].prefix()
            shape = [(g, 0, 1.0 + e[g], self._draft_seconds(d, g) + over, g + 1.0) for g in self.gammas]
        else:
            b, m = structure
            m_a, m_b = self.line(m)
            for d, per_gamma in self._gathering(b, m):
                step = self._draft_seconds(b, d) + m_a + m_b * (d + 1)
                shape += [(g, d, tokens, steps * step + over, rows) for g, steps, tokens, rows in per_gamma]
        self._shapes[structure] = (key, shape)
        return shape

    def _gathering(self, b: str, m: str) -> list[tuple[int, list[tuple[int, float, float, float]]]]:
        """Bottom b -> middle m -> top, from acceptance alone: per draft_gamma d, per gamma g, (g, expected middle
        steps, expected tokens of the cycle, expected rows of the top's pass); see the module for the model."""
        key = (self._acceptance[(b, m)].version, self._acceptance[(m, self.top)].version)
        cached = self._gatherings.get((b, m))
        if cached is not None and cached[0] == key:
            return cached[1]
        rates = self._acceptance[(b, m)].rates()
        e_top = self._acceptance[(m, self.top)].prefix()
        gammas, gmax = set(self.gammas), self.gammas[-1]
        out = []
        for d in self.draft_gammas:
            py, survive = [], 1.0  # py[k]: P(a middle step yields k + 1 tokens)
            for k in range(d):
                py.append(survive * (1.0 - rates[k]))
                survive *= rates[k]
            py.append(survive)
            r = [1.0] + [0.0] * (gmax - 1)  # r[n]: P(the gathered count ever equals n)
            # tail[n][j]: over the steps from n that yield >= j + 1 tokens, sums of P * (tokens the top accepts
            # of all gathered, all gathered)
            tail: list[list[tuple[float, float]]] = []
            for n in range(gmax):
                if n:
                    r[n] = sum(r[n - k - 1] * py[k] for k in range(min(d + 1, n)))
                tokens = count = 0.0
                row = [(0.0, 0.0)] * (d + 1)
                for k in range(d, -1, -1):
                    tokens += py[k] * e_top[n + k + 1]
                    count += py[k] * (n + k + 1)
                    row[k] = (tokens, count)
                tail.append(row)
            per_gamma, steps = [], 0.0
            for g in range(1, gmax + 1):
                steps += r[g - 1]
                if g in gammas:
                    tokens = count = 0.0
                    for n in range(max(0, g - d - 1), g):
                        t, c = tail[n][g - n - 1]
                        tokens += r[n] * t
                        count += r[n] * c
                    per_gamma.append((g, steps, 1.0 + tokens, count + 1.0))
            out.append((d, per_gamma))
        self._gatherings[(b, m)] = (key, out)
        return out

    def options(self, structure: tuple[str, ...]) -> list[Option]:
        """Every (gamma, draft_gamma, expected tokens, expected seconds) of one cycle of `structure`."""
        top_a, top_b = self.line(self.top)
        fixed = top_a + self._overhead[self.top] + self.outside(structure)
        return [(g, d, tokens, below + fixed + top_b * rows) for g, d, tokens, below, rows in self._shape(structure)]

    def estimate(self, levels: tuple[str, ...], gamma: int = 0, draft_gamma: int = 0) -> tuple[float, float]:
        """(expected tokens, expected seconds) of one cycle of `levels` with these gammas."""
        for g, d, tokens, seconds in self.options(tuple(levels)):
            if (g, d) == ((gamma, draft_gamma) if levels else (0, 0)):
                return tokens, seconds
        raise ValueError(f"({gamma}, {draft_gamma}) is not on the grid of {levels}")

    def _best(self, structure: tuple[str, ...]) -> tuple[tuple[float, Option], tuple[float, Option]]:
        """(expected tokens per second, option) of the structure's best option, and of its best cheap one
        (gamma <= probe_gamma, draft_gamma <= PROBE_DRAFT_GAMMA) for probing (the best if none is cheap)."""
        top_a, top_b = self.line(self.top)
        fixed = top_a + self._overhead[self.top] + self.outside(structure)
        best = cheap = (-1.0, (0, 0, 0.0, 0.0))
        for g, d, tokens, below, rows in self._shape(structure):
            seconds = below + fixed + top_b * rows
            tps = tokens / seconds if seconds > 0 else math.inf
            if tps > best[0]:
                best = (tps, (g, d, tokens, seconds))
            if tps > cheap[0] and g <= self.probe_gamma and d <= PROBE_DRAFT_GAMMA:
                cheap = (tps, (g, d, tokens, seconds))
        return best, (cheap if cheap[0] >= 0 else best)

    # -- planning ----------------------------------------------------------------------------------------------
    def plan(self, context_len: int, lookup_has_match: bool | None = None, sequences: int = 1) -> Plan:
        """What the next cycle runs. context_len: tokens in the context now (recorded; the cost fits follow the
        context through their decay). lookup_has_match: whether prompt lookup has a proposal now (False rules
        out structures with lookup at the bottom; None: unknown, allowed). sequences: how many sequences share
        the passes (a batch); costs are per sequence as observed, so it is recorded only, for now."""
        self._close_cycle()
        self.cycle += 1
        self.context_len, self.sequences = context_len, sequences
        available = [s for s in self.structures if lookup_has_match is not False or self.lookup not in s]
        best = {s: self._best(s) for s in available}  # structure -> (best, cheap), each (tps, option)
        exploit = max(available, key=lambda s: best[s][0][0])
        if exploit and () in best and best[exploit][0][0] < (1 + self.plain_margin) * best[()][0][0]:
            exploit = ()
        exploit_tps = best[exploit][0][0]
        chosen, probe, warmup = exploit, False, False

        unexplored = [s for s in available if s not in self._ran]
        last = self.current
        if self.warmup and unexplored and exploit in self._ran:
            chosen, probe, warmup = unexplored[0], True, True
        elif not self.warmup or not unexplored:  # without warm-up, an unexplored structure is the stalest
            plain_s = self.cost(self.top, 1)
            if (last is not None and last.probe and last.levels and last.levels != exploit
                    and last.levels in best and self._last_tokens > self._probe_expected
                    and self._streak < STREAK_PROBES and self.credit >= -STREAK_DEBT_STEPS * plain_s):
                chosen, probe = last.levels, True  # the last probe did better than expected: look again
            elif self.cycle - self._last_probe >= self.probe_every and len(available) > 1:
                stalest = max((s for s in available if s != exploit), key=self._staleness)
                _, (_, _, tokens, seconds) = best[stalest][1]
                loss = seconds - tokens / exploit_tps
                if self.credit >= min(loss, CREDIT_STEPS * plain_s):
                    chosen, probe = stalest, True

        tps, (g, d, tokens, seconds) = best[chosen][1 if probe else 0]
        if not probe and self.hysteresis and last is not None and not last.probe and last.levels in best:
            # keep the last choice unless the best beats it clearly: estimates wobble from cycle to cycle,
            # and chasing each wobble is what makes a plan worse than any fixed one
            kept_tokens, kept_seconds = self.estimate(last.levels, last.gamma, last.draft_gamma)
            if kept_seconds > 0 and kept_tokens / kept_seconds >= (1 - self.hysteresis) * tps:
                chosen, g, d, tokens, seconds = last.levels, last.gamma, last.draft_gamma, kept_tokens, kept_seconds
                tps = tokens / seconds
        plan = Plan(chosen, g, d, probe, tps)
        self._streak = self._streak + 1 if probe and self.current is not None and self.current.probe else 0
        if probe:
            self._last_probe = self.cycle
            self._probes += 1
            self._probe_expected = tokens
        self.current, self._warmup, self._exploit_tps = plan, warmup, exploit_tps
        self._ran.add(chosen)
        self._runs[chosen] = self._runs.get(chosen, 0) + 1
        self._verifier = {n: (chosen + (self.top,))[i + 1] for i, n in enumerate(chosen)}
        if chosen:
            knobs = {"gamma": g, "draft_gamma": d} if len(chosen) == 2 else {"gamma": g}
            for knob, value in knobs.items():
                counts = self._histogram.setdefault(chosen, {}).setdefault(knob, {})
                counts[value] = counts.get(value, 0) + 1
        self._set_thresholds(plan, seconds / tokens)
        return plan

    def _staleness(self, structure: tuple[str, ...]) -> int:
        parts = _pairs(structure, self.top) if structure else ["plain"]
        return self.cycle - min(self._last_seen.get(p, -(10**9)) for p in parts)

    def _close_cycle(self) -> None:
        """Account the cycle that just ended: probe credit, and overheads of the levels it ran."""
        plan = self.current
        if plan is None:
            return
        seconds, tokens = self._cycle_seconds, max(1, self._cycle_tokens)
        w = self.cost_decay
        plain_s = self.cost(self.top, 1)
        if self._cycle_wall is not None:
            # bookkeeping that costs more than a whole decoding step is a stall (another process, a page
            # fault storm), not the structure's price: counted whole, one stall would rule a structure out
            outside = min(max(0.0, self._cycle_wall - seconds), plain_s)
            seconds = max(seconds, self._cycle_wall)
            mean = self._outside[plan.levels]
            mean[0], mean[1] = w * mean[0] + outside, w * mean[1] + 1.0
            self._cycle_wall = None
        self._last_tokens = tokens
        if plan.probe and not self._warmup:
            self.credit -= seconds - tokens / self._exploit_tps
        elif not plan.probe:
            self.credit = min(self.credit + self.probe_budget * seconds, CREDIT_STEPS * plain_s)
        for level in (*plan.levels, self.top):
            self._overhead[level] = w * self._overhead[level] + (1 - w) * self._cycle_overhead.get(level, 0.0)
        self._cycle_seconds, self._cycle_tokens, self._cycle_overhead = 0.0, 0, {}

    # -- stopping to draft -------------------------------------------------------------------------------------
    def _set_thresholds(self, plan: Plan, seconds_per_token: float) -> None:
        """Per running level, the survival probability below which drafting one more token does not pay, for
        each number of tokens already drafted (see the module)."""
        self._thresholds, self._survive = {}, {}
        self._per_call = dict(zip(plan.levels, plan.gammas))
        if plan.plain:
            return
        value = {self.top: seconds_per_token}
        extra: dict[str, float] = {}
        if len(plan.levels) == 2:
            b, m = plan.levels
            m_a, m_b = self.line(m)
            step = self._draft_seconds(b, plan.draft_gamma) + m_a + m_b * (plan.draft_gamma + 1)
            value[m] = extra[m] = step / (1.0 + self._acceptance[(b, m)].prefix()[plan.draft_gamma])
        for level in plan.levels:
            verifier = self._verifier[level]
            a, b = self.line(level)
            draft = extra.get(level, b if level == self.lookup else a + b)
            cost = draft + self.line(verifier)[1]
            rates = self._acceptance[(level, verifier)].rates()
            self._thresholds[level] = [
                cost / (value[verifier] * rates[k]) if rates[k] > 0 else math.inf for k in range(1, len(rates))
            ]

    def threshold(self, level: str, position: int) -> float:
        """The survival probability `level`'s drafts need after its `position`-th token for one more to pay
        (0 when `level` does not run under the current plan)."""
        thresholds = self._thresholds.get(level)
        if not thresholds:
            return 0.0
        return thresholds[min(max(position, 1), len(thresholds)) - 1]

    def should_continue(self, level: str, position: int, drafter_prob: float) -> bool:
        """Whether `level`, having just drafted (or gathered) its `position`-th token (1, 2, ...) of this run,
        whose own probability was `drafter_prob`, should draft one more. Keep that token either way. False
        once the plan's count for the level (gamma, or draft_gamma for a bottom under a middle) is reached; a
        level the plan does not run is never stopped. drafter_prob must be the drafting level's own
        probability of its token, never the verifier's."""
        thresholds = self._thresholds.get(level)
        if not thresholds:
            return True
        if position >= self._per_call[level]:
            return False
        chance = self._acceptance[(level, self._verifier[level])].calibrated(drafter_prob)
        survive = chance if position <= 1 else self._survive.get(level, 1.0) * chance
        self._survive[level] = survive
        go = survive >= self.threshold(level, position)
        if not go:
            self._stops[level] = self._stops.get(level, 0) + 1
        return go

    # -- statistics --------------------------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """Figures of the generation so far (JSON-ready): cycles, the fraction that ran plain decoding, probes,
        cycles per structure ("ngram>target-retrieval>target"), per structure histograms of the gammas chosen
        ("gamma_histogram": {structure: {"gamma": {"4": cycles}, "draft_gamma": {"2": cycles}}}), early stops by
        should_continue per level, cost estimates per level (ms per pass at 1 and at 8 rows, passes seen: 0 means
        a prior), acceptance estimates per drafter>verifier and position, the seconds per cycle outside passes
        per structure run ("outside_ms"), the expected speed-up of the best
        option over plain decoding at the last plan, and the context length then."""
        cycles = sum(self._runs.values())
        plain_s = self.cost(self.top, 1)
        return {
            "cycles": cycles,
            "plain_fraction": round(self._runs.get((), 0) / cycles, 4) if cycles else 0.0,
            "probes": self._probes,
            "structures": {_name(s, self.top): n for s, n in sorted(self._runs.items(), key=lambda x: -x[1])},
            "gamma_histogram": {_name(s, self.top): {knob: {str(k): n for k, n in sorted(h.items())}
                                                     for knob, h in knobs.items()}
                                for s, knobs in self._histogram.items()},
            "early_stops": dict(self._stops),
            "cost_ms": {level: {"at_1_row": round(1000 * self.cost(level, 1), 3),
                                "at_8_rows": round(1000 * self.cost(level, 8), 3),
                                "passes": c.passes}
                        for level, c in self._costs.items()},
            "acceptance": {f"{d}>{v}": [round(a, 3) for a in acc.rates()[: self.gammas[-1]]]
                           for (d, v), acc in self._acceptance.items() if acc.verifications},
            "outside_ms": {_name(s, self.top): round(1000 * self.outside(s), 3) for s in self._runs},
            "expected_speedup": round(self._exploit_tps * plain_s, 3) if cycles else None,
            "context_len": self.context_len,
        }

    def summary_sentence(self) -> str:
        """The report in one sentence."""
        r = self.report()
        if not r["cycles"]:
            return "Adaptive speculation planned no cycle."
        top = max(self._runs.items(), key=lambda x: x[1])[0]
        most = "plain decoding" if not top else _name(top, self.top)
        for knob, counts in self._histogram.get(top, {}).items():
            usual = max(counts, key=counts.__getitem__)
            most += f"{' at' if knob == 'gamma' else ','} {knob.replace('_', ' ')} {usual}"
        return (f"Adaptive speculation over {r['cycles']} cycles ran plain decoding in {100 * r['plain_fraction']:.0f}%"
                f" of them ({r['probes']} probes), most often {most}; at the end its best option promised "
                f"{r['expected_speedup']:.2f}x plain decoding.")


def _pairs(structure: tuple[str, ...], top: str) -> list[tuple[str, str]]:
    """(drafter, verifier) of each running level of a structure."""
    chain = (*structure, top)
    return [(chain[i], chain[i + 1]) for i in range(len(structure))]


def _name(structure: tuple[str, ...], top: str) -> str:
    return ">".join((*structure, top))
