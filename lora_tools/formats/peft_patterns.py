"""``rank_pattern``/``alpha_pattern`` keys that every supported PEFT version resolves to the same rank and alpha.

PEFT gives a module ``rank_pattern.get(key, r)`` and ``alpha_pattern.get(key, lora_alpha)``, where ``key`` is the
first pattern key, in order, that matches the module's name, or the name itself when none does. The match rule
changed over time (facts read from PEFT's source, v0.10.0 to v0.21.2):

- 0.10-0.13 (``LoraModel._create_and_replace``): one search over the rank keys followed by the alpha keys with
  ``re.match(rf".*\\.{key}$", name)``; the key found is then looked up in *both* dicts.
- 0.14 (``utils.other.get_pattern_key``): the same regex, searched separately for each dict.
- 0.15 and later: ``re.match(rf"(.*\\.)?({key})$", name)``, searched separately for each dict.

The old regex needs a dot before the key, so a full module name (or an escaped one) never matches there as a
regex; a plain full name still works through the fallback lookup, but only when no other key matched first.
Proper dotted suffixes (``layers.3.mlp.down_proj``, ``down_proj``) match under both rules.

Keys are chosen on the tree of dotted suffixes of the module names: a key at a suffix covers every module below it,
keys are written deepest first so that the first match is the most specific one, and a small dynamic programme
places as few keys as possible (``down_proj: 2`` for thirty layers, with exceptions listed before it). Rank and
alpha share one key list, which makes the 0.10-0.13 combined search agree with the separate ones; entries that
change nothing are then pruned. Every module is finally resolved with each rule before anything is written.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

Value = tuple[int, float]  # (rank, alpha) of one module
_INFEASIBLE = 10**9
_OTHER = ("other",)  # an inherited value that no module of the subtree has


@lru_cache(maxsize=4096)  # verification tries each key on many names: compile it once
def _compiled(template: str, key: str) -> re.Pattern[str] | None:
    try:
        return re.compile(template.replace("KEY", key))
    except re.error:
        return None  # PEFT would raise; an unusable pattern matches nothing here


def matches_new(key: str, name: str) -> bool:
    r"""PEFT >= 0.15: ``re.match(rf"(.*\.)?({key})$", name)``, the key ends the name at a dot or is all of it."""
    pattern = _compiled(r"(.*\.)?(KEY)$", key)
    return pattern is not None and pattern.match(name) is not None


def matches_old(key: str, name: str) -> bool:
    r"""PEFT 0.10-0.14: ``re.match(rf".*\.{key}$", name)``; the key must follow a dot, so never the whole name."""
    pattern = _compiled(r".*\.KEY$", key)
    return pattern is not None and pattern.match(name) is not None


def get_pattern_key(pattern_keys: list[str], module_name: str) -> str | None:
    """PEFT >= 0.15's rule, as the reader applies it: the first key (in order) that matches, or None."""
    return next((key for key in pattern_keys if matches_new(key, module_name)), None)


def first_key(keys: list[str], name: str, match: Callable[[str, str], bool]) -> str:
    """The first key that matches, else the name itself (PEFT then looks the name up in the dict)."""
    return next((key for key in keys if match(key, name)), name)


def resolve(rule: str, config: Mapping[str, Any], name: str) -> Value:
    """The (rank, alpha) that ``rule`` (a key of ``RULES``) gives module ``name`` under a LoraConfig dict."""
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    if rule == COMBINED_RULE:
        key = first_key(list(rank_pattern) + list(alpha_pattern), name, matches_old)
        return rank_pattern.get(key, config["r"]), alpha_pattern.get(key, config["lora_alpha"])
    match = RULES[rule]
    return (rank_pattern.get(first_key(list(rank_pattern), name, match), config["r"]),
            alpha_pattern.get(first_key(list(alpha_pattern), name, match), config["lora_alpha"]))


COMBINED_RULE = "PEFT 0.10-0.13"  # one search over rank keys then alpha keys, looked up in both dicts
NEWEST_RULE = "PEFT >= 0.15"
# PEFT versions -> the match function each one applies to a pattern key.
RULES: dict[str, Callable[[str, str], bool]] = {
    COMBINED_RULE: matches_old, "PEFT 0.14": matches_old, NEWEST_RULE: matches_new,
}


@dataclass
class Patterns:
    """What ``choose_patterns`` writes; ``old_peft_mismatches`` lists what PEFT < 0.15 would get wrong."""

    r: int
    lora_alpha: float
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    old_peft_mismatches: list[str] = field(default_factory=list)

    def as_config(self) -> dict[str, Any]:
        return {"r": self.r, "lora_alpha": self.lora_alpha, "rank_pattern": self.rank_pattern,
                "alpha_pattern": self.alpha_pattern}


def mismatches(config: Mapping[str, Any], targets: Mapping[str, Value], rules: list[str] | None = None
               ) -> list[str]:
    """'rule: module gets rank .., alpha ..; wants ..' for every module that a rule resolves wrongly."""
    found = []
    for rule in rules or list(RULES):
        for name, want in targets.items():
            got = resolve(rule, config, name)
            if (got[0], float(got[1])) != (want[0], float(want[1])):
                found.append(f"{rule}: {name} gets rank {got[0]}, alpha {got[1]:g}; wants {want[0]}, {want[1]:g}")
    return found


