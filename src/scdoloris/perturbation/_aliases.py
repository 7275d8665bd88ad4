"""Old and alternative gene symbols: screens and guide libraries keep names that HGNC has since changed.

The alias table is Bioconductor ``org.Hs.eg.db`` 3.16 (Artistic-2.0), bundled with the package:
150,059 (current symbol, alias) pairs of human genes, e.g. ``MARCHF1`` / ``MARCH1`` and
``SEPTIN7`` / ``SEPT7``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import lru_cache
from importlib import resources

import pandas as pd

ALIAS_FILE = "symbol_alias_human_orgHsEgDb_3.16.tsv.gz"


@lru_cache(maxsize=1)
def _alias_targets() -> tuple[dict[str, tuple[str, ...]], frozenset[str]]:
    """``{alias: current symbols it names}`` and the set of current symbols."""
    path = resources.files("scdoloris.datasets") / "data" / ALIAS_FILE
    with resources.as_file(path) as file:
        table = pd.read_csv(file, sep="\t", dtype=str)
    targets = table.groupby("alias_symbol")["symbol"].agg(lambda s: tuple(sorted(set(s))))
    return targets.to_dict(), frozenset(table["symbol"])


def symbol_candidates(name: str) -> tuple[str, ...]:
    """Current symbols ``name`` may stand for: itself when it is current, else those it is an alias of.

    Examples
    --------
    >>> from scdoloris.perturbation import symbol_candidates
    >>> symbol_candidates("MARCH1"), symbol_candidates("MARCHF1"), symbol_candidates("not-a-gene")
    (('MARCHF1',), ('MARCHF1',), ())
    """
    targets, current = _alias_targets()
    if name in current:
        return (name,)
    return targets.get(name, ())


def align_prior(
    prior: pd.DataFrame, names: Iterable[str], aliases: dict[str, str] | None = None
) -> tuple[pd.DataFrame, dict[str, str], dict[str, tuple[str, ...]]]:
    """Rename the prior's genes into the data's names where the data use an old or alternative symbol.

    A name absent from the prior whose symbol candidates hold exactly one gene of the prior, itself
    not among ``names``, takes that gene's place in the edge table (so ``MARCH1`` in a screen gets
    ``MARCHF1``'s GO neighbours). ``aliases`` (name -> prior symbol) already decided are applied
    first.

    Returns
    -------
    prior, aliases, ambiguous
        The renamed edge table; every name -> prior symbol mapping applied; names whose candidates
        hold several genes of the prior (left as they are).

    Examples
    --------
    >>> import pandas as pd
    >>> from scdoloris.perturbation import align_prior
    >>> prior = pd.DataFrame({"source": ["MARCHF1", "A"], "target": ["A", "B"], "weight": [1.0, 1.0]})
    >>> renamed, aliases, _ = align_prior(prior, ["MARCH1", "A", "B"])
    >>> renamed["source"].tolist(), aliases
    (['MARCH1', 'A'], {'MARCH1': 'MARCHF1'})
    """
    aliases = dict(aliases or {})
    known = set(prior["source"]) | set(prior["target"])
    names = list(dict.fromkeys(str(n) for n in names))
    taken = set(names) | set(aliases)
    ambiguous: dict[str, tuple[str, ...]] = {}
    for name in names:
        if name in known or name in aliases:
            continue
        in_prior = tuple(s for s in symbol_candidates(name) if s in known and s != name)
        if len(in_prior) == 1 and in_prior[0] not in taken and in_prior[0] not in aliases.values():
            aliases[name] = in_prior[0]
        elif len(in_prior) > 1:
            ambiguous[name] = in_prior
    if aliases:
        rename = {symbol: name for name, symbol in aliases.items()}
        prior = prior.assign(source=prior["source"].replace(rename), target=prior["target"].replace(rename))
    return prior, aliases, ambiguous


def resolve_names(names: Sequence[str], nodes: Sequence[str], aliases: dict[str, str]) -> dict[str, str]:
    """``{asked name: node}`` for names that are not nodes but name one under another symbol.

    A model trained on ``MARCH1`` (aliased to ``MARCHF1``) answers ``MARCHF1`` with its ``MARCH1``
    node, and the other way round.

    Examples
    --------
    >>> from scdoloris.perturbation import resolve_names
    >>> resolve_names(["MARCHF1", "A"], ["A", "MARCH1"], {"MARCH1": "MARCHF1"})
    {'MARCHF1': 'MARCH1'}
    >>> resolve_names(["MARCH1"], ["MARCHF1"], {})
    {'MARCH1': 'MARCHF1'}
    """
    node_set = set(nodes)
    if all(name in node_set for name in names):
        return {}
    by_symbol = {symbol: node for node, symbol in aliases.items() if node in node_set}
    for node in nodes:
        for symbol in symbol_candidates(node):
            by_symbol.setdefault(symbol, node)
    resolved = {}
    for name in names:
        if name in node_set:
            continue
        matches = {by_symbol[s] for s in symbol_candidates(name) if s in by_symbol}
        if len(matches) == 1:
            resolved[name] = matches.pop()
    return resolved
