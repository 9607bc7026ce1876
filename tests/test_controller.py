"""The adaptive-speculation controller against a simulated chain: true pass costs and per-position acceptance are
known functions, a cycle is simulated the way the chain runs it (drafts, passes, accept/reject), and the
controller sees only what the chain would tell it."""

from __future__ import annotations

import json
import random
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from triforce.controller import TOP, Controller, PassCost, Plan

MS = 1e-3
MIDDLE = "target-retrieval"


def top_cost(rows: int, context: int = 16_384) -> float:
    """The target at `context` tokens on this CPU: ~20 ms for one row, 7 rows ~1.8 steps (compute-bound)."""
    per_row = 2.7 * MS * context / 16_384
    return 20 * MS - per_row + per_row * rows


@dataclass
class World:
    """True costs (seconds of a pass: level -> f(rows, context)) and acceptance ((drafter, verifier) -> f(position),
    the chance of accepting the draft at a 1-based position given the earlier ones were accepted)."""

    accept: dict[tuple[str, str], Callable[[int], float]]
    costs: dict[str, Callable[[int, int], float]] = field(default_factory=dict)
    lookup: str = "ngram"
    outside: dict[tuple[str, ...], float] = field(default_factory=dict)  # seconds per cycle outside the passes

    def __post_init__(self) -> None:
        defaults = {TOP: top_cost, MIDDLE: lambda r, c: 12 * MS + 0.5 * MS * r,
                    "draft": lambda r, c: 2 * MS + 0.1 * MS * r, "ngram": lambda r, c: 0.05 * MS}
        self.costs = {**defaults, **self.costs}

    def rate(self, pair: tuple[str, str], position: int) -> float:
        return self.accept[pair](position)

    def draft_cost(self, level: str, tokens: int, context: int = 16_384) -> float:
        if level == self.lookup:
            return self.costs[level](tokens, context)
        return tokens * self.costs[level](1, context)


def flat(rate: float) -> Callable[[int], float]:
    return lambda position: rate


# -- the expected-value model, written independently of the controller: gathering paths enumerated ----------------
def accepted_distribution(rate: Callable[[int], float], n: int) -> list[float]:
    """P(exactly k of n drafts accepted), k = 0..n."""
    probs, survive = [], 1.0
    for i in range(1, n + 1):
        probs.append(survive * (1 - rate(i)))
        survive *= rate(i)
    return probs + [survive]


def mean_accepted(rate: Callable[[int], float], n: int) -> float:
    return sum(k * p for k, p in enumerate(accepted_distribution(rate, n)))


def expected(levels: tuple[str, ...], g: int, d: int, rate: Callable[[tuple[str, str], int], float],
             cost: Callable[[str, int], float], draft_cost: Callable[[str, int], float]) -> tuple[float, float]:
    """(tokens, seconds) of one cycle, by enumerating the middle's gathering paths."""
    if not levels:
        return 1.0, cost(TOP, 1)
    if len(levels) == 1:
        drafter = levels[0]
        return 1 + mean_accepted(lambda i: rate((drafter, TOP), i), g), draft_cost(drafter, g) + cost(TOP, g + 1)
    b, m = levels
    step_outcomes = accepted_distribution(lambda i: rate((b, m), i), d)
    final: dict[int, float] = defaultdict(float)
    steps, frontier = 0.0, {0: 1.0}
    while frontier:
        nxt: dict[int, float] = defaultdict(float)
        for n, p in frontier.items():
            steps += p
            for k, pk in enumerate(step_outcomes):
                (final if n + k + 1 >= g else nxt)[n + k + 1] += p * pk
        frontier = nxt
    tokens = 1 + sum(p * mean_accepted(lambda i: rate((m, TOP), i), G) for G, p in final.items())
    seconds = steps * (draft_cost(b, d) + cost(m, d + 1)) + sum(p * cost(TOP, G + 1) for G, p in final.items())
    return tokens, seconds


def grid(c: Controller, lookup_has_match: bool | None = True) -> list[tuple[tuple[str, ...], int, int]]:
    out = []
    for s in c.structures:
        if lookup_has_match is False and "ngram" in s:
            continue
        if not s:
            out.append(((), 0, 0))
        elif len(s) == 1:
            out += [(s, g, 0) for g in c.gammas]
        else:
            out += [(s, g, d) for g in c.gammas for d in c.draft_gammas]
    return out