class _Verifier:
    """``mismatches`` for patterns whose keys come from one ordered list, exact and fast.

    Which keys match which module (regex semantics of each rule) is computed once; a key's last segment is
    literal, so only names ending with it are tried. Resolving a module is then a walk over the few keys that
    match it, and pruning can re-verify every module after each removal.
    """

    def __init__(self, keys: list[str], names: list[str]) -> None:
        by_tail: dict[str, list[str]] = {}
        anywhere: list[str] = []  # keys whose last segment holds regex syntax: tried against every name
        for key in keys:
            tail = key.replace("\\", "").rsplit(".", 1)[-1]
            (by_tail.setdefault(tail, []) if re.escape(tail) == tail else anywhere).append(key)
        order = {key: i for i, key in enumerate(keys)}
        self.matching: dict[tuple[Callable[[str, str], bool], str], list[str]] = {}
        for name in names:
            tried = anywhere + [k for tail, group in by_tail.items() if name.endswith(tail) for k in group]
            tried.sort(key=order.__getitem__)
            for match in (matches_old, matches_new):
                self.matching[match, name] = [key for key in tried if match(key, name)]

    def mismatches(self, patterns: Patterns, targets: Mapping[str, Value], rules: list[str]) -> list[str]:
        """As ``mismatches``, for patterns whose dicts keep the order of the key list (true while pruning)."""
        rank_pattern, alpha_pattern = patterns.rank_pattern, patterns.alpha_pattern
        found = []
        for rule in rules:
            for name, want in targets.items():
                matching = self.matching[RULES[rule], name]
                rank_key = next((key for key in matching if key in rank_pattern), None)
                alpha_key = next((key for key in matching if key in alpha_pattern), None)
                if rule == COMBINED_RULE:  # the rank keys are searched first, and the key found serves both
                    rank_key = alpha_key = rank_key or alpha_key
                got = (rank_pattern.get(rank_key or name, patterns.r),
                       alpha_pattern.get(alpha_key or name, patterns.lora_alpha))
                if (got[0], float(got[1])) != (want[0], float(want[1])):
                    found.append(f"{rule}: {name} gets rank {got[0]}, alpha {got[1]:g}; "
                                 f"wants {want[0]}, {want[1]:g}")
        return found


class _Node:
    """One dotted suffix of some module names (``segments``), with the suffixes one segment longer below it."""

    def __init__(self, segments: tuple[str, ...]) -> None:
        self.segments = segments
        self.children: dict[str, _Node] = {}
        self.module: str | None = None  # the module whose full name is this suffix
        self.values: set[Value] = set()  # values of every module at or below this node


def _build_tree(targets: Mapping[str, Value]) -> _Node:
    root = _Node(())
    for name, value in targets.items():
        parts = tuple(name.split("."))
        node = root
        root.values.add(value)
        for start in range(len(parts) - 1, -1, -1):
            node = node.children.setdefault(parts[start], _Node(parts[start:]))
            node.values.add(value)
        node.module = name
    return root


class _Chain:
    """Suffix nodes that cover the same modules, collapsed: a key anywhere on it means the same thing."""

    def __init__(self, top: _Node) -> None:
        nodes = [top]
        while nodes[-1].module is None and len(nodes[-1].children) == 1:
            nodes.append(next(iter(nodes[-1].children.values())))
        bottom = nodes[-1]
        self.module = bottom.module
        self.values = bottom.values
        self.children = [_Chain(child) for child in bottom.children.values()]
        # A proper suffix of the module's name matches it under both rules; the full name only through PEFT's
        # fallback lookup in 0.10-0.14, which an ancestor's key pre-empts. Prefer a key that does not start
        # with a layer number ("layers.3.mlp.down_proj" over "3.mlp.down_proj").
        proper = nodes[:-1] if bottom.module is not None else nodes
        self.full_name_only = not proper
        candidates = proper or nodes
        readable = [n for n in candidates if not n.segments[0].isdigit()]
        self.key = ".".join((readable or candidates)[0].segments)


