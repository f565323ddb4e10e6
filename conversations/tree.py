"""A conversation as a tree (issue 13): every message has a parent (the turn
before it, None for the first), versions of a message are siblings (same
parent, same role), and the active path runs from the root to the
conversation's active leaf. Pure Python over the rows of one conversation,
read in one query (Conversation.tree()), so that the ORM code stays small."""

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Node:
    id: Any
    parent_id: Any
    role: str


class Tree:
    def __init__(self, nodes: Iterable[Node]) -> None:
        """nodes oldest first: children and siblings keep that order."""
        self.nodes: dict[Any, Node] = {}
        self.children: dict[Any, list[Any]] = defaultdict(list)
        for node in nodes:
            self.add(node)

    def add(self, node: Node) -> None:
        self.nodes[node.id] = node
        self.children[node.parent_id].append(node.id)

    def __contains__(self, message_id: Any) -> bool:
        return message_id in self.nodes

    def path(self, leaf: Any) -> list[Any]:
        """The ids from the root down to leaf (none for None)."""
        path = []
        seen = set()
        while leaf is not None and leaf in self.nodes and leaf not in seen:
            # `seen`: a cycle cannot be made through our code, but a row
            # edited by hand must not hang a socket.
            seen.add(leaf)
            path.append(leaf)
            leaf = self.nodes[leaf].parent_id
        path.reverse()
        return path

    def siblings(self, message_id: Any) -> list[Any]:
        """The versions of a message, oldest first, itself included."""
        node = self.nodes[message_id]
        return [m for m in self.children[node.parent_id] if self.nodes[m].role == node.role]

    def newest_leaf_under(self, message_id: Any) -> Any:
        """The leaf that was written last among message_id and everything
        below it: where a switch to that message lands."""
        # A newer leaf may hang under an older child: look at them all (a
        # conversation is hundreds of messages, not millions). Descendants
        # are newer than message_id, so a leaf below always wins over it.
        order = {m: i for i, m in enumerate(self.nodes)}
        best, stack = message_id, [message_id]
        while stack:
            current = stack.pop()
            below = self.children.get(current, [])
            if not below and order[current] > order[best]:
                best = current
            stack.extend(below)
        return best

    def newest_leaf(self) -> Any:
        """The leaf written last in the whole conversation (None if empty)."""
        leaves = [m for m in self.nodes if not self.children.get(m)]
        return leaves[-1] if leaves else None