def brute_force(c: Controller, rate: Callable, cost: Callable, draft_cost: Callable,
                lookup_has_match: bool | None = True) -> dict[tuple[tuple[str, ...], int, int], float]:
    """Expected tokens per second of every option on the controller's grid."""
    out = {}
    for option in grid(c, lookup_has_match):
        tokens, seconds = expected(*option, rate, cost, draft_cost)
        out[option] = tokens / seconds
    return out


def controller_view(c: Controller) -> tuple[Callable, Callable, Callable]:
    """The controller's estimates as (rate, cost, draft_cost) for `expected`."""
    def rate(pair: tuple[str, str], i: int) -> float:
        return c.acceptance(*pair)[i - 1]

    def draft_cost(level: str, n: int) -> float:
        return c.cost(level, n) if level == c.lookup else n * c.cost(level, 1)

    return rate, c.cost, draft_cost


def world_view(w: World, context: int = 16_384) -> tuple[Callable, Callable, Callable]:
    return w.rate, lambda level, rows: w.costs[level](rows, context), lambda lv, n: w.draft_cost(lv, n, context)


def key(plan: Plan) -> tuple[tuple[str, ...], int, int]:
    return plan.levels, plan.gamma, plan.draft_gamma


# -- the simulated chain ------------------------------------------------------------------------------------------
class Deaf:
    """Hears a simulated chain and keeps nothing."""

    def observe_pass(self, *args: object) -> None:
        pass

    def observe_verification(self, *args: object) -> None:
        pass


def run_cycle(c: Controller | Deaf, w: World, plan: Plan, rng: random.Random,
              context: int = 16_384) -> tuple[int, float]:
    """One cycle as the chain runs it; the controller hears every pass and verification. (tokens, seconds)."""
    seconds = 0.0

    def run(level: str, rows: int) -> None:
        nonlocal seconds
        t = w.costs[level](rows, context)
        c.observe_pass(level, rows, t)
        seconds += t

    def draft(level: str, n: int) -> None:
        if level == w.lookup:
            run(level, n)
        else:
            for _ in range(n):
                run(level, 1)

    def judge(pair: tuple[str, str], n: int) -> int:
        k = 0
        while k < n and rng.random() < w.rate(pair, k + 1):
            k += 1
        return k

    if plan.plain:
        run(TOP, 1)
        return 1, seconds
    if len(plan.levels) == 1:
        (d,) = plan.levels
        draft(d, plan.gamma)
        run(TOP, plan.gamma + 1)
        k = judge((d, TOP), plan.gamma)
        c.observe_verification(d, plan.gamma, k)
        return k + 1, seconds
    b, m = plan.levels
    gathered = 0
    while gathered < plan.gamma:
        draft(b, plan.draft_gamma)
        run(m, plan.draft_gamma + 1)
        k = judge((b, m), plan.draft_gamma)
        c.observe_verification(b, plan.draft_gamma, k)
        gathered += k + 1
    run(TOP, gathered + 1)
    k = judge((m, TOP), gathered)
    c.observe_verification(m, gathered, k)
    return k + 1, seconds


def simulate(c: Controller, w: World, cycles: int, seed: int = 0, context: Callable[[int], int] = lambda i: 16_384,
             match: Callable[[int], bool] = lambda i: True,
             tell_cycles: bool = False) -> list[tuple[Plan, bool, int, float]]:
    """(plan, lookup had a match, tokens, seconds) of each cycle; tell_cycles: report each cycle's wall time
    (passes plus the world's time outside them) as the chain does."""
    rng = random.Random(seed)
    out = []
    for i in range(cycles):
        ctx, has_match = context(i), match(i)
        plan = c.plan(ctx, lookup_has_match=has_match)
        tokens, seconds = run_cycle(c, w, plan, rng, ctx)
        seconds += w.outside.get(plan.levels, 0.0)
        if tell_cycles:
            c.observe_cycle(seconds)
        out.append((plan, has_match, tokens, seconds))
    return out


def throughput(cycles: list[tuple[Plan, bool, int, float]]) -> float:
    return sum(x[2] for x in cycles) / sum(x[3] for x in cycles)