class _Planner:
    """Fewest keys such that every module resolves to its value; ``strict`` also demands it of PEFT < 0.15."""

    def __init__(self, targets: Mapping[str, Value], strict: bool) -> None:
        self.targets = targets
        self.strict = strict
        self.memo: dict[tuple[int, Any, bool], tuple[int, Value | None]] = {}

    def best(self, chain: _Chain, inherited: Any, keyed_above: bool) -> tuple[int, Value | None]:
        """(keys needed, value to key this chain with or None) given what PEFT resolves here without a key."""
        if inherited not in chain.values:
            inherited = _OTHER
        memo_key = (id(chain), inherited, keyed_above)
        if memo_key in self.memo:
            return self.memo[memo_key]
        want = self.targets[chain.module] if chain.module is not None else None
        choice: tuple[int, Value | None] = (_INFEASIBLE, None)
        if want is None or want == inherited:
            choice = (self._below(chain, inherited, keyed_above), None)
        for value in sorted(chain.values, key=_value_order):
            if value == inherited:
                continue  # a key repeating the inherited value changes nothing
            if want is not None and want != value:
                continue
            if want is not None and chain.full_name_only and self.strict and keyed_above:
                continue  # PEFT < 0.15 resolves this module through the key above, never its full name
            cost = 1 + self._below(chain, value, True)
            if cost < choice[0]:
                choice = (cost, value)
        self.memo[memo_key] = choice
        return choice

    def _below(self, chain: _Chain, inherited: Any, keyed_above: bool) -> int:
        return min(_INFEASIBLE, sum(self.best(child, inherited, keyed_above)[0] for child in chain.children))

    def keys(self, chain: _Chain, inherited: Any, keyed_above: bool, out: list[tuple[_Chain, Value]]) -> None:
        _, value = self.best(chain, inherited, keyed_above)
        if value is not None:
            out.append((chain, value))
            inherited, keyed_above = value, True
        for child in chain.children:
            self.keys(child, inherited, keyed_above, out)


def _value_order(value: Value) -> tuple[int, float]:
    return (-value[0], -value[1])


def _plan(targets: Mapping[str, Value], strict: bool, escape: bool) -> Patterns | None:
    root = _build_tree(targets)
    top = [_Chain(child) for child in root.children.values()]
    planner = _Planner(targets, strict)
    counts = Counter(targets.values())
    # The default (r, lora_alpha) is the one needing fewest keys; ties go to the commonest, then the larger rank.
    costs = {d: sum(planner.best(chain, d, False)[0] for chain in top) for d in counts}
    default = min(costs, key=lambda d: (costs[d], -counts[d], _value_order(d)))
    if costs[default] >= _INFEASIBLE:
        return None
    chosen: list[tuple[_Chain, Value]] = []
    for chain in top:
        planner.keys(chain, default, False, chosen)
    # Deepest first: a longer suffix must be tried before the shorter one that also matches it.
    chosen.sort(key=lambda item: (-item[0].key.count("."), item[0].key))
    # Escaping stops a key's dots matching other characters; a full-name key stays plain under the old rule,
    # where only PEFT's lookup of the name itself (an exact dict key) can find it.
    keyed = [(re.escape(chain.key) if escape and not (strict and chain.full_name_only) else chain.key, value)
             for chain, value in chosen]
    return Patterns(r=default[0], lora_alpha=default[1], rank_pattern={k: v[0] for k, v in keyed},
                    alpha_pattern={k: v[1] for k, v in keyed})


def _prune(patterns: Patterns, targets: Mapping[str, Value], rules: list[str], verifier: _Verifier) -> None:
    """Drop entries that change nothing (e.g. rank entries equal to ``r`` when only alpha differs).

    Tried all at once first (the common case: one of the two dicts is redundant as a whole), then one by one.
    """
    for attr in ("rank_pattern", "alpha_pattern"):
        table: dict[str, Any] = getattr(patterns, attr)
        default = patterns.r if attr == "rank_pattern" else patterns.lora_alpha
        # Only an entry repeating the default or a shorter key's value can be redundant.
        candidates = [key for key, value in table.items() if value == default or any(
            key.endswith("." + other) and table[other] == value for other in table if other != key)]
        setattr(patterns, attr, {k: v for k, v in table.items() if k not in candidates})
        if not verifier.mismatches(patterns, targets, rules):
            continue
        setattr(patterns, attr, table)
        for key in candidates:
            table = getattr(patterns, attr)
            setattr(patterns, attr, {k: v for k, v in table.items() if k != key})
            if verifier.mismatches(patterns, targets, rules):
                setattr(patterns, attr, table)


def choose_patterns(targets: Mapping[str, Value]) -> Patterns:
    """``r``, ``lora_alpha`` and pattern dicts giving each module its (rank, alpha) under every PEFT rule.

    Plain dotted names first; regex-escaped ones if a plain name's dots (regex wildcards) would match another
    module. When no set of keys works for PEFT < 0.15 (names ending one another at dots, each with its own
    value, e.g. ``a``, ``x.a`` and ``y.x.a`` with three ranks), the keys are right for PEFT >= 0.15 and
    ``old_peft_mismatches`` says which modules older versions would get wrong.
    """
    if not targets:
        raise ValueError("no modules to write patterns for")
    every = list(RULES)
    for strict, rules in ((True, every), (False, [NEWEST_RULE])):
        for escape in (False, True):
            patterns = _plan(targets, strict=strict, escape=escape)
            if patterns is None:
                continue
            # Exact regex semantics of each rule, every module, before anything is written.
            verifier = _Verifier(list(patterns.rank_pattern), list(targets))
            if not verifier.mismatches(patterns, targets, rules):
                _prune(patterns, targets, rules, verifier)
                patterns.old_peft_mismatches = verifier.mismatches(patterns, targets, every[:-1])
                return patterns
    # Escaped keys match exactly the modules below them under PEFT >= 0.15, so this is not reached.
    raise ValueError("no rank_pattern/alpha_pattern reproduces these ranks")
