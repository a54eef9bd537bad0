"""Reading scenario YAML safely: a duplicate key is an error naming both lines, and alias expansion is bounded.

`yaml.safe_load` takes the last of two equal keys silently, and expands aliases without limit: a file of
nine nested aliases ("billion laughs") becomes billions of nodes once anything walks it. Here the
document is composed first, its size with every alias expanded is counted on the node graph (shared
nodes counted once per use, in linear time), and only a document under MAX_EXPANDED_NODES is built.
"""

from __future__ import annotations

from typing import Any

import yaml

from testbed.core.errors import TestbedError

MAX_EXPANDED_NODES = 100_000
"""Nodes a scenario may have with every alias expanded: far above any real scenario (lowband has ~80)."""


class ScenarioYamlError(TestbedError):
    """The text is not a scenario document we will build (bad YAML, a duplicate key, an alias bomb)."""


class _ScenarioLoader(yaml.SafeLoader):
    """SafeLoader whose mappings refuse a key given twice."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = first_line.get(key)
            except TypeError:  # an unhashable key: SafeLoader says so itself
                break
            if first is not None:
                raise ScenarioYamlError(f"line {line}: key {str(key)[:80]!r} is given twice (first on line {first}); "
                                        "keep one")
            first_line[key] = line
        return super().construct_mapping(node, deep=deep)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _expanded_size(root: yaml.Node) -> int:
    """Nodes of the document with every alias expanded (a shared node counts once per place it is used).

    Post-order without recursion (a deep document must not hit Python's recursion limit); a node that
    contains itself through an alias is an error.
    """
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if children_done:
            open_nodes.discard(id(node))
            total = 1 + sum(sizes[id(child)] for child in _children(node))
            sizes[id(node)] = min(total, MAX_EXPANDED_NODES + 1)
            continue
        if id(node) in sizes:
            continue
        if id(node) in open_nodes:
            raise ScenarioYamlError(f"line {node.start_mark.line + 1}: an alias refers to a value that contains it")
        open_nodes.add(id(node))
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node))
    return sizes[id(root)]


def load_scenario_yaml(text: str) -> Any:
    """The one YAML document in `text` as Python data; ScenarioYamlError saying where it is wrong otherwise."""
    try:
        loader = _ScenarioLoader(text)  # the reader refuses non-printable characters already here
    except yaml.YAMLError as error:
        raise ScenarioYamlError(f"not valid YAML: {str(error).splitlines()[0]}") from None
    try:
        try:
            root = loader.get_single_node()
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise ScenarioYamlError(f"not valid YAML: {where}{problem}") from None
        if root is None:
            return None
        if _expanded_size(root) > MAX_EXPANDED_NODES:
            raise ScenarioYamlError(f"the document expands (through its aliases) to more than {MAX_EXPANDED_NODES:,} "
                                    "values; a scenario is far smaller: write it out without nested aliases")
        try:
            return loader.construct_document(root)
        except yaml.YAMLError as error:
            raise ScenarioYamlError(f"not valid YAML: {str(error).splitlines()[0]}") from None
    finally:
        loader.dispose()