# -- the model ----------------------------------------------------------------------------------------------------
def test_the_closed_form_is_the_enumerated_model_and_matches_a_monte_carlo_chain():
    """The controller's expected tokens and seconds per cycle equal the enumeration over gathering paths for
    every option, and a simulated accept/reject chain with the same rates and costs averages to them."""
    c = Controller((("ngram", "draft"), MIDDLE))
    rng = random.Random(1)
    # uneven estimates: per-position rates that differ, costs at several row counts
    for _ in range(60):
        for level, rows in ((TOP, 1), (TOP, 6), (MIDDLE, 3), (MIDDLE, 1), ("draft", 1), ("ngram", 4)):
            c.observe_pass(level, rows, World({}).costs[level](rows, 16_384) * rng.uniform(0.9, 1.1))
        c.observe_verification("draft", 4, rng.choice([0, 1, 2, 4]), verifier=MIDDLE)
        c.observe_verification("ngram", 4, rng.choice([0, 3, 4, 4]), verifier=MIDDLE)
        c.observe_verification(MIDDLE, 8, rng.choice([1, 5, 7, 8]), verifier=TOP)
        c.observe_verification("draft", 8, rng.choice([0, 1, 3]), verifier=TOP)
        c.observe_verification("ngram", 8, rng.choice([0, 6, 8]), verifier=TOP)
    view = controller_view(c)
    for option in grid(c):
        tokens, seconds = c.estimate(*option)
        want_tokens, want_seconds = expected(*option, *view)
        assert tokens == pytest.approx(want_tokens, rel=1e-9) and seconds == pytest.approx(want_seconds, rel=1e-9)

    rate, cost, draft_cost = view
    acc = {pair: (lambda i, p=pair: rate(p, i)) for pair in c._acceptance}
    world = World(acc, costs={lv: (lambda r, ctx, lv=lv: cost(lv, r)) for lv in (TOP, MIDDLE, "draft", "ngram")})
    for option in [(("draft", MIDDLE), 5, 2), (("ngram", MIDDLE), 3, 4), ((MIDDLE,), 4, 0), (("draft",), 6, 0)]:
        n = 6000
        results = [run_cycle(Deaf(), world, Plan(*option), rng) for _ in range(n)]  # `c` must not change
        for j, want in enumerate(c.estimate(*option)):  # tokens, seconds: within 4 standard errors
            values = [r[j] for r in results]
            mean = sum(values) / n
            error = (sum((v - mean) ** 2 for v in values) / (n - 1) / n) ** 0.5
            assert abs(mean - want) <= 4 * error + 1e-12, (option, j, mean, want, error)


@pytest.mark.parametrize("name, accept, costs", [
    ("sampling: the middle at 0.75", {(MIDDLE, TOP): flat(0.75), ("ngram", MIDDLE): flat(0.6),
                                      ("ngram", TOP): flat(0.5)}, {}),
    ("greedy: the middle at 0.95", {(MIDDLE, TOP): flat(0.95), ("ngram", MIDDLE): flat(0.7),
                                    ("ngram", TOP): flat(0.65)}, {}),
    ("cheap rows (a GPU)", {(MIDDLE, TOP): flat(0.85), ("ngram", MIDDLE): flat(0.6), ("ngram", TOP): flat(0.55)},
     {TOP: lambda r, c: 20 * MS + 0.05 * MS * r}),
    ("acceptance falling with position", {(MIDDLE, TOP): lambda i: 0.95 - 0.06 * i,
                                          ("ngram", MIDDLE): lambda i: 0.9 / i, ("ngram", TOP): lambda i: 0.8 / i},
     {}),
])
def test_plan_is_the_best_option_of_the_grid(name, accept, costs):
    """After the cycles a generation would run, plan() takes the option the enumerated model finds best under the
    controller's estimates; under the true costs and rates that option is within 5% of the best, and the cycles
    run (probes and estimation noise included) within 10% of always running the best."""
    w = World(accept, costs)
    c = Controller(("ngram", MIDDLE))
    cycles = simulate(c, w, 400, seed=2)
    plan = c.plan(16_384, lookup_has_match=True)
    while plan.probe:  # no observation in between: the estimates stay, and probes are not repeated
        plan = c.plan(16_384, lookup_has_match=True)
    estimated = brute_force(c, *controller_view(c))
    assert estimated[key(plan)] == pytest.approx(max(estimated.values()), rel=1e-9)
    assert key(plan) == max(estimated, key=estimated.get)
    truth = brute_force(c, *world_view(w))
    best = max(truth.values())
    assert truth[key(plan)] >= 0.95 * best, (name, key(plan), max(truth, key=truth.get))
    assert throughput(cycles[100:]) >= 0.9 * best


# -- turning speculation off, and on again ------------------------------------------------------------------------
def test_a_drafter_that_is_never_right_costs_at_most_3_percent_of_plain_decoding():
    """Prompt lookup and the middle level never right: after the warm-up the controller decodes plainly (but
    right after a probe, when a weak record still favours the nearly free lookup); over 1000 cycles, probes
    and warm-up included, it runs at >= 0.97x plain decoding."""
    w = World({(MIDDLE, TOP): flat(0.0), ("ngram", MIDDLE): flat(0.0), ("ngram", TOP): flat(0.0)})
    c = Controller(("ngram", MIDDLE))
    cycles = simulate(c, w, 1000, seed=3)
    assert throughput(cycles) >= 0.97 / top_cost(1)
    assert c.report()["plain_fraction"] >= 0.9
    chosen = [p for p, *_ in cycles[20:] if not p.probe]
    assert sum(p.plain for p in chosen) >= 0.98 * len(chosen)


def test_time_outside_the_passes_counts_against_the_structure_that_spends_it():
    """A draft model worth 1.3x plain decoding by its passes alone, but whose cycles spend 15 ms more outside
    them (sampling, verification, bookkeeping), which makes it 0.85x at best: told each cycle's wall time, the
    controller learns that time and decodes plainly; not told, it keeps speculating at a loss."""
    w = World({("draft", TOP): flat(0.6)}, outside={("draft",): 15 * MS})

    def plain_share(cycles: list) -> float:
        chosen = [p for p, *_ in cycles[100:] if not p.probe]
        return sum(p.plain for p in chosen) / len(chosen)

    told, deaf = Controller(("draft",), warmup=False), Controller(("draft",), warmup=False)
    heard = simulate(told, w, 500, seed=5, tell_cycles=True)
    unheard = simulate(deaf, w, 500, seed=5)
    assert plain_share(heard) >= 0.9 and plain_share(unheard) <= 0.1
    assert throughput(heard[100:]) >= 0.97 / top_cost(1) > throughput(unheard[100:])
    assert told.outside(("draft",)) == pytest.approx(15 * MS, rel=1e-6)
    assert told.report()["outside_ms"]["draft>target"] == pytest.approx(15, rel=1e-3)


def test_one_stall_outside_the_passes_does_not_rule_a_structure_out():
    """A draft worth ~1.5x plain decoding whose first cycle stalls 300 ms outside its passes (a page fault
    storm, another process): the stall counts as at most one decoding step, and the draft is soon chosen."""
    w = World({("draft", TOP): flat(0.8)})
    c = Controller(("draft",), warmup=False)
    stalled = {"first": True}
    rng = random.Random(3)
    cycles = []
    for _ in range(300):
        plan = c.plan(16_384)
        tokens, seconds = run_cycle(c, w, plan, rng, 16_384)
        if plan.levels and stalled.pop("first", False):
            seconds += 300 * MS
        c.observe_cycle(seconds)
        cycles.append((plan, True, tokens, seconds))
    assert not stalled  # the draft ran, and stalled
    chosen = [p for p, *_ in cycles[100:] if not p.probe]
    assert sum(not p.plain for p in chosen) >= 0.9 * len(chosen)
    assert c.outside(("draft",)) < 2 * MS


def test_speculation_must_beat_plain_decoding_by_the_margin():
    """With estimates that promise speculation 0.5-4.5% over plain decoding, a controller without a margin
    speculates and one with a 5% margin decodes plainly; with estimates promising more, both speculate."""
    def fed(hits: int, trials: int, margin: float) -> Controller:
        c = Controller(("draft",), warmup=False, probe_every=10**6, plain_margin=margin)
        for i in range(trials):
            for rows in (1, 2, 3):
                c.observe_pass(TOP, rows, top_cost(rows))
            c.observe_pass("draft", 1, 2.1 * MS)
            c.observe_verification("draft", 1, int(i < hits), verifier=TOP)
        return c

    def gain(c: Controller) -> float:
        tps = brute_force(c, *controller_view(c))
        return max(v for k, v in tps.items() if k[0]) / tps[((), 0, 0)]

    def chosen(c: Controller) -> Plan:
        plan = c.plan(16_384)
        while plan.probe:  # no observation in between: the estimates stay, and probes are not repeated
            plan = c.plan(16_384)
        return plan

    trials = 60
    slight = [h for h in range(trials + 1) if 1.005 < gain(fed(h, trials, 0.0)) < 1.045]
    assert slight, "no acceptance on the grid gives a slight gain"
    assert not chosen(fed(slight[0], trials, 0.0)).plain
    assert chosen(fed(slight[0], trials, 0.05)).plain
    assert gain(fed(trials, trials, 0.0)) > 1.3 and not chosen(fed(trials, trials, 0.05)).plain
    with pytest.raises(ValueError, match="plain_margin"):
        Controller(("draft",), plain_margin=1.0)
    with pytest.raises(ValueError, match="seconds"):
        Controller(("draft",)).observe_cycle(-1.0)


def test_a_drafter_that_gets_good_is_found_within_60_cycles():
    """The draft model is never right for 410 cycles (speculation off), then right 90% of the time: probing
    finds it, and within 60 cycles of the change the controller speculates in every non-probe cycle."""
    def rate(i: int) -> float:
        return 0.9 if state["cycle"] >= 410 else 0.0

    state = {"cycle": 0}
    w = World({("draft", TOP): rate})
    c = Controller(("draft",))
    rng = random.Random(4)
    chosen = []
    for i in range(700):
        state["cycle"] = i
        plan = c.plan(16_384)
        run_cycle(c, w, plan, rng)
        chosen.append(plan)
    assert all(p.plain for p in chosen[100:400] if not p.probe)
    found = next(i for i in range(410, 700) if all(not p.plain for p in chosen[i:700] if not p.probe))
    assert found - 410 <= 60, found
    assert throughput_of_plans(chosen[found:], w) > 1.5 / top_cost(1)


def throughput_of_plans(plans: list[Plan], w: World) -> float:
    tokens = seconds = 0.0
    for p in plans:
        t, s = expected(p.levels, p.gamma, p.draft_gamma, *world_view(w))
        tokens, seconds = tokens + t, seconds + s
    return tokens / seconds


# -- costs that move with the context -----------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [5, 6])
def test_gamma_shrinks_as_the_top_cost_per_row_grows_with_the_context(seed):
    """The top's cost per row grows with the context (attention over more keys, compute-bound), so a verified
    row gets dearer than a drafted token and the best gamma falls; the controller follows the brute force of
    the true costs at the context it plans for (within one step of gamma)."""
    def top(rows: int, context: int) -> float:  # 7 rows: 1.1 steps at 1K, 1.9 at 20K, 2.1 at 32K
        return 15 * MS + 0.3e-6 * context + (0.05 * MS + 0.17e-6 * context) * rows

    w = World({("draft", TOP): flat(0.85)}, {TOP: top, "draft": lambda rows, context: 1 * MS})
    c = Controller(("draft",))
    contexts = [1_000 + 31 * i for i in range(1000)]
    cycles = simulate(c, w, 1000, seed=seed, context=lambda i: contexts[i])

    def best_gamma(context: int) -> int:
        truth = brute_force(c, *world_view(w, context))
        return max(truth, key=truth.get)[1]

    start, end = best_gamma(contexts[150]), best_gamma(contexts[-1])
    assert end < start  # the model's own prediction
    chosen_start = Counter(p.gamma for p, *_ in cycles[100:200] if not p.probe).most_common(1)[0][0]
    chosen_end = Counter(p.gamma for p, *_ in cycles[900:] if not p.probe).most_common(1)[0][0]
    assert abs(chosen_start - start) <= 1 and abs(chosen_end - end) <= 1, (start, chosen_start, end, chosen_end)
    assert chosen_end < chosen_start


def test_the_cost_fit_recovers_a_line_and_forgets_old_passes():
    fit = PassCost(prior_ratio=1.0, prior_slope=0.1, decay=0.97)
    for i in range(200):
        rows = 1 + i % 8
        fit.observe(rows, 0.010 + 0.002 * rows)
    a, b = fit.line()
    assert a == pytest.approx(0.010, rel=0.01) and b == pytest.approx(0.002, rel=0.01)
    for i in range(300):  # the context grew: every pass got 50% dearer
        rows = 1 + i % 8
        fit.observe(rows, 1.5 * (0.010 + 0.002 * rows))
    a, b = fit.line()
    assert a == pytest.approx(0.015, rel=0.01) and b == pytest.approx(0.003, rel=0.01)
    lone = PassCost(prior_ratio=1.0, prior_slope=0.1, decay=0.97)
    for _ in range(50):  # rows never vary: the slope is the prior's fraction of the intercept
        lone.observe(1, 0.02)
    a, b = lone.line()
    assert a + b == pytest.approx(0.02) and b == pytest.approx(0.1 * a)


# -- stopping to draft --------------------------------------------------------------------------------------------
def calibrated_controller(draft_ms: float = 2.0, top_row_ms: float = 2.7, top_ms: float = 20.0) -> Controller:
    """A draft model -> top controller whose drafts are accepted with probability equal to the drafter's own
    probability (a calibrated drafter: confident 70% of the time, anything otherwise), planned for one cycle."""
    c = Controller(("draft",), probe_every=10**9)
    rng = random.Random(6)
    for i in range(400):
        q = rng.uniform(0.85, 1.0) if rng.random() < 0.7 else rng.random()
        c.observe_pass("draft", 1, draft_ms * MS)
        c.observe_pass(TOP, 1 + i % 8, (top_ms - top_row_ms) * MS + top_row_ms * MS * (1 + i % 8))
        c.observe_verification("draft", 1, int(rng.random() < q), [q], verifier=TOP)
    for _ in range(3):  # past the warm-up
        plan = c.plan(16_384)
    assert plan.levels == ("draft",) and not plan.probe
    return c


def test_drafting_stops_below_the_derived_threshold_and_goes_on_above():
    c = calibrated_controller()
    assert c.current.gamma >= 3
    threshold = c.threshold("draft", 1)
    assert 0.1 < threshold < 0.9
    chance = c._acceptance[("draft", TOP)].calibrated
    assert chance(0.97) == pytest.approx(0.97, abs=0.05) and chance(0.05) < 0.3  # learnt from the outcomes
    assert c.should_continue("draft", 1, 0.97)
    assert not c.should_continue("draft", 1, 0.05)
    assert c.report()["early_stops"] == {"draft": 1}
    # what is compared is the chance that every draft so far survives: a second shaky draft stops where the
    # first did not
    q = next(q / 100 for q in range(100, 0, -1) if chance(q / 100) ** 2 < c.threshold("draft", 2))
    assert chance(q) >= threshold
    assert c.should_continue("draft", 1, q) and not c.should_continue("draft", 2, q)
    # at the plan's gamma it stops, without counting an early stop
    assert not c.should_continue("draft", c.current.gamma, 1.0)
    assert c.report()["early_stops"] == {"draft": 2}
    # a level that does not run under the plan is never stopped
    assert c.should_continue(TOP, 1, 0.0)


def test_the_threshold_rises_with_the_cost_of_drafting_and_of_verifying_rows_and_falls_with_the_top_step():
    base = calibrated_controller().threshold("draft", 1)
    assert calibrated_controller(draft_ms=6.0).threshold("draft", 1) > base
    assert calibrated_controller(top_row_ms=5.0).threshold("draft", 1) > base
    assert calibrated_controller(top_ms=60.0, top_row_ms=2.7).threshold("draft", 1) < base


def test_stopping_keeps_the_simulated_chain_at_least_as_fast():
    """With a calibrated drafter, the chain that asks should_continue is not slower than the one that drafts
    the full gamma."""
    w = World({("draft", TOP): flat(0.5)})

    def run(stop: bool) -> float:
        c = Controller(("draft",))
        rng = random.Random(7)
        tokens = seconds = 0.0
        for _ in range(1500):
            plan = c.plan(16_384)
            if plan.plain:
                t, s = run_cycle(c, w, plan, rng)
            else:
                qs, s = [], 0.0
                for i in range(plan.gamma):
                    s += w.costs["draft"](1, 0)
                    c.observe_pass("draft", 1, w.costs["draft"](1, 0))
                    qs.append(rng.random())
                    if stop and not c.should_continue("draft", i + 1, qs[-1]):
                        break
                k = 0
                while k < len(qs) and rng.random() < qs[k]:
                    k += 1
                s += top_cost(len(qs) + 1)
                c.observe_pass(TOP, len(qs) + 1, top_cost(len(qs) + 1))
                c.observe_verification("draft", len(qs), k, qs)
                t = k + 1
            tokens, seconds = tokens + t, seconds + s
        return tokens / seconds

    assert run(stop=True) >= 0.99 * run(stop=False)


# -- the hybrid bottom --------------------------------------------------------------------------------------------
def test_a_hybrid_bottom_uses_lookup_when_it_matches_and_the_draft_model_otherwise():
    w = World({("ngram", MIDDLE): flat(0.9), ("ngram", TOP): flat(0.85), ("draft", MIDDLE): flat(0.75),
               ("draft", TOP): flat(0.7), (MIDDLE, TOP): flat(0.8)})
    for has_match in (True, False):  # the world itself: lookup best when it matches, the draft model otherwise
        truth = brute_force(Controller((("ngram", "draft"), MIDDLE)), *world_view(w), lookup_has_match=has_match)
        assert max(truth, key=truth.get)[0][0] == ("ngram" if has_match else "draft")
    c = Controller((("ngram", "draft"), MIDDLE))
    pattern = random.Random(8)
    matches = [pattern.random() < 0.5 for _ in range(600)]
    cycles = simulate(c, w, 600, seed=8, match=lambda i: matches[i])
    for plan, has_match, *_ in cycles:
        assert has_match or "ngram" not in plan.levels
    late = [(p, m) for p, m, *_ in cycles[100:] if not p.probe]
    assert all(p.bottom == "ngram" for p, m in late if m)
    assert all(p.bottom == "draft" for p, m in late if not m)
    acceptance = c.report()["acceptance"]
    assert acceptance["ngram>target"][0] > acceptance["draft>target"][0]


# -- the rest of the interface ------------------------------------------------------------------------------------
def test_report_has_the_documented_keys_and_sane_values():
    w = World({(MIDDLE, TOP): flat(0.8), ("ngram", MIDDLE): flat(0.6), ("ngram", TOP): flat(0.5)})
    c = Controller(("ngram", MIDDLE))
    assert c.summary_sentence()  # before any cycle too
    cycles = simulate(c, w, 200, seed=9)
    r = json.loads(json.dumps(c.report()))
    assert set(r) == {"cycles", "plain_fraction", "probes", "structures", "gamma_histogram", "early_stops",
                      "cost_ms", "acceptance", "outside_ms", "expected_speedup", "context_len"}
    assert set(r["outside_ms"]) == set(r["structures"]) and not any(r["outside_ms"].values())  # no cycle told
    assert r["cycles"] == 200 == sum(r["structures"].values())
    assert r["plain_fraction"] == pytest.approx(sum(p.plain for p, *_ in cycles) / 200, abs=1e-4)
    assert 0 < r["probes"] < 200
    for name, knobs in r["gamma_histogram"].items():
        assert sum(knobs["gamma"].values()) == r["structures"][name]
        assert ("draft_gamma" in knobs) == (name.count(">") == 2)
        if "draft_gamma" in knobs:
            assert sum(knobs["draft_gamma"].values()) == r["structures"][name]
    assert "target" not in r["gamma_histogram"]  # plain decoding has no gamma
    assert set(r["cost_ms"]) == {TOP, "ngram", MIDDLE}
    for costs in r["cost_ms"].values():
        assert 0 < costs["at_1_row"] <= costs["at_8_rows"] and costs["passes"] > 0
    assert r["cost_ms"][TOP]["at_1_row"] == pytest.approx(20.0, rel=0.05)
    assert all(0 < a < 1 for rates in r["acceptance"].values() for a in rates)
    assert max(r["structures"], key=r["structures"].get) == "ngram>target"  # the best here (1.38x)
    assert r["acceptance"]["ngram>target"][0] == pytest.approx(0.5, abs=0.12)
    assert r["expected_speedup"] > 1
    sentence = c.summary_sentence()
    assert sentence.endswith(".") and sentence.count(". ") == 0 and "200 cycles" in sentence


def test_before_any_observation_it_explores_each_structure_once_then_trusts_its_estimates():
    c = Controller(("ngram", MIDDLE), probe_every=10**9)
    seen = [c.plan(1000).levels for _ in range(4)]
    assert sorted(seen) == sorted(c.structures)
    assert not c.plan(1000).probe


def test_plan_gammas_are_the_chains_and_bad_input_is_refused():
    assert Plan(("ngram", MIDDLE), 6, 2).gammas == [2, 6]
    assert Plan((MIDDLE,), 4).gammas == [4] and Plan().gammas == [] and Plan().plain
    assert Plan(("draft", MIDDLE), 6, 2).bottom == "draft"
    c = Controller(("ngram", MIDDLE))
    with pytest.raises(ValueError):
        c.observe_pass("draft", 1, 0.01)
    with pytest.raises(ValueError):
        c.observe_verification(MIDDLE, 2, 3, verifier=TOP)
    with pytest.raises(ValueError):
        Controller(("a", "b", "c"))
    with pytest.raises(ValueError):
        Controller(("a", ("b", "c")))
    assert all(Controller(()).plan(10).plain for _ in range(3))


def test_an_overhead_of_a_level_counts_in_its_structures():
    c = Controller(("ngram", MIDDLE))
    c.plan(1000)
    before = c.estimate((MIDDLE,), 4)[1]
    c.current = Plan((MIDDLE,), 4)
    for _ in range(200):
        c.observe_overhead(MIDDLE, 0.005)
        c._close_cycle()
        c.current = Plan((MIDDLE,), 4)
    assert c.estimate((MIDDLE,), 4)[1] == pytest.approx(before + 0.005, rel=0.01)
    assert c.estimate(("ngram",), 4)[1] < before


def test_plan_is_cheap():
    """A decoding step is 10-20 ms: planning (the full grid of a hybrid three-level chain) stays far below."""
    w = World({(MIDDLE, TOP): flat(0.8), ("ngram", MIDDLE): flat(0.6), ("ngram", TOP): flat(0.5),
               ("draft", MIDDLE): flat(0.6), ("draft", TOP): flat(0.5)})
    c = Controller((("ngram", "draft"), MIDDLE))
    rng = random.Random(10)
    spent = 0.0
    for _ in range(500):
        t0 = time.perf_counter()
        plan = c.plan(16_384, lookup_has_match=True)
        spent += time.perf_counter() - t0
        run_cycle(c, w, plan, rng)
    assert spent / 500 < 500e-6  # measured ~50 us on this machine; the bound leaves room for a busy CI host


def test_without_warmup_the_priors_decide_first_and_probes_try_the_rest():
    """warmup=False: the first plan is the priors' best; the structures never run are probed (the
    stalest first) as the probe budget allows, so each has run within a few probe intervals."""
    ctl = Controller(("ngram", "target-retrieval"), warmup=False, probe_every=4, probe_budget=0.2)
    first = ctl.plan(1000, lookup_has_match=True)
    assert not first.probe and first.levels == max(
        ctl.structures, key=lambda s: ctl._best(s)[0][0])
    seen: dict[tuple[str, ...], int] = {}
    for cycle in range(1000):
        plan = ctl.plan(1000, lookup_has_match=True)
        seen.setdefault(plan.levels, cycle)
        for level in plan.levels:
            ctl.observe_pass(level, 1, 0.002 if level == "ngram" else 0.012)
        if len(plan.levels) == 2:
            ctl.observe_verification("ngram", plan.draft_gamma, plan.draft_gamma // 2)
        if plan.levels:
            ctl.observe_verification(plan.levels[-1], plan.gamma, plan.gamma // 2)
        ctl.observe_pass("target", plan.gamma + 1, 0.02 + 0.002 * plan.gamma)
    assert set(seen) == set(ctl.structures) and max(seen.values()) < 500


def test_hysteresis_keeps_a_choice_within_the_margin():
    """With a margin, the plan sticks to the last option while it stays within the margin of the
    best, instead of flipping on each wobble of the estimates."""
    def run(hysteresis: float) -> int:
        ctl = Controller(("target-retrieval",), warmup=False, probe_every=10**6, hysteresis=hysteresis)
        flips, last = 0, None
        for i in range(300):
            plan = ctl.plan(1000)
            if last is not None and (plan.gamma, plan.levels) != last:
                flips += 1
            last = (plan.gamma, plan.levels)
            if plan.levels:
                for _ in range(plan.gamma):
                    ctl.observe_pass("target-retrieval", 1, 0.006 * (1 + 0.05 * ((i * 7) % 5 - 2)))
                accepted = sum(1 for k in range(plan.gamma) if (i * 13 + k * 7) % 10 < 9)
                ctl.observe_verification("target-retrieval", plan.gamma, min(accepted, plan.gamma))
            ctl.observe_pass("target", plan.gamma + 1, 0.02 + 0.002 * plan.gamma)
        return flips

    assert run(0.05) < run(0.0)


def test_a_dearer_row_prior_plans_shorter_verifications_until_passes_say_otherwise():
    """row_slope is the prior cost per extra row (kernels differ: 0.1 of a step on AVX512-BF16,
    0.5 on AVX2): before any pass, a dearer row makes the first plan gather fewer tokens per
    verification, or decode plainly; bad values are refused."""
    cheap = Controller(("ngram", "target-retrieval"), warmup=False, row_slope=0.1).plan(1000, lookup_has_match=True)
    dear = Controller(("ngram", "target-retrieval"), warmup=False, row_slope=0.5).plan(1000, lookup_has_match=True)
    assert cheap.levels and cheap.gamma > 1
    assert dear.plain or dear.gamma < cheap.gamma
    assert Controller(("ngram",), row_slope=0.5)._costs[TOP].rho == 0.5
    with pytest.raises(ValueError, match="row_slope"):
        Controller(("ngram",), row_slope=-0.1)
